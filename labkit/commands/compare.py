"""``labkit compare RUN RUN…``: runs of one experiment from different machines or backends side by
side (:mod:`labkit.compare`)."""

from __future__ import annotations

import json

from . import command


def _args(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids (or unique parts), or reference:KEY")
    p.add_argument("--baseline", metavar="RUN", help="the run the others are divided by (default: the first)")
    p.add_argument("--html", metavar="FILE", help="also write the charts, one per metric, to this HTML file")
    p.add_argument("--json", action="store_true", help="the facts, the shared points and the ratios as JSON")


@command("compare", "runs of one experiment from different machines or backends side by side, with ratios",
         _args, order=72)
def compare(args) -> int:
    from pathlib import Path

    from .. import compare as cmpmod

    cmp = cmpmod.compare(args.runs, args.baseline)
    if args.html:
        figs = [cmpmod.figure(cmp, m) for m in dict.fromkeys(cmp.table["metric"])]
        body = "".join(f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs))
        facts = cmp.facts.drop(columns=["label"]).to_html(index=False)
        Path(args.html).write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>labkit compare</title>"
                                   f"</head><body style='font-family:sans-serif'><h1>labkit compare</h1>{facts}"
                                   f"<pre>{cmpmod.text(cmp)}</pre>{body}</body></html>")
    if args.json:
        print(json.dumps({"baseline": cmp.baseline, "facts": cmp.facts.to_dict("records"),
                          "summary": cmpmod.summary(cmp).to_dict("records"),
                          "points": cmp.table.to_dict("records")}, indent=1, default=str))
        return 0
    print(cmpmod.text(cmp))
    if args.html:
        print(f"charts: {args.html}")
    return 0
