"""
`python -m bench` (`make bench`): every scenario, then one table of
scenario, baseline medians, saltfleet median, ratio, target and whether it is
met. `--quick` (`make bench QUICK=1`) runs a reduced set in under 5 minutes,
`--smoke` one run of the smallest set (what the test suite runs). Results also
go to .bench/ as JSON (latest.json and one file per run).
"""

import argparse
import os
import sys
import time

from bench.env import REPO
from bench.report import build_rows, format_table, machine, write_json
from bench.scenarios import Bench


def _sizes(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="a reduced set (< 5 min)")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode", help="one run of the smallest set")
    parser.add_argument("--runs", type=int, help="timed runs per measurement (default: 3, smoke: 1)")
    parser.add_argument("--fanout", type=_sizes, help="fan-out minion counts, e.g. 1,10,25,50 (empty: none)")
    parser.add_argument(
        "--no-heartbeat",
        dest="heartbeat",
        action="store_false",
        help="fan-out minions without pillar/fleet.sls's mine.update schedule",
    )
    parser.add_argument(
        "--only",
        type=lambda text: {name.strip() for name in text.split(",") if name.strip()},
        default=set(),
        help="only these scenarios, e.g. fan-out (the fleet page's rows are measured there), or start-up,saltfleet",
    )
    parser.add_argument("--json-dir", default=str(REPO / ".bench"), help="where the JSON goes (default .bench/)")
    parser.add_argument("--keep", action="store_true", help="keep the bench's /tmp directory (its daemons are stopped)")
    args = parser.parse_args(argv)
    mode = args.mode or "full"

    load_start = os.getloadavg()
    started = time.monotonic()
    bench = Bench(
        mode,
        runs=args.runs,
        fanout=args.fanout,
        keep=args.keep,
        heartbeat=args.heartbeat,
        log=lambda text: print(text, flush=True),
    )
    unknown = sorted(args.only - set(bench.scenarios()))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: no such scenario; there are {', '.join(bench.scenarios())}")
    print(f"saltfleet bench, {mode} mode: {bench.plan}", flush=True)
    bench.run(args.only)
    rows = build_rows(bench.times, bench.plan)
    facts = machine(load_start)
    elapsed = time.monotonic() - started
    result = {
        "mode": mode,
        "plan": bench.plan,
        "machine": facts,
        "elapsed": round(elapsed, 1),
        "times": bench.times,
        "rows": rows,
        "state_durations_ms": bench.details,
        "errors": bench.errors,
    }
    path = write_json(args.json_dir, result)
    print(
        f"\nsaltfleet bench ({mode}; median of {bench.plan['runs']} run(s) each; {facts['cores']} cores; "
        f"load average {facts['load_average_start'][0]} at start, {facts['load_average_end'][0]} at end; "
        f"salt {facts['salt']}; {elapsed:.0f} s)\n"
    )
    print(format_table(rows))
    for name, error in bench.errors.items():
        print(f"\nFAILED {name}: {error}")
    print(f"\nJSON: {path}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
