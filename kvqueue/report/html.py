"""A self-contained one-page HTML report: inline CSS, PNGs as data URIs, no script, no network.

The page opens anywhere (a mail attachment, an air-gapped laptop, a CI artifact): it refers to
no file, font, stylesheet or script outside itself. Every text is escaped; tables come from
`kvqueue.report.table.Table` (marked rows highlighted), figures from PNG files embedded
whole. `page` puts the sections in the order given — conclusion first, by convention.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvqueue.report.table import Table

REPORT_FILE = "report.html"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #d8dde6; padding-bottom: .2em; }
.subtitle { color: #5b6678; margin-top: 0; }
.conclusion { background: #eef5ff; border-left: 4px solid #0072b2; padding: .6em 1em; }
.conclusion p { margin: .35em 0; }
.overload { background: #fff3e6; border-left: 4px solid #d55e00; padding: .5em 1em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e3e7ee; white-space: nowrap; }
th { background: #f4f6f9; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.marked td { background: #fff3e6; }
.notes { color: #5b6678; font-size: 12px; margin: .2em 0 1em; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: .15em 1.2em; }
dl.settings dt { color: #5b6678; }
dl.settings dd { margin: 0; font-family: ui-monospace, monospace; font-size: 13px; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
figcaption { color: #5b6678; font-size: 13px; }
"""


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    body: str  # HTML


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,…`` URI of the PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(path: Path, caption: str) -> str:
    """The PNG at `path`, embedded, with its caption."""
    uri = data_uri(Path(path).read_bytes())
    return (
        f'<figure><img src="{uri}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def paragraphs(lines: Sequence[str], css_class: str = "") -> str:
    body = "".join(f"<p>{esc(line)}</p>" for line in lines)
    return f'<div class="{css_class}">{body}</div>' if css_class else body


def settings_list(items: Sequence[tuple[str, object]]) -> str:
    """A definition list of settings; None values are left out."""
    rows = "".join(
        f"<dt>{esc(name)}</dt><dd>{esc(value)}</dd>" for name, value in items if value is not None
    )
    return f'<dl class="settings">{rows}</dl>'


def table_html(table: Table) -> str:
    """The table (right-aligned columns as numbers, marked rows highlighted) and its notes."""
    classes = ["num" if align == ">" else "" for _, align in table.columns]
    head = "".join(
        f'<th class="{c}">{esc(h)}</th>' for h, c in zip(table.headers, classes, strict=True)
    )
    body = []
    for index, row in enumerate(table.rows):
        cells = "".join(f'<td class="{c}">{esc(v)}</td>' for v, c in zip(row, classes, strict=True))
        marked = ' class="marked"' if index in table.marked else ""
        body.append(f"<tr{marked}>{cells}</tr>")
    notes = "".join(f"<p>{esc(n)}</p>" for n in table.notes)
    return (
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f'<div class="notes">{notes}</div>'
    )


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="subtitle">{esc(subtitle)}</p>',
    ]
    for section in sections:
        parts.append(f"<section><h2>{esc(section.title)}</h2>{section.body}</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(out_dir: str | Path, document: str) -> Path:
    """Write `document` as ``report.html`` in `out_dir`; returns its path."""
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
