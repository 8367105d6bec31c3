"""An operator in a real browser: starts an instance with the machine page's form, finds
failed instances by search and filter in the instance list, and retries them all with the
bulk action (confirmation included). Run by `tests/it/console.rs` with the server's address,
Chromium's path and a scratch folder; exits non-zero, saying what was wrong, on a failure.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

from cdp import Browser


def api(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path) as answer:
        return json.loads(answer.read())


def check(condition: bool, what: str, page: str = "") -> None:
    if not condition:
        print(f"FAILED: {what}\n{page}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    base, chromium, scratch = sys.argv[1], sys.argv[2], sys.argv[3]
    browser = Browser(chromium, scratch)
    try:
        # The start form: a context that makes the action fail, and a name.
        browser.goto(f"{base}/machines/Console")
        check("Start an instance" in browser.text(), "the machine page has a start form", browser.text())
        browser.submit(
            "document.querySelector('#start textarea').value = '{\"fail\": true}';"
            "document.querySelector('#start input[name=name]').value = 'bad-form';"
            "document.querySelector('#start button').click();",
            "/instances/bad-form",
        )
        check("bad-form" in browser.text(), "the form leads to the new instance's page", browser.text())
        # A mistake in the form comes back on it.
        browser.goto(f"{base}/machines/Console")
        browser.submit(
            "document.querySelector('#start textarea').value = '{oops';"
            "document.querySelector('#start button').click();",
            "/machines/Console/start",
        )
        check("The context is not JSON" in browser.text(), "a bad context is explained", browser.text())
        # Wait until the failing instances have failed (the API started the others).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failed = api(base, "/api/instances?status=failed&prefix=bad-")["instances"]
            if len(failed) == 3:
                break
            time.sleep(0.3)
        check(len(failed) == 3, f"three bad instances failed: {failed}")

        # Search and filter: failed instances whose name starts with `bad-`.
        browser.goto(f"{base}/instances")
        browser.submit(
            "document.querySelector('#filters input[name=prefix]').value = 'bad-';"
            "document.querySelector('#filters select[name=status]').value = 'failed';"
            "document.querySelector('#filters button').click();",
            "/instances",
        )
        rows = browser.eval("[...document.querySelectorAll('#rows input[type=checkbox]')].map(b => b.value)")
        check(sorted(rows) == ["bad-1", "bad-2", "bad-form"], f"the filtered rows: {rows}", browser.text())
        check("prefix=bad-" in browser.eval("location.search"), "the filters are in the URL")

        # Bulk retry of the selection, confirmed.
        browser.submit(
            "document.querySelectorAll('#rows input[type=checkbox]').forEach(b => b.checked = true);"
            "document.querySelector('#bulk button[value=retry-selected]').click();",
            "/instances/bulk",
        )
        check("Retry 3 instances?" in browser.text(), "a confirmation says how many", browser.text())
        browser.submit("document.getElementById('confirm-button').click();", "/instances/bulk")
        check("3 of 3 instances retried" in browser.text(), "all three retried", browser.text())
        # Each runs again: a second failed attempt is logged.
        for name in ["bad-1", "bad-2", "bad-form"]:
            deadline = time.monotonic() + 60
            while len(api(base, f"/api/instances/{name}/logs")["logs"]) < 2:
                check(time.monotonic() < deadline, f"{name} did not run again after the retry")
                time.sleep(0.3)
        print("ok")
    finally:
        browser.close()


if __name__ == "__main__":
    main()
