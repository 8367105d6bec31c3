"""What one step of an instance is while its calls run: the state both faces share.

A :class:`Step` is made for each ``step`` request of the host protocol. The native
:class:`phasm.Context` and Fantasm's :class:`fantasm.fsm.FSMContext` are two views of the
same step: they write forks, spawns, log lines, a halt and a next token into it, and the
host turns it into the ``done`` response.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import re
import threading
import traceback
from typing import Any, Callable, Optional

#: Context values of these declared types are converted when actions read them.
_INT_TYPES = {"int", "long", "types.IntType", "types.LongType"}
_FLOAT_TYPES = {"float", "types.FloatType"}
_BOOL_TYPES = {"bool", "types.BooleanType"}
_STR_TYPES = {"str", "unicode", "string"}
_JSON_TYPES = {"json", "dict"}
_DATETIME_TYPES = {"datetime", "datetime.datetime"}
_DATE_TYPES = {"date", "datetime.date"}

_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}

_current = threading.local()

#: The deepest nesting of arrays and objects in a line the host writes, the message object
#: itself being level 1. phasm reads the lines with serde_json, which gives up past 128
#: levels; the margin leaves phasm room to wrap a value again (a context in a request).
MAX_DEPTH = 100

#: The level of the object holding a ``done`` answer's context keys (``{"context": {…}}``);
#: its values may therefore nest ``MAX_DEPTH - CONTEXT_LEVEL`` levels.
CONTEXT_LEVEL = 2
#: The level of a forked context in a ``done`` answer (``{"forks": [{…}]}``).
FORK_LEVEL = 3
#: The level of a spawned context in a ``done`` answer
#: (``{"spawns": [{"contexts": [{…}]}]}``).
SPAWN_LEVEL = 5

#: The integers phasm's JSON keeps exactly (serde_json: i64 and u64); a larger one would be
#: read as a float, or not at all past 1.8e308.
_INT_MIN = -(2 ** 63)
_INT_MAX = 2 ** 64 - 1

#: Bytes of log text one step may produce (``print()``, stderr, loggers); the rest is cut and
#: counted in one last line.
DEFAULT_LOG_BYTES = 64 * 1024
#: Log lines one step may produce; the rest is cut and counted in one last line.
DEFAULT_LOG_LINES = 1000

_SURROGATE = re.compile("[\ud800-\udfff]")
_LONG_DIGITS = re.compile(r"\d{20}")
_CONTAINERS = (dict, list, tuple, set, frozenset)


def current_step() -> Optional["Step"]:
    """The step the calling thread is running, if any (for ``print()``)."""
    return getattr(_current, "step", None)


def set_current_step(step: Optional["Step"]) -> None:
    _current.step = step


class ContextTypeError(ValueError):
    """A context value does not convert to the type ``context_types`` declares."""


def coerce(type_name: Optional[str], value: Any, key: str = "") -> Any:
    """Convert ``value`` to the Python type named in ``context_types``.

    Values already of the right type pass unchanged; strings are parsed (Fantasm's rules:
    ``'1'``, ``'True'`` and ``'true'`` are true). ``None`` stays ``None``.
    """
    if type_name is None or value is None:
        return value
    try:
        if type_name in _INT_TYPES:
            if isinstance(value, bool):
                return int(value)
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
        elif type_name in _FLOAT_TYPES:
            number: Optional[float] = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                number = float(value.strip())
            if number is not None:
                if not math.isfinite(number):
                    raise ContextTypeError(
                        f"context key `{show_key(key)}` is declared `{type_name}` in "
                        f"context_types but holds {_short_repr(value)}: {number!r} is not a "
                        f"number JSON can hold"
                    )
                return number
        elif type_name in _BOOL_TYPES:
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                return value in ("1", "True", "true")
            if isinstance(value, (int, float)):
                return bool(value)
        elif type_name in _STR_TYPES:
            return value if isinstance(value, str) else str(value)
        elif type_name in _JSON_TYPES:
            if not isinstance(value, str):
                return value
            try:
                parsed = strict_loads(value)
            except RecursionError:
                parsed = None
                problem: Optional[str] = "is nested too deep to read"
            else:
                problem = json_problem(parsed, CONTEXT_LEVEL)
            if problem is not None:
                raise ContextTypeError(
                    f"context key `{show_key(key)}` is declared `{type_name}` in "
                    f"context_types but holds JSON text that {problem}"
                )
            return parsed
        elif type_name in _DATETIME_TYPES:
            if isinstance(value, _dt.datetime):
                return value
            if isinstance(value, str):
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif type_name in _DATE_TYPES:
            if isinstance(value, _dt.date):
                return value
            if isinstance(value, str):
                return _dt.date.fromisoformat(value[:10])
        else:
            return value  # another class name: kept as stored
    except ContextTypeError:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise ContextTypeError(
            f"context key `{show_key(key)}` is declared `{type_name}` in context_types but "
            f"holds {_short_repr(value)}: {clean_text(str(e))[:200]}"
        ) from e
    raise ContextTypeError(
        f"context key `{show_key(key)}` is declared `{type_name}` in context_types but holds "
        f"{_short_repr(value)} ({type(value).__name__})"
    )


def refuse_json_constant(name: str) -> Any:
    """``json.loads``' hook for ``NaN``, ``Infinity`` and ``-Infinity``: refused."""
    raise ValueError(f"{name} is not JSON")


