#!/usr/bin/env python3
"""The capacity model of docs/scaling.md from one run of scripts/bench.sh.

    python3 scripts/capacity.py target/bench/<time>/results.jsonl

For every closed-loop phase (and the worker's drain of a full queue), the CPU each component spent (top, % of one core,
sampled during the phase) divided by the phase's rate gives microseconds of
CPU per request and per event; one core of that component then carries
1e6 / that many per second. Prints a Markdown table.
"""

import json
import sys

COMPONENTS = ["gateway", "redis", "rabbitmq", "worker", "postgres", "loadgen"]


def main(path: str) -> None:
    closed = {}
    cpu = {}
    for line in open(path, encoding="utf-8"):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if d.get("mode") == "closed":
            # The first closed loop of a scenario (the drain's fill is another).
            closed.setdefault(d["scenario"], d)
        elif d.get("check") == "drain":
            rate = d["rows_per_s_from_first_row"]
            closed["drain"] = {"scenario": "drain", "events_per_s": rate, "req_per_s": 0}
        elif d.get("check") == "cpu_percent_of_one_core":
            cpu[d["scenario"]] = d
    print("| phase | rate | unit | " + " | ".join(COMPONENTS) + " | all |")
    print("|---|---|---|" + "---|" * (len(COMPONENTS) + 1))
    for scenario, run in closed.items():
        if scenario not in cpu or scenario == "hello":
            continue
        per_unit = run["events_per_s"] if run["events_per_s"] > run["req_per_s"] else run["req_per_s"]
        unit = "event" if per_unit == run["events_per_s"] and run["events_per_s"] > run["req_per_s"] else "request"
        cells = []
        for c in COMPONENTS + ["all"]:
            pct = cpu[scenario].get(c, 0.0)
            us = pct * 1e4 / per_unit
            cells.append(f"{us:.0f} µs" + (f" ({1e6 / us:,.0f}/s per core)" if c != "all" and us >= 1 else ""))
        print(f"| {scenario} | {per_unit:,.0f}/s | {unit} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
