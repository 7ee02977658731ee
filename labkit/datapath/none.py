"""The ``none`` datapath: no Service implementation (pods reach endpoints directly only)."""

from __future__ import annotations

from ..services import ServiceTable, TableDiff
from .base import Datapath, register


@register
class NoDatapath(Datapath):
    name = "none"
    scope = "none"

    def apply(self, desired: ServiceTable, changes: TableDiff) -> None:
        pass

    def cleanup(self) -> None:
        pass