#: A strict JSON reader, made once (``json.loads`` with a keyword makes a new decoder per
#: call): ``NaN`` and the infinities are refused.
STRICT_DECODER = json.JSONDecoder(parse_constant=refuse_json_constant)


def strict_loads(data: "bytes | str") -> Any:
    """``data`` read as strict JSON: UTF-8 (when bytes), no ``NaN`` or infinities. Raises
    :class:`ValueError` (a :class:`UnicodeDecodeError` or :class:`json.JSONDecodeError`)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return STRICT_DECODER.decode(text)


def coerce_all(types: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every key that ``types`` declares converted (a new dict)."""
    out = dict(data)
    for key, type_name in types.items():
        if key in out:
            out[key] = coerce(type_name, out[key], key)
    return out


def to_json(value: Any) -> Any:
    """``json.dumps``' fallback: dates as ISO 8601 text, sets and tuples as lists."""
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"a {type(value).__name__} is not JSON")


class NotJSONError(TypeError, ValueError):
    """A value strict JSON cannot hold, or nested deeper than phasm reads; the message says
    which and where."""


#: The one encoder of everything the host writes: strict (no NaN or Infinity), compact,
#: UTF-8 left as is (a lone surrogate is caught when the line is encoded).
_STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                           default=to_json)


def encode_json(value: Any, level: int = 0) -> str:
    """``value`` as strict JSON text, for a place at nesting ``level`` of a line (0: the
    line itself).

    Raises :class:`NotJSONError` (its message, e.g. "holds nan, which JSON cannot hold",
    follows the name of the place) for NaN or an infinity, a lone surrogate, an integer
    outside 64 bits, anything but JSON values, dates and sets, and nesting past
    :data:`MAX_DEPTH`.
    """
    try:
        text = _STRICT.encode(value)
    except (ValueError, TypeError, RecursionError) as e:
        problem = json_problem(value, level)
        raise NotJSONError(problem or f"cannot be written as JSON ({type(e).__name__})") from None
    # The C encoder checked floats and types; the rest is looked for only where it may be.
    if (_SURROGATE.search(text) is not None or _LONG_DIGITS.search(text) is not None
            or text.count("[") + text.count("{") > MAX_DEPTH - level):
        problem = json_problem(value, level)
        if problem is not None:
            raise NotJSONError(problem)
    return text


