"""The workshop notebooks' exercises and the two copies handed out (:mod:`labkit.notebooks`), without root.

Every exercise is a question, an answer cell, one solution cell and one self-check, in that order; the
participant's copy has no solution cell and none of their text, and runs without them (nothing a
later cell reads is defined only by a solution); the instructor's copy keeps them with
``solutions = True``; both are written without outputs; ``labkit notebooks copy`` writes either.
That each solution is right is tests/test_notebooks.py's part: it runs every notebook with
``solutions=True``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from labkit import notebooks as nbmod
from labkit.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
WORKSHOP = ["00-workshop", "01-lab-tour", "02-pod-network-modes", "03-service-scale", "04-network-policy"]
LABKIT = [sys.executable, "-m", "labkit.cli"]


def read(path: Path):
    return nbformat.read(path, as_version=4)


def code_lines(nb) -> set[str]:
    return {line.strip() for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()}


def parameters_cell(nb):
    return next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))


@pytest.fixture(scope="module")
def participant(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("participant")
    written = nbmod.participant_copy(ROOT / "notebooks", dest)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    return dest


# ---------------------------------------------------------------- the exercises in the sources

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_one_answer_solution_and_self_check_in_order(path):
    nb = read(path)
    found = nbmod.exercises(nb)
    assert 0 not in found, f"a solution cell that sets no eN: cells {found.get(0)}"
    if path.stem in WORKSHOP:
        assert len(found) >= 2, f"{path.stem} has {len(found)} exercises"
    assert sorted(found) == list(range(1, len(found) + 1)), sorted(found)  # numbered 1..K
    for n, cells in found.items():
        for role in ("question", "answer", "solution", "check"):
            assert len(cells[role]) == 1, f"exercise {n}: {len(cells[role])} {role} cells ({cells})"
        q, a, s, c = (cells[r][0] for r in ("question", "answer", "solution", "check"))
        assert q < a < s < c, f"exercise {n}: question, answer, solution, self-check out of order ({cells})"
        assert nb.cells[s].source.startswith("if solutions:"), f"exercise {n}: its solution runs unasked"
        assert nb.cells[a].source.startswith(f"e{n} = None  # your answer"), nb.cells[a].source
    if found:
        assert re.search(r"^solutions = False\b", parameters_cell(nb).source, re.MULTILINE)
        if any("from labkit.notebooks import" in c.source for c in nb.cells):  # then nothing shadows them
            shadowed = [c.source for c in nb.cells if c.cell_type == "code" and re.search(
                r"^(self_check|summary)\s*=|\bdef (self_check|summary)\b", c.source, re.MULTILINE)]
            assert not shadowed, f"a cell redefines labkit.notebooks' helpers: {shadowed}"
        last_check = max(cells["check"][0] for cells in found.values())
        assert any("summary()" in c.source for c in nb.cells[last_check + 1:] if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nothing_after_a_solution_needs_it(path):
    """What a solution cell defines besides its answer is read by no other cell: the participant's copy,
    which has no solution cells, runs the same."""
    nb = read(path)

    def names(source: str, ctx) -> set[str]:
        tree = ast.parse(source)
        out = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}
        if ctx is ast.Store:
            out |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
            out |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            out |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args}
        return out

    code = [c for c in nb.cells if c.cell_type == "code"]
    only_there = set().union(*(names(c.source, ast.Store) for c in code if nbmod.is_solution(c)))
    only_there -= set().union(*(names(c.source, ast.Store) for c in code if not nbmod.is_solution(c)))
    read_elsewhere = set().union(*(names(c.source, ast.Load) for c in code if not nbmod.is_solution(c)))
    answers = {f"e{n}" for n in nbmod.exercises(nb)}
    assert not (only_there - answers) & read_elsewhere


# ---------------------------------------------------------------- the participant's copy

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_participant_copy_has_no_solution_cell_nor_its_text(participant, path):
    source, copy = read(path), read(participant / path.name)
    nbformat.validate(copy)
    assert not [c for c in copy.cells if nbmod.is_solution(c)]
    solutions = [c for c in source.cells if nbmod.is_solution(c)]
    assert len(copy.cells) == len(source.cells) - len(solutions)
    text, lines = (participant / path.name).read_text(), code_lines(copy)
    for cell in solutions:
        assert cell.source not in text and nbformat.writes(nbformat.v4.new_notebook(cells=[cell]))[40:] not in text
        for line in cell.source.splitlines():  # no line of a solution, the answer's above all, is left
            assert line.strip() == "if solutions:" or line.strip() not in lines, line
    assert not [c for c in copy.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    if nbmod.exercises(source):
        assert re.search(r"^solutions = False\b", parameters_cell(copy).source, re.MULTILINE)


def test_participant_copy_clears_outputs_and_switches_solutions_off(tmp_path):
    """From an executed notebook (outputs, solutions = True, papermill's metadata): none of it is handed out."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    nb = read(ROOT / "notebooks" / "00-workshop.ipynb")
    params = parameters_cell(nb)
    params.source = nbmod.set_solutions(params.source, True)
    for k, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = [nbformat.v4.new_output("stream", text=f"✓ exercise {k}: right\n")]
        cell.execution_count = k + 1
    nb.metadata["papermill"] = {"parameters": {"solutions": True}}
    nbformat.write(nb, src / "00-workshop.ipynb")
    [written] = nbmod.participant_copy(src, dest)
    copy = read(written)
    assert "✓ exercise" not in written.read_text() and "papermill" not in copy.metadata
    assert "solutions = False  " in parameters_cell(copy).source  # the comment kept after it
    assert not [c for c in copy.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]


# ---------------------------------------------------------------- the instructor's copy

def test_instructor_copy_keeps_the_solutions_and_runs_them(tmp_path):
    written = nbmod.instructor_copy(ROOT / "notebooks", tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        source, copy = read(path), read(tmp_path / path.name)
        assert [c.source for c in copy.cells if nbmod.is_solution(c)] == \
               [c.source for c in source.cells if nbmod.is_solution(c)]
        assert nbmod.exercises(copy) == nbmod.exercises(source)
        assert not [c for c in copy.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
        if nbmod.exercises(source):
            assert re.search(r"^solutions = True\b", parameters_cell(copy).source, re.MULTILINE)


def test_a_copy_never_writes_over_a_notebook_already_there(tmp_path):
    nbmod.participant_copy(ROOT / "notebooks", tmp_path)
    mine = tmp_path / "00-workshop.ipynb"
    work = read(mine)
    next(c for c in work.cells if c.source.startswith("e1 = None")).source = 'e1 = "web-0"'  # a participant's
    nbformat.write(work, mine)
    with pytest.raises(UsageError, match="00-workshop.ipynb"):
        nbmod.participant_copy(ROOT / "notebooks", tmp_path)
    assert [c for c in read(mine).cells if c.source == 'e1 = "web-0"']
    nbmod.instructor_copy(ROOT / "notebooks", tmp_path, overwrite=True)
    assert [c for c in read(mine).cells if nbmod.is_solution(c)]
    with pytest.raises(UsageError, match="no notebooks"):
        nbmod.participant_copy(tmp_path / "empty", tmp_path / "out")


# ---------------------------------------------------------------- the self-check

def test_self_check_says_right_or_a_hint_never_the_answer(capsys, monkeypatch):
    monkeypatch.setattr(nbmod, "_checked", {})
    assert nbmod.self_check("exercise 1", np.int64(1), 1.01, "median over repeats") is True  # within 2 %
    assert nbmod.self_check("exercise 2", " EBPF", "ebpf", "look at the flat one") is True
    assert nbmod.self_check("exercise 3", ["web", "mac"], {"mac", "web"}, "the db column") is True
    assert nbmod.self_check("exercise 4", 3.4567, 1.2345, "divide the other way") is False
    assert nbmod.self_check("exercise 5", None, 7, "count the pairs") is None
    assert nbmod.self_check("exercise 6", "web", {"web", "mac"}, "all of them") is False
    assert nbmod.self_check("exercise 7", True, None, "unmeasured") is None  # not counted
    out = capsys.readouterr().out
    assert out.count("✓") == 3 and "✗ exercise 4: not quite. Hint: divide the other way" in out
    assert "… exercise 5: not answered yet. Hint: count the pairs" in out
    assert "1.2345" not in out and "7" not in out.replace("exercise 7", "")  # the expected values never shown
    assert nbmod.counts() == {"checked": 6, "right": 3, "unanswered": 1}
    nbmod.summary()
    assert capsys.readouterr().out == "self-checks: 3/6 right, 1 not answered\n"


def test_with_solutions_a_wrong_or_missing_answer_fails(monkeypatch):
    monkeypatch.setattr(nbmod, "_checked", {})
    with pytest.raises(AssertionError, match="exercise 1"):
        nbmod.self_check("exercise 1", "iptables", "ebpf", "hint", solutions=True)
    with pytest.raises(AssertionError, match="left no answer"):
        nbmod.self_check("exercise 2", None, 3, "hint", solutions=True)
    assert nbmod.self_check("exercise 3", 3, 3, "hint", solutions=True) is True


# ---------------------------------------------------------------- the command line

def test_labkit_notebooks_copy(tmp_path):
    env = {**os.environ, "LABKIT_RESULTS": str(tmp_path / "results"), "LABKIT_STATE_DIR": str(tmp_path / "state")}

    def labkit(*argv):
        return subprocess.run(LABKIT + list(argv), capture_output=True, text=True, env=env, timeout=60)

    proc = labkit("notebooks", "copy", str(tmp_path / "alice"))
    assert proc.returncode == 0, proc.stderr
    assert f"{len(NOTEBOOKS)} notebooks in {tmp_path / 'alice'} (participant's copy" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "alice").iterdir()) == [p.name for p in NOTEBOOKS]
    assert not [c for p in (tmp_path / "alice").iterdir() for c in read(p).cells if nbmod.is_solution(c)]

    proc = labkit("notebooks", "copy", str(tmp_path / "teacher"), "--instructor")
    assert proc.returncode == 0 and "instructor's copy, with solutions" in proc.stdout, proc.stderr
    assert [c for c in read(tmp_path / "teacher" / "00-workshop.ipynb").cells if nbmod.is_solution(c)]

    for argv, names in [(["notebooks", "copy", str(tmp_path / "alice")], "--force"),  # never over her work
                        (["notebooks", "copy", str(tmp_path / "x"), "--source", str(tmp_path / "nosuch")],
                         "no such folder"),
                        (["notebooks", "copy"], "the following arguments are required: DEST"),
                        (["notebooks"], "the following arguments are required: ACTION")]:
        proc = labkit(*argv)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and names in lines[0], (argv, proc.stderr)
    assert not (tmp_path / "x").exists() and not (tmp_path / "results").exists()
    assert labkit("notebooks", "copy", str(tmp_path / "alice"), "--force").returncode == 0

    (tmp_path / "c.bash").write_text(labkit("completion", "bash").stdout)
    for words, cword, offered in [("labkit note", 1, ["notebooks"]), ("labkit notebooks c", 2, ["copy"]),
                                  ("labkit notebooks copy d --ins", 4, ["--instructor"])]:
        out = subprocess.run(["bash", "-c", f"source {tmp_path}/c.bash; COMP_WORDS=({words}); COMP_CWORD={cword}; "
                                            "_labkit; echo ${COMPREPLY[@]}"], capture_output=True, text=True)
        assert out.stdout.split() == offered, (words, out)
