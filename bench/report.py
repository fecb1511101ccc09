"""The table `make bench` prints and the JSON it writes: rows built from the medians of the runs."""

import json
import os
import platform
import time
from pathlib import Path

from bench.env import median

HEADER = ("scenario", "baseline medians", "saltfleet", "ratio", "target", "met")


def _s(value, unit="s"):
    """Seconds (or ``unit``); an int is a count."""
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "-"
    return f"{value:.2f} s" if unit == "s" else f"{value:.1f} {unit}"


def _row(scenario, baselines, ours, ratio=None, target="-", met=None, note="", unit="s"):
    return {
        "scenario": scenario,
        "baselines": baselines,
        "saltfleet": ours,
        "ratio": ratio,
        "target": target,
        "met": met,
        "note": note,
        "unit": unit,
    }


def _ratio(ours, base):
    return None if ours is None or not base else ours / base


def _target_count(counts, wanted):
    """The count a target is checked on: the one named, or the largest this mode measured."""
    if wanted in counts:
        return wanted, ""
    return max(counts), f"target at {wanted}; this mode measured {max(counts)}"


def build_rows(times, plan):
    m = {key: median(values) for key, values in times.items()}
    runs = {key: len(values) for key, values in times.items()}
    rows = []
    startup = m.get("startup")
    if startup is not None:
        rows.append(_row("salt-call --local test.ping (Salt's start-up)", [], startup))

    counts = sorted({int(k.rsplit("_", 1)[1]) for k in m if k.startswith("sf_fresh_")})
    fresh_at, fresh_note = _target_count(counts, 5) if counts else (None, "")
    for count in counts:
        floor, ours = m.get(f"floor_fresh_{count}"), m.get(f"sf_fresh_{count}")
        baselines = [("raw floor", floor), ("built-ins", m.get(f"builtins_fresh_{count}"))]
        if count == 1:
            # One deployment cannot overlap with another: Salt's start-up plus the floor, with a margin.
            budget = None if startup is None or floor is None else startup + 1.2 * floor
            over = None if ours is None or budget is None else ours - budget
            rows.append(
                _row(
                    "fresh host, 1 deployment(s)",
                    [*baselines, ("start-up", startup)],
                    ours,
                    None if over is None else f"{over:+.2f} s",
                    "<= start-up + 1.2 x floor",
                    over is not None and over <= 0,
                    "ratio: saltfleet minus (start-up + 1.2 x floor)",
                )
            )
            continue
        ratio = _ratio(ours, floor)
        checked = count == fresh_at
        rows.append(
            _row(
                f"fresh host, {count} deployment(s)",
                baselines,
                ours,
                ratio,
                "<= 0.6 x floor" if checked else "-",
                (ratio is not None and ratio <= 0.6) if checked else None,
                fresh_note if checked else "",
            )
        )

    noop_counts = sorted({int(k.rsplit("_", 1)[1]) for k in m if k.startswith("sf_noop_")})
    bi_counts = sorted({int(k.rsplit("_", 1)[1]) for k in m if k.startswith("builtins_noop_")})
    both = [c for c in noop_counts if c in bi_counts]
    bi_at, bi_note = _target_count(both, 5) if both else (None, "")
    for count in noop_counts:
        ours, builtins = m.get(f"sf_noop_{count}"), m.get(f"builtins_noop_{count}")
        ratio = _ratio(ours, builtins)
        checked = count == bi_at
        rows.append(
            _row(
                f"no-op re-apply, {count} deployment(s), vs built-ins",
                [("built-ins", builtins)],
                ours,
                ratio,
                "<= 0.15 x built-ins" if checked else "-",
                (ratio is not None and ratio <= 0.15) if checked else None,
                bi_note if checked else "",
            )
        )
    if noop_counts:
        count, note = _target_count(noop_counts, 5)
        ours = m.get(f"sf_noop_{count}")
        beside = m.get(f"startup_beside_noop_{count}", startup)
        extra = None if ours is None or beside is None else ours - beside
        rows.append(
            _row(
                f"no-op re-apply, {count} deployment(s), vs start-up",
                [("test.ping", beside)],
                ours,
                f"{extra:+.2f} s" if extra is not None else None,
                "<= start-up + 1.5 s",
                extra is not None and extra <= 1.5,
                "; ".join(filter(None, [note, "test.ping timed beside each no-op run (interleaved)"])),
            )
        )
        nops = m.get(f"salt_nop_local_{count}")
        extra = None if ours is None or nops is None else ours - nops
        rows.append(
            _row(
                f"no-op re-apply, {count} deployment(s), vs {count} test.nop states",
                [(f"{count} x test.nop", nops)],
                ours,
                f"{extra:+.2f} s" if extra is not None else None,
                "<= floor + 0.3 s",
                extra is not None and extra <= 0.3,
                "; ".join(filter(None, [note, "salt-call --local: one test.nop per deployment, interleaved"])),
            )
        )

    newrev = sorted(int(k.rsplit("of", 1)[1]) for k in m if k.startswith("sf_newrev_1of"))
    for count in newrev:
        ours, fresh1 = m.get(f"sf_newrev_1of{count}"), m.get("sf_fresh_1")
        ratio = _ratio(ours, fresh1)
        rows.append(
            _row(
                f"new revision of 1 of {count} deployments",
                [("saltfleet fresh 1", fresh1)],
                ours,
                ratio,
                "<= 1.5 x fresh 1",
                ratio is not None and ratio <= 1.5,
                "" if count == 5 else f"target at 1 of 5; this mode: 1 of {count}",
            )
        )

    sizes = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("master_noop_"))
    idle = "2 deployments/minion of a branch, program `sleep 3600` (not Celery); Salt's floor interleaved"
    for size in sizes:
        ours, floor = m.get(f"master_noop_{size}"), m.get(f"salt_nop_{size}")
        ratio = _ratio(ours, floor)
        checked = size >= 10
        rows.append(
            _row(
                f"fan-out no-op: salt '*' state.apply, {size} minion(s)",
                [("one test.nop", floor)],
                ours,
                ratio,
                "<= 1.25 x Salt's floor" if checked else "-",
                (ratio is not None and ratio <= 1.25) if checked else None,
                idle if size == sizes[0] else "",
            )
        )
    git_sizes = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("git_requests_noop_"))
    git_at, git_note = _target_count(git_sizes, 10) if git_sizes else (None, "")
    for size in git_sizes:
        asked = max(times[f"git_requests_noop_{size}"])
        checked = size == git_at
        rows.append(
            _row(
                f"git server requests in a fan-out no-op, {size} minion(s)",
                [],
                asked,
                None,
                "<= 1, not one per host" if checked else "-",
                asked <= 1 if checked else None,
                "; ".join(filter(None, ["the most of any run (a count, not seconds)", git_note if checked else ""])),
            )
        )
    for key in sorted((k for k in m if k.startswith("master_fresh_new_")), key=lambda k: int(k.rsplit("_", 1)[1])):
        more = int(key.rsplit("_", 1)[1])
        rows.append(_row(f"fan-out fresh: state.apply of {more} new minion(s)", [], m[key], note=f"{runs[key]} run(s)"))
    inv_sizes = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("inventory_runner_"))
    inv_at, inv_note = _target_count(inv_sizes, 50) if inv_sizes else (None, "")
    for size in inv_sizes:
        ours = m.get(f"inventory_runner_{size}")
        checked = size == inv_at
        rows.append(
            _row(
                f"fleet.inventory over {size} minion(s) (runner, master's cache)",
                [],
                ours,
                None,
                "<= 1 s" if checked else "-",
                (ours is not None and ours <= 1.0) if checked else None,
                inv_note if checked else "",
            )
        )
        cli, base = m.get(f"inventory_cli_{size}"), m.get("saltrun_startup")
        rows.append(
            _row(
                f"salt-run fleet.inventory over {size} minion(s) (CLI)",
                [("salt-run test.arg", base)],
                cli,
                f"{cli - base:+.2f} s" if cli is not None and base is not None else None,
                note="wall clock of the command, Salt's start-up included",
            )
        )
    rows.extend(_page_rows(m))
    rows.extend(_rollout_rows(m))
    rows.extend(_handover_rows(m, plan))
    rows.extend(_canary_rows(m, runs, plan, times))
    return rows


