"""A small Chrome DevTools Protocol driver over `--remote-debugging-pipe` (standard library
only), for the console's browser tests: open a page, run JavaScript in it, wait for it to
load. Chrome reads commands on fd 3 and writes answers on fd 4, each a JSON text ended by
a NUL byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any


class Browser:
    """One headless Chromium with one page."""

    def __init__(self, chromium: str, profile: str) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire() -> None:
            # Move both ends out of the way first (either may already be fd 3 or 4), then
            # to 3 and 4, inheritable.
            read_end = os.dup(to_chrome_r)
            write_end = os.dup(from_chrome_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self._process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            close_fds=False,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self._session = attached["sessionId"]

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        """Send a command and wait for its answer (events in between are skipped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 65536)
                if not chunk:
                    raise RuntimeError("Chromium closed the pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
        raise TimeoutError(f"no answer to {method}")

    def eval(self, script: str) -> Any:
        """Run JavaScript in the page; its value."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": script, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{script}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        """Open a URL and wait until it has loaded."""
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_loaded(lambda: self.eval("location.href") == url)

    def wait_loaded(self, ready: Any = None, seconds: float = 20) -> None:
        """Wait until the page has loaded (and `ready()` holds, when given)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.eval("document.readyState") == "complete" and (ready is None or ready()):
                    return
            except RuntimeError:
                pass  # the page is being replaced
            time.sleep(0.1)
        raise TimeoutError(f"the page did not load: {self.eval('location.href')}")

    def submit(self, script: str, path: str) -> None:
        """Run a script that submits a form, and wait for the page at `path` to load."""
        # Mark the current document, so that a new one at the same path is told apart.
        self.eval(f"window.__before_submit = true; setTimeout(() => {{ {script} }}, 0); true")
        self.wait_loaded(
            lambda: self.eval("location.pathname") == path
            and self.eval("window.__before_submit === undefined")
        )

    def key(self, key: str) -> None:
        """Press and release a key (`Tab`, `Enter`, ` `) as a keyboard would."""
        codes = {"Tab": 9, "Enter": 13, " ": 32}
        for kind in ("keyDown", "keyUp"):
            params: dict[str, Any] = {
                "type": kind,
                "key": key,
                "code": "Space" if key == " " else key,
                "windowsVirtualKeyCode": codes[key],
            }
            if kind == "keyDown" and key in ("Enter", " "):
                params["text"] = "\r" if key == "Enter" else " "
            self.call("Input.dispatchKeyEvent", params, session=True)

    def focused(self) -> str:
        """What has the keyboard focus: `TAG name|text -> href`."""
        return str(self.eval(
            "(() => { const e = document.activeElement; if (!e) return '';"
            # An SVG link's href is an animated string.
            " const h = e.href && (e.href.baseVal !== undefined ? e.href.baseVal : e.href);"
            " return e.tagName.toUpperCase() + ' ' + (e.name || e.innerText || e.textContent || '').trim().slice(0, 40)"
            " + (h ? ' -> ' + new URL(h, location.href).pathname : ''); })()"
        ))

    def text(self) -> str:
        """The page's text."""
        return str(self.eval("document.body.innerText"))

    def close(self) -> None:
        """Stop Chromium."""
        self._process.kill()
        self._process.wait()
