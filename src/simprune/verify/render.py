"""Render a report's sections (paragraphs, cards, tables, figures, code) as Markdown or self-contained HTML."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from simprune.verify.tables import markdown_table

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328;
background:#f6f7f9;margin:0}
main{max-width:1160px;margin:0 auto;padding:28px 36px 48px;background:#fff;min-height:100vh;box-sizing:border-box}
h1{font-size:24px;margin:0 0 4px;line-height:1.3}
.sub{color:#59636e;margin:0 0 20px;font-size:13px}
h2{font-size:18px;margin:32px 0 10px;padding-bottom:4px;border-bottom:1px solid #d1d9e0}
p{margin:8px 0 12px;max-width:900px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{padding:5px 12px;border-bottom:1px solid #e5e8eb;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600;border-bottom:2px solid #d1d9e0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:hover{background:#f9fafb}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0 16px}
.card{border:1px solid #d1d9e0;border-radius:8px;padding:10px 16px;min-width:130px;background:#fbfcfd}
.card b{display:block;font-size:22px;line-height:1.2;color:#0b5cad}
.card span{font-size:12px;color:#59636e}
figure{margin:12px 0 20px}
figure img{max-width:100%;height:auto;border:1px solid #e5e8eb;border-radius:4px}
figcaption{font-size:13px;color:#59636e;margin-top:4px}
pre{background:#f6f8fa;border:1px solid #e5e8eb;border-radius:6px;padding:10px 12px;font-size:13px;
white-space:pre-wrap;word-break:break-all}
"""

_NUMERIC = re.compile(r"^[-+]?\d[\d,.]*\s?(%|M|ms|x|points|x faster|\([-+]\d[\d.]*\))?$")


def render_markdown(title: str, sections: list) -> str:
    lines = [f"# {title}", ""]
    for name, blocks in sections:
        lines += [f"## {name}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "p":
                lines += [block[1], ""]
            elif kind == "cards":
                lines += [" · ".join(f"**{v}** {label}" for v, label in block[1]), ""]
            elif kind == "table":
                lines += [markdown_table(block[1], block[2]), ""]
            elif kind == "img":
                lines += [f"![{Path(block[1]).stem}]({block[1]})", ""] + ([f"*{block[2]}*", ""] if block[2] else [])
            elif kind == "code":
                lines += ["```", block[1], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _html_cell(v: Any, tag: str = "td", align: bool = True) -> str:
    text = str(v)
    cls = ' class="num"' if tag == "td" and align and _NUMERIC.match(text.strip()) else ""
    return f"<{tag}{cls}>{html.escape(text)}</{tag}>"


def render_html(title: str, sections: list, directory: Path, subtitle: str = "") -> str:
    """One HTML page; PNGs referenced by the sections are read from ``directory`` and embedded."""
    out = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        out.append(f'<p class="sub">{html.escape(subtitle)}</p>')
    for name, blocks in sections:
        out.append(f"<h2>{html.escape(name)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "cards":
                cards = "".join(f'<div class="card"><b>{html.escape(str(v))}</b><span>{html.escape(label)}</span></div>'
                                for v, label in block[1])
                out.append(f'<div class="cards">{cards}</div>')
            elif kind == "table":
                header, rows = block[1], block[2]
                head = "".join(_html_cell(h, "th") for h in header) if any(header) else ""
                body = "".join("<tr>" + "".join(_html_cell(c, align=bool(head)) for c in r) + "</tr>" for r in rows)
                out.append(f"<table>{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{body}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode((directory / block[1]).read_bytes()).decode()
                cap = f"<figcaption>{html.escape(block[2])}</figcaption>" if block[2] else ""
                out.append(f'<figure><img alt="{html.escape(block[2] or block[1])}" '
                           f'src="data:image/png;base64,{data}">{cap}</figure>')
            elif kind == "code":
                out.append(f"<pre>{html.escape(block[1])}</pre>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(out) + "\n</main></body></html>\n")
