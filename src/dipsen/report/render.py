"""A report as a list of blocks, rendered to Markdown; its HTML page is rendered from that Markdown (markdown-it-py),
so the two forms cannot diverge."""

from __future__ import annotations

import html
from dataclasses import dataclass

from markdown_it import MarkdownIt


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    path: str
    caption: str


Block = Heading | Paragraph | Table | Image


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(block.headers) + " |", "|" + "---|" * len(block.headers)]
            lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            if block.caption:
                lines.append(f"\n*{block.caption}*")
            out.append("\n".join(lines))
        else:
            out.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(out) + "\n"


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
    "table{display:block;overflow-x:auto;border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    "table+p,p:has(>img)+p{color:#444;font-size:0.9em}code{background:#f3f3f3;padding:0 2px}"
)

_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
"""CommonMark and GitHub's tables; raw HTML in the text is shown as text, never passed through."""


def to_html(markdown: str, title: str) -> str:
    """A standalone page of ``markdown``: its stylesheet inline, images beside it, nothing fetched from the network."""
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head>\n<body>\n{_MARKDOWN.render(markdown)}</body></html>\n"
    )
