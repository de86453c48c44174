"""A screenshot of `engine serve`'s page on a real index: upload a photo, drag a box, describe it, search.

Drives Debian's Chromium headless through Playwright (as tests/test_server_browser.py does) against the
app served in-process on a free loopback port, then saves the page (256 colours) for the docs:

    python scripts/serve_screenshot.py --index DIR --image data/stamps/images/000918.jpg \
        --region 96,32,316,220 --text "an albino peahen" --out docs/images/serve-page.png
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True, help="the photo to upload as the query")
    ap.add_argument("--region", required=True, help="x1,y1,x2,y2 in the photo's pixels: the box dragged on the page")
    ap.add_argument("--text", default="")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from engine.api import Engine
    from engine.server.app import create_app
    from engine.server.background import running_server
    from engine.server.settings import ServerSettings

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: Chromium is not installed (apt-get install chromium)")
    with Image.open(args.image) as photo:
        width, height = photo.size
    x1, y1, x2, y2 = (float(v) for v in args.region.split(","))
    with Engine(args.index) as engine, running_server(create_app(engine, ServerSettings())) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.set_default_timeout(180_000)
        tab.goto(url + "/")
        tab.set_input_files("#upload", str(args.image))
        tab.wait_for_selector("#canvas:not([hidden])")
        box = tab.locator("#canvas").bounding_box()
        tab.mouse.move(box["x"] + x1 / width * box["width"], box["y"] + y1 / height * box["height"])
        tab.mouse.down()
        tab.mouse.move(box["x"] + x2 / width * box["width"], box["y"] + y2 / height * box["height"], steps=8)
        tab.mouse.up()
        tab.fill("#text", args.text)
        tab.fill("#k", str(args.k))
        tab.check("#exclude-self")
        tab.click("#search")
        tab.wait_for_selector(".hit canvas[data-drawn='1']")
        tab.wait_for_function("document.querySelectorAll('.hit').length === document.querySelectorAll(\".hit canvas[data-drawn='1']\").length")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(args.out), full_page=True)
        browser.close()
    with Image.open(args.out) as shot:
        small = shot.convert("RGB").quantize(256)
    small.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
