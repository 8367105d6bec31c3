#!/usr/bin/env python3
"""What a million waiting instances cost an idle worker (issue 12, "scale of waiting").

Fills a database with N instances that each wait on a 30-day countdown (their next task is
due a month from now) or, with `--waits event`, for an event from outside (a `wait:` state
without a timeout: a wait task that is never due), starts `phasm worker`, and measures:

- the worker's CPU over `--seconds` while it has nothing to do (utime + stime from /proc);
- how soon a newly started instance's first step begins: `started_at` of its first
  transition minus its `created_at`, over `--starts` instances started one by one.

Usage (release build first: `cargo build --release -p phasm-cli`):

    python3 scripts/waiting_scale.py --db /tmp/waiting.db
    python3 scripts/waiting_scale.py --db 'postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dwaiting'

A SQLite database is filled with Python's `sqlite3`, a PostgreSQL one with `psql`. The
database should be a fresh one: the script adds `--instances` waiting instances to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

MACHINES = """actions:
  Nap:
    exec: [sh, -c, "cat > /dev/null; echo '{\\"event\\": \\"later\\"}'"]
  Wake:
    exec: [sh, -c, "cat > /dev/null; echo '{}'"]
state_machines:
- name: Sleeper
  states:
  - name: a
    initial: true
    action: Nap
    transitions:
    - event: later
      to: b
      countdown: 30d
  - name: b
    final: true
    action: Wake
"""

MONTH_MICROS = 30 * 24 * 3600 * 1_000_000

# The due time of a wait without a timeout (`engine::NEVER`).
NEVER = 2**63 - 1

# A countdown's task, or a wait's: (name suffix, kind, event, due, accepts).
def task_shape(waits: str, now: int) -> tuple[str, str, str, int, str | None]:
    if waits == "event":
        accepts = '[{"event":"later","name":"NAME--a--later--b--step-1","queue":"default"}]'
        return "--a--wait--step-1", "wait", "", NEVER, accepts
    return "--a--later--b--step-1", "dispatch", "later", now + MONTH_MICROS, None


def phasm(binary: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run phasm to its end; fail loudly when it fails."""
    done = subprocess.run(
        [str(binary), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"phasm {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def fill_sqlite(path: str, count: int, now: int, waits: str) -> None:
    """Add `count` waiting instances to a SQLite file."""
    suffix, kind, event, due, accepts = task_shape(waits, now)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    with db:
        db.execute(
            """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
               INSERT INTO instances (name, machine, status, context, created_at, updated_at)
               SELECT 'waiting-' || i, 'Sleeper', 'running', '{}', ?, ? FROM n""",
            (count, now, now),
        )
        db.execute(
            """INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step,
                                  branch, queue, status, due_at, created_at, accepts)
               SELECT id, name || ?, ?, 'a', ?, '{}', 1, '', 'default', 'ready', ?, ?, ?
               FROM instances WHERE name LIKE 'waiting-%'""",
            (suffix, kind, event, due, now, accepts),
        )
    db.close()


def fill_postgres(url: str, count: int, now: int, waits: str) -> None:
    """Add `count` waiting instances to a PostgreSQL database."""
    suffix, kind, event, due, accepts = task_shape(waits, now)
    accepts_sql = "NULL" if accepts is None else f"'{accepts}'"
    sql = f"""
INSERT INTO instances (name, machine, status, context, created_at, updated_at)
SELECT 'waiting-' || i, 'Sleeper', 'running', '{{}}', {now}, {now}
FROM generate_series(1, {count}) AS i;
INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step, branch, queue,
                   status, due_at, created_at, accepts)
SELECT id, name || '{suffix}', '{kind}', 'a', '{event}', '{{}}', 1, '', 'default',
       'ready', {due}, {now}, {accepts_sql}
FROM instances WHERE name LIKE 'waiting-%';
ANALYZE;
"""
    base, _, query = url.partition("?")
    env = dict(os.environ)
    if "search_path%3D" in query:
        schema = query.split("search_path%3D", 1)[1].split("&", 1)[0]
        env["PGOPTIONS"] = f"-csearch_path={schema}"
    subprocess.run(["psql", "-q", base, "-c", sql], check=True, env=env)


def at(stamp: str) -> float:
    """Milliseconds since the epoch of an RFC 3339 time as phasm prints it."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a SQLite path or a PostgreSQL URL")
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument(
        "--waits",
        choices=["countdown", "event"],
        default="countdown",
        help="what the instances wait for: a 30-day countdown, or an event (no timeout)",
    )
    parser.add_argument(
        "--phasm",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "target/release/phasm",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="phasm-waiting-"))
    (work / "fsm.yaml").write_text(MACHINES)
    # The schema, by phasm itself: one instance, worked to its countdown.
    phasm(args.phasm, "start", "fsm.yaml", "--name", "first", "--db", args.db, cwd=work)
    now = int(time.time() * 1_000_000)
    began = time.monotonic()
    if args.db.startswith(("postgres://", "postgresql://")):
        fill_postgres(args.db, args.instances, now, args.waits)
    else:
        fill_sqlite(args.db, args.instances, now, args.waits)
    print(f"{args.instances} instances waiting for {'an event' if args.waits == 'event' else 'a countdown'} added in {time.monotonic() - began:.1f}s")
    worker = subprocess.Popen(
        [str(args.phasm), "worker", "fsm.yaml", "--db", args.db, "--quiet"],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)  # the worker starts and works the first instance to its countdown
        cpu = cpu_seconds(worker.pid)
        time.sleep(args.seconds)
        idle = (cpu_seconds(worker.pid) - cpu) / args.seconds
        print(f"idle worker: {idle * 100:.2f}% of a core over {args.seconds:.0f}s")
        delays = []
        for i in range(args.starts):
            name = f"probe-{i}"
            phasm(args.phasm, "start", "fsm.yaml", "--name", name, "--db", args.db, cwd=work)
            for _ in range(500):
                status = json.loads(
                    phasm(args.phasm, "status", name, "--json", "--db", args.db, cwd=work).stdout
                )
                if status.get("history"):
                    break
                time.sleep(0.01)
            else:
                sys.exit(f"{name} did not take its first step")
            first = status["history"][0]
            delays.append(at(first["started_at"]) - at(status["created_at"]))
            time.sleep(0.5)
        delays.sort()
        print(
            "first step began after (ms): "
            + ", ".join(f"{d:.0f}" for d in delays)
            + f"; median {delays[len(delays) // 2]:.0f}, most {delays[-1]:.0f}"
        )
    finally:
        worker.terminate()
        worker.wait(timeout=30)


if __name__ == "__main__":
    main()
