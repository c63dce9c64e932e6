#!/usr/bin/env python3
"""The capacity model of docs/scaling.md from one run of scripts/bench.sh.

    python3 scripts/capacity.py target/bench/<time>/results.jsonl              # both tables
    python3 scripts/capacity.py target/bench/<time>/results.jsonl --cpu-table  # CPU per request only
    python3 scripts/capacity.py target/bench/<time>/results.jsonl --cpu        # its summary as JSON lines

For every closed-loop phase (and the worker's drain of a full queue), the CPU each component spent (top, % of one core,
sampled during the phase) divided by the phase's rate gives microseconds of
CPU per request and per event; one core of that component then carries
1e6 / that many per second. Prints a Markdown table.

The "cpu" phase measures the same repeatably: several closed loops of a fixed
number of requests, the process's CPU time (gateway: /proc/PID/stat; Redis:
INFO cpu) before and after each. Its table gives per scenario and token kind
the median µs per request over the runs and the spread (min–max).
"""

import argparse
import json
import statistics

COMPONENTS = ["gateway", "redis", "rabbitmq", "worker", "postgres", "loadgen"]
CPU_FIGURES = ["gateway_us", "redis_us", "redis_script_us", "worker_us"]


def read(path: str) -> list:
    out = []
    for line in open(path, encoding="utf-8"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def top_table(lines: list) -> list:
    """The table of the top samples, one row per closed-loop phase and token kind."""
    closed = {}
    cpu = {}
    for d in lines:
        key = (d.get("scenario"), d.get("tokens"))
        if d.get("mode") == "closed":
            # The first closed loop of a scenario (the drain's fill is another).
            closed.setdefault(key, d)
        elif d.get("check") == "drain":
            rate = d["rows_per_s_from_first_row"]
            closed[("drain", None)] = {"scenario": "drain", "events_per_s": rate, "req_per_s": 0}
        elif d.get("check") == "cpu_percent_of_one_core":
            cpu[key] = d
    rows = ["| phase | tokens | rate | unit | " + " | ".join(COMPONENTS) + " | all |",
            "|---|---|---|---|" + "---|" * (len(COMPONENTS) + 1)]
    for key, run in closed.items():
        scenario, tokens = key
        sample = cpu.get(key) or (cpu.get((scenario, None)) if scenario == "drain" else None)
        if sample is None or scenario == "hello":
            continue
        per_event = run["events_per_s"] > run["req_per_s"]
        per_unit = run["events_per_s"] if per_event else run["req_per_s"]
        cells = []
        for c in COMPONENTS + ["all"]:
            us = sample.get(c, 0.0) * 1e4 / max(per_unit, 1)
            cells.append(f"{us:.0f} µs" + (f" ({1e6 / us:,.0f}/s per core)" if c != "all" and us >= 1 else ""))
        unit = "event" if per_event else "request"
        rows.append(f"| {scenario} | {tokens or '—'} | {per_unit:,.0f}/s | {unit} | " + " | ".join(cells) + " |")
    return rows


def cpu_summary(lines: list) -> list:
    """Per (scenario, tokens) of the cpu phase: median, min and max of each figure over the runs."""
    runs = {}
    for d in lines:
        if d.get("check") == "cpu_per_request":
            runs.setdefault((d["scenario"], d["tokens"]), []).append(d)
    out = []
    for (scenario, tokens), rs in runs.items():
        s = {"check": "cpu_per_request_summary", "scenario": scenario, "tokens": tokens, "runs": len(rs),
             "requests_per_run": rs[0]["requests"], "non_2xx_or_errors": sum(r["requests"] - r["ok"] + r["errors"] for r in rs)}
        for f in CPU_FIGURES:
            values = [r[f] for r in rs]
            s[f] = {"median": round(statistics.median(values), 1), "min": min(values), "max": max(values)}
        out.append(s)
    return out


def cpu_table(summary: list) -> list:
    rows = ["| phase | tokens | runs × requests | gateway µs/request | Redis µs/request (process) "
            "| Redis µs/request (scripts) | worker µs/request |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = [f"{s[f]['median']:.1f} ({s[f]['min']:.1f}–{s[f]['max']:.1f})" for f in CPU_FIGURES]
        flag = f" ⚠ {s['non_2xx_or_errors']} not 2xx" if s["non_2xx_or_errors"] else ""
        rows.append(f"| {s['scenario']} | {s['tokens']} | {s['runs']} × {s['requests_per_run']:,}{flag} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--cpu", action="store_true", help="print the cpu phase's summary as JSON lines")
    ap.add_argument("--cpu-table", action="store_true", help="print only the cpu phase's table")
    a = ap.parse_args()
    lines = read(a.results)
    summary = cpu_summary(lines)
    if a.cpu:
        for s in summary:
            print(json.dumps(s))
        return
    if not a.cpu_table:
        print("\n".join(top_table(lines)))
    if summary:
        print("\nCPU per request (cpu phase): median over the runs (min–max)\n")
        print("\n".join(cpu_table(summary)))


if __name__ == "__main__":
    main()
