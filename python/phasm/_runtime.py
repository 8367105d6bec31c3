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
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
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
            return json.loads(value) if isinstance(value, str) else value
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
    except (ValueError, TypeError) as e:
        raise ContextTypeError(
            f"context key `{key}` is declared `{type_name}` in context_types but holds "
            f"{value!r}: {e}"
        ) from e
    raise ContextTypeError(
        f"context key `{key}` is declared `{type_name}` in context_types but holds "
        f"{value!r} ({type(value).__name__})"
    )


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


def check_json(what: str, data: dict[str, Any]) -> None:
    """Raise a :class:`TypeError` naming the first key of ``data`` that is not JSON."""
    for key, value in data.items():
        try:
            json.dumps(value, default=to_json)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{what} key `{key}` holds {type(value).__name__} {value!r:.80}, which phasm "
                f"cannot store ({e}); keep JSON values (str, int, float, bool, None, list, "
                f"dict, datetime) in the context"
            ) from None


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
                 wait_for_go: Callable[["Step", Any], None]) -> None:
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
        self._wait_for_go = wait_for_go
        self._logger: Optional[Logger] = None
        self._printed = ""

    @property
    def logger(self) -> Logger:
        if self._logger is None:
            self._logger = Logger(self)
        return self._logger

    def log(self, level: str, message: str) -> None:
        self.logs.append({"level": level, "message": message})

    def printed(self, text: str) -> None:
        """Text a user's ``print()`` wrote: whole lines become ``info`` log lines."""
        self._printed += text
        while "\n" in self._printed:
            line, self._printed = self._printed.split("\n", 1)
            self.log("info", line)

    def flush_printed(self) -> None:
        if self._printed:
            self.log("info", self._printed)
            self._printed = ""

    def fork(self, data: dict[str, Any]) -> None:
        check_json("a fork's context", data)
        self.forks.append(copy.deepcopy(data))

    def spawn(self, machine: str, contexts: Any, countdown: Any = 0) -> None:
        if isinstance(contexts, dict):
            contexts = [contexts]
        if not isinstance(machine, str) or not machine:
            raise TypeError("spawn needs a machine name")
        items = [dict(c) for c in (contexts or [])]
        for c in items:
            check_json("a spawned context", c)
        if isinstance(countdown, (list, tuple)):
            raise TypeError("phasm's spawn takes one countdown for all contexts")
        request: dict[str, Any] = {"machine": machine, "contexts": items}
        if countdown:
            request["countdown"] = float(countdown)
        self.spawns.append(request)

    def report_token(self, token: Any) -> None:
        """Tell phasm the next page's token and wait until the next page is queued."""
        self._wait_for_go(self, token)
