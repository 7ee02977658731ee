"""Typed errors. Every error a user can cause names the field or thing at fault and the fix.

LabkitError
├── SpecError            the lab spec is invalid (carries every problem, each with its path)
├── MissingFeature       the kernel or machine lacks something labkit needs (carries the doctor's fix)
├── LabStateError        a lab does not exist, already exists, or its state is unreadable
├── BackendError         a backend failed to realise or tear down a lab
├── DatapathError        a datapath failed to render or apply rules (previous state left intact)
└── MeasurementError     a load generator failed; raw samples already saved are kept
"""

from __future__ import annotations


class LabkitError(Exception):
    """Base of every error labkit raises on purpose."""


class SpecError(LabkitError):
    """The spec is invalid. ``problems`` lists ``(path, message)`` pairs, all of them at once."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [f"{path}: {msg}" if path else msg for path, msg in self.problems]
        super().__init__(
            f"invalid lab spec ({len(lines)} problem{'s' if len(lines) != 1 else ''}):\n  "
            + "\n  ".join(lines)
        )


class MissingFeature(LabkitError):
    """A capability is missing. ``feature`` is the doctor's name for it, ``fix`` one line to fix it."""

    def __init__(self, feature: str, needed_by: str, fix: str):
        self.feature, self.needed_by, self.fix = feature, needed_by, fix
        super().__init__(f"{needed_by} needs '{feature}', which this machine lacks. Fix: {fix}")


class LabStateError(LabkitError):
    """A lab is not there, is there already, or its recorded state cannot be read."""


class BackendError(LabkitError):
    """A backend could not realise or remove a lab."""


class DatapathError(LabkitError):
    """A datapath could not render or apply its rules; the previous kernel state is intact."""


class MeasurementError(LabkitError):
    """A load generator failed. Raw samples written before the failure are kept."""
