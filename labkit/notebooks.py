"""The workshop notebooks' exercises: the self-check every notebook uses, and the two copies handed out.

An exercise is four cells in a row: a markdown question; the participant's answer cell
``eN = None  # your answer``; a code cell tagged ``solution`` that sets ``eN`` from the notebook's
own data when the ``solutions`` parameter is True; and a self-check cell calling :func:`self_check`
with a value computed from the same data, which says ✓ or gives a hint that does not state the
answer. CI runs every notebook with ``solutions=True``, so a wrong solution fails its notebook.

The participant's copy (:func:`participant_copy`) leaves the solution cells out; the instructor's
(:func:`instructor_copy`) keeps them and runs with ``solutions = True``. Both are written without
outputs, so nothing a run printed travels with them. ``labkit notebooks copy DEST [--instructor]``
is the command line for either.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Any

from .errors import UsageError

SOLUTION_TAG = "solution"
PARAMETERS_TAG = "parameters"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"  # the repo's (an editable install's)

_SOLUTIONS_LINE = re.compile(r"^solutions\s*=\s*[^#\n]*?(\s*#.*)?$", re.MULTILINE)

# name -> True (right), False (wrong) or None (not answered), in the order checked; one kernel, one notebook
_checked: dict[str, bool | None] = {}


# ---------------------------------------------------------------- notebook side

def matches(answer: Any, expected: Any, rel_tol: float = 0.02) -> bool:
    """Whether ``answer`` is ``expected``: floats within ``rel_tol`` (measurements are read off charts and
    rounded), words without regard to case or surrounding blanks, a set as the same members in any order."""
    if isinstance(expected, (set, frozenset)):
        try:
            return {_word(a) for a in answer} == {_word(e) for e in expected}
        except TypeError:  # a single value where a collection was asked for
            return False
    if isinstance(expected, str):
        return isinstance(answer, str) and _word(answer) == _word(expected)
    if isinstance(expected, float) and isinstance(answer, numbers.Real) and not isinstance(answer, bool):
        return math.isclose(answer, expected, rel_tol=rel_tol)
    return answer == expected


def _word(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def self_check(name: str, answer: Any, expected: Any, hint: str, solutions: bool = False,
               rel_tol: float = 0.02) -> bool | None:
    """Print ✓, or the hint (never ``expected``), for the participant's ``answer``; return whether it is
    right (None: not answered yet). With ``solutions`` true the answer came from the solution cell, and a
    wrong or missing one raises AssertionError: the notebook fails, as CI must see it.

    ``expected`` None: this run has no data to check against (its parameters left out what the exercise
    asks about); the check says so and is not counted."""
    if expected is None:
        print(f"– {name}: this run did not measure what it asks about (see the notebook's parameters)")
        return None
    if answer is None:
        _checked[name] = None
        print(f"… {name}: not answered yet. Hint: {hint}")
        assert not solutions, f"{name}: the solution cell left no answer"
        return None
    ok = matches(answer, expected, rel_tol)
    _checked[name] = ok
    print(f"✓ {name}: right" if ok else f"✗ {name}: not quite. Hint: {hint}")
    assert ok or not solutions, f"{name}: the solution says {answer!r}, the data {expected!r}"
    return ok


def counts() -> dict[str, int]:
    """How many self-checks this kernel ran, how many were right and how many are still unanswered."""
    return {"checked": len(_checked), "right": sum(v is True for v in _checked.values()),
            "unanswered": sum(v is None for v in _checked.values())}


def summary() -> None:
    """Print :func:`counts` as one line (a notebook's last exercise is followed by it)."""
    c = counts()
    print(f"self-checks: {c['right']}/{c['checked']} right, {c['unanswered']} not answered")


# ---------------------------------------------------------------- the exercises of a notebook

_ANSWER = re.compile(r"^e(\d+) = None\b")
_QUESTION = re.compile(r"\*\*Exercise (\d+)\.\*\*")


def exercises(nb) -> dict[int, dict[str, list[int]]]:
    """The cells of each exercise of notebook ``nb``, by number: ``{"question": [...], "answer": [...],
    "solution": [...], "check": [...]}``, lists of cell indexes (a well-formed exercise has one of each,
    in that order). A cell tagged ``solution`` that sets no answer is listed under number 0."""
    found: dict[int, dict[str, list[int]]] = {}

    def add(n: int, role: str, i: int) -> None:
        found.setdefault(n, {"question": [], "answer": [], "solution": [], "check": []})[role].append(i)

    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for m in _QUESTION.finditer(cell.source):
                add(int(m.group(1)), "question", i)
            continue
        if cell.cell_type != "code":
            continue
        if is_solution(cell):
            numbers = {int(n) for n in re.findall(r"^\s*e(\d+)\s*=(?!=)", cell.source, re.MULTILINE)}
            for n in numbers or {0}:
                add(n, "solution", i)
        elif m := _ANSWER.match(cell.source):
            add(int(m.group(1)), "answer", i)
        for n in re.findall(r"self_check\(\s*\"[^\"]*\",\s*e(\d+)\b", cell.source):
            add(int(n), "check", i)
    return found


# ---------------------------------------------------------------- the copies handed out

def is_solution(cell) -> bool:
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def participant_copy(src_dir: str | Path, dest_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every notebook of ``src_dir`` into ``dest_dir`` without its solution cells, with outputs
    cleared and ``solutions = False`` in its parameters cell; the written paths."""
    return _copy(src_dir, dest_dir, keep_solutions=False, overwrite=overwrite)


def instructor_copy(src_dir: str | Path, dest_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every notebook of ``src_dir`` into ``dest_dir`` with its solution cells, outputs cleared and
    ``solutions = True`` (a run fills in every answer); the written paths."""
    return _copy(src_dir, dest_dir, keep_solutions=True, overwrite=overwrite)


def _copy(src_dir: str | Path, dest_dir: str | Path, keep_solutions: bool, overwrite: bool) -> list[Path]:
    import nbformat

    src, dest = Path(src_dir), Path(dest_dir)
    sources = sorted(src.glob("*.ipynb"))
    if not sources:
        raise UsageError(f"{src}: no notebooks (*.ipynb) there to copy")
    targets = [dest / s.name for s in sources]
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} is a file: give a folder to write the notebooks into")
    there = [t.name for t in targets if t.exists()]
    if there and not overwrite:  # a participant's own work is never written over by accident
        raise UsageError(f"{dest} has {', '.join(there)} already: pick another folder, or replace them "
                         f"(--force)")
    dest.mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets):
        nb = nbformat.read(source, as_version=4)
        nb.cells = [c for c in nb.cells if keep_solutions or not is_solution(c)]
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
                if PARAMETERS_TAG in cell.metadata.get("tags", []):
                    cell.source = set_solutions(cell.source, keep_solutions)
        nb.metadata.pop("papermill", None)  # an executed source's parameters are not the handout's
        nbformat.write(nb, target)
    return targets


def set_solutions(source: str, value: bool) -> str:
    """A parameters cell's source with ``solutions = <value>`` (its comment kept); unchanged when the
    cell has no such line (a notebook without exercises)."""
    return _SOLUTIONS_LINE.sub(lambda m: f"solutions = {value}{m.group(1) or ''}", source, count=1)


__all__ = ["SOLUTION_TAG", "NOTEBOOKS", "matches", "self_check", "counts", "summary", "exercises", "is_solution", "participant_copy",
           "instructor_copy", "set_solutions"]
