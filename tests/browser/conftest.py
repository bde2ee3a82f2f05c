"""A real headless Chromium (Debian's package; Playwright drives it, it downloads no browser)
against a real uvicorn. Screenshots go to DRIFTSAFE_SCREENSHOTS, else a folder under the
system's temporary directory; the run's summary prints where."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SCREENSHOTS = Path(os.environ.get("DRIFTSAFE_SCREENSHOTS")
                   or Path(tempfile.gettempdir()) / "driftsafe-screenshots")


def chromium_or_fail() -> str:
    """The system Chromium. .ci/run installs it, so under CI a missing one fails the run; on a
    laptop without it the tests say what to install and skip."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = [what for what, ok in (("chromium (apt-get install -y chromium)", path),
                                     ("playwright (pip install -e '.[test]')",
                                      _has_playwright())) if not ok]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing; .ci/run should have installed it")
        pytest.skip(f"{', '.join(missing)} not installed")
    return path


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def pytest_terminal_summary(terminalreporter):
    if SCREENSHOTS.is_dir() and any(SCREENSHOTS.glob("*.png")):
        terminalreporter.write_line(f"browser screenshots: {SCREENSHOTS}")
