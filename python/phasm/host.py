"""phasm's Python action host: runs a worker's Python actions, many steps at once.

phasm starts ``python3 -c 'import phasm.host; phasm.host.main()'`` a few times per worker and
talks to each process over stdin/stdout in newline-delimited JSON (docs/host-protocol.md):
a ``hello`` that resolves every action name before any instance runs, then ``step`` requests
(all of a step's calls in order, sharing one ``obj``), answered by ``done`` (and, for a
continuation page, ``token`` first). The protocol owns the process's real stdout: a user's
``print()`` becomes a log line of the step that printed it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import os
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Optional, TextIO

# phasm's own `fantasm` is imported before `hello` puts the application's folders on the
# path: an application that carries its copy of Fantasm (App Engine imports and all) then
# still gets these modules, which `sys.modules` keeps.
import fantasm.action  # noqa: F401
import fantasm.constants  # noqa: F401
import fantasm.exceptions  # noqa: F401
from fantasm.fsm import FanInContexts, FSMContext
from phasm import PROTOCOL_VERSION, Context, Halt, TransientError
from phasm._runtime import (
    Aborted,
    Step,
    check_json,
    coerce_all,
    current_step,
    level_name,
    set_current_step,
    to_json,
)

#: Steps one host process runs at once (phasm bounds what it sends to the same number).
DEFAULT_THREADS = 32


class ResolveError(Exception):
    """An action or constant name that cannot be resolved, with the reason."""


def resolve(ref: str) -> Any:
    """The object a dotted name refers to: the longest importable module prefix, then
    attributes (``pkg.module.Class``, ``module.Class.CONSTANT``)."""
    parts = ref.split(".")
    if len(parts) < 2:
        raise ResolveError(
            f"`{ref}` names no module: write `module.{ref}`, or set the machine's "
            f"`namespace:` to the module that defines it"
        )
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                continue  # not a module at this length: try a shorter prefix
            raise ResolveError(
                f"module `{module_name}` cannot be imported: {type(e).__name__}: {e}"
            ) from e
        except Exception as e:  # noqa: BLE001 - any error inside the user's module
            raise ResolveError(
                f"module `{module_name}` cannot be imported: {type(e).__name__}: {e}"
            ) from e
        value: Any = module
        for attr in parts[cut:]:
            if not hasattr(value, attr):
                close = difflib.get_close_matches(attr, [n for n in dir(value) if not n.startswith("_")], n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                raise ResolveError(
                    f"`{attr}` was not found in {_describe(value)} (looking up `{ref}`){hint}"
                )
            value = getattr(value, attr)
        return value
    raise ResolveError(f"no module of `{ref}` can be imported (is `python: path:` right?)")


def _describe(value: Any) -> str:
    if inspect.ismodule(value):
        return f"module `{value.__name__}` ({getattr(value, '__file__', '?')})"
    return f"`{getattr(value, '__qualname__', value)!s}`"


class Target:
    """A resolved action: a Fantasm-style object (``execute``), a native class (``run``),
    or a native function. Classes are instantiated once per host process."""

    def __init__(self, ref: str, value: Any) -> None:
        self.ref = ref
        if inspect.isclass(value):
            unsupported = getattr(value, "_phasm_unsupported", None)
            if unsupported:
                raise ResolveError(f"class `{value.__name__}` is a {unsupported}")
            try:
                instance = value()
            except Exception as e:  # noqa: BLE001
                raise ResolveError(
                    f"class `{value.__name__}` cannot be instantiated without arguments: "
                    f"{type(e).__name__}: {e}"
                ) from e
        else:
            instance = value
        if callable(getattr(instance, "execute", None)):
            self.kind = "fantasm"
            self.call = instance.execute
        elif inspect.isclass(value) and callable(getattr(instance, "run", None)):
            self.kind = "class"
            self.call = instance.run
        elif inspect.isfunction(value) or inspect.isbuiltin(value) or (
            callable(value) and not inspect.isclass(value) and not inspect.ismodule(value)
        ):
            self.kind = "function"
            self.call = value
        else:
            raise ResolveError(
                f"`{ref}` is not an action: expected a function taking a phasm.Context, a "
                f"class with run(self, ctx), or a Fantasm FSMAction with "
                f"execute(self, context, obj)"
            )
        continuation = getattr(instance, "continuation", None)
        self.continuation = continuation if callable(continuation) else None


class Host:
    """One host process's state: resolved actions, machines, and steps waiting for phasm."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._write = threading.Lock()
        self._gates: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._gates_lock = threading.Lock()
        self.targets: dict[str, Target] = {}
        self.types: dict[str, dict[str, str]] = {}
        self.threads = DEFAULT_THREADS
        self.drain_seconds = 300.0
        self._running = 0
        self._idle = threading.Condition()

    # -- output --------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, ensure_ascii=False, separators=(",", ":"), default=to_json)
        line = (data + "\n").encode("utf-8", "surrogateescape")
        with self._write:
            try:
                self._out.write(line)
                self._out.flush()
            except (BrokenPipeError, OSError):
                pass  # phasm is gone; the step's outcome is lost and will be retried

    # -- hello ---------------------------------------------------------------------------

    def hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        version = msg.get("protocol")
        if version != PROTOCOL_VERSION:
            return {
                "type": "ready",
                "protocol": PROTOCOL_VERSION,
                "fatal": f"phasm speaks protocol {version}, this host speaks {PROTOCOL_VERSION}",
            }
        for entry in reversed(msg.get("path") or []):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        self.threads = max(1, int(msg.get("threads") or DEFAULT_THREADS))
        self.drain_seconds = float(msg.get("drain_seconds") or 300)
        self.types = {
            name: dict(info.get("context_types") or {})
            for name, info in (msg.get("machines") or {}).items()
        }
        actions = []
        for entry in msg.get("actions") or []:
            ref = entry["ref"]
            try:
                target = Target(ref, resolve(ref))
            except ResolveError as e:
                actions.append({"ref": ref, "error": str(e)})
                continue
            self.targets[ref] = target
            actions.append({
                "ref": ref,
                "kind": target.kind,
                "continuation": target.continuation is not None,
            })
        constants = []
        for entry in msg.get("constants") or []:
            constants.append(resolve_constant(entry.get("candidates") or []))
        return {
            "type": "ready",
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "actions": actions,
            "constants": constants,
        }

    # -- steps ---------------------------------------------------------------------------

    def wait_for_go(self, step: Step, token: Any) -> None:
        event = threading.Event()
        answer: list[dict[str, Any]] = []
        with self._gates_lock:
            self._gates[step.id] = (event, answer)
        self.send({"type": "token", "id": step.id, "token": token})
        event.wait()
        if answer and answer[0].get("type") == "abort":
            raise Aborted(answer[0].get("error") or "phasm stopped the step")

    def answer(self, msg: dict[str, Any]) -> None:
        with self._gates_lock:
            gate = self._gates.pop(msg.get("id"), None)
        if gate is not None:
            gate[1].append(msg)
            gate[0].set()

    def run_step(self, msg: dict[str, Any]) -> None:
        try:
            response = self.step(msg)
        except BaseException as e:  # noqa: BLE001 - never lose a step's answer
            response = {
                "type": "done",
                "id": msg.get("id"),
                "error": {
                    "call": None,
                    "type": type(e).__name__,
                    "message": f"the host failed running the step: {e}",
                    "traceback": traceback.format_exc(),
                },
            }
        finally:
            set_current_step(None)
        try:
            self.send(response)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def step(self, msg: dict[str, Any]) -> dict[str, Any]:
        types = self.types.get(msg.get("machine", ""), {})
        step = Step(msg, types, self.wait_for_go)
        set_current_step(step)
        response: dict[str, Any] = {"type": "done", "id": step.id}
        event: Any = None
        obj: dict[str, Any] = _Obj({"__rc__": step.attempt, "__tn__": step.task})
        try:
            data = FSMContext(coerce_all(types, msg.get("context") or {}), step, obj)
            raw_contexts = msg.get("contexts")
            joined: Optional[FanInContexts] = None
            if raw_contexts is not None:
                joined = FanInContexts(
                    [FSMContext(coerce_all(types, c), step, obj) for c in raw_contexts], step
                )
                obj["__fic__"] = data
            native = Context(data, step, obj, joined)
        except Exception as e:  # noqa: BLE001 - a context that does not fit its types
            response["error"] = _error(None, None, e)
            return response
        for index, call in enumerate(msg.get("calls") or []):
            role = call.get("role", "")
            step.state = call.get("state", "")
            step.role = role
            target = self.targets.get(call.get("action", ""))
            try:
                if target is None:
                    raise LookupError(f"action `{call.get('action')}` was not resolved at hello")
                argument = joined if joined is not None else data
                if role == "continuation":
                    if target.continuation is None:
                        continue
                    if target.kind == "fantasm":
                        token = target.continuation(argument, obj, token=step.token)
                    else:
                        token = target.continuation(native)
                    if token is not None:
                        step.report_token(token)
                    continue
                if target.kind == "fantasm":
                    result = target.call(argument, obj)
                else:
                    result = target.call(native)
                if role == "action":
                    if result is not None and not isinstance(result, str):
                        raise TypeError(
                            f"the main action must return an event name (a str) or None, "
                            f"not {type(result).__name__} {result!r:.80}"
                        )
                    event = result
            except Halt as e:
                step.halt = str(e) or "halted by the action"
                break
            except Aborted as e:
                response["error"] = {"call": index, "type": "Aborted", "message": str(e)}
                return response
            except Exception as e:  # noqa: BLE001 - any failure of user code
                if _is_halt(e):
                    message = getattr(e, "message", None) or str(e)
                    level = getattr(e, "logLevel", logging.WARNING)
                    if level is not None and message:
                        step.log(level_name(level), message)
                    step.halt = message or "halted by HaltMachineError"
                    break
                step.flush_printed()
                response["error"] = _error(index, call, e)
                response["log"] = step.logs
                return response
            if step.halt is not None:
                break
        step.flush_printed()
        try:
            check_json("context", data)
            response["context"] = dict(data)
        except TypeError as e:
            response["error"] = _error(None, None, e)
            response["log"] = step.logs
            return response
        response["event"] = event
        if step.forks:
            response["forks"] = step.forks
        if step.spawns:
            response["spawns"] = step.spawns
        if step.halt is not None:
            response["halt"] = step.halt
        if step.next_token_set:
            response["next_token"] = step.next_token
        if step.logs:
            response["log"] = step.logs
        return response

    # -- the loop ------------------------------------------------------------------------

    def serve(self, inp: BinaryIO) -> None:
        pool: Optional[ThreadPoolExecutor] = None
        for line in inp:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
                kind = msg.get("type")
            except (ValueError, AttributeError) as e:
                print(f"phasm host: ignoring a line that is not a JSON object: {e}",
                      file=sys.stderr)
                continue
            if kind == "step":
                if pool is None:
                    pool = ThreadPoolExecutor(self.threads, thread_name_prefix="phasm-step")
                with self._idle:
                    self._running += 1
                pool.submit(self.run_step, msg)
            elif kind in ("go", "abort"):
                self.answer(msg)
            elif kind == "hello":
                self.send(self.hello(msg))
            else:
                print(f"phasm host: ignoring a message of unknown type {kind!r}", file=sys.stderr)
        # stdin closed: phasm is draining (or gone). Finish running steps, within a limit.
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout=self.drain_seconds)


