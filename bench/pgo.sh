#!/usr/bin/env bash
# Builds a profile-guided release binary of herald (or of the bare baseline:
# `bench/pgo.sh bench-bare`; `bench/pgo.sh --check` only looks for llvm-profdata) in
# four steps:
#   1. an instrumented release build (`-Cprofile-generate`), in its own target directory;
#   2. a training run: the benchmark scenarios at their quick sizes (`bench all --quick`)
#      against that binary, which writes its profile when it exits;
#   3. the profile merged with `llvm-profdata`;
#   4. the release build optimized with it (`-Cprofile-use`), in its own target directory.
# The binary is $CARGO_TARGET_DIR/pgo/release/<package>; the script prints its path last.
#
# Profile-guided optimization lays out the code a message runs through together and
# moves the rest aside, so a frame or a delivery runs fewer instructions and touches
# fewer instruction-cache lines (bench/notes.md has the measurement). The plain
# `cargo build --release` stays what the README runs; this is a build for a deployment.
# What the training does not run is laid out as rarely run: it runs the benchmark's
# configuration (memberships from token claims, the echo provider, the memory broker, and
# a Redis for the cluster scenario), so the OpenAI-compatible client and the SQL
# membership lookups are among what it does not run.
#
# Needs: what bench/run.sh needs (cargo, python3 with venv for the plot's virtualenv,
# redis-server on PATH for the cluster scenario), and an `llvm-profdata` that reads
# rustc's raw profiles:
# rustup's `llvm-tools` component, or Debian's `llvm-19` package (`apt-get install llvm-19`),
# whose reader takes the raw profiles of rustc 1.95 (LLVM 22). Set LLVM_PROFDATA to choose.
# Each of the two builds takes about as long as a cold release build (all crates are
# built with the profile flags).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -gt 1 ]]; then
    echo "bench/pgo.sh: one argument at most (herald, bench-bare or --check)" >&2
    exit 2
fi
package="${1:-herald}"
case "$package" in
    --check) ;;
    herald) servers=herald ;;
    # One binary serves the three bare kinds; each is trained.
    bench-bare) servers=bare,bare-tungstenite-small,bare-tokio-websockets ;;
    *)
        echo "bench/pgo.sh: unknown package '$package' (herald or bench-bare)" >&2
        exit 2
        ;;
esac

find_profdata() {
    if [[ -n "${LLVM_PROFDATA:-}" ]]; then
        command -v "$LLVM_PROFDATA" || return 1
        return
    fi
    local sysroot
    sysroot="$(rustc --print sysroot)"
    for candidate in "$sysroot"/lib/rustlib/*/bin/llvm-profdata; do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
    done
    for candidate in llvm-profdata-22 llvm-profdata-21 llvm-profdata-20 llvm-profdata-19 llvm-profdata; do
        if command -v "$candidate" > /dev/null; then
            command -v "$candidate"
            return
        fi
    done
    return 1
}

if ! profdata="$(find_profdata)"; then
    echo "bench/pgo.sh: no llvm-profdata found; install rustup's llvm-tools component" \
        "(rustup component add llvm-tools) or Debian's llvm-19 (apt-get install llvm-19)," \
        "or set LLVM_PROFDATA" >&2
    exit 1
fi
if [[ "$package" == "--check" ]]; then
    exit 0
fi

# Absolute: the instrumented binary writes its profile to a path fixed when it is built,
# and runs in another directory.
mkdir -p "${CARGO_TARGET_DIR:-target}"
CARGO_TARGET_DIR="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
export CARGO_TARGET_DIR
data="$CARGO_TARGET_DIR/pgo-data/$package"
train="$CARGO_TARGET_DIR/pgo-train/$package"

# The training run's `bench all` draws its plot with the Django baseline's virtualenv.
bench/baselines/django/install.sh >&2
echo "== pgo: instrumented build of $package" >&2
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/pgo-gen" RUSTFLAGS="-Cprofile-generate=$data" \
    cargo build --release --locked -p "$package"
cargo build --release --locked -p bench

# herald's training adds the cluster scenario: its nodes share a Redis, so the Redis
# broker's publish and subscriber paths are trained too.
scenarios=idle,fanout,unicast,stream,multiplex
if [[ "$package" == herald ]]; then
    scenarios="$scenarios,cluster"
fi
echo "== pgo: training run (bench all --quick --servers $servers --scenarios $scenarios)" >&2
# Build scripts compiled with the flag wrote profiles of their own; only the server's count.
rm -rf "$data" "$train"
mkdir -p "$data" "$train"
ln -s "$CARGO_TARGET_DIR/pgo-gen/release/$package" "$train/$package"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$CARGO_TARGET_DIR/release/bench" all --quick --bin-dir "$train" --servers "$servers" \
    --scenarios "$scenarios" --no-markdown --out "$train/results" >&2
# A scenario that failed is recorded in the results, not in the exit status; a profile
# without it would leave its code laid out as rarely run.
if ! python3 - "$train"/results/*.json <<'PY'
import json, sys
errors = [error for path in sys.argv[1:] for error in json.load(open(path)).get("errors", [])]
for error in errors:
    print(f"bench/pgo.sh: training scenario failed: {error}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
then
    echo "bench/pgo.sh: no profile merged; fix the failed scenarios above and run it again" >&2
    exit 1
fi
shopt -s nullglob
raw=("$data"/*.profraw)
if [[ ${#raw[@]} -eq 0 ]]; then
    echo "bench/pgo.sh: the training run left no profile in $data" >&2
    exit 1
fi
"$profdata" merge -o "$data/merged.profdata" "${raw[@]}" >&2

echo "== pgo: optimized build of $package" >&2
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/pgo" RUSTFLAGS="-Cprofile-use=$data/merged.profdata" \
    cargo build --release --locked -p "$package"
echo "$CARGO_TARGET_DIR/pgo/release/$package"
