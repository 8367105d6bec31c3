"""phasm's Python action host: runs a worker's Python actions, many steps at once.

phasm starts ``python3 -c 'import phasm.host; phasm.host.main()'`` a few times per worker and
talks to each process over stdin/stdout in newline-delimited JSON (docs/host-protocol.md):
a ``hello`` that resolves every action name before any instance runs, then ``step`` requests
(all of a step's calls in order, sharing one ``obj``), answered by ``done`` (and, for a
continuation page, ``token`` first). The protocol owns the process's real stdout: a user's
``print()`` (and what the step's thread writes to ``sys.stderr``) becomes a log line of the
step that wrote it, within the step's log limits.

Every line the host writes goes through :func:`encode_line`, which writes strict JSON only:
an answer that cannot be written (NaN, a lone surrogate, nesting past
:data:`~phasm._runtime.MAX_DEPTH`) is replaced by that step's error answer.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Iterable, Optional, TextIO

# phasm's own `fantasm` is imported before `hello` puts the application's folders on the
# path: an application that carries its copy of Fantasm (App Engine imports and all) then
# still gets these modules, which `sys.modules` keeps.
import fantasm.action  # noqa: F401
import fantasm.constants  # noqa: F401
import fantasm.exceptions  # noqa: F401
from fantasm.fsm import FanInContexts, FSMContext
from phasm import PROTOCOL_VERSION, Context, Halt, TransientError
from phasm.protocol import (
    AbortMessage,
    DoneMessage,
    FromHost,
    GoMessage,
    HelloMessage,
    ReadyAction,
    ReadyMessage,
    StepMessage,
)
from phasm._runtime import (
    CONTEXT_LEVEL,
    DEFAULT_LOG_BYTES,
    DEFAULT_LOG_LINES,
    FORK_LEVEL,
    SPAWN_LEVEL,
    Aborted,
    NotJSONError,
    Step,
    check_json,
    clean_text,
    coerce_all,
    current_step,
    encode_json,
    json_problem,
    level_name,
    strict_loads,
    set_current_step,
)

#: Steps one host process runs at once (phasm bounds what it sends to the same number).
DEFAULT_THREADS = 32

#: The environment variable in which phasm passes its own pid to the hosts it starts: a host
#: whose parent is no longer that process at start exits at once (the worker died while the
#: host was starting). The host removes it from its environment.
PARENT_PID_VARIABLE = "PHASM_PARENT_PID"

#: ``prctl`` option: the signal this process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1

#: The start of a step request as phasm writes it, to answer a request that cannot be read.
_STEP_ID = re.compile(rb'\s*\{\s*"type"\s*:\s*"step"\s*,\s*"id"\s*:\s*(\d{1,19})\s*[,}]')


def encode_line(message: dict[str, Any]) -> bytes:
    """``message`` as one line of the protocol: strict JSON (no NaN or Infinity, no lone
    surrogate, at most :data:`~phasm._runtime.MAX_DEPTH` levels deep), UTF-8, ``\\n``-ended.
    Every line the host writes is made here. Raises :class:`NotJSONError`."""
    text = encode_json(message)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError as e:  # encode_json looks for surrogates; never trust it alone
        raise NotJSONError(f"cannot be written as UTF-8 ({e.reason})") from None


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
        self.log_bytes = DEFAULT_LOG_BYTES
        self.log_lines = DEFAULT_LOG_LINES
        #: Whether the process that started the host is gone (then nobody reads the answers
        #: of steps still running when stdin closes, and the host does not wait for them).
        self.parent_gone: Callable[[], bool] = lambda: False
        self._running = 0
        self._closing = False
        self._idle = threading.Condition()

    # -- output --------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Write one message through :func:`encode_line`. One that cannot be written is
        replaced by the answer it still allows: a ``done`` by that step's error answer (so
        only that step fails), a ``ready`` by a ``fatal`` one."""
        try:
            line: Optional[bytes] = encode_line(message)
        except Exception as e:  # noqa: BLE001 - no answer is lost to a value JSON cannot hold
            line = self._refusal(message, e)
        if line is not None:
            self._write_line(line)

    def _write_line(self, line: bytes) -> None:
        with self._write:
            try:
                self._out.write(line)
                self._out.flush()
            except (BrokenPipeError, OSError):
                pass  # phasm is gone; the step's outcome is lost and will be retried

    def _refusal(self, message: FromHost | ReadyMessage, e: Exception) -> Optional[bytes]:
        """The line that answers in place of ``message``, which cannot be written."""
        kind = message.get("type")
        if kind == "done":
            ident = message.get("id")
            if not isinstance(ident, int) or isinstance(ident, bool) or ident < 0:
                print("phasm host: an answer without a request id cannot be written as JSON; "
                      "dropped", file=sys.stderr)
                return None
            try:
                problem = _describe_answer(message) or str(e)
                answer: DoneMessage = {"type": "done", "id": ident, "error": {
                    "call": None,
                    "type": "NotJSONError",
                    "message": f"the step's answer cannot be sent to phasm: {problem}",
                    "transient": False,
                }}
                log = message.get("log")
                if log and json_problem(log, 1) is None:
                    answer["log"] = log
                return encode_line(answer)
            except Exception:  # noqa: BLE001 - even the explanation cannot be written
                return encode_line({"type": "done", "id": ident, "error": {
                    "call": None, "type": "NotJSONError",
                    "message": "the step's answer cannot be written as JSON",
                }})
        if kind == "ready":
            try:
                return encode_line({"type": "ready", "protocol": PROTOCOL_VERSION,
                                    "fatal": f"the host's answer to hello cannot be sent to "
                                             f"phasm: {clean_text(str(e))}"})
            except Exception:  # noqa: BLE001
                return encode_line({"type": "ready", "protocol": PROTOCOL_VERSION,
                                    "fatal": "the host's answer to hello cannot be written as JSON"})
        print(f"phasm host: a {clean_text(repr(kind))[:40]} message cannot be written as JSON; "
              f"dropped", file=sys.stderr)
        return None

    # -- hello ---------------------------------------------------------------------------

    def hello(self, msg: HelloMessage) -> ReadyMessage:
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
        self.log_bytes = max(1, int(msg.get("max_log_bytes") or DEFAULT_LOG_BYTES))
        self.log_lines = max(1, int(msg.get("max_log_lines") or DEFAULT_LOG_LINES))
        self.types = {
            name: dict(info.get("context_types") or {})
            for name, info in (msg.get("machines") or {}).items()
        }
        actions: list[ReadyAction] = []
        for entry in msg.get("actions") or []:
            ref = entry["ref"]
            try:
                target = Target(ref, resolve(ref))
            except ResolveError as e:
                actions.append({"ref": ref, "error": clean_text(str(e))})
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
        try:
            line = encode_line({"type": "token", "id": step.id, "token": token})
        except Exception as e:  # noqa: BLE001 - fails the continuation call, not the host
            problem = json_problem(token, 1) or str(e)
            raise NotJSONError(f"the next page's token {problem}") from None
        event = threading.Event()
        answer: list[GoMessage | AbortMessage] = []
        with self._gates_lock:
            self._gates[step.id] = (event, answer)
        self._write_line(line)
        event.wait()
        if answer and answer[0].get("type") == "abort":
            raise Aborted(answer[0].get("error") or "phasm stopped the step")

    def answer(self, msg: GoMessage | AbortMessage) -> None:
        with self._gates_lock:
            gate = self._gates.pop(msg.get("id"), None)
        if gate is not None:
            gate[1].append(msg)
            gate[0].set()

    def run_step(self, msg: StepMessage) -> None:
        with self._idle:
            if self._closing:
                # stdin closed before the step started: phasm is stopping or gone, so the
                # step is not started (and not answered).
                self._running -= 1
                self._idle.notify_all()
                print(f"phasm host: stdin closed before step {msg.get('id')!r:.24} started; "
                      f"it does not run", file=sys.stderr)
                return
        response: DoneMessage
        try:
            response = self.step(msg)
        except BaseException as e:  # noqa: BLE001 - never lose a step's answer
            response = {
                "type": "done",
                "id": msg.get("id"),
                "error": {
                    "call": None,
                    "type": type(e).__name__,
                    "message": f"the host failed running the step: {_text_of(e)}",
                    "traceback": _traceback_of(e),
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

    def step(self, msg: StepMessage) -> DoneMessage:
        types = self.types.get(msg.get("machine", ""), {})
        step = Step(msg, types, self.wait_for_go, self.log_bytes, self.log_lines)
        set_current_step(step)
        response: DoneMessage = {"type": "done", "id": step.id}
        event: Any = None
        obj: dict[str, Any] = _Obj({"__rc__": step.attempt, "__tn__": step.task})
        try:
            # phasm checks what enters a context (no value nested past 90 levels; JSON as
            # serde_json reads it holds no NaN and no lone surrogate), and `coerce_all`
            # refuses a typed value JSON cannot hold: the context is checked once, on the way
            # back.
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
            return _with_log(response, step)
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
                step.halt = _text_of(e) or "halted by the action"
                break
            except Aborted as e:
                response["error"] = {"call": index, "type": "Aborted",
                                     "message": clean_text(str(e))}
                return _with_log(response, step)
            except Exception as e:  # noqa: BLE001 - any failure of user code
                if _is_halt(e):
                    message = getattr(e, "message", None) or _text_of(e)
                    level = getattr(e, "logLevel", logging.WARNING)
                    if level is not None and message:
                        step.log(level_name(level), message)
                    step.halt = message or "halted by HaltMachineError"
                    break
                response["error"] = _error(index, call, e)
                return _with_log(response, step)
            if step.halt is not None:
                break
        # Checked as the answer is written (`send`): a value JSON cannot hold fails this step
        # there, naming its key — one encoding of the context per step, not two.
        response["context"] = dict(data)
        response["event"] = event
        if step.forks:
            response["forks"] = step.forks
        if step.spawns:
            response["spawns"] = step.spawns
        if step.halt is not None:
            response["halt"] = clean_text(str(step.halt))
        if step.next_token_set:
            response["next_token"] = step.next_token
        return _with_log(response, step)

    # -- the loop ------------------------------------------------------------------------

    def serve(self, inp: Iterable[bytes]) -> None:
        """Answer phasm's messages until stdin closes; then let the running steps finish
        (within ``drain_seconds``, and only while the process that started the host lives)
        and drop those not started yet."""
        pool: Optional[ThreadPoolExecutor] = None
        for line in inp:
            if not line.strip():
                continue
            try:
                msg = strict_loads(line)
                if not isinstance(msg, dict):
                    raise ValueError(f"a JSON {type(msg).__name__}, not an object")
                kind = msg.get("type")
            except (ValueError, RecursionError) as e:
                self._unreadable(line, e)
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
        # stdin closed: phasm is draining (or gone). Steps not started yet are dropped;
        # running ones may finish, within the limit, while the process that started us lives.
        deadline = time.monotonic() + self.drain_seconds
        with self._idle:
            self._closing = True
            while self._running > 0:
                left = deadline - time.monotonic()
                if left <= 0 or self.parent_gone():
                    break
                self._idle.wait(min(left, 0.25))

    def _unreadable(self, line: bytes, e: BaseException) -> None:
        """A line that is not a JSON object: a step request (known by its start) is answered
        with an error, so only that step fails; anything else is noted on stderr."""
        found = _STEP_ID.match(line)
        reason = clean_text(str(e))[:200] if not isinstance(e, RecursionError) else (
            "it is nested too deep")
        if found is None:
            print(f"phasm host: ignoring a line that is not a JSON object: {reason}",
                  file=sys.stderr)
            return
        self.send({"type": "done", "id": int(found.group(1)), "error": {
            "call": None,
            "type": type(e).__name__,
            "message": f"the host cannot read the step request: {reason}",
            "transient": False,
        }})


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


def _with_log(response: dict[str, Any], step: Step) -> dict[str, Any]:
    """``response`` with the step's log lines (and what its limits cut)."""
    step.finish_log()
    if step.logs:
        response["log"] = step.logs
    return response


def _text_of(e: BaseException) -> str:
    """``str(e)`` fit for a message; never raises (a broken ``__str__`` must not cost the
    step its answer)."""
    try:
        return clean_text(str(e))
    except Exception:  # noqa: BLE001
        return f"({type(e).__name__} whose str() failed)"


def _traceback_of(e: BaseException) -> str:
    try:
        return clean_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    except Exception:  # noqa: BLE001
        return f"({type(e).__name__}: the traceback cannot be formatted)"


def _describe_answer(message: dict[str, Any]) -> Optional[str]:
    """What in a ``done`` answer cannot be written as JSON, named for the step's error:
    "context key `amount` holds nan, which JSON cannot hold"."""
    for field, name in (("event", "the event"), ("halt", "the halt reason"),
                        ("next_token", "the next token")):
        if field in message:
            problem = json_problem(message[field], 1)
            if problem is not None:
                return f"{name} {problem}"
    places: list[tuple[str, Any, int]] = [("context", message.get("context"), CONTEXT_LEVEL)]
    for number, fork in enumerate(message.get("forks") or [], 1):
        places.append((f"fork {number}'s context", fork, FORK_LEVEL))
    for spawn in message.get("spawns") or []:
        if not isinstance(spawn, dict):
            continue
        for number, context in enumerate(spawn.get("contexts") or [], 1):
            places.append((f"spawned context {number} of machine "
                           f"`{clean_text(str(spawn.get('machine')))[:60]}`", context, SPAWN_LEVEL))
    for what, data, level in places:
        if isinstance(data, dict):
            try:
                check_json(what, data, level)
            except NotJSONError as e:
                return str(e)
    for field, value in message.items():
        problem = json_problem(value, 1)
        if problem is not None:
            return f"`{clean_text(str(field))[:40]}` {problem}"
    return None


def _error(index: Optional[int], call: Optional[dict[str, Any]], e: BaseException) -> dict[str, Any]:
    error: dict[str, Any] = {
        "call": index,
        "type": type(e).__name__,
        "message": _text_of(e),
        "traceback": _traceback_of(e),
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
        problem = json_problem(value, 3)
        if problem is not None:
            return {"ref": ref, "error": f"`{ref}` {problem}"}
        return {"ref": ref, "value": value}
    return {}


class _PrintRouter:
    """``sys.stdout`` or ``sys.stderr`` while the host runs: text a step's thread writes
    becomes that step's log lines (``info`` from stdout, ``warning`` from stderr), within the
    step's log limits; other text goes to the real stderr. The protocol has the real stdout
    to itself. ``logging`` handlers made after the host started write through it too."""

    def __init__(self, fallback: TextIO, level: str = "info") -> None:
        self._fallback = fallback
        self._level = level
        self.encoding = "utf-8"
        self.errors = getattr(fallback, "errors", None) or "backslashreplace"

    def write(self, text: str) -> int:
        step = current_step()
        if step is None:
            return self._fallback.write(text)
        step.printed(text, self._level)
        return len(text)

    def flush(self) -> None:
        if current_step() is None:
            self._fallback.flush()

    def fileno(self) -> int:
        """The real stderr's descriptor (text written there is not a step's log line)."""
        return self._fallback.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def parent_is_gone(expected: Optional[int], parent: int) -> bool:
    """Whether the process that started the host is gone, given the pid phasm passed
    (``PHASM_PARENT_PID``, ``None`` when not set) and the host's parent pid now. Without a
    pid from phasm, a parent of pid 1 means the host was orphaned."""
    if expected is None or expected <= 0:
        return parent == 1
    if parent == expected:
        return False
    # Another process between phasm and the host (a wrapper script that did not `exec`), or
    # phasm died and the host was adopted: tell them apart by whether phasm still exists.
    return not _process_exists(expected)


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X", b"")
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        pass  # no /proc (macOS): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _die_with_parent() -> int:
    """Tie the host's life to the process that started it, and return that process's pid.

    On Linux the host asks for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so a
    worker killed with SIGKILL does not leave hosts running its steps. A parent that died
    before that request is caught by comparing with ``PHASM_PARENT_PID``: the host then
    exits at once (status 1)."""
    text = os.environ.pop(PARENT_PID_VARIABLE, "").strip()
    expected = int(text) if text.isdigit() else None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(signal.SIGKILL)),
                       ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        except Exception:  # noqa: BLE001 - no ctypes, no prctl: stdin's end still stops us
            pass
    parent = os.getppid()
    if parent_is_gone(expected, parent):
        sys.stderr.write(f"phasm host: the process that started this host (pid "
                         f"{expected if expected is not None else 'unknown'}) is gone; "
                         f"exiting\n")
        sys.stderr.flush()
        os._exit(1)
    return parent


def _close_in_forked_children(fds: tuple[int, ...]) -> None:
    """A process forked from the host (``os.fork``, ``multiprocessing``) gets the protocol's
    descriptors pointed at /dev/null: phasm learns that a host died from the end of its
    stdout, which a child still holding the pipe would delay for as long as the child lives.
    (Programs started with ``subprocess`` never get them: the descriptors are not
    inheritable, so ``exec`` closes them.) The child's output is its own, not the log of the
    step that forked it."""

    def after_in_child() -> None:
        set_current_step(None)
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            return
        for fd in fds:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
        os.close(null)

    os.register_at_fork(after_in_child=after_in_child)


def main() -> None:
    """Run the host on this process's stdin and stdout until stdin closes."""
    parent = _die_with_parent()
    # Keep the protocol's pipes for ourselves; fd 0 and 1 become /dev/null and stderr, so
    # neither user code nor its child processes can read or break the protocol. os.dup's
    # descriptors are not inheritable (no program started by an action gets them), and
    # forked children drop them.
    protocol_in_fd = os.dup(0)
    protocol_out_fd = os.dup(1)
    _close_in_forked_children((protocol_in_fd, protocol_out_fd))
    protocol_in = os.fdopen(protocol_in_fd, "rb")
    protocol_out = os.fdopen(protocol_out_fd, "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull, encoding="utf-8")
    real_stderr = sys.stderr
    sys.stdout = _PrintRouter(real_stderr, "info")  # type: ignore[assignment]
    sys.stderr = _PrintRouter(real_stderr, "warning")  # type: ignore[assignment]
    if "" in sys.path:
        sys.path.remove("")  # the working folder is on the path only when `python: path` says so
    host = Host(protocol_out)
    host.parent_gone = lambda: os.getppid() != parent
    host.serve(protocol_in)
    real_stderr.flush()
    os._exit(0)  # do not wait for threads a hung action still holds


if __name__ == "__main__":
    main()