def _rollout_rows(m):
    """fleet.deploy over the fan-out fleet against Salt's own batching of the same change, a task stream running."""
    rows = []
    for key in sorted((k for k in m if k.startswith("rollout_fleet_deploy_")), key=lambda k: int(k.rsplit("_", 1)[1])):
        size = int(key.rsplit("_", 1)[1])
        ours, salt_b = m[key], m.get(f"rollout_salt_b_{size}")
        ratio = _ratio(ours, salt_b)
        checked = size == 50
        rows.append(
            _row(
                f"fleet.deploy batch=20% over {size} minion(s), a Celery task stream running",
                [("salt -b 20% '*' state.apply", salt_b)],
                ours,
                ratio,
                "<= 1.2 x salt -b" if checked else "-",
                (ratio is not None and ratio <= 1.2) if checked else None,
                f"a new rev of one deployment (a Celery worker per minion, RabbitMQ), the two alternating; "
                f"{int(m.get(f'rollout_tasks_{size}') or 0)} tasks sent through them, every one with its result; "
                "fleet.deploy left every host deployed in the ledger",
            )
        )
    return rows


def _page_rows(m):
    """The fleet page: first load to the filled hosts table; a rollout's lines from the runner to the page."""
    rows = []
    sizes = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("page_load_"))
    at, note = _target_count(sizes, 50) if sizes else (None, "")
    for size in sizes:
        ours, checked = m.get(f"page_load_{size}"), size == at
        baselines = [("test.arg via salt-api", m.get(f"page_floor_{size}"))]
        baselines.append(("fleet.overview via salt-api", m.get(f"page_overview_{size}")))
        baselines.append(("page without data", m.get(f"page_static_{size}")))
        rows.append(
            _row(
                f"fleet page first load, {size} minion(s) (to the filled hosts table)",
                baselines,
                ours,
                _ratio(ours, m.get(f"page_floor_{size}")),
                "<= 1 s" if checked else "-",
                (ours is not None and ours <= 1.0) if checked else None,
                "; ".join(
                    filter(
                        None,
                        [
                            "ratio: against Salt's floor for a runner call through salt-api (test.arg)",
                            note if checked else "",
                        ],
                    )
                ),
            )
        )
    for key in sorted(
        (k for k in m if k.startswith("page_event_") and "plain" not in k), key=lambda k: int(k.rsplit("_", 1)[1])
    ):
        size = int(key.rsplit("_", 1)[1])
        ours, plain = m[key], m.get(f"page_event_plain_{size}")
        rows.append(
            _row(
                f"rollout progress on the fleet page, {size} minion(s) (runner fires -> page shows)",
                [("salt-api /events, plain client", plain)],
                ours,
                _ratio(ours, plain),
                "<= 1 s",
                ours is not None and ours <= 1.0,
                "the slowest line of each one-host fleet.deploy (start, batch, host, end), median over runs",
            )
        )
    return rows


