#!/usr/bin/env python3
"""How soon after its tick a schedule's instance starts, with one or more workers.

Writes a machine file with an `every: 1s` schedule (`overlap: allow`), runs `--workers`
`phasm worker` processes on one database for `--seconds`, then reads every instance the
schedule started (`phasm list --json`) and reports how many ticks fired, whether any was
missed or fired twice, and the delay from each tick (in the instance's name) to the
instance's `created_at`.

Usage (release build first: `cargo build --release -p phasm-cli`):

    python3 scripts/schedule_latency.py --db /tmp/schedules.db --workers 2
    python3 scripts/schedule_latency.py --db 'postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dsched' --workers 2

The database should be a fresh one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MACHINE = """actions:
  Go:
    exec: [sh, -c, "cat > /dev/null; echo '{}'"]
schedules:
- name: tick
  machine: Job
  every: 1s
  overlap: allow
state_machines:
- name: Job
  states:
  - name: run
    initial: true
    final: true
    action: Go
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a SQLite path or a PostgreSQL URL")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--phasm",
        default=str(Path(__file__).resolve().parent.parent / "target/release/phasm"),
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fsm = Path(tmp) / "fsm.yaml"
        fsm.write_text(MACHINE)
        workers = [
            subprocess.Popen(
                [args.phasm, "worker", str(fsm), "--db", args.db, "--quiet"],
                stderr=subprocess.DEVNULL,
            )
            for _ in range(args.workers)
        ]
        time.sleep(args.seconds)
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        out = subprocess.run(
            [args.phasm, "list", "--json", "--limit", "100000", "--db", args.db],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    ticks: list[tuple[int, float]] = []
    for i in json.loads(out):
        stamp = i["instance"].removeprefix("tick-")
        tick = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        created = datetime.fromisoformat(i["created_at"].replace("Z", "+00:00"))
        ticks.append((int(tick.timestamp()), (created - tick).total_seconds() * 1000))
    ticks.sort()
    seconds = [t for t, _ in ticks]
    gaps = sum(1 for a, b in zip(seconds, seconds[1:]) if b != a + 1)
    delays = sorted(d for _, d in ticks)
    print(f"{len(ticks)} ticks fired by {args.workers} workers in {args.seconds:.0f}s; "
          f"missed or repeated: {gaps}")
    if delays:
        print(f"instance created after its tick (ms): min {delays[0]:.0f}, "
              f"median {statistics.median(delays):.0f}, max {delays[-1]:.0f}")


if __name__ == "__main__":
    main()
