"""``labkit plan SPEC``: what ``labkit up SPEC`` would change, per machine, before it changes anything
(:func:`labkit.backends.hosts.plan`: on hosts labkit did not create, every change it makes there)."""

from __future__ import annotations

from . import command


def _args(p) -> None:
    p.add_argument("spec", help="YAML spec file")
    p.add_argument("--json", action="store_true", help="the changes as JSON: machine -> list of changes")
    p.add_argument("--inspect", action="store_true",
                   help="backend hosts: also log in to each host (read only) and say what would stop `up`")


@command("plan", "what `labkit up SPEC` would change on each machine, before it changes anything", _args, order=12)
def plan(args) -> int:
    import json

    from ..spec import load_spec

    spec = load_spec(args.spec)
    if spec.backend != "hosts":
        from .. import addressing

        p = addressing.plan(spec)
        where = "this machine" if spec.backend == "netns" else f"{len(spec.nodes)} VM(s) labkit makes"
        changes = {spec.backend: [f"everything on {where}, named with the lab's prefix {spec.prefix} and removed by "
                                  f"`labkit down {spec.name}`: nodes {', '.join(n.name for n in spec.nodes)}, "
                                  f"pods {', '.join(f'{q} ({pp.ip})' for q, pp in p.pods.items()) or 'none'}; the "
                                  "host's own interfaces, routes, rules and sysctls are not changed"]}
        problems: list[str] = []
    else:
        from ..backends import hosts

        changes = {f"{n} ({spec.inventory.hosts[n].ssh})": steps for n, steps in hosts.plan(spec).items()}
        changes["the network between the hosts (VPC) must route"] = hosts.vpc_routes(spec)
        problems = hosts.check_hosts(spec) if args.inspect else []
    if args.json:
        print(json.dumps({"changes": changes, "problems": problems}, indent=1))
    else:
        for where, steps in changes.items():
            print(f"{where}:")
            for step in steps:
                print(f"  - {step}")
        if args.inspect:
            print("problems: " + ("none: `labkit up` may go on" if not problems else ""))
            for prob in problems:
                print(f"  ! {prob}")
    return 1 if problems else 0
