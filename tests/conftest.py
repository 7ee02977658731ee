"""Shared fixtures and the one way to say what a test needs.

``@pytest.mark.needs("root", "bcc-compile", …)``: the test runs only where every named feature is
usable — ``root``, or a `labkit doctor` capability, probed once per run — and is otherwise skipped
with the doctor's reason and fix. Kernel tests build real labs with unique names; every lab a test
builds is torn down by the fixture even when the test fails. The leak check (:mod:`leakcheck`) fails
the whole run if anything is left behind, whatever the file order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


pytest_plugins = ["leakcheck"]


def missing(feature: str) -> str | None:
    """Why ``feature`` is not usable here (None: it is)."""
    if feature == "root":
        return None if os.geteuid() == 0 else "needs root: builds real namespaces (CI runs as root)"
    if os.geteuid() != 0:
        return f"needs root to probe {feature}"
    from labkit import doctor

    cap = doctor.check(feature)
    if cap.status != doctor.MISSING:
        return None
    return f"needs {feature}, which this machine lacks ({cap.detail}); fix: {cap.fix}"


def pytest_collection_modifyitems(config, items):
    reasons: dict[str, str | None] = {}
    for item in items:
        for mark in item.iter_markers("needs"):
            for feature in mark.args:
                if feature not in reasons:
                    reasons[feature] = missing(feature)
                if reasons[feature]:
                    item.add_marker(pytest.mark.skip(reason=reasons[feature]))
                    break


@pytest.fixture
def lab_name(request):
    """A lab name unique to this test process and test."""
    base = "t" + format(abs(hash(request.node.nodeid)) % 36**4, "x")[:5]
    return f"{base}{os.getpid() % 10000}"


@pytest.fixture
def make_lab():
    """Build labs from specs; all of them are removed afterwards, whatever happened."""
    from labkit import lab as labmod

    built = []

    def make(spec, **kw):
        built.append(spec.name)
        return labmod.up(spec, progress=False, **kw)

    yield make
    for name in reversed(built):
        labmod.down(name)
