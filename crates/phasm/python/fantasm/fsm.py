"""``FSMContext``: what a Fantasm action receives as ``context``, on phasm."""

from __future__ import annotations

import copy
import datetime as _dt
from typing import Any, Iterable, Optional

from phasm._runtime import Logger, Step, coerce


class _StateRef:
    """``context.currentState``: the state the running call belongs to."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<State {self.name}>"


class FSMContext(dict):
    """An instance's data (a dict) and the step it runs in.

    Dict operations read and change the context that is committed with the step. The
    methods are Fantasm's: :meth:`fork`, :meth:`spawn`, :meth:`getInstanceStartTime`,
    :meth:`clone`, :meth:`putTypedValue`; attributes ``logger``, ``instanceName``,
    ``machineName`` and ``currentState``.
    """

    def __init__(self, data: Optional[dict[str, Any]] = None, step: Optional[Step] = None,
                 obj: Optional[dict[str, Any]] = None) -> None:
        super().__init__(data or {})
        self._step = step
        self._obj = obj

    # -- who and where -------------------------------------------------------------------

    @property
    def instanceName(self) -> str:
        return self._step.instance if self._step else ""

    @property
    def machineName(self) -> str:
        return self._step.machine if self._step else ""

    @property
    def currentState(self) -> _StateRef:
        return _StateRef(self._step.state if self._step else "")

    @property
    def logger(self) -> Logger:
        if self._step is None:
            raise RuntimeError("this context is not part of a running step")
        return self._step.logger

    def getInstanceStartTime(self) -> Optional[_dt.datetime]:
        """When the instance started, read from a generated name (``MACHINE-YYYYmmddHHMMSS-xxxxxx``).

        Like Fantasm's, this works only for generated names; it returns ``None`` for a name
        chosen by the caller.
        """
        return instance_start_time(self.instanceName)

    # -- Fantasm's operations ------------------------------------------------------------

    def fork(self, data: Optional[dict[str, Any]] = None) -> None:
        """A copy of the context as it is now, updated with ``data``, becomes a new branch
        that receives the same next event as this one."""
        step = self._require_step("fork")
        copied = copy.deepcopy(dict(self))
        if data:
            copied.update(data)
        step.fork(copied)
        if self._obj is not None:
            self._obj.setdefault("__fc__", []).append(copied)

    def spawn(self, machineName: str, contexts: Any, countdown: Any = 0, method: str = "POST",
              _currentConfig: Any = None, taskName: Optional[str] = None) -> None:
        """Start one instance of ``machineName`` per context when this step commits.

        A retry of the step starts nothing twice (the instances are named after the step).
        ``method``, ``_currentConfig`` and ``taskName`` are accepted for compatibility.
        """
        self._require_step("spawn").spawn(machineName, contexts, countdown)

    def setQueue(self, queueName: str) -> None:
        raise NotImplementedError(
            "context.setQueue() is not supported by phasm: set `queue:` on the machine or "
            "transition in the YAML instead"
        )

    def clone(self, instanceName: Optional[str] = None,
              updateData: Optional[dict[str, Any]] = None,
              replaceData: Optional[dict[str, Any]] = None) -> "FSMContext":
        data = copy.deepcopy(dict(replaceData if replaceData is not None else self))
        if updateData:
            data.update(updateData)
        return FSMContext(data, self._step, self._obj)

    def putTypedValue(self, key: str, value: Any) -> None:
        """Store ``value`` converted to the type ``context_types`` declares for ``key``."""
        types = self._step.types if self._step else {}
        self[key] = coerce(types.get(key), value, key)

    def _require_step(self, what: str) -> Step:
        if self._step is None:
            raise RuntimeError(f"context.{what}() needs a running step")
        return self._step


class FanInContexts(list):
    """At a fan-in state: the list of joined contexts, with Fantasm's extra attributes."""

    def __init__(self, items: Iterable[FSMContext], step: Step) -> None:
        super().__init__(items)
        self._step = step
        self.guarded = False

    @property
    def logger(self) -> Logger:
        return self._step.logger

    @property
    def instanceName(self) -> str:
        return self._step.instance

    @property
    def machineName(self) -> str:
        return self._step.machine


def instance_start_time(name: str) -> Optional[_dt.datetime]:
    parts = name.rsplit("-", 2)
    if len(parts) != 3:
        return None
    try:
        return _dt.datetime.strptime(parts[1], "%Y%m%d%H%M%S")
    except ValueError:
        return None


def startStateMachine(machineName: str, contexts: Any, *args: Any, **kwargs: Any) -> None:
    """Not available outside a step: start instances with ``phasm start`` or the HTTP API,
    or from an action with ``context.spawn(machineName, contexts)``."""
    raise NotImplementedError(
        "fantasm.fsm.startStateMachine() is not available on phasm: inside an action use "
        "context.spawn(machineName, contexts); from elsewhere use `phasm start` or "
        "POST /api/machines/{machine}/instances"
    )
