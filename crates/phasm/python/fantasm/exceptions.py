"""The exceptions Fantasm applications raise and catch."""

from __future__ import annotations

import logging
from typing import Optional


class FSMRuntimeError(Exception):
    """The parent of Fantasm's run-time errors."""


class HaltMachineError(FSMRuntimeError):
    """Stop the instance cleanly from any action: it ends ``halted``, nothing is retried.

    ``logLevel`` is the level the message is logged at (``None``: not logged).
    """

    def __init__(self, message: str = "", logLevel: Optional[int] = logging.WARNING) -> None:
        super().__init__(message)
        self.message = message
        self.logLevel = logLevel


class UserTransientError(FSMRuntimeError):
    """A passing fault: the step is retried (logged as a warning, not an error)."""


class UnknownEventError(FSMRuntimeError):
    """An action returned an event the state has no transition for."""


class UnknownMachineError(FSMRuntimeError):
    """No machine of that name."""


class UnknownStateError(FSMRuntimeError):
    """No state of that name."""


class FanInNoContextsAvailableRuntimeError(FSMRuntimeError):
    """Kept for imports; phasm never runs a join without contexts."""


TRANSIENT_ERRORS = (UserTransientError,)