def _handover_rows(m, plan):
    """Task latency during a handover against the same stream at rest: p99 and the longest gap between completions."""
    rest, during = m.get("handover_rest_p99"), m.get("handover_deploy_p99")
    if during is None:
        return []
    ratio = _ratio(during, rest)
    gap, rest_gap = m.get("handover_deploy_gap"), m.get("handover_rest_gap")
    met = ratio is not None and ratio <= 2.0 and gap is not None and gap <= 1.0
    tasks = m.get("handover_deploy_tasks")
    note = (
        f"p50 {_ms(m.get('handover_deploy_p50'))} during, {_ms(m.get('handover_rest_p50'))} at rest; "
        f"longest gap between completions {_ms(gap)} during, {_ms(rest_gap)} at rest; "
        f"{tasks:.0f} tasks at a steady rate (median run); broker: {plan.get('handover_broker', '?')}"
    )
    return [
        _row(
            "task latency p99 during a handover (vs at rest)",
            [("at rest", rest)],
            during,
            ratio,
            "<= 2 x at rest, gap <= 1 s",
            met,
            note,
        )
    ]


def _canary_rows(m, runs, plan, times):
    """
    Canary rollouts: the fleet's throughput while an analysis watches it against
    none (windows alternating), and the time to roll a bad release back.
    """
    rows = []
    seconds = (plan.get("canary") or {}).get("seconds")
    for label, what in (("stream", "tasks of 20 ms"), ("zero", "tasks of no work (Celery's overhead alone)")):
        plain, watched = m.get(f"canary_tput_{label}_plain"), m.get(f"canary_tput_{label}_watched")
        if watched is None:
            continue
        # The median of each pair's ratio (a watched window against the one before it), not of the medians.
        ratio = m.get(f"canary_tput_{label}_ratio")
        checked = label == "stream"
        note = (
            f"{runs[f'canary_tput_{label}_watched']} pairs of windows of {seconds} s, none then watched; ratio: the "
            "median of the pairs' ratios, throughputs: medians; 2 hosts x 2 Celery workers saturated by a backlog, "
            "RabbitMQ; watched: the listeners of deployment.task_events running (task events on), both hosts asked "
            "for their counts every 3 s through saltfleet_jobs.publish as fleet.deploy's analyse step asks them"
        )
        cores = _cores(m, label, watched, plain)
        note = "; ".join(
            filter(None, [note if checked else "the same windows and analysis, tasks that do nothing", cores])
        )
        rows.append(
            _row(
                f"task throughput while an analysis watches, {what}",
                [("no analysis", plain)],
                watched,
                ratio,
                ">= 0.95 x no analysis" if checked else "-",
                (ratio is not None and ratio >= 0.95) if checked else None,
                note,
                unit="tasks/s",
            )
        )
    total = m.get("canary_rollback_total")
    if total is not None:
        parts = (
            f"parts: judged -> the analysis began {_s(m.get('canary_rollback_wait'))} (the canary host's "
            f"deployment.update_code had not returned), -> it decided {_s(m.get('canary_rollback_decide'))} "
            f"(its first window with counts {_s(m.get('canary_rollback_counting'))} after it began), "
            f"-> rollback sent {_s(m.get('canary_rollback_send'))}, -> old release serving on the changed host "
            f"{_s(m.get('canary_rollback_serve'))} (deployment.rollback returned "
            f"{_s(m.get('canary_rollback_returned'))} after it was sent)"
        )
        rows.append(
            _row(
                "time to roll back a release failing 40% of its tasks (judged -> old release serving)",
                [],
                total,
                None,
                "<= 10 s",
                total <= 10.0,
                f"{parts}; median of {runs['canary_rollback_total']} rollout(s) of steps [hosts 1, analyse 30, "
                "100%], window 3 s, default thresholds, a task every 50 ms; judged: the new release's completions "
                "walked in time order until the 99% exact one-sided lower bound of its failure rate passes the limit "
                f"(as saltfleet_analysis.judge decides; after {_judged(times)} of its tasks)",
            )
        )
    return rows


