"""phasm's Python API: actions for phasm machines, run by phasm's action host.

An action is a function taking a :class:`Context`, or a class with ``run(self, ctx)``
(one instance per host process). A state's main action returns the next event::

    import phasm

    def charge(ctx: phasm.Context) -> str:
        amount = ctx.get("amount", float)
        ctx.put("charged", amount)
        ctx.info(f"charged {amount}")
        return "paid"

A continuation state's action is a class with ``continuation(self, ctx)`` returning the
next page's token (``None`` on the last page) before ``run`` processes this page.

Name it in the YAML as ``module.function`` (or ``Name`` with the machine's ``namespace``
set to the module), with a top-level ``python:`` section. Fantasm's ``FSMAction`` classes
run too: see the :mod:`fantasm` package.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Optional

from phasm._runtime import Logger, NotJSONError, Step, check_json, coerce, json_problem

__all__ = ["Context", "Halt", "TransientError", "PROTOCOL_VERSION", "__version__"]

__version__ = "0.1.0"

#: The host protocol version this package speaks (see docs/host-protocol.md).
PROTOCOL_VERSION = 1

_TYPES = {
    int: "int",
    float: "float",
    bool: "bool",
    str: "str",
    dict: "json",
    list: "json",
    _dt.datetime: "datetime",
    _dt.date: "date",
}


class Halt(Exception):
    """Raise to stop the instance deliberately: it ends ``halted`` and nothing is retried."""


class TransientError(Exception):
    """Raise for a passing fault: the attempt fails and is retried (logged as a warning)."""


class Context:
    """What an action sees and changes while it runs.

    The instance's data reads like a dict (``ctx["key"]``, ``"key" in ctx``) and with typed
    :meth:`get`; changes are committed with the step, exactly once, after every call of the
    step succeeded.
    """

    def __init__(self, data: dict[str, Any], step: Step, scratch: dict[str, Any],
                 contexts: Optional[list[dict[str, Any]]] = None) -> None:
        self._data = data
        self._step = step
        self._scratch = scratch
        self._contexts = contexts

    # -- where the call runs -------------------------------------------------------------

    @property
    def instance(self) -> str:
        """The instance's name."""
        return self._step.instance

    @property
    def machine(self) -> str:
        """The machine's name."""
        return self._step.machine

    @property
    def state(self) -> str:
        """The state this call belongs to (the source state for exit and transition actions)."""
        return self._step.state

    @property
    def role(self) -> str:
        """``entry``, ``action``, ``exit``, ``transition`` or ``continuation``."""
        return self._step.role

    @property
    def event(self) -> str:
        """The event being dispatched (``pseudo-init`` when entering the initial state)."""
        return self._step.event

    @property
    def attempt(self) -> int:
        """Earlier attempts of this step (0 on the first)."""
        return self._step.attempt

    @property
    def idempotency_key(self) -> str:
        """Unique to this step and the same on every attempt: use it to make side effects
        idempotent (e.g. as a payment provider's idempotency key)."""
        return self._step.task

    @property
    def started_at(self) -> Optional[_dt.datetime]:
        """When the instance started (UTC), for generated instance names; else ``None``."""
        from fantasm.fsm import instance_start_time

        return instance_start_time(self._step.instance)

    @property
    def token(self) -> Any:
        """In a continuation state: this page's token (``None`` on the first page)."""
        return self._step.token

    @property
    def wait_token(self) -> Optional[str]:
        """In a step entering a waiting state: the token that addresses the wait it begins
        (``POST /api/waits/{token}`` ends it), the same on every attempt; else ``None``."""
        return self._step.wait_token

    @property
    def contexts(self) -> list[dict[str, Any]]:
        """At a fan-in state: the joined branches' contexts, in order of arrival."""
        return list(self._contexts or [])

    @property
    def scratch(self) -> dict[str, Any]:
        """A dict shared by the calls of this step and then dropped (Fantasm's ``obj``)."""
        return self._scratch

    @property
    def data(self) -> dict[str, Any]:
        """The context itself, as a dict (changes are kept)."""
        return self._data

    @property
    def logger(self) -> Logger:
        """Fantasm-style logger (``debug`` … ``critical``)."""
        return self._step.logger

    # -- the data ------------------------------------------------------------------------

    def get(self, key: str, type: Any = None, default: Any = None) -> Any:
        """The value of ``key`` converted to ``type`` (``int``, ``float``, ``bool``, ``str``,
        ``dict``, ``list``, ``datetime.datetime``, ``datetime.date``, or a ``context_types``
        name), or ``default`` when absent.

        Raises ``ValueError`` when the value does not convert.
        """
        if key not in self._data:
            return default
        value = self._data[key]
        if type is None:
            return value
        name = type if isinstance(type, str) else _TYPES.get(type)
        if name is None:
            raise TypeError(f"cannot convert context values to {type!r}")
        return coerce(name, value, key)

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` (carried to the next step). The value must be JSON (dates become
        ISO 8601 text)."""
        check_json("context", {key: value})
        self._data[key] = value

    def remove(self, key: str) -> Any:
        """Remove ``key``, returning its value (``None`` when absent)."""
        return self._data.pop(key, None)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    # -- effects -------------------------------------------------------------------------

    def fork(self, data: Optional[dict[str, Any]] = None) -> None:
        """A copy of the context as it is now, with ``data`` merged in, becomes a new branch
        that receives the same next event as this one."""
        copied = dict(self._data)
        if data:
            copied.update(data)
        self._step.fork(copied)

    def spawn(self, machine: str, contexts: Any, countdown: float = 0) -> None:
        """Start one instance of ``machine`` per context when this step commits, after
        ``countdown`` seconds. A retry of the step starts nothing twice."""
        self._step.spawn(machine, contexts, countdown)

    def halt(self, reason: str = "halted by the action") -> None:
        """Stop the machine after this call: the instance ends ``halted``."""
        self._step.halt = reason

    def set_next_token(self, token: Any) -> None:
        """In a continuation state without ``continuation()``: the next page's token, known
        only after this page ran (the next page is then queued after this one). It must be
        JSON."""
        problem = json_problem(token, 1)
        if problem is not None:
            raise NotJSONError(f"the next token {problem}")
        self._step.next_token = token
        self._step.next_token_set = True

    def log(self, level: str, message: str) -> None:
        """A log line at ``level`` (``debug``, ``info``, ``warning``, ``error``, ``critical``)."""
        self._step.log(level, str(message))

    def debug(self, message: str) -> None:
        self.log("debug", message)

    def info(self, message: str) -> None:
        self.log("info", message)

    def warning(self, message: str) -> None:
        self.log("warning", message)

    def error(self, message: str) -> None:
        self.log("error", message)
