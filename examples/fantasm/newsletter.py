"""The actions of fsm.yaml, written as for Fantasm (they would run there unchanged)."""

import logging

from fantasm.action import FSMAction, ListContinuationFSMAction
from fantasm.constants import CONTINUATION_RESULTS_KEY
from fantasm.exceptions import HaltMachineError

OK_EVENT = "ok"

LISTS = {
    "weekly": ["ada@example.com", "bob@example.com", "cy@example.com",
               "dee@example.com", "eve@example.com"],
    "empty": [],
}


class LoadSubscribers(FSMAction):
    """Pick the mailing list; halt the machine when there is nobody to write to."""

    def execute(self, context, obj):
        name = context.get("list", "weekly")
        subscribers = LISTS.get(name)
        if not subscribers:
            raise HaltMachineError(f"list {name!r} has no subscribers: nothing to send",
                                   logLevel=logging.INFO)
        context["subscribers"] = subscribers
        context.logger.info("sending to %d subscribers of %s", len(subscribers), name)
        return OK_EVENT


class CountPage(FSMAction):
    """Entry action of the continuation state: runs for every page, before the page."""

    def execute(self, context, obj):
        obj["entered"] = True


class SendPage(ListContinuationFSMAction):
    """Two subscribers a page; one branch per subscriber (the page's own and a fork)."""

    def getList(self, context, obj):
        return context["subscribers"]

    def getBatchSize(self, context, obj):
        return 2

    def execute(self, context, obj):
        assert obj["entered"], "the entry action shares obj with the main action"
        page = obj[CONTINUATION_RESULTS_KEY]
        del context["subscribers"]
        for email in page[1:]:
            context.fork({"email": email})
        context["email"] = page[0]
        print(f"sent to {page[0]}")  # a print() becomes a log line of this step
        return "sent"


class Tally(FSMAction):
    """Fan-in: gets every branch's context; the machine continues with obj['__fic__']."""

    def execute(self, contexts, obj):
        emails = sorted(c["email"] for c in contexts)
        joined = obj["__fic__"]
        joined["sent"] = len(emails)
        joined["emails"] = emails
        joined.pop("email", None)
        contexts.logger.warning("tally: %d e-mails sent", len(emails))
        joined.spawn("Audit", [{"sent": len(emails)}])
        return "done"


class Audit(FSMAction):
    def execute(self, context, obj):
        context.logger.info("audit: %s e-mails, attempt %s, started %s",
                            context["sent"], obj["__rc__"], context.getInstanceStartTime())
