"""Plain-text output shared by the CLI and the results store: aligned tables."""

from __future__ import annotations


def table(rows: list[dict], cols: list[str]) -> str:
    """``rows`` as an aligned table with upper-case headers, one line per row."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


__all__ = ["table"]
