"""Draw the README's two pictures from a trained checkpoint on the built-in data.

    .venv/bin/python docs/pictures.py runs/scan-shapes-t2i/model_best.safetensors

writes docs/images/explain_attention.png (``itmkit explain`` of one test image and its caption) and
docs/images/serve_page.png (``itmkit serve``'s page in headless Chromium, after typing that caption
and clicking its image). Chromium: Debian's (``make browser``), or the one ITMKIT_CHROMIUM names.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

DOCS_IMAGES = Path(__file__).resolve().parent / "images"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def itmkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "itmkit", *args]


def explain_picture(checkpoint: Path, image: int, caption: int, out: Path) -> None:
    subprocess.run(itmkit("explain", str(checkpoint), "--image", str(image), "--caption", str(caption), "-o", str(out),
                          "--device", "cpu"), check=True)


def page_screenshot(checkpoint: Path, query: str, image_id: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("ITMKIT_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        sys.exit("no Chromium: run `make browser` (Debian's chromium) or set ITMKIT_CHROMIUM")
    server = subprocess.Popen(itmkit("serve", str(checkpoint), "--port", "0", "--device", "cpu"),
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if "serving" not in line:
            sys.exit(f"itmkit serve did not start: {line!r}")
        url = line.split(" on ", 1)[1].split()[0]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.fill("#query", query)
            page.press("#query", "Enter")
            page.wait_for_selector(".result >> nth=9", timeout=120_000)
            page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete"
                                   " && i.naturalWidth > 0)", timeout=120_000)
            cards = page.eval_on_selector_all(".result", "cards => cards.map(c => c.dataset.imageId)")
            page.click(f".result[data-image-id='{image_id if image_id in cards else cards[0]}']")
            page.wait_for_selector("#caption-list li", timeout=120_000)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint trained on the built-in data")
    parser.add_argument("--image", type=int, default=3, help="test image (row) to explain and look for")
    parser.add_argument("--caption", type=int, default=None, help="caption row (default: the image's first)")
    parser.add_argument("--out", type=Path, default=DOCS_IMAGES, help="folder to write the two pictures into")
    args = parser.parse_args()
    from itmkit.checkpoint import load_checkpoint
    from itmkit.data.shapes import item_id
    from itmkit.datasets import open_named_split, resolve_data_dir

    recipe = load_checkpoint(args.checkpoint).model.recipe
    split = open_named_split(resolve_data_dir(recipe.data.path), recipe.data.test_split)
    caption = 5 * args.image if args.caption is None else args.caption
    explain_picture(args.checkpoint, args.image, caption, args.out / "explain_attention.png")
    page_screenshot(args.checkpoint, split.captions[caption], item_id(split.name, args.image),
                    args.out / "serve_page.png")
    print(f"wrote {args.out / 'explain_attention.png'} and {args.out / 'serve_page.png'}")


if __name__ == "__main__":
    main()