class _Obj(dict):
    """Fantasm's ``obj``: a dict whose keys also read as attributes (``obj.results``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _is_halt(e: BaseException) -> bool:
    return any(c.__name__ == "HaltMachineError" for c in type(e).__mro__)


def _error(index: Optional[int], call: Optional[dict[str, Any]], e: BaseException) -> dict[str, Any]:
    error: dict[str, Any] = {
        "call": index,
        "type": type(e).__name__,
        "message": str(e),
        "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)),
        "transient": isinstance(e, TransientError) or any(
            c.__name__ == "UserTransientError" for c in type(e).__mro__
        ),
    }
    if call is not None:
        error["role"] = call.get("role")
        error["action"] = call.get("action")
        error["state"] = call.get("state")
    return error


def resolve_constant(candidates: list[str]) -> dict[str, Any]:
    """The first candidate that names a string constant; ``{}`` when none resolves (the
    name is then used as written)."""
    for ref in candidates:
        try:
            value = resolve(ref)
        except ResolveError:
            continue
        if not isinstance(value, str):
            return {"ref": ref, "error": f"`{ref}` is a {type(value).__name__}, not a str"}
        return {"ref": ref, "value": value}
    return {}


class _PrintRouter:
    """``sys.stdout`` while the host runs: text printed during a step becomes that step's log
    lines; other text goes to stderr. The protocol has the real stdout to itself."""

    def __init__(self, fallback: TextIO) -> None:
        self._fallback = fallback
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        step = current_step()
        if step is None:
            return self._fallback.write(text)
        step.printed(text)
        return len(text)

    def flush(self) -> None:
        if current_step() is None:
            self._fallback.flush()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def main() -> None:
    """Run the host on this process's stdin and stdout until stdin closes."""
    # Keep the protocol's pipes for ourselves; fd 0 and 1 become /dev/null and stderr, so
    # neither user code nor its child processes can read or break the protocol.
    protocol_in = os.fdopen(os.dup(0), "rb")
    protocol_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull, encoding="utf-8")
    sys.stdout = _PrintRouter(sys.stderr)  # type: ignore[assignment]
    if "" in sys.path:
        sys.path.remove("")  # the working folder is on the path only when `python: path` says so
    host = Host(protocol_out)
    host.serve(protocol_in)
    sys.stderr.flush()
    os._exit(0)  # do not wait for threads a hung action still holds


if __name__ == "__main__":
    main()
