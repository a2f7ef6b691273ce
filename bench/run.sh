#!/usr/bin/env bash
# Runs herald's benchmarks end to end: installs the Django baseline (PyPI, into a venv
# under ~/.cache), builds herald, the bare baseline and the load generator in release
# mode, runs every scenario against every server, and writes bench/results/<date>.json,
# its plot, and BENCHMARKS.md.
#
# Usage: bench/run.sh [--quick] [--pgo] [any `bench all` option, e.g. --scenarios idle,fanout]
# --pgo measures herald and the bare baseline each built profile-guided (bench/pgo.sh, the
# same treatment for both, as the release profile's link-time optimization is), in place
# of the plain builds: an instrumented and an optimized build of each, and their training
# runs. The script passes `--bin-dir` itself.
# A full run measures the goals of issue 19 in five herald/bare pairs and judges them
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

if [[ $pgo -eq 1 ]] && ! bench/pgo.sh --check; then
    exit 1
fi
bench/baselines/django/install.sh
# Absolute: the binaries are linked from another directory.
mkdir -p "${CARGO_TARGET_DIR:-target}"
CARGO_TARGET_DIR="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
export CARGO_TARGET_DIR
cargo build --release --locked -p bench
bin="$CARGO_TARGET_DIR/bench-bin"
rm -rf "$bin"
mkdir -p "$bin"
if [[ $pgo -eq 1 ]]; then
    herald="$(bench/pgo.sh herald)"
    bare="$(bench/pgo.sh bench-bare)"
    ln -s "$herald" "$bin/herald"
    ln -s "$bare" "$bin/bench-bare"
    export HERALD_BENCH_BUILDS="herald and the bare baseline each built profile-guided by bench/pgo.sh (herald trained on \`bench all --quick\` with the cluster scenario, the bare baseline on its three kinds)"
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
