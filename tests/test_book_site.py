"""The book as a site: every chapter executed (two at a time), built once with Jupyter Book, served on 127.0.0.1, and
opened in headless Chromium. Each chapter page must show its title and its figures and no error output; the front page must
show the registry's coverage table; the first chapter is saved as a screenshot in build/screenshots/.

Needs Debian's `chromium` (`.ci/run` installs it); skipped without it.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]-*.md"))
SCREENSHOTS = ROOT / "build" / "screenshots"

# no network, no first-run work, no profile left behind: the browser sees only the local server
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
# an output cell Jupyter Book marks as an error: `<div class="output traceback highlight-ipythontb ...">`
ERROR_OUTPUT = re.compile(r'class="[^"]*\boutput\b[^"]*\b(traceback|error)\b')


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("headless Chromium not found: apt-get install chromium (.ci/run does this)")
    return path


def _title(chapter: Path) -> str:
    return next(line[2:].strip() for line in chapter.read_text().splitlines() if line.startswith("# "))


#: chapters executed at once (each in its own kernel process; CI has two cores)
WORKERS = 2


def _execute_chapters(book: Path, env: dict, run_dir: Path) -> None:
    """Execute every chapter of the copied book (and every other page with code cells), ``WORKERS`` at a time, into
    ``<page>.ipynb`` with its outputs (replacing the text notebook), so that the site build only renders them. This is the book's one execution in
    the suite: ``tests/test_book.py`` leaves it to this file when the site is built."""
    jupytext = Path(sys.executable).with_name("jupytext")
    # the chapters and every other page with code cells (the front page's coverage table)
    pending = sorted(p for p in book.glob("*.md") if "kernelspec:" in p.read_text().split("\n---", 1)[0])
    running: list[tuple[Path, subprocess.Popen]] = []
    failures = []
    while pending or running:
        while pending and len(running) < WORKERS:
            md = pending.pop(0)
            cmd = [str(jupytext), "--to", "ipynb", "--execute", "--run-path", str(run_dir), str(md), "-o",
                   str(md.with_suffix(".ipynb"))]  # fmt: skip
            running.append((md, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True)))  # fmt: skip
        md, proc = running.pop(0)
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures.append(f"{md.name}:\n{out[-3000:]}")
        md.unlink()
    assert not failures, "a chapter failed to execute:\n" + "\n".join(failures)


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The built site (a copy of book/ built in a temporary folder, so `make book`'s output is left alone)."""
    _chromium()
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    if not jupyter_book.exists():
        jupyter_book = shutil.which("jupyter-book")
        if jupyter_book is None:
            pytest.skip("jupyter-book is not installed")
    book = tmp_path_factory.mktemp("site") / "book"
    shutil.copytree(BOOK, book, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("MPLBACKEND", None)  # the kernel must use the inline backend to show figures
    _execute_chapters(book, env, tmp_path_factory.mktemp("run"))
    config = book / "_config.yml"
    config.write_text(config.read_text().replace("execute_notebooks: force", 'execute_notebooks: "off"'))
    # -W: a Sphinx warning (a broken link, a missing page, a cell that failed) fails the build
    proc = subprocess.run(
        [str(jupyter_book), "build", str(book), "-W", "--keep-going"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, f"jupyter-book build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    html = book / "_build" / "html"
    assert (html / "index.html").exists()
    return html


@pytest.fixture(scope="session")
def server(site):
    """The site served on 127.0.0.1 by http.server in a thread; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _browse(url: str, tmp_path_factory, *extra: str) -> str:
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"chromium failed on {url}:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _dom(url: str, tmp_path_factory) -> str:
    return _browse(url, tmp_path_factory, "--virtual-time-budget=3000", "--dump-dom")


def _assert_images_load(base: str, page: str, dom: str) -> int:
    sources = re.findall(r'<img[^>]*\bsrc="([^"]+)"', dom)
    local = [s for s in sources if not s.startswith(("http:", "https:", "data:"))]
    for src in local:
        with urllib.request.urlopen(f"{base}/{src}", timeout=10) as resp:
            assert resp.status == 200 and len(resp.read()) > 100, f"{page}: figure {src} does not load"
    return len(local)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_page_renders(chapter, server, tmp_path_factory):
    page = f"{chapter.stem}.html"
    dom = _dom(f"{server}/{page}", tmp_path_factory)
    assert f"{_title(chapter)}<" in dom or _title(chapter) in re.sub(r"<[^>]+>", "", dom), (
        f"{page}: the title {_title(chapter)!r} is not on the page"
    )
    assert "<img" in dom, f"{page} shows no figure"
    assert _assert_images_load(server, page, dom) >= 1, f"{page}: no figure served from the site"
    errors = ERROR_OUTPUT.findall(dom)
    assert not errors, f"{page} shows error output ({', '.join(sorted(set(errors)))})"


def test_front_page_shows_the_coverage_table(server, tmp_path_factory):
    from mllm_ref.cli import coverage

    dom = _dom(f"{server}/index.html", tmp_path_factory)  # index.html redirects to intro.html
    assert 'class="table coverage"' in dom, "the front page has no coverage table"
    for row in coverage():
        assert f"<code>{row['id']}</code>" in dom, f"{row['id']} is missing from the front page's coverage table"
    assert not ERROR_OUTPUT.findall(dom)
    for chapter in CHAPTERS:
        assert f'href="{chapter.stem}.html"' in dom, f"the front page does not link to {chapter.stem}"
    assert 'href="teachers.html"' in dom, "the front page does not link to the teacher's guide"


def test_teachers_guide_page(server, tmp_path_factory):
    text = re.sub(r"<[^>]+>", "", _dom(f"{server}/teachers.html", tmp_path_factory))
    assert "Teacher" in text
    for command in ("mllm-ref exercise", "mllm-ref grade", "--csv"):
        assert command in text


def test_screenshot_of_the_first_chapter(server, tmp_path_factory):
    first = CHAPTERS[0]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{first.stem}.png"
    shot.unlink(missing_ok=True)
    _browse(
        f"{server}/{first.stem}.html", tmp_path_factory,
        "--virtual-time-budget=3000", f"--screenshot={shot}", "--window-size=1280,2000",
    )
    assert shot.exists(), f"chromium wrote no screenshot to {shot}"
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000, f"{shot} is not a rendered page ({len(data)} bytes)"
