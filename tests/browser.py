"""Open a Snakemake report in headless Chromium (Debian's /usr/bin/chromium, driven by playwright)
and read back what a person would see in the batch gallery.

Nothing is downloaded: playwright only drives the system browser. The report folder is served over
a local HTTP server, as a web server or `python -m http.server` would serve an unzipped report.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
]
# A test artifact CI keeps: screenshots of the report as the browser showed it.
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def require_chromium() -> None:
    """Skip (visibly) where there is no browser, but fail in CI, which installs it (.ci/run)."""
    if shutil.which(CHROMIUM) is None or not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("TURBOWAN_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """A quiet HTTP server for `folder` on a free local port; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# Everything the checks need from the gallery page, gathered in the page itself.
READ_GALLERY = """() => {
  const videos = [...document.querySelectorAll('video')].map(v => ({
    row: v.closest('section').dataset.row, readyState: v.readyState, duration: v.duration,
    width: v.videoWidth, height: v.videoHeight, error: v.error ? v.error.code : null}));
  const images = [...document.querySelectorAll('img')].map(i => ({
    src: i.getAttribute('src').slice(0, 60), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const sections = Object.fromEntries([...document.querySelectorAll('section.row')].map(s => [s.dataset.row, {
    text: s.innerText, error: (s.querySelector('.error') || {}).innerText || null}]));
  const summary = [...document.querySelectorAll('#summary tr.summary-row')].map(r => r.innerText);
  return {videos, images, sections, summary, counts: document.querySelector('#counts').innerText};
}"""
MEDIA_SETTLED = """() => [...document.querySelectorAll('video')].every(v => v.readyState >= 1 || v.error)
  && [...document.querySelectorAll('img')].every(i => i.complete)"""
# What a script injected through the sheet's free text would set (tests/test_report.py puts
# `window.__pwned=...` in a prompt): null while no such script ran in the frame.
PWNED = "() => window.__pwned === undefined ? null : String(window.__pwned)"


def injected_scripts(page) -> dict[str, str]:
    """{frame url: window.__pwned} for every frame of `page` (the page itself, its iframes) in which a
    script set it; empty when none did."""
    found = {}
    for frame in page.frames:
        value = frame.evaluate(PWNED)
        if value is not None:
            found[frame.url[:120]] = value
    return found


def launch(pw, profile: Path):
    """Headless Chromium (the system's) with a throw-away profile in `profile`."""
    return pw.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000},
    )


def scripts_run_in_pages(root: Path, pages: list[Path]) -> dict[str, dict[str, str]]:
    """Open every page (an .html file under `root`, served over HTTP), let it load, render and settle,
    and return {page's path under root: injected_scripts(page)}."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    found = {}
    with serve(root) as base, sync_playwright() as pw:
        context = launch(pw, root / ".chromium-profile")
        try:
            for path in pages:
                rel = path.relative_to(root).as_posix()
                page = context.new_page()
                page.goto(f"{base}/{rel}", wait_until="load")  # (images, failed ones too, are done)
                page.wait_for_load_state("networkidle")
                page.wait_for_timeout(300)  # scripts a page runs once rendered
                found[rel] = injected_scripts(page)
                page.close()
        finally:
            context.close()
    return found


def gallery_in_report(report_html: Path, screenshot: Path) -> dict:
    """Open report.html, click through Results > Batch > the gallery's view button, read the gallery.

    Returns READ_GALLERY's result, and under "pwned" injected_scripts() of the report with the gallery
    open; saves a screenshot of the report with the gallery open.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    require_chromium()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with serve(report_html.parent) as base, sync_playwright() as pw:
        context = launch(pw, report_html.parent / ".chromium-profile")
        try:
            page = context.new_page()
            page.goto(f"{base}/{report_html.name}")
            page.get_by_text("Results", exact=True).first.click()
            page.get_by_text("Batch", exact=True).first.click()
            page.locator("tr", has_text="gallery/index.html").locator("a[iconname=eye]").click()
            frame = page.wait_for_selector("iframe").content_frame()
            try:
                frame.wait_for_selector("#summary", timeout=20_000)
            except PlaywrightTimeout:
                raise AssertionError(f"the gallery did not load in the report (frame {frame.url[:60]!r}; "
                                     "Chromium blocks embedded data: pages above 2 MB)") from None
            frame.wait_for_function(MEDIA_SETTLED, timeout=20_000)
            seen = frame.evaluate(READ_GALLERY)
            seen["pwned"] = injected_scripts(page)  # in the report and the gallery's frame
            # Show the whole gallery in the screenshot: the report sizes its iframe to the window.
            height = frame.evaluate("document.documentElement.scrollHeight")
            page.set_viewport_size({"width": 1400, "height": height + 100})
            page.evaluate("h => { document.querySelector('iframe').style.height = h + 'px'; }", height + 50)
            page.screenshot(path=str(screenshot), full_page=True)
            return seen
        finally:
            context.close()
