"""The barrier: every batch is in. Check that each record was counted once."""
import json
import sys

batches = json.load(sys.stdin)["contexts"]
ids = sorted(i for b in batches for i in b["ids"])
if ids != sorted(set(ids)):
    sys.exit("a record was counted twice")
json.dump({"context": {
    "count": sum(b["count"] for b in batches),
    "total_cents": sum(b["cents"] for b in batches),
    "batches": len(batches),
}}, sys.stdout)