def json_problem(value: Any, level: int = 0) -> Optional[str]:
    """Why ``value``, at nesting ``level`` of a line, cannot be written as strict JSON that
    phasm reads back (``None``: it can). The text completes a subject ("context key `a`"),
    e.g. "holds nan at `["b"][0]`, which JSON cannot hold"."""
    budget = MAX_DEPTH - level
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, level + 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"holds {item!r}{_at(path)}, which JSON cannot hold"
        elif isinstance(item, int):
            if not _INT_MIN <= item <= _INT_MAX:
                return (f"holds an integer of {item.bit_length()} bits{_at(path)}, beyond the "
                        f"64 bits phasm keeps exactly")
        elif isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                return (f"holds text with a lone surrogate ({_escape(found.group())}){_at(path)}, "
                        f"which is not Unicode and JSON cannot hold")
        elif isinstance(item, _CONTAINERS):
            if depth > MAX_DEPTH:
                return (f"is nested more than {budget} levels deep (or contains itself), "
                        f"deeper than phasm reads")
            children: list[tuple[Any, int, tuple[Any, ...]]] = []
            if isinstance(item, dict):
                for key, child in item.items():
                    problem = _key_problem(key)
                    if problem is not None:
                        return f"has a key that {problem}{_at(path)}"
                    children.append((child, depth + 1, path + (key,)))
            else:
                for index, child in enumerate(item):
                    children.append((child, depth + 1, path + (index,)))
            stack.extend(reversed(children))
        elif not isinstance(item, (_dt.datetime, _dt.date, _dt.time)):
            return (f"holds {type(item).__name__} {_short_repr(item)}{_at(path)}, "
                    f"which is not JSON (keep str, int, float, bool, None, list, dict or "
                    f"datetime values)")
    return None


def _short_repr(value: Any) -> str:
    """At most 80 characters of ``repr(value)``, never raising."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real problem
        return "(no repr)"
    return clean_text(text[:80])


def _key_problem(key: Any) -> Optional[str]:
    """Why an object key cannot be written as JSON (``None``: it can)."""
    if isinstance(key, str):
        found = _SURROGATE.search(key)
        if found is not None:
            return (f"is text with a lone surrogate ({_escape(found.group())}), which is not "
                    f"Unicode and JSON cannot hold")
    elif isinstance(key, float) and not math.isfinite(key):
        return f"is {key!r}, which JSON cannot hold"
    elif not (key is None or isinstance(key, (int, float))):
        return f"is a {type(key).__name__}, not text"
    return None


def _at(path: tuple[Any, ...]) -> str:
    """Where inside a value, as `` at `["a"][0]` `` (nothing for the value itself)."""
    if not path:
        return ""
    text = "".join(f"[{_show_json(p)}]" if isinstance(p, str) else f"[{p!r}]" for p in path)
    if len(text) > 120:
        text = "…" + text[-120:]
    return f" at `{text}`"


def _show_json(text: str) -> str:
    return json.dumps(_escape_surrogates(text[:60] + ("…" if len(text) > 60 else "")),
                      ensure_ascii=False)


def _escape(char: str) -> str:
    return f"\\u{ord(char):04x}"


def _escape_surrogates(text: str) -> str:
    return _SURROGATE.sub(lambda m: _escape(m.group()), text)


def show_key(key: Any) -> str:
    """A context key as it may appear in a message: surrogates escaped, at most 80
    characters."""
    text = key if isinstance(key, str) else repr(key)
    if len(text) > 80:
        text = text[:80] + "…"
    return _escape_surrogates(text)


def clean_text(text: str) -> str:
    """``text`` fit for a log line or an error message: a lone surrogate, which no UTF-8
    line can hold, becomes U+FFFD (a pair of them, the character they make)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def check_json(what: str, data: dict[str, Any], level: int = CONTEXT_LEVEL) -> None:
    """Raise :class:`NotJSONError` naming the first key of ``data`` whose value phasm cannot
    store (``level``: the nesting level of ``data`` in the line that carries it)."""
    try:
        encode_json(data, level - 1)
        return
    except NotJSONError as e:
        whole = str(e)
    for key, value in data.items():
        problem = _key_problem(key)
        if problem is None:
            problem = json_problem(value, level)
        if problem is not None:
            raise NotJSONError(f"{what} key `{show_key(key)}` {problem}")
    raise NotJSONError(f"{what} {whole}")


