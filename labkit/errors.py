"""Typed errors. Every error a user can cause names the field or thing at fault and the fix, and
carries the exit status the CLI ends with (:data:`EXIT_CODES`, the table ``labkit --help`` shows).

LabkitError                  exit 5 unless a subclass says otherwise
├── UsageError           2   a bad flag, value or name (labkit.registry.UnknownName is one)
├── SpecError            2   the lab spec is invalid (carries every problem, each with its path)
├── MissingFeature       3   the kernel or machine lacks something labkit needs (carries the doctor's fix)
├── LabStateError        5   a lab's state is unreadable, or it exists already
│   └── NoSuchLab        4   no lab of that name
├── NoSuchRun            4   no run of that id in the results store
├── BackendError         5   a backend failed to realise or tear down a lab
├── DatapathError        5   a datapath failed to render or apply rules (previous state left intact)
├── MeasurementError     1   a load generator failed; raw samples already saved are kept
├── ResultsStoreError    6   the results store could not be written (full, read-only)
└── Refused              7   the labkit daemon refused a participant's request (a quota, a limit)
"""


from __future__ import annotations

EXIT_CODES = {
    0: "ok",
    1: "a check or a measurement found a failure",
    2: "usage or spec error: a bad flag, value, name or spec (the message names it and the fix)",
    3: "this machine lacks a feature it needs (labkit doctor's reason and fix)",
    4: "the lab or run does not exist",
    5: "building, changing or removing a lab failed (the message says what and where; the lab's log has more)",
    6: "the results store could not be written (full or read-only); what was written before is kept",
    7: "the labkit daemon refused the request: a quota or a limit of the classroom (the message names it)",
    130: "interrupted (Ctrl-C)",
}


class LabkitError(Exception):
    """Base of every error labkit raises on purpose."""

    exit_code = 5


class UsageError(LabkitError):
    """A bad flag, value or name given to labkit."""

    exit_code = 2


class SpecError(LabkitError):
    """The spec is invalid. ``problems`` lists ``(path, message)`` pairs, all of them at once."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"{path}: {msg}" if path else msg for path, msg in self.problems]
        if len(lines) == 1:  # one problem, one line
            super().__init__(f"invalid lab spec: {lines[0]}")
        else:
            super().__init__(f"invalid lab spec ({len(lines)} problems):\n  " + "\n  ".join(lines))


class MissingFeature(LabkitError):
    """A capability is missing. ``feature`` is the doctor's name for it, ``fix`` one line to fix it."""

    exit_code = 3

    def __init__(self, feature: str, needed_by: str, fix: str):
        self.feature, self.needed_by, self.fix = feature, needed_by, fix
        super().__init__(f"{needed_by} needs '{feature}', which this machine lacks. Fix: {fix}")


class LabStateError(LabkitError):
    """A lab is there already, or its recorded state cannot be read."""


class NoSuchLab(LabStateError):
    """No lab of that name (on this machine, or among the caller's)."""

    exit_code = 4


class NoSuchRun(LabkitError):
    """No run of that id in the results store."""

    exit_code = 4


class BackendError(LabkitError):
    """A backend could not realise or remove a lab."""


class DatapathError(LabkitError):
    """A datapath could not render or apply its rules; the previous kernel state is intact."""


class MeasurementError(LabkitError):
    """A load generator failed. Raw samples written before the failure are kept."""

    exit_code = 1


class ResultsStoreError(LabkitError):
    """The results store could not be written (full, read-only). Points written before are kept."""

    exit_code = 6


class Refused(LabkitError):
    """The labkit daemon refused a participant's request: over a quota, past a limit, or something it
    does not do on anyone's behalf. Nothing was created."""

    exit_code = 7
