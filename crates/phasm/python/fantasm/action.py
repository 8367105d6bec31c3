"""Fantasm's action base classes, on phasm.

An action is any object with ``execute(self, context, obj)``; a state's main action returns
the next event (or ``None``); entry, exit and transition actions return nothing. A
continuation state's action also has ``continuation(self, context, obj, token=None)``,
which returns the next page's token (or ``None`` on the last page): phasm queues the next
page before ``execute`` runs on this one, so pages overlap.
"""

from __future__ import annotations

from typing import Any, Optional

from fantasm.constants import (
    CONTINUATION_COMPLETE_PARAM,
    CONTINUATION_RESULT_KEY,
    CONTINUATION_RESULTS_COUNTER_PARAM,
    CONTINUATION_RESULTS_KEY,
    CONTINUATION_RESULTS_SIZE_PARAM,
)

#: Why the datastore continuations cannot run on phasm (shown when a state is bound to one).
DATASTORE_UNSUPPORTED = (
    "needs App Engine's datastore, which phasm does not have: subclass "
    "ContinuationFSMAction and page through your database in continuation() (return the "
    "next cursor as the token), or use ListContinuationFSMAction, or phasm's built-in "
    "`lines:`/`list:` actions"
)


class FSMAction:
    """An action: ``execute(context, obj)`` does the work (the main action returns the event)."""

    def execute(self, context: Any, obj: dict[str, Any]) -> Optional[str]:
        raise NotImplementedError()


class ContinuationFSMAction(FSMAction):
    """A continuation state's action: ``continuation`` picks a page, ``execute`` processes it."""

    def continuation(self, context: Any, obj: dict[str, Any], token: Any = None) -> Any:
        raise NotImplementedError()

    @staticmethod
    def checkFanInForTotalResultsCount(contexts: list[Any], obj: dict[str, Any]) -> Optional[int]:
        """At a fan-in after a single-level continuation: the total number of results, from the
        context of the last page (``None`` if that page is not among ``contexts``)."""
        for context in contexts:
            if context.get(CONTINUATION_COMPLETE_PARAM):
                return context.get(CONTINUATION_RESULTS_COUNTER_PARAM)
        return None

    @staticmethod
    def getResultsCount(context: Any, obj: dict[str, Any]) -> int:
        """How many results this page has."""
        return context.get(CONTINUATION_RESULTS_SIZE_PARAM, 0)


class ListContinuationFSMAction(ContinuationFSMAction):
    """Pages through ``getList(context, obj)`` ``getBatchSize(context, obj)`` items at a time.

    Each page finds its items in ``obj['results']`` (and the first in ``obj['result']``).
    The list must be the same on every call. Unlike Fantasm, ``__cc__`` (last page) is also
    right when the list's length is a multiple of the batch size.
    """

    def getList(self, context: Any, obj: dict[str, Any]) -> list[Any]:
        raise NotImplementedError()

    def getBatchSize(self, context: Any, obj: dict[str, Any]) -> int:
        return 1

    def continuation(self, context: Any, obj: dict[str, Any], token: Any = None) -> Optional[str]:
        items = self.getList(context, obj)
        batch = max(1, int(self.getBatchSize(context, obj)))
        index = int(token or 0)
        results = list(items[index:index + batch])
        obj[CONTINUATION_RESULTS_KEY] = results
        obj[CONTINUATION_RESULT_KEY] = results[0] if results else None
        following = index + batch
        context[CONTINUATION_RESULTS_COUNTER_PARAM] = index + len(results)
        context[CONTINUATION_RESULTS_SIZE_PARAM] = len(results)
        context[CONTINUATION_COMPLETE_PARAM] = following >= len(items)
        return str(following) if following < len(items) else None


class DatastoreContinuationFSMAction(ContinuationFSMAction):
    """Importable and subclassable so modules that define such classes load; a state bound
    to one is refused when phasm starts (it needs App Engine's datastore)."""

    _phasm_unsupported = "DatastoreContinuationFSMAction " + DATASTORE_UNSUPPORTED

    def getQuery(self, context: Any, obj: dict[str, Any]) -> Any:
        raise NotImplementedError()

    def getBatchSize(self, context: Any, obj: dict[str, Any]) -> int:
        return 1

    def continuation(self, context: Any, obj: dict[str, Any], token: Any = None) -> Any:
        raise NotImplementedError(self._phasm_unsupported)


class NDBDatastoreContinuationFSMAction(DatastoreContinuationFSMAction):
    """As :class:`DatastoreContinuationFSMAction`, for NDB: refused when bound to a state."""

    _phasm_unsupported = "NDBDatastoreContinuationFSMAction " + DATASTORE_UNSUPPORTED

    def getKeysOnly(self, context: Any, obj: dict[str, Any]) -> bool:
        return False

    def getDeadline(self, context: Any, obj: dict[str, Any]) -> float:
        return 5

    def getReadPolicy(self, context: Any, obj: dict[str, Any]) -> int:
        return 0
