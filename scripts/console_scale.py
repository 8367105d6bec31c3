#!/usr/bin/env python3
"""How fast the console answers with a million ended instances (issue 13, "each page answers
in under 50 ms with 1,000,000 ended instances in the database").

Fills a fresh SQLite database with `--ended` instances of machine `Job` that ended over the
last 30 days, each after 1 to 601 s (one in 50 failed; three transitions each) and `--running` instances waiting in
its states, starts `phasm serve` on it, and requests each console page and list query
`--times` times, printing the median and slowest answer of each.

Usage (release build first: `cargo build --release -p phasm-cli`):

    python3 scripts/console_scale.py --db /tmp/console.db
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MACHINE = """actions:
  Go:
    exec: [sh, -c, "cat > /dev/null; echo '{\\"event\\": \\"next\\"}'"]
state_machines:
- name: Job
  states:
  - name: a
    initial: true
    action: Go
    transitions:
    - event: next
      to: b
  - name: b
    action: Go
    transitions:
    - event: next
      to: c
  - name: c
    final: true
"""

DAY = 86_400 * 1_000_000


def fill(path: str, ended: int, running: int, now: int) -> None:
    """Add the instances, their history, and the running ones' pending steps."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    with db:
        db.execute(
            """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
               INSERT INTO instances (name, machine, status, context, created_at, updated_at,
                                      ended_at, error)
               SELECT printf('job-%07d', i), 'Job',
                      CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'completed' END, '{}',
                      ? - 30 * ? + i * (30 * ? / ?),
                      ? - 30 * ? + i * (30 * ? / ?) + 1000000 + (i * 7919 % 600000) * 1000,
                      ? - 30 * ? + i * (30 * ? / ?) + 1000000 + (i * 7919 % 600000) * 1000,
                      CASE WHEN i % 50 = 0 THEN 'action `Go` failed: error ' || (i % 7) END
               FROM n""",
            (ended, now, DAY, DAY, ended, now, DAY, DAY, ended, now, DAY, DAY, ended),
        )
        for step, (frm, to) in enumerate([(None, "a"), ("a", "b"), ("b", "c")]):
            db.execute(
                """INSERT INTO history (instance_id, from_state, event, to_state, attempt,
                                        started_at, finished_at, task, branch, ends_branch)
                   SELECT id, ?, 'next', ?, 1, created_at, created_at + 1000, name || '--' || ?, '', 0
                   FROM instances""",
                (frm, to, step),
            )
        db.execute(
            """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
               INSERT INTO instances (name, machine, status, context, created_at, updated_at)
               SELECT printf('live-%05d', i), 'Job', 'running', '{}', ? - i * 1000000, ? FROM n""",
            (running, now, now),
        )
        db.execute(
            """INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step,
                                  branch, queue, status, due_at, created_at)
               SELECT id, name || '--a--next--b--step-1', 'dispatch', 'a', 'next', '{}', 1, '',
                      'default', 'ready', ? + 30 * ?, created_at
               FROM instances WHERE status = 'running'""",
            (now, DAY),
        )
    db.execute("ANALYZE")
    db.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a SQLite path (a fresh one)")
    parser.add_argument("--ended", type=int, default=1_000_000)
    parser.add_argument("--running", type=int, default=1000)
    parser.add_argument("--times", type=int, default=20)
    parser.add_argument(
        "--phasm",
        default=str(Path(__file__).resolve().parent.parent / "target/release/phasm"),
    )
    args = parser.parse_args()
    if Path(args.db).exists():
        sys.exit(f"{args.db} exists: give a fresh path")
    with tempfile.TemporaryDirectory() as tmp:
        fsm = Path(tmp) / "fsm.yaml"
        fsm.write_text(MACHINE)
        # Creates the file with phasm's schema (and one running instance, `first`).
        subprocess.run(
            [args.phasm, "start", str(fsm), "--db", args.db, "--name", "first"],
            check=True,
            capture_output=True,
        )
        now = int(time.time() * 1_000_000)
        began = time.monotonic()
        fill(args.db, args.ended, args.running, now)
        print(f"{args.ended} ended and {args.running} running instances added in "
              f"{time.monotonic() - began:.1f}s")
        port = free_port()
        server = subprocess.Popen(
            [args.phasm, "serve", str(fsm), "--db", args.db, "--listen", f"127.0.0.1:{port}"],
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    urllib.request.urlopen(base + "/healthz").read()
                    break
                except OSError:
                    time.sleep(0.1)
            def days_ago(n: int) -> str:
                return time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - n * 86_400))

            day_ago = days_ago(1)
            middle = sqlite3.connect(args.db).execute(
                "SELECT h.id FROM history h JOIN instances i ON i.id = h.instance_id"
                " WHERE i.name = 'job-0500000' ORDER BY h.id LIMIT 1 OFFSET 1"
            ).fetchone()[0]
            pages = [
                "/",
                "/machines/Job",
                "/machines/Job/graph.svg",
                "/instances",
                "/instances?machine=Job&status=failed",
                "/instances?prefix=job-09999",
                "/instances?prefix=job-",
                "/instances?prefix=nothing-like-this",
                "/instances?machine=Job&state=b&stuck=1h",
                f"/instances?order=ended&ended_after={day_ago}",
                "/instances?cursor=job-0500000",
                "/instances?order=oldest",
                f"/instances?created_before={days_ago(20)}",
                f"/instances?machine=Job&created_after={days_ago(21)}&created_before={days_ago(20)}",
                "/instances?order=duration",
                "/instances?order=duration&machine=Job&cursor=job-0500000",
                "/instances/job-0500000",
                "/instances/job-0500000/history",
                f"/instances/job-0500000/steps/{middle}",
                "/api/openapi.json",
                "/workers",
                "/queues",
            ]
            print(f"{'page':<50} median   slowest  (ms, {args.times} requests)")
            for page in pages:
                took = []
                for _ in range(args.times):
                    start = time.perf_counter()
                    with urllib.request.urlopen(base + page) as answer:
                        answer.read()
                    took.append((time.perf_counter() - start) * 1000)
                print(f"{page:<50} {statistics.median(took):6.1f}  {max(took):7.1f}")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
