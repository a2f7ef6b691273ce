#!/usr/bin/env bash
# Runs herald's benchmarks end to end: installs the Django baseline (PyPI, into a venv
# under ~/.cache), builds herald, the bare baseline and the load generator in release
# mode, runs every scenario against every server, and writes bench/results/<date>.json,
# its plot, and BENCHMARKS.md.
#
# Usage: bench/run.sh [--quick] [--pgo] [any `bench all` option, e.g. --scenarios idle,fanout]
# --pgo measures herald and the bare baseline each built profile-guided (bench/pgo.sh, the
# same treatment for both, as the release profile's link-time optimization is); it adds
# two instrumented and two optimized builds and their training runs.
# A full run measures the goals of issue 19 in three herald/bare pairs and judges them
# on the median ratio (`--pairs`, bench/src/pairs.rs); `--pairs 1` measures once.
# Needs: cargo, python3 (3.11) with venv, redis-server on PATH; for the profile-guided
# builds, llvm-profdata (see bench/pgo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

pgo=0
args=()
for arg in "$@"; do
    if [[ "$arg" == "--pgo" ]]; then
        pgo=1
    else
        args+=("$arg")
    fi
done

bench/baselines/django/install.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked -p bench
if [[ $pgo -eq 1 ]] && ! bench/pgo.sh --check; then
    exit 1
fi
bin="$CARGO_TARGET_DIR/bench-bin"
rm -rf "$bin"
mkdir -p "$bin"
if [[ $pgo -eq 1 ]]; then
    ln -s "$(bench/pgo.sh herald)" "$bin/herald"
    ln -s "$(bench/pgo.sh bench-bare)" "$bin/bench-bare"
    export HERALD_BENCH_BUILDS="herald and the bare baseline each built profile-guided by bench/pgo.sh (trained on \`bench all --quick\`)"
else
    # Built separately so herald's binary is exactly the one `cargo build --release`
    # makes (the bare baseline turns on axum's `ws` feature, which would otherwise be
    # unified in).
    cargo build --release --locked -p herald
    cargo build --release --locked -p bench-bare
    ln -s "$CARGO_TARGET_DIR/release/herald" "$bin/herald"
    ln -s "$CARGO_TARGET_DIR/release/bench-bare" "$bin/bench-bare"
    export HERALD_BENCH_BUILDS="release builds (\`cargo build --release\`: link-time optimization, not profile-guided)"
fi
# The load generator and the servers each hold up to ~20,000 sockets.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export HERALD_BENCH_COMMAND="bench/run.sh${*:+ $*}"
exec "$CARGO_TARGET_DIR/release/bench" all --bin-dir "$bin" ${args[@]+"${args[@]}"}
