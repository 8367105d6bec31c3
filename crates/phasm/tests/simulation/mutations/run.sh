#!/usr/bin/env bash
# Show that the simulation finds bugs: apply each deliberate mutation here (a bug in the
# fence, in settling, in event delivery) to the source, run the deterministic SQLite
# simulation from seed 0 until a seed fails, print that seed and what broke, and take the
# mutation out again. A mutation no seed catches in $SEEDS (default 2000) is reported as
# survived, and the script exits 1.
#
#   bash crates/phasm/tests/simulation/mutations/run.sh            # every mutation
#   bash crates/phasm/tests/simulation/mutations/run.sh fence      # one
#
# It changes the work tree while it runs: do not run it beside a build of the same tree.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../../.." && pwd)"
cd "$root"
seeds="${SEEDS:-2000}"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    names=()
    for p in "$here"/*.patch; do names+=("$(basename "$p" .patch)"); done
fi
survived=0
for name in "${names[@]}"; do
    patch="$here/$name.patch"
    git apply "$patch" || { echo "$name: the patch no longer applies"; exit 2; }
    out="$(PHASM_SIM_QUIET=1 PHASM_SIM_SEEDS="$seeds" cargo test -q -p phasm --test simulation \
        -- --exact workers_over_a_failing_sqlite_store_lose_nothing_and_join_each_item_once 2>&1)"
    git apply -R "$patch"
    failed="$(printf '%s\n' "$out" | grep -m1 -oE 'seed [0-9]+: ' | grep -oE '[0-9]+')"
    if [ -n "$failed" ]; then
        why="$(printf '%s\n' "$out" | grep -m1 -A2 -E 'seed [0-9]+: ' | sed -E 's/^.*\}: //' | grep -v 'stack backtrace' | tr -s ' \n' ' ' | cut -c1-200)"
        echo "$name: caught by seed $failed, after $((failed + 1)) seeds: $why"
    else
        echo "$name: survived $seeds seeds"
        survived=1
    fi
done
exit "$survived"
