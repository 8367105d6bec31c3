"""One step's data, output or children never hurt the host or its other steps.

- Strict encoding: every line the host writes is JSON that phasm's serde_json reads (no NaN
  or Infinity, no lone surrogate, at most 100 levels deep, integers it can read); a step
  whose answer cannot be written gets an error answer naming the key.
- Forked children do not hold the protocol's pipes; a host dies with its parent and drops
  steps not started when stdin closes.
- A step's log is capped (bytes and lines), and what the step's thread writes to stderr is
  part of it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from typing import Any, Iterator, Optional
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(HERE)
sys.path.insert(0, PACKAGE_ROOT)

from phasm import Context  # noqa: E402
from tests.support import WithModule  # noqa: E402
from phasm._runtime import (  # noqa: E402
    MAX_DEPTH,
    ContextTypeError,
    NotJSONError,
    Step,
    coerce,
)
from phasm.host import Host, _PrintRouter, encode_line, parent_is_gone  # noqa: E402

BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import phasm.host; phasm.host.main()"

MODULE = '''
import logging
import os
import subprocess
import sys
import threading
import time

from fantasm.action import FSMAction
import phasm

BAD_CONSTANT = "ok\\ud800"
STARTED = threading.Event()
RELEASE = threading.Event()

def echo(ctx):
    ctx.put("parent_pid_variable", os.environ.get("PHASM_PARENT_PID"))
    return "ok"

class SetNan(FSMAction):
    def execute(self, context, obj):
        context["amount"] = float("nan")  # a dict write: checked when the step ends
        return "ok"

class SetHugeInt(FSMAction):
    def execute(self, context, obj):
        context["big"] = 10 ** 400
        return "ok"

def bad_event(ctx):
    return "ok\\ud800"

def surrogates_in_text(ctx):
    print("printed \\ud800 text")
    ctx.info("logged \\udcff text")
    raise ValueError("broken \\ud800 value")

class NanToken:
    def continuation(self, ctx):
        return float("nan")
    def run(self, ctx):
        return "ok"

def put_nan(ctx):
    ctx.put("amount", float("nan"))

def spawn_nan(ctx):
    ctx.spawn("Child", {"a": 1}, countdown=float("inf"))

def loud(ctx):
    for _ in range(1024):
        print("x" * 1023)
    print("y" * (4 * 1024 * 1024))
    return "ok"

def chatty(ctx):
    for i in range(5000):
        ctx.logger.info("line %d", i)
    return "ok"

def to_stderr(ctx):
    sys.stderr.write("written to stderr\\n")
    print("printed to stderr", file=sys.stderr)
    logging.getLogger("hardmod").warning("through logging")
    other = threading.Thread(target=lambda: print("from another thread", file=sys.stderr))
    other.start()
    other.join()
    return "ok"

def blocker(ctx):
    STARTED.set()
    RELEASE.wait(30)
    return "ok"

def forks_a_child(ctx):
    pid = os.fork()
    if pid == 0:
        print("from the forked child", file=sys.stderr)
        sys.stderr.flush()
        time.sleep(30)
        os._exit(0)
    ctx.put("child", pid)
    return "ok"

def starts_programs(ctx):
    program = subprocess.Popen(["sleep", "30"], close_fds=False)
    os.system("sleep 20 >/dev/null 2>&1 </dev/null &")
    ctx.put("child", program.pid)
    return "ok"
'''


def strict_lines(data: bytes) -> list[dict[str, Any]]:
    """The host's output read as phasm reads it (serde_json): UTF-8, no NaN or Infinity, no
    lone surrogate, at most 127 levels deep, numbers a 64-bit float holds."""
    messages = []
    assert data.endswith(b"\n") or not data, data[-80:]
    for raw in data.split(b"\n")[:-1]:
        text = raw.decode("utf-8")  # strict

        def refuse(name: str) -> Any:
            raise AssertionError(f"the host wrote {name}")

        message = json.loads(text, parse_constant=refuse)
        stack: list[tuple[Any, int]] = [(message, 1)]
        while stack:
            value, depth = stack.pop()
            if isinstance(value, (dict, list)):
                assert depth < 128, "a line nested deeper than serde_json reads"
                items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
                for key, item in items:
                    if isinstance(key, str):
                        key.encode("utf-8")
                    stack.append((item, depth + 1))
            elif isinstance(value, str):
                value.encode("utf-8")  # a "\ud800" escape would fail here, as in serde_json
            elif isinstance(value, int) and not isinstance(value, bool):
                assert math.isfinite(float(value)), "an integer serde_json cannot read"
        messages.append(message)
    return messages


class Collect(io.BytesIO):
    def messages(self) -> list[dict[str, Any]]:
        return strict_lines(self.getvalue())


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


class HardeningTestCase(WithModule):
    MODULE_NAME = "hardmod"
    MODULE_SOURCE = MODULE

    def host(self, refs: list[str], types: Optional[dict[str, str]] = None,
             threads: int = 2, **hello: Any) -> tuple[Host, Collect]:
        out = Collect()
        host = Host(out)
        message = {"type": "hello", "protocol": 1, "path": [], "threads": threads,
                   "actions": [{"ref": r} for r in refs], "constants": [],
                   "machines": {"M": {"context_types": types or {}}}}
        message.update(hello)
        host.send(host.hello(message))
        return host, out

    @staticmethod
    def request(ident: int, calls: list[tuple[str, str]], **fields: Any) -> dict[str, Any]:
        msg = {"type": "step", "id": ident, "machine": "M", "instance": "M-1", "task": "t",
               "attempt": 0, "event": "e", "context": {}, "token": None,
               "calls": [{"role": r, "action": a, "state": "s"} for r, a in calls]}
        msg.update(fields)
        return msg

    def run_step(self, host: Host, out: Collect, calls: list[tuple[str, str]],
                 **fields: Any) -> dict[str, Any]:
        """Run one step as the host does (answer written through ``send``) and return its
        answer, read strictly."""
        host.run_step(self.request(9, calls, **fields))
        done = [m for m in out.messages() if m["type"] == "done"]
        self.assertEqual(len(done), 1, done)
        return done[0]


class StrictEncodingTests(HardeningTestCase):
    def test_a_float_key_holding_nan_or_infinity_text_fails_that_step_naming_the_key(self) -> None:
        for text in ["nan", "inf", "-inf", "infinity", "NaN", "1e999"]:
            with self.subTest(text=text):
                host, out = self.host(["hardmod.echo"], {"amount": "float"})
                done = self.run_step(host, out, [("action", "hardmod.echo")],
                                     context={"amount": text, "other": 1})
                self.assertIn("context key `amount`", done["error"]["message"])
                self.assertIn("is not a number JSON can hold", done["error"]["message"])
                self.assertNotIn("context", done)
        with self.assertRaises(ContextTypeError):
            coerce("float", float("inf"), "amount")

    def test_a_json_key_nested_too_deep_fails_that_step_naming_the_key(self) -> None:
        host, out = self.host(["hardmod.echo"], {"tree": "json"})
        done = self.run_step(host, out, [("action", "hardmod.echo")],
                             context={"tree": "[" * 130 + "]" * 130})
        self.assertIn("context key `tree`", done["error"]["message"])
        self.assertIn(f"nested more than {MAX_DEPTH - 2} levels deep", done["error"]["message"])
        host, out = self.host(["hardmod.echo"], {"tree": "json"})
        done = self.run_step(host, out, [("action", "hardmod.echo")],
                             context={"tree": "[" * 5000 + "]" * 5000})
        self.assertIn("context key `tree`", done["error"]["message"])
        host, out = self.host(["hardmod.echo"], {"tree": "json"})
        done = self.run_step(host, out, [("action", "hardmod.echo")],
                             context={"tree": '{"a": NaN}'})
        self.assertIn("context key `tree`", done["error"]["message"])

    def test_a_deep_context_from_phasm_fails_that_step_naming_the_key(self) -> None:
        # phasm refuses such a value where it enters; one stored before fails the step
        # that carries it (its answer cannot be written), naming the key.
        host, out = self.host(["hardmod.echo"])
        done = self.run_step(host, out, [("action", "hardmod.echo")],
                             context={"deep": nested(120), "fine": nested(90)})
        self.assertIn("context key `deep` is nested more than 98 levels deep",
                      done["error"]["message"])
        self.assertNotIn("context", done)

    def test_nan_set_by_an_action_fails_that_step(self) -> None:
        host, out = self.host(["hardmod.SetNan"])
        done = self.run_step(host, out, [("action", "hardmod.SetNan")], context={"a": 1})
        self.assertIn("context key `amount` holds nan, which JSON cannot hold",
                      done["error"]["message"])
        self.assertNotIn("context", done)

    def test_an_integer_serde_json_cannot_read_fails_that_step(self) -> None:
        host, out = self.host(["hardmod.SetHugeInt"])
        done = self.run_step(host, out, [("action", "hardmod.SetHugeInt")])
        self.assertIn("context key `big` holds an integer of", done["error"]["message"])

    def test_a_lone_surrogate_in_the_context_is_answered_not_hung(self) -> None:
        host, out = self.host(["hardmod.echo"])
        done = self.run_step(host, out, [("action", "hardmod.echo")],
                             context={"name": "a\ud800b", "fine": "é"})
        self.assertIn("context key `name` holds text with a lone surrogate (\\ud800)",
                      done["error"]["message"])
        self.assertNotIn("a\ud800b", json.dumps(done))

    def test_lone_surrogates_in_log_lines_and_errors_are_replaced(self) -> None:
        host, out = self.host(["hardmod.surrogates_in_text"])
        with contextlib.redirect_stdout(_PrintRouter(sys.stderr)):  # type: ignore[type-var]
            done = self.run_step(host, out, [("action", "hardmod.surrogates_in_text")])
        self.assertEqual(done["error"]["type"], "ValueError")
        self.assertEqual(done["error"]["message"], "broken \ufffd value")
        self.assertEqual(done["log"], [{"level": "info", "message": "printed \ufffd text"},
                                       {"level": "info", "message": "logged \ufffd text"}])

    def test_an_event_json_cannot_hold_fails_that_step(self) -> None:
        host, out = self.host(["hardmod.bad_event"])
        done = self.run_step(host, out, [("action", "hardmod.bad_event")])
        self.assertIn("the event holds text with a lone surrogate", done["error"]["message"])
        self.assertNotIn("event", done)

    def test_a_token_json_cannot_hold_fails_the_continuation_call(self) -> None:
        host, out = self.host(["hardmod.NanToken"])
        runner = threading.Thread(target=host.run_step, daemon=True, args=(self.request(
            9, [("continuation", "hardmod.NanToken"), ("action", "hardmod.NanToken")]),))
        runner.start()
        runner.join(10)
        self.assertFalse(runner.is_alive(), "the step must not wait for a go to a bad token")
        done = out.messages()[-1]
        self.assertEqual(done["error"]["call"], 0)
        self.assertEqual(done["error"]["message"],
                         "the next page's token holds nan, which JSON cannot hold")
        self.assertEqual([m["type"] for m in out.messages()], ["ready", "done"])

    def test_values_json_cannot_hold_are_refused_where_an_action_puts_them(self) -> None:
        step = Step({"id": 1}, {}, lambda step, token: None)
        ctx = Context({}, step, {})
        with self.assertRaises(NotJSONError) as caught:
            ctx.put("amount", float("nan"))
        self.assertEqual(str(caught.exception),
                         "context key `amount` holds nan, which JSON cannot hold")
        self.assertIsInstance(caught.exception, TypeError)
        with self.assertRaises(NotJSONError):
            ctx.put("deep", nested(MAX_DEPTH))
        ctx.put("deep enough", nested(MAX_DEPTH - 2))
        with self.assertRaises(NotJSONError):
            ctx.fork({"x": {"y": [float("-inf")]}})
        with self.assertRaises(NotJSONError):
            ctx.set_next_token({"page": float("nan")})
        with self.assertRaises(ValueError):
            ctx.spawn("Child", {"a": 1}, countdown=float("inf"))
        self.assertEqual(step.forks, [])
        self.assertEqual(step.spawns, [])

    def test_a_constant_json_cannot_hold_is_an_error_of_ready(self) -> None:
        out = Collect()
        host = Host(out)
        host.send(host.hello({"type": "hello", "protocol": 1, "path": [], "actions": [],
                              "constants": [{"candidates": ["hardmod.BAD_CONSTANT"]}],
                              "machines": {}}))
        ready = out.messages()[0]
        self.assertIn("lone surrogate", ready["constants"][0]["error"])

    def test_when_even_the_error_cannot_be_written_a_minimal_answer_is(self) -> None:
        host, out = self.host(["hardmod.SetNan"])
        with mock.patch("phasm.host._describe_answer", return_value="\ud800"):
            host.send({"type": "done", "id": 12, "context": {"a": float("nan")}})
        self.assertEqual(out.messages()[-1], {"type": "done", "id": 12, "error": {
            "call": None, "type": "NotJSONError",
            "message": "the step's answer cannot be written as JSON"}})

    def test_every_answer_is_strict_whatever_it_carries(self) -> None:
        host, out = self.host([])
        answers = [
            {"type": "done", "id": 1, "context": {"a": 1}, "forks": [{"b": float("nan")}]},
            {"type": "done", "id": 2, "spawns": [{"machine": "C", "contexts": [{"d": nested(96)}]}]},
            {"type": "done", "id": 3, "next_token": "\udc80"},
            {"type": "done", "id": 4, "context": {"\ud800": 1}},
            {"type": "done", "id": 5, "halt": float("inf")},
            {"type": "done", "id": 6, "log": [{"level": "info", "message": "\ud800"}]},
            {"type": "done", "id": 7, "context": {"s": {1, 2}}, "event": "fine"},
        ]
        for answer in answers:
            host.send(answer)
        done = {m["id"]: m for m in out.messages() if m["type"] == "done"}
        self.assertEqual(sorted(done), [1, 2, 3, 4, 5, 6, 7])
        self.assertEqual(done[1]["error"]["message"], "the step's answer cannot be sent to phasm: "
                         "fork 1's context key `b` holds nan, which JSON cannot hold")
        self.assertIn("spawned context 1 of machine `C` key `d` is nested more than 95 levels",
                      done[2]["error"]["message"])
        self.assertIn("the next token holds text with a lone surrogate (\\udc80)",
                      done[3]["error"]["message"])
        self.assertIn("context key `\\ud800` is text with a lone surrogate",
                      done[4]["error"]["message"])
        self.assertIn("the halt reason holds inf", done[5]["error"]["message"])
        self.assertIn("`log` holds text with a lone surrogate", done[6]["error"]["message"])
        self.assertEqual(sorted(done[7]["context"]["s"]), [1, 2])
        with self.assertRaises(NotJSONError):
            encode_line({"type": "token", "id": 1, "token": float("nan")})

    def test_a_step_request_that_cannot_be_read_fails_only_that_step(self) -> None:
        host, out = self.host(["hardmod.echo"])
        lines = [
            b'{"type":"step","id":5,"context":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n",
            b'{"type":"step","id":6,"context":{"a":NaN},"calls":[]}\n',
            b'{"type":"step","id":7,"context":{"a":"\xff"},"calls":[]}\n',
            b'{"type":"step","id":8,"context":{"a":tru},"calls":[]}\n',
            (json.dumps(self.request(9, [("action", "hardmod.echo")])) + "\n").encode(),
        ]

        def then_wait() -> Iterator[bytes]:
            yield from lines
            # stdin ends once step 9 ran (a step not started when it ends would be dropped).
            deadline = time.monotonic() + 10
            while b'"id":9' not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)

        host.serve(then_wait())
        done = {m["id"]: m for m in out.messages() if m["type"] == "done"}
        self.assertEqual(sorted(done), [5, 6, 7, 8, 9])
        for ident in (5, 6, 7, 8):
            self.assertIn("the host cannot read the step request", done[ident]["error"]["message"])
            self.assertIsNone(done[ident]["error"]["call"])
        self.assertEqual(done[9]["event"], "ok")


class OutputVolumeTests(HardeningTestCase):
    def test_a_steps_printed_output_is_capped_and_the_rest_summed_up(self) -> None:
        host, out = self.host(["hardmod.loud"])
        started = time.monotonic()
        with contextlib.redirect_stdout(_PrintRouter(sys.stderr)):  # type: ignore[type-var]
            done = self.run_step(host, out, [("action", "hardmod.loud")])
        self.assertLess(time.monotonic() - started, 10)
        log = done["log"]
        kept = sum(len(line["message"].encode()) for line in log[:-1])
        self.assertLessEqual(kept, 64 * 1024)
        self.assertLessEqual(len(log), 66)
        self.assertEqual(log[-1]["level"], "warning")
        self.assertRegex(log[-1]["message"],
                         r"^… 4\.9 MiB more output cut \([\d,]+ lines; limit 64 KiB or "
                         r"1,000 lines per step\)$")
        self.assertEqual(done["event"], "ok")

    def test_a_steps_log_lines_are_capped(self) -> None:
        host, out = self.host(["hardmod.chatty"])
        done = self.run_step(host, out, [("action", "hardmod.chatty")])
        self.assertEqual(len(done["log"]), 1001)
        self.assertEqual(done["log"][999]["message"], "line 999")
        self.assertIn("(4,000 lines; limit 64 KiB or 1,000 lines per step)",
                      done["log"][-1]["message"])

    def test_hello_may_set_the_limits(self) -> None:
        host, out = self.host(["hardmod.chatty"], max_log_lines=10, max_log_bytes=100)
        done = self.run_step(host, out, [("action", "hardmod.chatty")])
        self.assertEqual(len(done["log"]), 11)
        self.assertIn("limit 100 bytes or 10 lines per step", done["log"][-1]["message"])

    def test_a_long_line_without_a_newline_is_not_kept_whole(self) -> None:
        step = Step({"id": 1}, {}, lambda step, token: None, log_bytes=1000)
        for _ in range(100):
            step.printed("z" * 10_000)
        step.printed("\n", "info")
        step.finish_log()
        self.assertEqual(step.logs[0]["message"], "z" * 1000)
        self.assertEqual(step.logs[-1]["message"], "… 975.6 KiB more output cut (1 line; "
                         "limit 1000 bytes or 1,000 lines per step)")
        self.assertLess(len(step._partial), 1)

    def test_stderr_of_the_steps_thread_is_a_warning_line_of_its_log(self) -> None:
        host, out = self.host(["hardmod.to_stderr"])
        real = io.StringIO()
        with contextlib.redirect_stderr(_PrintRouter(real, "warning")):  # type: ignore[type-var]
            done = self.run_step(host, out, [("action", "hardmod.to_stderr")])
        self.assertEqual(done["log"], [
            {"level": "warning", "message": "written to stderr"},
            {"level": "warning", "message": "printed to stderr"},
            {"level": "warning", "message": "through logging"},
        ])
        self.assertEqual(real.getvalue(), "from another thread\n")


class WholeHostTests(HardeningTestCase):
    def start(self, *, env: Optional[dict[str, str]] = None,
              stderr: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
        environment = dict(os.environ)
        environment.pop("PHASM_PARENT_PID", None)
        environment.update(env or {})
        return subprocess.Popen([sys.executable, "-c", BOOT, PACKAGE_ROOT],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                env=environment)

    def lines(self, *steps: tuple[int, str]) -> bytes:
        messages: list[dict[str, Any]] = [
            {"type": "hello", "protocol": 1, "path": [self.tmp.name], "threads": 4,
             "actions": [{"ref": ref} for _, ref in steps], "constants": [], "machines": {}}]
        messages += [self.request(ident, [("action", ref)]) for ident, ref in steps]
        return "".join(json.dumps(m) + "\n" for m in messages).encode()

    def read_to_eof(self, proc: subprocess.Popen[bytes], seconds: float) -> Optional[bytes]:
        """Everything on the host's stdout, or ``None`` when it does not end in time."""
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(proc.stdout.read()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(seconds)
        return result[0] if result else None

    def test_stderr_and_logging_during_a_step_go_to_its_log(self) -> None:
        proc = self.start()
        stdout, stderr = proc.communicate(self.lines((1, "hardmod.to_stderr")), timeout=60)
        messages = strict_lines(stdout)
        self.assertEqual(messages[1]["log"], [
            {"level": "warning", "message": "written to stderr"},
            {"level": "warning", "message": "printed to stderr"},
            {"level": "warning", "message": "through logging"},
        ], stderr)
        self.assertIn(b"from another thread", stderr)
        self.assertNotIn(b"written to stderr", stderr)

    def test_a_forked_child_does_not_hold_the_protocol_pipe(self) -> None:
        with tempfile.TemporaryFile() as err:
            proc = self.start(stderr=err)
            child = 0
            try:
                assert proc.stdin is not None
                proc.stdin.write(self.lines((1, "hardmod.forks_a_child")))
                proc.stdin.close()
                stdout = self.read_to_eof(proc, 10)
                self.assertIsNotNone(stdout, "the host's stdout must end when the host exits")
                assert stdout is not None
                done = strict_lines(stdout)[1]
                child = done["context"]["child"]
                self.assertEqual(done["event"], "ok")
                self.assertEqual(proc.wait(10), 0)
                # The child's output is its own (the host's stderr), not lost in a step's log.
                deadline = time.monotonic() + 5
                while True:
                    err.seek(0)
                    printed = err.read()
                    if b"from the forked child" in printed or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                self.assertIn(b"from the forked child", printed)
            finally:
                if child:
                    os.kill(child, signal.SIGKILL)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                assert proc.stdout is not None
                proc.stdout.close()

    def test_programs_an_action_starts_do_not_hold_the_protocol_pipe(self) -> None:
        with tempfile.TemporaryFile() as err:
            proc = self.start(stderr=err)
            child = 0
            try:
                assert proc.stdin is not None
                proc.stdin.write(self.lines((1, "hardmod.starts_programs")))
                proc.stdin.close()
                stdout = self.read_to_eof(proc, 10)
                self.assertIsNotNone(stdout, "the host's stdout must end when the host exits")
                assert stdout is not None
                child = strict_lines(stdout)[1]["context"]["child"]
            finally:
                if child:
                    os.kill(child, signal.SIGKILL)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                assert proc.stdout is not None
                proc.stdout.close()

    def test_a_host_whose_parent_is_already_gone_exits_at_once(self) -> None:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        proc = self.start(env={"PHASM_PARENT_PID": str(gone.pid)})
        try:
            self.assertEqual(proc.wait(10), 1)
            assert proc.stderr is not None
            self.assertIn(b"is gone; exiting", proc.stderr.read())
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def test_the_parent_pid_variable_is_checked_and_not_passed_on(self) -> None:
        proc = self.start(env={"PHASM_PARENT_PID": str(os.getpid())})
        stdout, stderr = proc.communicate(self.lines((1, "hardmod.echo")), timeout=60)
        self.assertEqual(proc.returncode, 0, stderr)
        done = strict_lines(stdout)[1]
        self.assertIsNone(done["context"]["parent_pid_variable"])

    @unittest.skipUnless(sys.platform.startswith("linux"), "PR_SET_PDEATHSIG is Linux's")
    def test_a_host_dies_with_its_parent(self) -> None:
        # The host's stdin stays open (this test holds it), so only the death signal ends it.
        host_in_read, host_in_write = os.pipe()
        host_out_read, host_out_write = os.pipe()
        middle = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent("""
                import subprocess, sys, time
                host = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                                        stdin=int(sys.argv[3]), stdout=int(sys.argv[4]))
                print(host.pid, flush=True)
                time.sleep(60)
            """), BOOT, PACKAGE_ROOT, str(host_in_read), str(host_out_write)],
            stdout=subprocess.PIPE, pass_fds=(host_in_read, host_out_write))
        os.close(host_in_read)
        os.close(host_out_write)
        host_pid = 0
        try:
            assert middle.stdout is not None
            host_pid = int(middle.stdout.readline())
            os.write(host_in_write, self.lines())
            with os.fdopen(host_out_read, "rb", closefd=False) as out:
                self.assertEqual(json.loads(out.readline())["type"], "ready")
            middle.kill()
            middle.wait()
            deadline = time.monotonic() + 5
            while alive(host_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertFalse(alive(host_pid), "the host outlived its parent")
        finally:
            if middle.poll() is None:
                middle.kill()
                middle.wait()
            if host_pid and alive(host_pid):
                os.kill(host_pid, signal.SIGKILL)
            os.close(host_in_write)
            os.close(host_out_read)

    def test_whether_the_parent_is_gone(self) -> None:
        self.assertTrue(parent_is_gone(None, 1))
        self.assertFalse(parent_is_gone(None, os.getpid()))
        self.assertFalse(parent_is_gone(os.getppid(), os.getppid()))
        self.assertFalse(parent_is_gone(1, 1))  # phasm may itself be pid 1 (a container)
        # A wrapper between phasm and the host: phasm still exists.
        self.assertFalse(parent_is_gone(os.getpid(), 12345))
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        self.assertTrue(parent_is_gone(gone.pid, 1))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


class ClosingTests(HardeningTestCase):
    def test_steps_not_started_when_stdin_closes_are_dropped(self) -> None:
        import hardmod  # type: ignore[import-not-found]

        hardmod.STARTED.clear()
        hardmod.RELEASE.clear()
        out = Collect()
        host = Host(out)
        hello = {"type": "hello", "protocol": 1, "path": [], "threads": 1,
                 "actions": [{"ref": "hardmod.blocker"}, {"ref": "hardmod.echo"}],
                 "constants": [], "machines": {}}

        def lines() -> Iterator[bytes]:
            yield (json.dumps(hello) + "\n").encode()
            yield (json.dumps(self.request(1, [("action", "hardmod.blocker")])) + "\n").encode()
            self.assertTrue(hardmod.STARTED.wait(10))
            yield (json.dumps(self.request(2, [("action", "hardmod.echo")])) + "\n").encode()
            # stdin ends here, while step 1 runs and step 2 waits for a thread.
            threading.Timer(0.3, hardmod.RELEASE.set).start()

        with contextlib.redirect_stderr(io.StringIO()) as noted:
            host.serve(lines())
        self.assertIn("stdin closed before step 2 started", noted.getvalue())
        self.assertEqual([(m["type"], m.get("id")) for m in out.messages()],
                         [("ready", None), ("done", 1)])

    def test_running_steps_are_not_waited_for_once_the_parent_is_gone(self) -> None:
        import hardmod  # type: ignore[import-not-found]

        hardmod.STARTED.clear()
        hardmod.RELEASE.clear()
        out = Collect()
        host = Host(out)
        host.parent_gone = lambda: hardmod.STARTED.is_set()
        hello = {"type": "hello", "protocol": 1, "path": [], "threads": 1, "drain_seconds": 10,
                 "actions": [{"ref": "hardmod.blocker"}], "constants": [], "machines": {}}

        def lines() -> Iterator[bytes]:
            yield (json.dumps(hello) + "\n").encode()
            yield (json.dumps(self.request(1, [("action", "hardmod.blocker")])) + "\n").encode()
            self.assertTrue(hardmod.STARTED.wait(10))

        started = time.monotonic()
        try:
            host.serve(lines())
            self.assertLess(time.monotonic() - started, 3)
        finally:
            hardmod.RELEASE.set()


if __name__ == "__main__":
    unittest.main()
