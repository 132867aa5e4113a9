"""Every chapter of the book executes from top to bottom without an error cell, and imports rather than defines
technique code."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(p for p in BOOK.glob("[0-9][0-9]-*.md"))


def test_the_book_has_its_table_of_contents():
    toc = (BOOK / "_toc.yml").read_text()
    for chapter in CHAPTERS:
        assert f"file: {chapter.stem}" in toc, f"{chapter.name} is not in book/_toc.yml"
    assert "file: teachers" in toc, "the teacher's guide is not in book/_toc.yml"


def test_front_page_coverage_table_is_the_registry(capsys):
    """The coverage table on the book's front page and `mllm-ref list --json` come from one function.

    Runs only the front page's table cell (no kernel, no book build): it must call `mllm_ref.cli.coverage`,
    its rows must equal what the command line prints, and its HTML must name every technique and reference.
    """
    jupytext = pytest.importorskip("jupytext")
    pytest.importorskip("IPython")
    from mllm_ref import cli

    nb = jupytext.read(BOOK / "intro.md")
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "coverage()" in c.source]
    assert len(cells) == 1, "book/intro.md must have exactly one code cell that calls coverage()"
    source = cells[0]
    assert "from mllm_ref.cli import coverage" in source, "the front page must take its table from mllm_ref.cli"
    namespace: dict = {}
    exec(compile(source, str(BOOK / "intro.md"), "exec"), namespace)
    assert namespace["coverage"] is cli.coverage

    assert cli.main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert namespace["rows"] == listed
    html = namespace["table_html"]
    for row in listed:
        assert f"<code>{row['id']}</code>" in html, f"{row['id']} is missing from the front page's table"
        assert row["reference"] in html


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_defines_no_technique_code(chapter):
    """Chapters import from the package; a plotting helper is fine, a technique's math is not."""
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(chapter)
    allowed = {"plot_attention"}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse("\n".join(l for l in cell.source.splitlines() if not l.startswith(("%", "!"))))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.name in allowed or node.name.startswith(("plot_", "show_")), (
                    f"{chapter.name} defines {node.name}; technique code belongs in mllm_ref"
                )


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_executes(chapter, tmp_path, monkeypatch, site_is_built):
    """Each chapter runs without an error cell and draws a figure. When the site is built (Chromium and Jupyter
    Book present), ``tests/test_book_site.py`` executes every chapter and checks the same on each page, so the
    chapters are not executed twice."""
    if site_is_built:
        pytest.skip("executed and checked by tests/test_book_site.py, which builds the site")
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(chapter)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must use the inline backend to show figures
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{chapter.name}: {out.get('ename')}: {out.get('evalue')}"
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 1, f"{chapter.name} produced no figure"
