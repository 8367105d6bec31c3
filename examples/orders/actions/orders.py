"""Actions of the order pipeline, one program for all steps (the step is argv[1]).

phasm writes one JSON request on stdin (machine, instance, state, role, event, task,
attempt, context) and reads one JSON response on stdout: the next `event`, and the
new `context`. Anything on stderr lands in the instance's log.
"""
import json
import sys

step = sys.argv[1]
request = json.load(sys.stdin)
context = request.get("context") or {}
attempt = request.get("attempt", 0)

if step == "check":
    quantity = int(context.get("quantity", 1))
    event = "ok" if quantity > 0 else "invalid"
    context["total"] = round(quantity * float(context.get("amount", 9.99)), 2)
elif step == "charge":
    # The provider is flaky: the first attempt of every order times out.
    if attempt == 0 and not context.get("charged_once"):
        print("payment provider timed out, retrying", file=sys.stderr)
        sys.exit(1)
    event = "declined" if context.get("card") == "declined" else "paid"
elif step == "ship":
    context["tracking"] = "TRK-" + request["instance"][-6:]
    event = "shipped"
elif step == "remind":
    event = None
elif step == "cancel":
    event = None
else:
    sys.exit(f"unknown step {step}")

json.dump({"event": event, "context": context, "log": [f"{step}: done"]}, sys.stdout)