def format_message(message: Any, args: tuple[Any, ...]) -> str:
    """A log message with ``%`` arguments applied (the raw message if they do not fit)."""
    try:
        text = message if isinstance(message, str) else str(message)
    except Exception:  # noqa: BLE001 - a broken __str__ must not fail the step
        return "Exception constructing log message. Please adjust your usage of context.logger."
    if args:
        try:
            return text % args
        except (TypeError, ValueError):
            return f"{text} {args!r}"
    return text


class Logger:
    """Fantasm's ``context.logger``: levels debug…critical, kept with the step's log lines."""

    def __init__(self, step: "Step") -> None:
        self._step = step
        self.level = logging.DEBUG
        self.maxLevel = logging.CRITICAL
        self.tags: list[str] = []

    def setLevel(self, level: int) -> None:
        self.level = level

    def setMaxLevel(self, level: int) -> None:
        self.maxLevel = level

    def log(self, level: int, message: Any, *args: Any, **kwargs: Any) -> None:
        if level < self.level or level > self.maxLevel:
            return
        text = format_message(message, args)
        if kwargs.get("exc_info"):
            text = f"{text}\n{traceback.format_exc().rstrip()}"
        self._step.log(level_name(level), text)

    def debug(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.DEBUG, message, *args, **kwargs)

    def info(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.INFO, message, *args, **kwargs)

    def warning(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, message, *args, **kwargs)

    warn = warning

    def error(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.ERROR, message, *args, **kwargs)

    def critical(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.CRITICAL, message, *args, **kwargs)

    def exception(self, message: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["exc_info"] = True
        self.log(logging.ERROR, message, *args, **kwargs)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _size(count: int) -> str:
    """A byte count for people: ``512 bytes``, ``64 KiB``, ``49.9 MiB``."""
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{text} {unit}"


def level_name(level: int) -> str:
    """The protocol's name of a ``logging`` level (rounded down to a known one)."""
    for value in sorted(_LEVEL_NAMES, reverse=True):
        if level >= value:
            return _LEVEL_NAMES[value]
    return "debug"


class Aborted(Exception):
    """phasm told the step to stop (its next page could not be queued)."""


class Step:
    """One ``step`` request while its calls run."""

    def __init__(self, msg: dict[str, Any], types: dict[str, str],
                 wait_for_go: Callable[["Step", Any], None],
                 log_bytes: int = DEFAULT_LOG_BYTES, log_lines: int = DEFAULT_LOG_LINES) -> None:
        self.id: int = msg["id"]
        self.machine: str = msg.get("machine", "")
        self.instance: str = msg.get("instance", "")
        self.task: str = msg.get("task", "")
        self.attempt: int = int(msg.get("attempt") or 0)
        self.event: str = msg.get("event") or ""
        self.token: Any = msg.get("token")
        self.wait_token: Optional[str] = msg.get("wait_token")
        self.types = types
        self.state: str = ""
        self.role: str = ""
        self.logs: list[dict[str, str]] = []
        self.forks: list[dict[str, Any]] = []
        self.spawns: list[dict[str, Any]] = []
        self.halt: Optional[str] = None
        self.next_token: Any = None
        self.next_token_set = False
        self.log_bytes = log_bytes
        self.log_lines = log_lines
        self._wait_for_go = wait_for_go
        self._logger: Optional[Logger] = None
        self._partial: dict[str, str] = {}  # by level: text written after the last newline
        self._log_lock = threading.Lock()  # an action's own threads may log too
        self._logged_bytes = 0
        self._cut_bytes = 0
        self._cut_lines = 0

    @property
    def logger(self) -> Logger:
        if self._logger is None:
            self._logger = Logger(self)
        return self._logger

    def _full(self) -> bool:
        return self._logged_bytes >= self.log_bytes or len(self.logs) >= self.log_lines

    def log(self, level: str, message: str) -> None:
        """A log line of the step, within its limits (``log_bytes`` of text, ``log_lines``
        lines): what does not fit is cut, counted, and told by :meth:`finish_log`."""
        message = clean_text(message if isinstance(message, str) else str(message))
        size = _utf8_len(message)
        with self._log_lock:
            if self._full():
                self._cut_bytes += size
                self._cut_lines += 1
                return
            room = self.log_bytes - self._logged_bytes
            if size > room:
                message = message.encode("utf-8")[:room].decode("utf-8", "ignore")
                kept = _utf8_len(message)
                self._cut_bytes += size - kept
                size = kept
            self._logged_bytes += size
            self.logs.append({"level": level, "message": message})

    def printed(self, text: str, level: str = "info") -> None:
        """Text the step's thread wrote to ``sys.stdout`` (``info``) or ``sys.stderr``
        (``warning``): each whole line becomes a log line, within the step's limits."""
        if self._full():
            self._cut(text)
            return
        pending = self._partial.pop(level, "") + text
        if "\n" in pending:
            lines = pending.split("\n")
            pending = lines.pop()
            for index, line in enumerate(lines):
                if self._full():
                    self._cut_lines += len(lines) - index
                    self._cut_bytes += sum(_utf8_len(rest) for rest in lines[index:])
                    self._cut(pending)
                    return
                self.log(level, line)
        if len(pending) >= self.log_bytes:
            self.log(level, pending)  # a line longer than the limit: cut it now
            pending = ""
        if pending:
            self._partial[level] = pending

    def _cut(self, text: str) -> None:
        with self._log_lock:
            self._cut_bytes += _utf8_len(text)
            self._cut_lines += text.count("\n")

    def finish_log(self) -> None:
        """End the step's log: text printed after the last newline becomes a line, and one
        last ``warning`` line says how much the limits cut."""
        for level in list(self._partial):
            self.log(level, self._partial.pop(level))
        with self._log_lock:
            if self._cut_bytes or self._cut_lines:
                lines = (f"{self._cut_lines:,} line{'s' if self._cut_lines > 1 else ''}; "
                         if self._cut_lines else "")
                self.logs.append({"level": "warning", "message": (
                    f"… {_size(self._cut_bytes)} more output cut ({lines}limit "
                    f"{_size(self.log_bytes)} or {self.log_lines:,} lines per step)"
                )})
                self._cut_bytes = self._cut_lines = 0

    def fork(self, data: dict[str, Any]) -> None:
        check_json("a fork's context", data, FORK_LEVEL)
        self.forks.append(copy.deepcopy(data))

    def spawn(self, machine: str, contexts: Any, countdown: Any = 0) -> None:
        if isinstance(contexts, dict):
            contexts = [contexts]
        if not isinstance(machine, str) or not machine:
            raise TypeError("spawn needs a machine name")
        items = [dict(c) for c in (contexts or [])]
        for c in items:
            check_json("a spawned context", c, SPAWN_LEVEL)
        if isinstance(countdown, (list, tuple)):
            raise TypeError("phasm's spawn takes one countdown for all contexts")
        request: dict[str, Any] = {"machine": machine, "contexts": items}
        if countdown:
            seconds = float(countdown)
            if not math.isfinite(seconds):
                raise ValueError(f"spawn's countdown must be a finite number of seconds, not {seconds!r}")
            request["countdown"] = seconds
        self.spawns.append(request)

    def report_token(self, token: Any) -> None:
        """Tell phasm the next page's token and wait until the next page is queued."""
        self._wait_for_go(self, token)
