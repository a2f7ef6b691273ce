"""Draws herald's fan-out sweep against its baselines from a bench/results/<date>.json:
p50 and p99 latency, deliveries per second, and server CPU per delivery, against the
number of subscribers.

Usage: plot.py RESULTS.json OUT.png (run by `bench all` with the Django baseline's venv).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path, png_path):
    with open(results_path) as f:
        results = json.load(f)
    fig, (latency, rate, cpu) = plt.subplots(1, 3, figsize=(16, 4.5))
    for fanout in results.get("fanout", []):
        rounds = sorted(fanout["rounds"], key=lambda r: r["subscribers"])
        if not rounds:
            continue
        n = [r["subscribers"] for r in rounds]
        line = latency.plot(n, [r["p99_us"] / 1000 for r in rounds], marker="o", label=f"{fanout['server']} p99")
        latency.plot(
            n,
            [r["p50_us"] / 1000 for r in rounds],
            marker=".",
            linestyle="--",
            color=line[0].get_color(),
            label=f"{fanout['server']} p50",
        )
        rate.plot(n, [r["deliveries_per_s"] for r in rounds], marker="o", label=fanout["server"])
        cpu.plot(n, [r["cpu_us_per_delivery"] for r in rounds], marker="o", label=fanout["server"])
    latency.set_xlabel("subscribers (one org)")
    latency.set_ylabel("publish → receive latency (ms)")
    latency.set_yscale("log")
    latency.grid(True, which="both", alpha=0.3)
    latency.legend(fontsize=7)
    rate.set_xlabel("subscribers (one org)")
    rate.set_ylabel("deliveries per second (offered rate differs by server)")
    rate.set_yscale("log")
    rate.grid(True, which="both", alpha=0.3)
    rate.legend(fontsize=7)
    cpu.set_xlabel("subscribers (one org)")
    cpu.set_ylabel("server CPU per delivery (µs)")
    cpu.set_yscale("log")
    cpu.grid(True, which="both", alpha=0.3)
    cpu.legend(fontsize=7)
    fig.suptitle(f"fan-out, {results.get('mode', '')} run {results.get('date', '')} (git {results.get('git_rev', '')})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
