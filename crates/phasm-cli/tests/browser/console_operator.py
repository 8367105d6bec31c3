"""An operator in a real browser: starts an instance with the machine page's form, finds
failed instances by search and filter in the instance list, retries them all with the bulk
action (confirmation included), then works with the keyboard alone: Tab through the list,
Enter on an instance, its timeline and steps, and a reset from a step's page. Run by `tests/it/console.rs` with the server's address,
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


def tab_to(browser: Browser, wanted: str, most: int = 80) -> list[str]:
    """Press Tab until the focused element's description contains `wanted`; what was focused
    on the way."""
    seen: list[str] = []
    for _ in range(most):
        browser.key("Tab")
        now = browser.focused()
        seen.append(now)
        if wanted in now:
            return seen
    check(False, f"Tab never reached {wanted!r}; it went through {seen}")
    return seen


def keyboard(browser: Browser, base: str) -> None:
    """The console with the keyboard alone: every control of the instance list is reached by
    Tab with a visible focus, a link is followed with Enter, and a step is run again with
    Space and Enter."""
    browser.goto(f"{base}/instances?prefix=ok-")
    seen = tab_to(browser, "-> /instances/ok-1")
    for control in ["A Machines", "A Instances", "A Workers", "A Queues", "INPUT prefix",
                    "SELECT machine", "SELECT status", "INPUT stuck", "SELECT order", "BUTTON"]:
        check(any(s.startswith(control) for s in seen), f"Tab reaches {control}: {seen}")
    outline = browser.eval("getComputedStyle(document.activeElement).outlineStyle")
    check(outline not in ("", "none"), f"the focused link shows its focus (outline {outline!r})")
    browser.key("Enter")
    browser.wait_loaded(lambda: browser.eval("location.pathname") == "/instances/ok-1")
    check(browser.eval("!!document.getElementById('timeline')"), "the instance page draws its timeline", browser.text())
    steps = browser.eval("[...document.querySelectorAll('#live table a[href*=\"/steps/\"]')].map(a => new URL(a.href).pathname)")
    check(len(steps) == 2, f"two steps are listed with links: {steps}", browser.text())
    # The last step (working → finished), by keyboard, then run again from it.
    tab_to(browser, "-> " + steps[1])
    browser.key("Enter")
    browser.wait_loaded(lambda: browser.eval("location.pathname") == steps[1])
    check("Context given" in browser.text(), "the step page shows its contexts", browser.text())
    tab_to(browser, "INPUT confirm")
    browser.key(" ")
    check(browser.eval("document.querySelector('#reset input[name=confirm]').checked"), "Space ticks the confirmation")
    tab_to(browser, "BUTTON Run again")
    browser.eval("window.__before_submit = true")
    browser.key("Enter")
    browser.wait_loaded(lambda: browser.eval("location.pathname") == "/instances/ok-1"
                        and browser.eval("window.__before_submit === undefined"))
    deadline = time.monotonic() + 30
    while True:
        view = api(base, "/api/instances/ok-1")
        if view["status"] == "completed" and view["history_total"] == 3:
            break
        check(time.monotonic() < deadline, f"ok-1 ran the step again and completed: {view}")
        time.sleep(0.3)


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
        keyboard(browser, base)
        print("ok")
    finally:
        browser.close()


if __name__ == "__main__":
    main()
