"""The HTML of a report: one page with its own style, tables, sections. Every value goes
through `html.escape`; images are data URIs (`figures`), so a page is one self-contained file."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

GENERATOR = "glip-data-engine report"  # the <meta name="generator"> of `pipeline report`'s pages: the ones it may overwrite

STYLE = """body{font-family:sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{text-align:left;background:#f4f4f4}
.big{font-size:22px}.charts img{margin-right:16px;vertical-align:top}iframe{width:100%;height:900px;border:1px solid #ccc}
section{border-top:2px solid #888;margin-top:28px}nav li{margin:2px 0}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}
figure{margin:0;border:1px solid #ddd;padding:6px;font-size:12px}figure img{max-width:100%}td.text,th.text{text-align:left}
details pre{font-size:12px;background:#f8f8f8;padding:8px;overflow:auto}.warn{color:#a30}"""


def esc(value: object) -> str:
    return html.escape(str(value))


def document(title: str, body: str, *, generator: str) -> str:
    """A whole page: `title` and the (already escaped) `body`, made by `generator`."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><meta name="generator" content="{esc(generator)}">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>")


def key_value_rows(items: Iterable[tuple[object, object]]) -> str:
    """`<tr>` rows of a two-column table: a name, its value."""
    return "".join(f'<tr><th>{esc(k)}</th><td class="text">{esc(v)}</td></tr>' for k, v in items)


def key_value_table(items: Iterable[tuple[object, object]]) -> str:
    rows = key_value_rows(items)
    return f"<table>{rows}</table>" if rows else ""


def table(header: Sequence[str], rows: Iterable[Sequence[object]], *, text_columns: Sequence[int] = ()) -> str:
    """A table of `rows` under `header`; columns in `text_columns` are left-aligned."""
    def cell(tag: str, index: int, value: object) -> str:
        return f'<{tag} class="text">{esc(value)}</{tag}>' if index in text_columns else f"<{tag}>{esc(value)}</{tag}>"

    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr>{body}</table>"


def image(uri: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="{uri}">' if uri else ""


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def details(summary: str, text: str) -> str:
    """A folded block of preformatted text (settings, identities)."""
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"
