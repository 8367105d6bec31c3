"""Fork one branch per record of the page; this branch keeps the first record."""
import json
import sys

request = json.load(sys.stdin)
records = request["context"]["records"]
first, rest = records[0], records[1:]
json.dump({
    "event": "priced",
    "context": {"id": first["id"], "cents": first["cents"]},
    "forks": [{"id": r["id"], "cents": r["cents"]} for r in rest],
}, sys.stdout)
