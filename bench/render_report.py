"""Render a compare report.html in headless Chromium and save a screenshot, to check the page in a real browser.

    python bench/render_report.py RUN_DIR/report.html [--screenshot out.png] [--chromium /usr/bin/chromium]

The page must be self-contained: network access is disabled as far as Chromium's flags allow, so an
external resource would show up as a missing image. Prints the screenshot path and its size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
WINDOW = "1280,2000"


def chromium_command(chromium: str, html: Path, screenshot: Path, profile: Path, window: str = WINDOW) -> list[str]:
    return [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={screenshot}", f"--window-size={window}",
        html.resolve().as_uri(),
    ]


def render(html: Path, screenshot: Path, chromium: str = CHROMIUM, window: str = WINDOW, timeout: float = 120) -> Path:
    """Screenshot `html` with headless Chromium; raises RuntimeError when no screenshot was written."""
    screenshot = screenshot.resolve()
    screenshot.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="ssimae-chromium-") as profile:
        run = subprocess.run(chromium_command(chromium, html, screenshot, Path(profile), window),
                             capture_output=True, text=True, timeout=timeout)
    if not screenshot.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    return screenshot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--screenshot", type=Path, help="default: report_screenshot.png beside the HTML")
    parser.add_argument("--chromium", default=shutil.which("chromium") or CHROMIUM)
    parser.add_argument("--window", default=WINDOW, help="WIDTH,HEIGHT in pixels")
    args = parser.parse_args()
    screenshot = args.screenshot or args.html.with_name("report_screenshot.png")
    if not Path(args.chromium).is_file():
        print(f"chromium not found at {args.chromium}; install it (apt-get install chromium)", file=sys.stderr)
        return 2
    path = render(args.html, screenshot, args.chromium, args.window)
    from PIL import Image

    with Image.open(path) as image:
        print(f"screenshot: {path} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
