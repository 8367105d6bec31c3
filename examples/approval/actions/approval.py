"""Actions of the approval example, one program for all steps (the step is argv[1]).

phasm writes one JSON request on stdin and reads one JSON response on stdout. In the step
that enters the waiting state `approval`, the request carries `wait_token`: the entry action
would mail a link to `POST /api/waits/{wait_token}`; here it logs it (stderr goes to the
instance's log).
"""
import json
import sys

step = sys.argv[1]
request = json.load(sys.stdin)
context = request.get("context") or {}
response = {"context": context}

if step == "check":
    response["event"] = "needs-approval" if float(context.get("amount", 0)) >= 100 else "ok"
elif step == "ask":
    token = request.get("wait_token")
    print(f"approve: POST /api/waits/{token} with {{\"event\": \"approved\"}}", file=sys.stderr)
    context["approval_token"] = token
elif step == "ship":
    context["shipped"] = True
elif step == "refund":
    context["refunded"] = True
elif step == "escalate":
    context["escalated_to"] = "head-of-sales"

json.dump(response, sys.stdout)
