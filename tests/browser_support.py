"""Real-browser tests: headless Chromium (the Debian `chromium`, never a downloaded one)
driven by Playwright for Python, against a real uvicorn server on a free loopback port.

A missing Chromium skips the tests locally and fails them when CI=true, like the service
fixtures of conftest.py. Screenshots go to `artifacts/` at the repository root
($EDGEPIPE_ARTIFACTS overrides)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_MS = 30_000  # generous: CI has two busy cores, and nothing here may depend on speed


def chromium_path() -> str:
    """The system Chromium, or skip (fail under CI=true)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium not installed (apt-get install chromium); the browser tests need it"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: browser tests must run)")
        pytest.skip(message)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("playwright (the test extra) is not installed (CI=true: browser tests must run)")
        pytest.skip("playwright not installed (pip install -e '.[test]')")
    return found


def artifacts_dir() -> Path:
    path = Path(os.environ.get("EDGEPIPE_ARTIFACTS") or ROOT / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """`app` served by uvicorn on a thread, on a loopback socket bound and listening before
    the server starts (a client may connect at once: its request waits in the backlog, no
    polling). Yields the base URL; stops the server (lifespan shutdown included) on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium browser (Playwright's sync API)."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))


def new_page(browser: Any, offline: bool = False) -> tuple[Any, Any, Console]:
    """(context, page, console) at 1280x900; `offline`: every request but file:// and data:
    URLs is refused, as on a machine without a network."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(TIMEOUT_MS)
    if offline:
        local = ("file:", "data:")
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local) else route.abort())
    page = context.new_page()
    return context, page, Console(page)


def screenshot(page: Any, name: str) -> Path:
    path = artifacts_dir() / name
    page.screenshot(path=str(path), full_page=True)
    return path
