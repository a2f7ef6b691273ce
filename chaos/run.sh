#!/usr/bin/env bash
# Runs herald's chaos suite end to end: builds the release `herald` and the suite, runs
# every scenario (real herald nodes and workers, private redis-servers, a 3 + 3 Redis
# Cluster, all on 127.0.0.1), prints the table, and (full run) writes
# chaos/results/<date>.json and RELIABILITY.md.
#
# Usage: chaos/run.sh [--quick] [--scenarios b,c] [--keep] [--write]
#   --quick          fewer clients and shorter phases (about half the time)
#   --scenarios X,Y  only these scenarios (letters a–h); the table is printed, nothing written
#   --keep           keep the scratch directory (every process's log)
#   --write          write RELIABILITY.md also for a quick or partial run
# Needs: cargo, redis-server and redis-cli (Redis 7) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null || { echo "chaos/run.sh: redis-server is not on PATH (install Redis 7)" >&2; exit 1; }
command -v redis-cli >/dev/null || { echo "chaos/run.sh: redis-cli is not on PATH (install Redis 7)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked -p herald
cargo build --release --locked -p herald-chaos
export HERALD_CHAOS_COMMAND="chaos/run.sh${*:+ $*}"
exec "$CARGO_TARGET_DIR/release/herald-chaos" run "$@"
