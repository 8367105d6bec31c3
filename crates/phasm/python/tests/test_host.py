"""The host's pieces (resolution, steps, contexts) and the whole host over real pipes."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import unittest
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(HERE)
sys.path.insert(0, PACKAGE_ROOT)

from fantasm.action import ListContinuationFSMAction  # noqa: E402
from fantasm.fsm import FSMContext, instance_start_time  # noqa: E402
from phasm import Context  # noqa: E402
from tests.support import WithModule  # noqa: E402
from phasm._runtime import ContextTypeError, Step, coerce, level_name  # noqa: E402
from phasm.host import Host, ResolveError, Target, _PrintRouter, resolve  # noqa: E402

MODULE = '''
from fantasm.action import FSMAction, ListContinuationFSMAction
from fantasm.exceptions import HaltMachineError
import phasm

OK = "ok"
NUMBER = 3

class Fantasm(FSMAction):
    def execute(self, context, obj):
        obj["seen"] = obj.get("seen", 0) + 1
        context["calls"] = context.get("calls", 0) + 1
        return "next"

class Halter(FSMAction):
    def execute(self, context, obj):
        raise HaltMachineError("stop", logLevel=None)

class Pages(ListContinuationFSMAction):
    def getList(self, context, obj):
        return [10, 20, 30]
    def execute(self, context, obj):
        context["page"] = obj["results"]
        return "paged"

class Native:
    def run(self, ctx):
        ctx.put("native", ctx.attempt)

def function(ctx):
    ctx.fork({"forked": 1})
    print("printed")
    return "done"

def boom(ctx):
    raise KeyError("missing")

class NotAnAction:
    pass

class Joiner(FSMAction):
    def execute(self, contexts, obj):
        obj["__fic__"]["xs"] = [c["x"] for c in contexts]
        contexts.logger.info("%d joined", len(contexts))
        return "joined"
'''


class Collect(io.BytesIO):
    """The protocol's output, as decoded messages."""

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().decode().splitlines()]


class HostTestCase(WithModule):
    MODULE_NAME = "hostmod"
    MODULE_SOURCE = MODULE

    def host(self, refs: list[str], types: dict[str, str] | None = None) -> tuple[Host, Collect, dict[str, Any]]:
        out = Collect()
        host = Host(out)
        ready = host.hello({
            "type": "hello", "protocol": 1, "path": [], "threads": 2,
            "actions": [{"ref": r} for r in refs],
            "constants": [{"candidates": ["hostmod.OK"]}, {"candidates": ["hostmod.NUMBER"]},
                          {"candidates": ["hostmod.NOPE"]}],
            "machines": {"M": {"context_types": types or {}}},
        })
        return host, out, ready

    def step(self, host: Host, calls: list[tuple[str, str]], **fields: Any) -> dict[str, Any]:
        msg = {"type": "step", "id": 1, "machine": "M", "instance": "M-20260102030405-abcdef",
               "task": "t", "attempt": 0, "event": "e", "context": {}, "token": None,
               "calls": [{"role": r, "action": a, "state": "s"} for r, a in calls]}
        msg.update(fields)
        return host.step(msg)


class ResolveTests(HostTestCase):
    def test_resolves_classes_functions_and_constants(self) -> None:
        _, _, ready = self.host(["hostmod.Fantasm", "hostmod.function", "hostmod.Native",
                                 "hostmod.Missing", "nomodule.X", "Bare", "hostmod.NotAnAction"])
        kinds = [a.get("kind") or a["error"] for a in ready["actions"]]
        self.assertEqual(kinds[:3], ["fantasm", "function", "class"])
        self.assertIn("`Missing` was not found in module `hostmod`", kinds[3])
        self.assertIn("no module of `nomodule.X` can be imported", kinds[4])
        self.assertIn("names no module", kinds[5])
        self.assertIn("is not an action", kinds[6])
        self.assertEqual(ready["constants"][0], {"ref": "hostmod.OK", "value": "ok"})
        self.assertIn("is a int, not a str", ready["constants"][1]["error"])
        self.assertEqual(ready["constants"][2], {})

    def test_an_error_inside_a_module_is_reported_not_skipped(self) -> None:
        with open(os.path.join(self.tmp.name, "broken.py"), "w") as f:
            f.write("import google.appengine.ext.db\n")
        with self.assertRaises(ResolveError) as caught:
            resolve("broken.Thing")
        self.assertIn("module `broken` cannot be imported", str(caught.exception))
        self.assertIn("google", str(caught.exception))

    def test_one_instance_per_class(self) -> None:
        host, _, _ = self.host(["hostmod.Fantasm"])
        target = host.targets["hostmod.Fantasm"]
        self.assertIsInstance(target, Target)
        first = self.step(host, [("entry", "hostmod.Fantasm"), ("action", "hostmod.Fantasm")])
        self.assertEqual(first["context"], {"calls": 2})
        self.assertEqual(first["event"], "next")
        self.assertIs(host.targets["hostmod.Fantasm"], target)


