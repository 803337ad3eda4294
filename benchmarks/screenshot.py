"""A PNG of a bench results page (OUT/index.html, written by `peftkit bench --report OUT`) as headless Chromium renders
it, to check the page a reader will open without opening a browser.

    python benchmarks/screenshot.py benchmarks/results/cpu /tmp/results.png --height 4000

Needs Chromium (Debian: apt-get install chromium). The browser runs with networking features off and a throwaway
profile; the page itself needs no network.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
QUIET_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, png: Path, width: int, height: int, timeout: float) -> None:
    """Render `page` at width x height CSS pixels into `png` (raises RuntimeError with Chromium's last words)."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(
            f"no Chromium found (looked for {', '.join(BROWSERS)}); install it: apt-get install chromium"
        )
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="peftkit-shot-") as profile:
        command = [
            browser,
            *QUIET_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png.resolve()}",
            page.resolve().as_uri(),
        ]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if not png.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise RuntimeError(f"Chromium wrote no screenshot: {last[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a bench results folder holding index.html")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400, help="CSS pixels captured from the top of the page")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up on Chromium")
    args = parser.parse_args()
    page = args.results / "index.html"
    if not page.is_file():
        print(f"screenshot: {page} does not exist; run `peftkit bench --report {args.results}` first", file=sys.stderr)
        return 2
    try:
        screenshot(page, args.png, args.width, args.height, args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"screenshot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.png} ({args.width}x{args.height}) from {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
