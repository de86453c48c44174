"""The page of ``engine serve`` in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright over a uvicorn server on the tiny index. Pick an image, drag a box, type a description, search,
see hits with their boxes; "more like this"; text-only search. ``ENGINE_UPDATE_SCREENSHOT=1`` writes the
screenshot to docs/images/serve-page.png (the README's picture), else to a temp folder.

Skipped, with the reason, where Chromium or the ``playwright`` package is absent (``apt-get install
chromium``; ``pip install playwright``: its own browser download is never used). ``ENGINE_CHROMIUM``
names another Chromium binary.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package (pip install playwright)")

from engine.server.app import create_app  # noqa: E402
from engine.server.background import running_server  # noqa: E402
from engine.server.settings import ServerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "images" / "serve-page.png"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""Headless and closed off: without the networking flags Chromium keeps calling hosts this machine cannot reach."""
TIMEOUT_MS = 120_000  # the first query loads the models


def _chromium() -> str | None:
    named = os.environ.get("ENGINE_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def page(tiny_engine) -> Iterator:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium, or set ENGINE_CHROMIUM): the page test needs a real browser")
    with running_server(create_app(tiny_engine, ServerSettings())) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 860})
            tab.set_default_timeout(TIMEOUT_MS)
            tab.goto(url + "/")
            yield tab
        finally:
            browser.close()


def _drag(tab, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag from ``start`` to ``end``, fractions of the element's width and height."""
    box = tab.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not shown"
    tab.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    tab.mouse.down()
    tab.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=8)
    tab.mouse.up()


def _hit_region_ids(tab) -> list[int]:
    return [int(v) for v in tab.locator(".hit").evaluate_all("cards => cards.map(c => c.dataset.regionId)")]


def test_draw_a_box_describe_it_and_see_hits(page, tiny_engine, tmp_path: Path) -> None:
    from query.filters import HitFilter

    page.click("#browse")
    page.wait_for_selector(".thumbs img[src^='blob:']")
    page.locator(".thumbs img").first.click()
    page.wait_for_selector("#canvas:not([hidden])")
    _drag(page, "#canvas", (0.08, 0.08), (0.6, 0.6))
    readout = page.text_content("#box-readout") or ""
    assert readout.startswith("region "), readout
    box = [float(v) for v in readout.split()[1].split(",")]
    page.fill("#text", "a red shape")
    page.fill("#k", "6")
    page.click("#search")
    page.wait_for_selector(".hit canvas[data-drawn='1']")
    page.wait_for_function("document.querySelectorAll('.hit').length === document.querySelectorAll(\".hit canvas[data-drawn='1']\").length")
    assert "hits for the box" in (page.text_content("#status") or "")
    image_id = int(page.locator(".thumbs img.selected").get_attribute("data-image-id"))
    expected = tiny_engine.search(image=tiny_engine.image(image_id).path, region=box, text="a red shape", k=6, filters=HitFilter(max_per_image=1))
    assert _hit_region_ids(page) == [h.region_id for h in expected]
    assert page.locator(".hit .score").first.text_content() == f"{expected[0].score:.4f}"
    shot = SCREENSHOT if os.environ.get("ENGINE_UPDATE_SCREENSHOT") else tmp_path / "serve-page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if shot == SCREENSHOT:  # 256 colours: a third of the bytes in the repository
        from PIL import Image

        with Image.open(shot) as picture:
            small = picture.convert("RGB").quantize(256)
        small.save(shot, optimize=True)


def test_explanation_maps_toggle(page) -> None:
    if page.locator(".hit").count() == 0:
        pytest.skip("needs the hits of the previous test")
    page.check("#explain")
    page.wait_for_function("document.querySelectorAll('.hit').length === document.querySelectorAll(\"img.explain[data-loaded='1']\").length")
    assert page.locator("img.explain").first.evaluate("img => img.naturalWidth") > 0
    page.uncheck("#explain")
    assert not page.locator("img.explain").first.is_visible()


def test_click_a_hit_for_more_like_this(page, tiny_engine) -> None:
    if page.locator(".hit").count() == 0:
        pytest.skip("needs the hits of the previous test")
    region_id = _hit_region_ids(page)[0]
    page.locator(".hit").first.click()
    page.wait_for_function(f"document.getElementById('status').textContent.includes('more like region {region_id}')")
    page.wait_for_selector(".hit")
    assert "(the indexed region)" in (page.text_content("#box-readout") or "")
    assert page.is_checked("#exclude-self")


def test_text_only_search_box(page, tiny_engine) -> None:
    from query.filters import HitFilter

    page.fill("#text-only", "a blue square")
    page.fill("#k", "4")
    page.fill("#per-image", "1")
    page.press("#text-only", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('a blue square')")
    page.wait_for_selector(".hit")
    expected = tiny_engine.search(text="a blue square", k=4, filters=HitFilter(max_per_image=1))
    assert _hit_region_ids(page) == [h.region_id for h in expected]


def test_filters_apply(page) -> None:
    page.fill("#path-glob", "*/no-such-folder/*")
    page.fill("#text-only", "a blue square")
    page.press("#text-only", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('No hits')")
    assert page.locator(".hit").count() == 0
    page.fill("#path-glob", "")


def test_errors_show_as_one_line(page) -> None:
    page.fill("#text-only", "x" * 1200)
    page.press("#text-only", "Enter")
    page.wait_for_selector("#status.error")
    assert "at most 1,000" in (page.text_content("#status") or "")
