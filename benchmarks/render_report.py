"""Render an ``lpdseg report`` HTML page to a PNG with headless Chromium.

    python benchmarks/render_report.py runs/lpd/report.html report.png [--width 1200 --height 4000]

Checks that the self-contained report renders in a real browser (no network:
Chromium runs with networking-free flags, so a page that needed an external
file would show broken images). Exits with status 3 when no Chromium is
installed (``apt-get install chromium``); the test that uses this skips then.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("render_report")

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render(
    html_path: str | Path,
    png_path: str | Path,
    width: int = 1200,
    height: int = 4000,
    timeout_s: float = 120.0,
) -> Path:
    """Screenshot ``html_path`` (a local file) into ``png_path`` with headless Chromium.

    Args:
        html_path: the HTML file.
        png_path: PNG to write.
        width: viewport width in CSS pixels.
        height: viewport height (the screenshot's height).
        timeout_s: give up after this many seconds.

    Returns:
        ``png_path``.

    Raises:
        FileNotFoundError: no Chromium installed, or no HTML file.
        RuntimeError: Chromium failed or wrote no screenshot.
    """
    html_path = Path(html_path).resolve()
    png_path = Path(png_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path} does not exist")
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found; install it with `apt-get install chromium`")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must be self-contained
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png_path}",
            html_path.as_uri(),
        ]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not png_path.is_file():
        raise RuntimeError(
            f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
        )
    return png_path


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, help="report.html to render")
    parser.add_argument("png", type=Path, help="screenshot to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if find_chromium() is None:
        log.error("no Chromium found (apt-get install chromium); nothing rendered")
        return 3
    out = render(args.html, args.png, args.width, args.height)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
