"""The run's leak check (tests/leakcheck.py) fails a run that leaves a lab object behind, and only
then: a child pytest run with one leaking test, and one with a clean test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import nsexec

HERE = Path(__file__).resolve().parent


def _child_run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_child.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "leakcheck", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_child.py")],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.needs("root")
def test_a_run_that_leaves_a_namespace_fails_and_names_it(tmp_path):
    name = f"lk-leaktest{os.getpid()}.n1"
    try:
        proc = _child_run(tmp_path, f"from labkit import nsexec\n\ndef test_leaks():\n"
                                    f"    nsexec.create_netns({name!r})\n")
        assert proc.returncode == 1, proc.stdout[-2000:]
        assert "1 passed" in proc.stdout and "LEAK" in proc.stdout and f"netns: {name}" in proc.stdout
    finally:
        nsexec.remove_netns(name)


@pytest.mark.needs("root")
def test_a_clean_run_passes(tmp_path):
    name = f"lk-leaktest{os.getpid()}.n2"
    proc = _child_run(tmp_path, f"from labkit import nsexec\n\ndef test_clean():\n"
                                f"    nsexec.create_netns({name!r})\n    nsexec.remove_netns({name!r})\n")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "LEAK" not in proc.stdout
