"""A real headless browser for the tests that check what a person sees (the MLflow UI, report.html):
the system's Chromium (Debian's `chromium` package, which `.ci/run` installs) driven by Playwright.

Without a Chromium on the machine these tests skip and say how to install one, except where
`CLINFT_REQUIRE_BROWSER=1` (as `.ci/run` sets it) makes that a failure, so CI never passes them unseen.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# No background traffic: on a machine without a network Chromium otherwise retries Google's hosts.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@contextmanager
def browser_page(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A Playwright page in headless Chromium, closed afterwards."""
    path = chromium_path()
    if path is None:
        message = "no Chromium on this machine (install it: apt-get install chromium)"
        if os.environ.get("CLINFT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(90_000)  # the MLflow UI's first paint on 2 busy cores
            yield page
        finally:
            browser.close()


def screenshot(page: Any, name: str, tmp: Path) -> Path:
    """A screenshot in `tmp`, and in `$CLINFT_SCREENSHOTS` too when set (how docs/ gets its pictures:
    `CLINFT_SCREENSHOTS=docs pytest tests/scenarios/test_mlflow_server.py`)."""
    path = tmp / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("CLINFT_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["CLINFT_SCREENSHOTS"]) / path.name)
    return path
