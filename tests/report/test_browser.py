"""report.html as a browser shows it: headless Chromium opens a report built from a committed study's results."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dipsen.report import build_report

STUDY = Path(__file__).parents[2] / "docs" / "study-2026-12-07"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium): report.html not checked in a browser"
)

# Appended to a copy of the page: once everything has loaded, it writes what the browser shows into the DOM for --dump-dom.
PROBE = """<script>
addEventListener("load", () => {
  const facts = {
    images: [...document.images].map((img) => [img.getAttribute("src"), img.naturalWidth]),
    lists: [...document.querySelectorAll("ul")].map((ul) => [...ul.children].map((li) => li.tagName + " " + li.innerText)),
    headings: [...document.querySelectorAll("h1, h2, h3")].map((h) => h.innerText),
    paragraphs: [...document.querySelectorAll("p")].map((p) => p.innerText),
    tables: [...document.querySelectorAll("table")].map((table) => [...table.rows].map((row) => row.cells.length)),
    text: document.body.innerText,
  };
  const out = document.createElement("pre");
  out.id = "facts";
  out.textContent = JSON.stringify(facts);
  document.body.append(out);
});
</script>"""


def _open(page: Path, profile: Path) -> dict:
    """What headless Chromium shows of ``page`` (the PROBE's facts), loading nothing from the network."""
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--dump-dom",
        probed.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="facts">(.*?)</pre>', dom, re.S)
    assert found, f"the page's load event never ran; Chromium dumped:\n{dom[:2000]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("report")
    markdown = build_report(json.loads((STUDY / "results.json").read_text()), out).read_text()
    return _open(out / "report.html", tmp_path_factory.mktemp("chromium-profile")), markdown


def test_every_figure_loads(shown):
    facts, markdown = shown
    assert [src for src, _ in facts["images"]] == re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert all(width > 0 for _, width in facts["images"]), facts["images"]


def test_lists_are_lists(shown):
    facts, _ = shown
    assert "What survives" in facts["headings"]
    survives = [items for items in facts["lists"] if items[0].startswith("LI MNIST: DiPSeN under the paper's own protocol")]
    assert len(survives) == 1 and len(survives[0]) == 4  # MNIST, SOCOFing's two tasks, CTU-13
    assert all(item.startswith("LI ") for items in facts["lists"] for item in items)


def test_no_markdown_syntax_shows(shown):
    facts, _ = shown
    for syntax in ("**", "|---", "![", "`"):
        assert syntax not in facts["text"], syntax
    leaked = [p for p in facts["paragraphs"] if p.startswith(("- ", "#", "|"))]
    assert not leaked, leaked


def test_every_table_row_has_a_cell_per_header(shown):
    facts, markdown = shown
    assert len(facts["tables"]) == markdown.count("\n|---")
    for cells in facts["tables"]:
        assert len(cells) > 1 and set(cells) == {cells[0]}, cells
