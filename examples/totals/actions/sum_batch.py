"""A join of the branches that arrived within one window: sum their records."""
import json
import sys

contexts = json.load(sys.stdin)["contexts"]
json.dump({
    "event": "summed",
    "context": {
        "count": len(contexts),
        "cents": sum(c["cents"] for c in contexts),
        "ids": sorted(c["id"] for c in contexts),
    },
}, sys.stdout)
