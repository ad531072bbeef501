"""A table of already formatted cells, drawn as text for a terminal or as HTML for a report.

Cells are strings (see `kvqueue.report.units` for how numbers become them); a column is
left-aligned (``"<"``) or right-aligned (``">"``); `notes` are lines printed under the table
(units, the overload line). `marked` rows (e.g. overloaded runs) are flagged in HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Table:
    title: str
    columns: tuple[tuple[str, str], ...]  # (header, "<" or ">")
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()
    marked: frozenset[int] = field(default_factory=frozenset)  # row indices to highlight

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(
                    f"row {row!r} has {len(row)} cells for {len(self.columns)} columns"
                )

    @property
    def headers(self) -> tuple[str, ...]:
        return tuple(title for title, _ in self.columns)

    def text(self) -> str:
        """Columns padded to their widest cell, a rule under the headers, then the notes."""
        widths = [
            max(len(row[i]) for row in (self.headers, *self.rows)) for i in range(len(self.columns))
        ]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                f"{cell:{align}{width}}"
                for cell, (_, align), width in zip(cells, self.columns, widths, strict=True)
            ).rstrip()

        lines = [line(self.headers), "  ".join("-" * w for w in widths)]
        lines += [line(row) for row in self.rows]
        lines += list(self.notes)
        return "\n".join(lines)