class StepTests(HostTestCase):
    def test_obj_is_shared_and_fresh_per_step(self) -> None:
        host, _, _ = self.host(["hostmod.Fantasm"])
        done = self.step(host, [("exit", "hostmod.Fantasm"), ("transition", "hostmod.Fantasm"),
                                ("entry", "hostmod.Fantasm"), ("action", "hostmod.Fantasm")])
        self.assertEqual(done["context"]["calls"], 4)

    def test_a_native_function_forks_and_prints(self) -> None:
        host, _, _ = self.host(["hostmod.function"])
        with contextlib.redirect_stdout(_PrintRouter(sys.stderr)):  # type: ignore[type-var]
            done = self.step(host, [("action", "hostmod.function")], context={"a": 1})
        self.assertEqual(done["event"], "done")
        self.assertEqual(done["forks"], [{"a": 1, "forked": 1}])
        self.assertEqual(done["log"], [{"level": "info", "message": "printed"}])

    def test_a_failure_names_the_call_and_keeps_the_traceback(self) -> None:
        host, _, _ = self.host(["hostmod.Fantasm", "hostmod.boom"])
        done = self.step(host, [("entry", "hostmod.Fantasm"), ("action", "hostmod.boom")])
        error = done["error"]
        self.assertEqual(error["call"], 1)
        self.assertEqual(error["type"], "KeyError")
        self.assertIn("in boom", error["traceback"])
        self.assertNotIn("context", done)

    def test_halt_stops_the_calls(self) -> None:
        host, _, _ = self.host(["hostmod.Halter", "hostmod.Fantasm"])
        done = self.step(host, [("entry", "hostmod.Halter"), ("action", "hostmod.Fantasm")])
        self.assertEqual(done["halt"], "stop")
        self.assertEqual(done["context"], {})
        self.assertNotIn("log", done)

    def test_a_continuation_reports_its_token_and_waits_for_go(self) -> None:
        host, out, _ = self.host(["hostmod.Pages"])
        msg = {"type": "step", "id": 7, "machine": "M", "instance": "i", "task": "t",
               "context": {}, "token": "1",
               "calls": [{"role": "continuation", "action": "hostmod.Pages", "state": "s"},
                         {"role": "action", "action": "hostmod.Pages", "state": "s"}]}
        result: list[dict[str, Any]] = []
        runner = threading.Thread(target=lambda: result.append(host.step(msg)))
        runner.start()
        for _ in range(200):
            if out.getvalue():
                break
            threading.Event().wait(0.01)
        self.assertEqual(out.messages(), [{"type": "token", "id": 7, "token": "2"}])
        self.assertFalse(result, "the page must wait for go")
        host.answer({"type": "go", "id": 7})
        runner.join(5)
        self.assertEqual(result[0]["context"]["page"], [20])
        self.assertEqual(result[0]["event"], "paged")

    def test_an_abort_fails_the_step(self) -> None:
        host, _, _ = self.host(["hostmod.Pages"])
        msg = {"type": "step", "id": 8, "machine": "M", "instance": "i", "task": "t",
               "context": {}, "token": None,
               "calls": [{"role": "continuation", "action": "hostmod.Pages", "state": "s"},
                         {"role": "action", "action": "hostmod.Pages", "state": "s"}]}
        threading.Timer(0.1, lambda: host.answer({"type": "abort", "id": 8, "error": "lease lost"})).start()
        done = host.step(msg)
        self.assertEqual(done["error"]["type"], "Aborted")
        self.assertEqual(done["error"]["message"], "lease lost")

    def test_context_types_convert_on_read_and_serialise_on_write(self) -> None:
        host, _, _ = self.host(["hostmod.Native"], {"when": "datetime", "n": "int"})
        done = self.step(host, [("action", "hostmod.Native")],
                         context={"when": "2026-01-02T03:04:05", "n": "7"}, attempt=2)
        self.assertEqual(done["context"], {"when": datetime.datetime(2026, 1, 2, 3, 4, 5), "n": 7, "native": 2})
        encoded = json.loads(json.dumps(done, default=str))
        self.assertEqual(encoded["context"]["n"], 7)

    def test_a_value_that_does_not_fit_its_type_fails_before_any_call(self) -> None:
        host, _, _ = self.host(["hostmod.Native"], {"n": "int"})
        done = self.step(host, [("action", "hostmod.Native")], context={"n": "seven"})
        self.assertIn("declared `int`", done["error"]["message"])

    def test_a_fan_in_gets_the_list_and_goes_on_with_fic(self) -> None:
        host, _, _ = self.host(["hostmod.Joiner"])
        done = self.step(host, [("action", "hostmod.Joiner")], context={"x": 1},
                         contexts=[{"x": 1}, {"x": 2}])
        self.assertEqual(done["context"], {"x": 1, "xs": [1, 2]})
        self.assertEqual(done["event"], "joined")
        self.assertEqual(done["log"], [{"level": "info", "message": "2 joined"}])


