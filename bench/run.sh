#!/usr/bin/env bash
# Runs herald's benchmarks end to end: installs the Django baseline (PyPI, into a venv
# under ~/.cache), builds herald, the bare baseline and the load generator in release
# mode, runs every scenario against every server, and writes bench/results/<date>.json,
# its plot, and BENCHMARKS.md.
#
# Usage: bench/run.sh [--quick] [any `bench all` option, e.g. --scenarios idle,fanout]
# A full run measures the goals of issue 19 in three herald/bare pairs and judges them
# on the median ratio (`--pairs`, bench/src/pairs.rs); `--pairs 1` measures once.
# Needs: cargo, python3 (3.11) with venv, redis-server on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

bench/baselines/django/install.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# Built separately so herald's binary is exactly the one `cargo build --release` makes
# (the bare baseline turns on axum's `ws` feature, which would otherwise be unified in).
cargo build --release --locked -p herald
cargo build --release --locked -p bench-bare
cargo build --release --locked -p bench
# The load generator and the servers each hold up to ~20,000 sockets.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export HERALD_BENCH_COMMAND="bench/run.sh${*:+ $*}"
exec "$CARGO_TARGET_DIR/release/bench" all "$@"
