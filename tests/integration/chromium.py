"""Headless Chromium driven through the DevTools protocol over ``--remote-debugging-pipe``.

Commands go as NUL-terminated JSON on the browser's fd 3, answers come on its fd 4:
no WebSocket client needed. Blocking calls with deadlines; run them in a thread.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get install -y --no-install-recommends chromium"


def binary() -> str | None:
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


class Chromium:
    """One headless browser with one page (the first target); ``close()`` ends it."""

    def __init__(self, profile: Path, *, width: int = 1280, height: int = 720) -> None:
        exe = binary()
        assert exe is not None, INSTALL
        to_browser, self._cmd = os.pipe()
        self._out, from_browser = os.pipe()
        # The protocol's fds are fixed, 3 for commands and 4 for answers (bash, as
        # dash redirects only fds 0-9). Its log goes beside the profile.
        self._log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', exe,
             "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next = 0
        self.session = self._attach()

    def _attach(self) -> str:
        targets = self.call("Target.getTargets", timeout=20)["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        return str(self.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"])

    def call(self, method: str, *, session: str | None = None, timeout: float = 10,
             **params: Any) -> dict[str, Any]:  # fmt: skip
        """Send one command and return its result (events in between are dropped)."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._cmd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium ended")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return dict(json.loads(raw))

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=self.session, **params)

    def open(self, url: str) -> None:
        self.page("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll ``expression`` until it is truthy; its value, or ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            with_errors = (
                f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"
            )
            value = self.evaluate(with_errors)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true within {timeout}s: {expression}")
            time.sleep(0.2)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except (OSError, RuntimeError, TimeoutError):
                self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self._cmd)
        os.close(self._out)
        self._log.close()