class ContextTests(unittest.TestCase):
    def step(self) -> Step:
        return Step({"id": 1, "machine": "M", "instance": "M-20260102030405-abcdef", "task": "t"},
                    {"n": "int"}, lambda step, token: None)

    def test_fork_copies_at_call_time(self) -> None:
        step = self.step()
        ctx = FSMContext({"a": [1]}, step, {})
        ctx.fork({"f": 1})
        ctx["a"].append(2)
        self.assertEqual(step.forks, [{"a": [1], "f": 1}])

    def test_spawn_takes_one_context_or_many(self) -> None:
        step = self.step()
        ctx = FSMContext({}, step, {})
        ctx.spawn("Child", {"x": 1}, countdown=5)
        ctx.spawn("Child", [{"x": 2}, {"x": 3}])
        self.assertEqual(step.spawns, [
            {"machine": "Child", "contexts": [{"x": 1}], "countdown": 5.0},
            {"machine": "Child", "contexts": [{"x": 2}, {"x": 3}]},
        ])

    def test_set_queue_explains_what_to_do(self) -> None:
        with self.assertRaises(NotImplementedError) as caught:
            FSMContext({}, self.step(), {}).setQueue("q")
        self.assertIn("queue:", str(caught.exception))

    def test_instance_start_time_from_generated_names(self) -> None:
        self.assertEqual(instance_start_time("M-20260102030405-abcdef"),
                         datetime.datetime(2026, 1, 2, 3, 4, 5))
        self.assertIsNone(instance_start_time("my-order"))

    def test_clone_and_put_typed_value(self) -> None:
        ctx = FSMContext({"a": {"b": 1}}, self.step(), {})
        clone = ctx.clone(updateData={"c": 2})
        clone["a"]["b"] = 5
        self.assertEqual(ctx["a"]["b"], 1)
        self.assertEqual(clone["c"], 2)
        ctx.putTypedValue("n", "12")
        self.assertEqual(ctx["n"], 12)

    def test_logger_levels_formatting_and_bounds(self) -> None:
        step = self.step()
        logger = FSMContext({}, step, {}).logger
        logger.setLevel(20)
        logger.debug("dropped")
        logger.info("%d items", 3)
        logger.critical("bad %s", "format", "extra")
        self.assertEqual(step.logs, [{"level": "info", "message": "3 items"},
                                     {"level": "critical", "message": "bad %s ('format', 'extra')"}])
        self.assertEqual(level_name(35), "warning")

    def test_native_typed_get_and_json_put(self) -> None:
        step = self.step()
        ctx = Context({"n": "5", "day": "2026-03-04"}, step, {})
        self.assertEqual(ctx.get("n", int), 5)
        self.assertEqual(ctx.get("day", datetime.date), datetime.date(2026, 3, 4))
        self.assertEqual(ctx.get("missing", int, default=9), 9)
        with self.assertRaises(TypeError):
            ctx.put("bad", object())
        ctx.halt("done")
        self.assertEqual(step.halt, "done")

    def test_coercion_rules(self) -> None:
        self.assertIs(coerce("bool", "true"), True)
        self.assertIs(coerce("bool", "no"), False)
        self.assertEqual(coerce("float", "2.5"), 2.5)
        self.assertEqual(coerce("json", '{"a": 1}'), {"a": 1})
        self.assertEqual(coerce("google.appengine.ext.db.Key", "k"), "k")
        with self.assertRaises(ContextTypeError):
            coerce("int", [1])

    def test_list_continuation_marks_the_last_page(self) -> None:
        class Items(ListContinuationFSMAction):
            def getList(self, context: Any, obj: Any) -> list[int]:
                return [1, 2, 3, 4]

            def getBatchSize(self, context: Any, obj: Any) -> int:
                return 2

        action, context, obj = Items(), {}, {}
        self.assertEqual(action.continuation(context, obj), "2")
        self.assertFalse(context["__cc__"])
        self.assertIsNone(action.continuation(context, obj, token="2"))
        self.assertEqual(obj["results"], [3, 4])
        self.assertTrue(context["__cc__"])


