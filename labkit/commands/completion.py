"""``labkit completion bash|zsh``: a shell completion script, made from the parser itself (every
command, every experiment and their flags), so it never falls behind the CLI."""

from __future__ import annotations

import argparse

from . import command


def _args(p) -> None:
    p.add_argument("shell", choices=("bash", "zsh"))


def tree(parser: argparse.ArgumentParser) -> dict[str, dict]:
    """``{command: {"flags": [...], "sub": {name: {...}}}}`` of ``parser``'s subcommands."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags = sorted(o for a in sub._actions for o in a.option_strings if o.startswith("--")
                               and a.help != argparse.SUPPRESS)
                out[name] = {"flags": flags, "sub": tree(sub)}
    return out


BASH = r"""# labkit completion for bash (labkit completion bash > /etc/bash_completion.d/labkit)
_labkit() {
  local cur=${COMP_WORDS[COMP_CWORD]} cmd=${COMP_WORDS[1]} sub=${COMP_WORDS[2]} words=""
  if [ "$COMP_CWORD" -eq 1 ]; then
    words="%(commands)s"
  else
    case "$cmd" in
%(cases)s
    esac
  fi
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -o default -F _labkit labkit
"""

ZSH = r"""#compdef labkit
# labkit completion for zsh (labkit completion zsh > "${fpath[1]}/_labkit")
autoload -U bashcompinit && bashcompinit
%(bash)s"""


def bash_script(parser: argparse.ArgumentParser) -> str:
    t = tree(parser)
    cases = []
    for name, node in t.items():
        if node["sub"]:
            inner = "\n".join(f'        {sub}) words="{" ".join(n["flags"])}" ;;' for sub, n in node["sub"].items())
            cases.append(f'      {name})\n        if [ "$COMP_CWORD" -eq 2 ]; then words="{" ".join(node["sub"])}"; '
                         f'else case "$sub" in\n{inner}\n        esac; fi ;;')
        else:
            cases.append(f'      {name}) words="{" ".join(node["flags"])}" ;;')
    return BASH % {"commands": " ".join(t), "cases": "\n".join(cases)}


@command("completion", "print a shell completion script: labkit completion bash|zsh", _args, order=120)
def completion(args) -> int:
    from ..cli import build_parser

    script = bash_script(build_parser())
    print(script if args.shell == "bash" else ZSH % {"bash": script})
    return 0
