"""The messages of the action host protocol (docs/host-protocol.md), as typed dicts.

Each mirrors a Rust type of ``phasm::action::host::protocol``: what phasm writes
(``ToHost``: :class:`HelloMessage`, :class:`StepMessage`, :class:`GoMessage`,
:class:`AbortMessage`) and what a host writes (:class:`ReadyMessage` once, then ``FromHost``:
:class:`TokenMessage` and :class:`DoneMessage`). The ``type`` key names the kind. Keys a
side may leave out are in the ``total=False`` part of each message.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, TypedDict, Union

#: A context: JSON object keys to values.
ContextDict = Dict[str, Any]


# -- phasm to the host -------------------------------------------------------------------

class HelloAction(TypedDict):
    """An action reference to resolve (``module.Class``)."""

    ref: str


class HelloConstant(TypedDict):
    """References to try for a constant, in order; the first naming a string wins."""

    candidates: List[str]


class HelloMachine(TypedDict):
    """What a host needs to know of a machine: its ``context_types``."""

    context_types: Dict[str, str]


class _HelloRequired(TypedDict):
    type: Literal["hello"]
    protocol: int
    path: List[str]
    threads: int
    drain_seconds: float
    actions: List[HelloAction]
    constants: List[HelloConstant]
    machines: Dict[str, HelloMachine]


class HelloMessage(_HelloRequired, total=False):
    """phasm's first message: what to resolve before any step runs."""

    max_log_bytes: int
    max_log_lines: int


class StepCall(TypedDict):
    """One call of a step: its slot (``exit``, ``transition``, ``entry``,
    ``continuation`` or ``action``), the action's reference, and its state."""

    role: str
    action: str
    state: str


class _StepRequired(TypedDict):
    type: Literal["step"]
    id: int
    machine: str
    instance: str
    task: str
    attempt: int
    event: str
    context: ContextDict
    token: Any
    calls: List[StepCall]


class StepMessage(_StepRequired, total=False):
    """A step: every call of it, sharing one context."""

    contexts: List[ContextDict]
    wait_token: str


class GoMessage(TypedDict):
    """The next page a ``token`` announced is queued: go on."""

    type: Literal["go"]
    id: int


class AbortMessage(TypedDict):
    """The next page could not be queued: the step stops."""

    type: Literal["abort"]
    id: int
    error: str


#: Any message phasm writes.
ToHost = Union[HelloMessage, StepMessage, GoMessage, AbortMessage]


# -- the host to phasm -------------------------------------------------------------------

class _ReadyActionRequired(TypedDict):
    ref: str


class ReadyAction(_ReadyActionRequired, total=False):
    """One action of ``hello``, resolved (its ``kind``) or not (its ``error``)."""

    error: str
    kind: str
    continuation: bool


class ReadyConstant(TypedDict, total=False):
    """One constant of ``hello``: the reference that resolved and its value, an error, or
    neither (the name is used as written)."""

    ref: str
    value: str
    error: str


class _ReadyRequired(TypedDict):
    type: Literal["ready"]
    protocol: int


class ReadyMessage(_ReadyRequired, total=False):
    """The answer to ``hello``; ``fatal`` when the host cannot work at all."""

    pid: int
    python: str
    fatal: str
    actions: List[ReadyAction]
    constants: List[ReadyConstant]


class TokenMessage(TypedDict):
    """A continuation page's next token: phasm queues that page, then answers ``go``."""

    type: Literal["token"]
    id: int
    token: Any


class DoneLog(TypedDict):
    """A log line of a step."""

    level: str
    message: str


class _DoneSpawnRequired(TypedDict):
    machine: str
    contexts: List[ContextDict]


class DoneSpawn(_DoneSpawnRequired, total=False):
    """Instances to start after the commit, one per context."""

    countdown: Optional[float]


class DoneError(TypedDict, total=False):
    """Which call failed (``None``: before or after the calls), and how."""

    call: Optional[int]
    type: str
    message: str
    traceback: Optional[str]
    transient: bool


class _DoneRequired(TypedDict):
    type: Literal["done"]
    id: int


class DoneMessage(_DoneRequired, total=False):
    """A step's outcome."""

    context: ContextDict
    event: Optional[str]
    forks: List[ContextDict]
    spawns: List[DoneSpawn]
    halt: str
    next_token: Any
    log: List[DoneLog]
    error: DoneError


#: Any message a host writes after ``ready``.
FromHost = Union[TokenMessage, DoneMessage]