class WholeHostTests(HostTestCase):
    def test_the_host_over_pipes_keeps_stdout_for_the_protocol(self) -> None:
        module = textwrap.dedent('''
            import os
            def loud(ctx):
                print("to the log")
                os.system("echo from a child process")
                return "ok"
        ''')
        with open(os.path.join(self.tmp.name, "loud.py"), "w") as f:
            f.write(module)
        lines = [
            {"type": "hello", "protocol": 1, "path": [self.tmp.name], "threads": 4,
             "actions": [{"ref": "loud.loud"}], "constants": [], "machines": {}},
            {"type": "step", "id": 1, "machine": "M", "instance": "i", "task": "t",
             "context": {}, "token": None,
             "calls": [{"role": "action", "action": "loud.loud", "state": "s"}]},
        ]
        boot = "import sys; sys.path.insert(0, sys.argv[1]); import phasm.host; phasm.host.main()"
        proc = subprocess.run(
            [sys.executable, "-c", boot, PACKAGE_ROOT],
            input="".join(json.dumps(line) + "\n" for line in lines).encode(),
            capture_output=True, timeout=60,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        messages = [json.loads(line) for line in proc.stdout.decode().splitlines()]
        self.assertEqual([m["type"] for m in messages], ["ready", "done"])
        self.assertEqual(messages[1]["event"], "ok")
        self.assertEqual(messages[1]["log"], [{"level": "info", "message": "to the log"}])
        self.assertIn(b"from a child process", proc.stderr)


    def test_a_vendored_fantasm_package_does_not_shadow_phasms(self) -> None:
        # Fantasm applications carried a copy of Fantasm (App Engine imports and all) in their
        # folder; the host's own `fantasm` must win whatever `python: path` says.
        app = tempfile.mkdtemp()
        os.makedirs(os.path.join(app, "fantasm"))
        with open(os.path.join(app, "fantasm", "__init__.py"), "w") as f:
            f.write("from google.appengine.ext import db\n")
        with open(os.path.join(app, "vend.py"), "w") as f:
            f.write("from fantasm.action import FSMAction\n\n"
                    "class Go(FSMAction):\n"
                    "    def execute(self, context, obj):\n"
                    "        return 'ok'\n")
        lines = [
            {"type": "hello", "protocol": 1, "path": [app], "threads": 1,
             "actions": [{"ref": "vend.Go"}], "constants": [], "machines": {}},
        ]
        boot = "import sys; sys.path.insert(0, sys.argv[1]); import phasm.host; phasm.host.main()"
        proc = subprocess.run(
            [sys.executable, "-c", boot, PACKAGE_ROOT],
            input="".join(json.dumps(line) + "\n" for line in lines).encode(),
            capture_output=True, timeout=60,
        )
        ready = json.loads(proc.stdout.decode().splitlines()[0])
        self.assertEqual(ready["actions"], [{"ref": "vend.Go", "kind": "fantasm", "continuation": False}],
                         proc.stderr)


if __name__ == "__main__":
    unittest.main()