def _judged(times):
    counts = times.get("canary_rollback_judged_tasks") or []
    return ", ".join(map(str, counts)) or "-"


def _cores(m, label, watched, plain):
    """Where the CPU went, no analysis -> watched: cores each part used (medians), and the workers' CPU per task."""
    parts = ("workers", "listeners", "rabbitmq", "salt", "bench", "others", "idle")
    said = []
    for part in parts:
        before, after = m.get(f"canary_cores_{label}_plain_{part}"), m.get(f"canary_cores_{label}_watched_{part}")
        if before is not None and after is not None:
            said.append(f"{part} {before:.2f} -> {after:.2f}")
    if not said:
        return ""
    text = f"cores used, no analysis -> watched: {', '.join(said)}"
    busy = (m.get(f"canary_cores_{label}_plain_workers"), m.get(f"canary_cores_{label}_watched_workers"))
    if None not in busy and plain and watched:
        text += f"; workers' CPU per task {busy[0] / plain * 1000:.1f} -> {busy[1] / watched * 1000:.1f} ms"
    return text


def _ms(value):
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _fmt_ratio(ratio):
    if ratio is None:
        return "-"
    return ratio if isinstance(ratio, str) else f"{ratio:.2f} x"


def _fmt_met(met):
    return "-" if met is None else ("yes" if met else "NO")


def format_table(rows):
    lines = []
    for row in rows:
        unit = row.get("unit", "s")
        baselines = ", ".join(f"{name} {_s(v, unit)}" for name, v in row["baselines"] if v is not None) or "-"
        lines.append(
            [
                row["scenario"],
                baselines,
                _s(row["saltfleet"], unit),
                _fmt_ratio(row["ratio"]),
                row["target"],
                _fmt_met(row["met"]),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *lines, strict=False)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(HEADER, widths, strict=False)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in lines)
    notes = [(i, row["note"]) for i, row in enumerate(rows) if row["note"]]
    if notes:
        out.append("")
        out.extend(f"  note ({rows[i]['scenario']}): {note}" for i, note in notes)
    return "\n".join(out)


def machine(load_start):
    import salt.version

    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "salt": salt.version.__version__,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(folder, result):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = folder / f"bench-{stamp}-{result['mode']}.json"
    text = json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"
    path.write_text(text)
    (folder / "latest.json").write_text(text)
    return path
