"""
A rollout in steps, for ``fleet.deploy``: ``hosts`` steps deploy, ``analyse``
steps watch the tasks the new release runs against the old one's
(``saltfleet_analysis`` judges), ``pause`` steps wait for an operator.

- ``{hosts: N}`` or ``{hosts: 'P%'}``: bring the new release to N hosts (or P%
  of them, rounded up) in all; the hosts it adds go in one batch (or in
  batches of ``batch=`` when it is given), cut short by ``min_consumers``.
  After the last step, the hosts left go too.
- ``{analyse: SECONDS}``: every host of the deployment counts its Celery
  tasks per release (``deployment.task_events``) every ``window`` seconds;
  the step ends when the analysis decides (it may fail early, it passes only
  after its full time). A failed step rolls back; an inconclusive one does
  what ``inconclusive`` says (pause, pass or fail).
- ``{pause: true}``: wait for ``fleet.promote`` (go on) or ``fleet.abort``
  (roll back).

The running (or last) analysis of each deployment is kept in
``<cachedir>/saltfleet/analysis/<name>.json`` (``fleet.analysis`` shows it);
each finished step goes into the ledger as an ``analysis`` event.
"""

import dataclasses
import math
import time

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_steps"

# Seconds between two looks at an operator's verdict while paused.
POLL = 0.5
# How long a listener outlives its step: a runner that dies leaves none for longer.
LISTEN_SLACK = 60
# Task names a ledger entry keeps per release (the busiest).
LEDGER_TASKS = 20
CRASHED_STATES = ("BACKOFF", "FATAL", "EXITED", "UNKNOWN")
# Windows a step's record keeps for the page's lines.
SERIES_MAX = 200


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


# ------------------------------------------------------------------ the plan


def _target(value, total):
    text = str(value).strip()
    if text.endswith("%"):
        return min(total, max(1, math.ceil(total * float(text[:-1]) / 100)))
    return min(total, int(text))


def actions(steps, hosts, batch, cut):
    """
    The rollout's actions, in order: ``{"batch": [minions]}``,
    ``{"analyse": seconds}`` and ``{"pause": True}``, from ``steps`` (checked
    by ``saltfleet_schema.check_rollout``; none: batches of ``batch`` over
    every host), ``hosts`` (sorted) and ``cut`` (batches -> (batches, held
    back), the ``min_consumers`` floors). Returns (actions, held back).
    """
    split = _utils("saltfleet_rollout.batches")
    if not steps:
        plan, held = cut(split(hosts, batch or 1))
        return [{"batch": b} for b in plan], held
    found, held, done = [], [], 0
    for step in [*steps, {"hosts": len(hosts)}]:
        kind, value = next(iter(step.items()))
        if kind != "hosts":
            found.append({kind: value})
            continue
        adding = hosts[done : _target(value, len(hosts))]
        if adding:
            plan, cut_short = cut(split(adding, batch or len(adding)))
            found += [{"batch": b} for b in plan]
            held += cut_short
            done += len(adding)
    # Nothing after the last batch watches anything: an analysis there judges the whole fleet's new release.
    return found, held


def describe(plan):
    """The actions in words: ``1 host, analyse 60 s, 3 hosts``."""
    count = _utils("saltfleet_rollout.count")
    words = []
    for action in plan:
        if "batch" in action:
            words.append(count(len(action["batch"]), "host"))
        elif "analyse" in action:
            words.append(f"analyse {action['analyse']} s")
        else:
            words.append("pause")
    return ", ".join(words)


# ------------------------------------------------------------ the analysis


@dataclasses.dataclass
class Watch:
    """An analysis of a rollout: where it looks, with what thresholds, and the old release's counts so far."""

    opts: dict
    name: str
    rid: str
    hosts: list
    settings: dict
    emit: object
    journal: object
    lock: object
    old_seen: dict = dataclasses.field(default_factory=dict)
    # {minion: {program: pid}} of the new release when the step began.
    pids: dict = dataclasses.field(default_factory=dict)


def watch(opts, name, rid, hosts, settings, emit, journal, lock):
    """The ``Watch`` of rollout ``rid`` of ``name`` (the loader hands out functions, not classes)."""
    return Watch(opts, name, rid, list(hosts), settings, emit, journal, lock)


def _live_path(opts, name):
    folder = _utils("saltfleet_ledger.folder")(opts) / "analysis"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{name}.json"


def live(opts, name):
    """The running (or last) analysis of deployment ``name``, as its rollout last wrote it; None when there was none."""
    # The name becomes a file name: a deployment's name alone.
    if not _utils("saltfleet_schema.check_name")("fleet.analysis", name, []):
        raise CommandExecutionError(f"{name!r} is not a deployment name")
    return _utils("saltfleet_files.read_json")(_live_path(opts, name), None)


def _fold(watch, returns, new, changed):
    """
    (new release's counts, old releases' counts, the old releases, crashes,
    notes) from the hosts' ``task_events`` returns. The new release's counts come from the hosts
    this rollout changed alone; a host's return that is no such report is a
    note, and counts for nothing.
    """
    merge = _utils("saltfleet_analysis.merge")
    read = _utils("saltfleet_taskevents.reply")
    new_tasks, old_tasks, olds, crashed, notes = {}, {}, set(), [], []
    for minion in watch.hosts:
        data = returns.get(minion)
        if data is None:
            notes.append(f"{minion}: no answer")
            continue
        try:
            said = read(data.get("ret") if isinstance(data, dict) else data)
        except ValueError as exc:
            notes.append(f"{minion}: {exc}")
            continue
        notes += [f"{minion}: {p}" for p in said["problems"]]
        for release, tasks in said["tasks"].items():
            if release in new and minion in changed:
                merge(new_tasks, tasks)
            elif release not in new:
                merge(old_tasks, tasks)
                olds.add(release)
        if minion in changed:
            crashed += [f"{minion}: node {n} went offline" for n in said["offline"]]
            for release in new & set(said["programs"]):
                crashed += _crashes(watch, minion, said["programs"][release])
    return new_tasks, old_tasks, olds, crashed, notes


def _crashes(watch, minion, programs):
    """A changed host's programs of the new release that crashed: out of RUNNING, or running with another pid."""
    first = watch.pids.setdefault(minion, {p: row["pid"] for p, row in programs.items()})
    found = []
    for program, row in sorted(programs.items()):
        if row["state"] in CRASHED_STATES:
            found.append(f"{minion}: {program} {row['state']}")
        elif first.get(program) and row["pid"] and row["pid"] != first[program]:
            found.append(f"{minion}: {program} restarted (pid {first[program]} is now {row['pid']})")
    return found


def _lean(figures):
    """A release's figures without the histograms, its busiest task names only: for the ledger and the report."""
    tasks = sorted(figures.get("tasks", {}).items(), key=lambda item: -(item[1]["succeeded"] + item[1]["failed"]))
    kept = {n: {k: v for k, v in row.items() if k != "runtime"} for n, row in tasks[:LEDGER_TASKS]}
    return {**{k: v for k, v in figures.items() if k not in ("runtime", "tasks")}, "tasks": kept}


def _line(name, number, seconds, elapsed, new, old, verdict, releases):
    """One progress line: what is watched and the numbers so far."""

    def said(label, shas, figures):
        finished = figures["succeeded"] + figures["failed"]
        text = f"{label} {','.join(s[:8] for s in sorted(shas)) or '-'}: {finished} tasks, {figures['failed']} failed"
        text += f" ({figures['failure_rate']:.1%})" if figures["failure_rate"] is not None else ""
        return text + (f", p95 {figures['p95']:.3g} s" if figures["p95"] is not None else "")

    head = f"{name}: analysis {number} ({seconds} s), {elapsed:.0f} s in: "
    body = f"{said('new', releases['new'], new)}; {said('old', releases['old'], old)}; limit {verdict['limit']:.1%}"
    return head + body + (f": {verdict['decision']}: {verdict['why']}" if verdict["decision"] != "running" else "")


def _key(watch, place):
    """The watch key of the analysis at ``place`` (its index in the rollout's actions): one per step."""
    return f"{watch.rid}-{place}"


def listen_ahead(watch, place, seconds, timeout):
    """
    Start the listeners of the analysis at ``place`` (``seconds`` long) on
    every host before the batch it follows goes out (``timeout``: that
    batch's; they last as long as it may, then the step), not waiting for
    them: the new release's first tasks count (a listener takes on the
    nodes of a generation that starts after it), and the analysis has
    numbers as soon as the batch returns. When this did not reach a host,
    the analysis's first window starts its listener.
    """
    batch = _utils("saltfleet_jobs.longest")(timeout)
    args = {"watch": _key(watch, place), "seconds": seconds + batch + LISTEN_SLACK}
    _utils("saltfleet_jobs.send")(watch.opts, watch.hosts, "deployment.task_events", [watch.name], args)


def stop_listening(watch, place):
    """End the listeners of the analysis at ``place``, not waiting (a listener left over ends at its deadline)."""
    args = {"watch": _key(watch, place), "stop": True}
    _utils("saltfleet_jobs.send")(watch.opts, watch.hosts, "deployment.task_events", [watch.name], args)


def analyse(watch, number, place, seconds, new, changed):
    """
    Run analysis ``number`` (at ``place`` in the rollout's actions) for
    ``seconds`` over the hosts' task events: ``new`` the SHAs this rollout
    deploys, ``changed`` the hosts it changed. Returns the step's record:
    decision (passed, failed, inconclusive, or promoted/aborted by an
    operator), why, the figures of each side, the thresholds.
    """
    settings = watch.settings
    watch.pids = {}
    judge = _utils("saltfleet_analysis.judge")
    summary = _utils("saltfleet_analysis.summary")
    publish = _utils("saltfleet_jobs.publish")
    call = ["deployment.task_events", [watch.name]]
    args = {"watch": _key(watch, place), "seconds": seconds + LISTEN_SLACK}
    timeout = max(10, 2 * settings["window"])
    started = time.monotonic()
    record, series = {}, []
    where = f"{len(changed)} changed of {len(watch.hosts)} hosts"
    watch.emit(f"{watch.name}: analysis {number}: watching the Celery tasks of {where} for {seconds} s")
    try:
        while True:
            _, returns = publish(watch.opts, watch.hosts, *call, args, timeout)
            elapsed = time.monotonic() - started
            new_tasks, old_tasks, olds, crashed, notes = _fold(watch, returns, new, changed)
            old_all = _utils("saltfleet_analysis.merge")(_copy(watch.old_seen), old_tasks)
            figures = {"new": summary(new_tasks), "old": summary(old_all)}
            verdict = judge(figures["new"], figures["old"], crashed, elapsed, seconds, settings)
            said = watch.lock.told()
            if said and verdict["decision"] == "running":
                verdict = {**verdict, "decision": f"{said['verdict']}d" if said["verdict"] == "promote" else "aborted"}
                verdict["why"] = f"{said['verdict']} by {said['user']} at {said['at']}"
            record = {
                "deployment": watch.name,
                "rollout": watch.rid,
                "step": number,
                "seconds": seconds,
                "elapsed": round(elapsed, 1),
                "releases": {"new": sorted(new), "old": sorted(olds)},
                "new": figures["new"],
                "old": figures["old"],
                "thresholds": settings,
                "notes": notes[:20],
                **verdict,
                "updated": _utils("saltfleet_ledger.now")(),
            }
            series = [*series[-SERIES_MAX + 1 :], _point(record)]
            record["series"] = series
            _utils("saltfleet_files.write_json")(_live_path(watch.opts, watch.name), record, 0o600)
            # On the bus as the ledger's lines are (the fleet page follows it), not in the ledger: it holds the end.
            _utils("saltfleet_ledger.announce")(watch.opts, _event(watch, record))
            level = {"failed": "fail", "passed": "ok", "inconclusive": "warn"}.get(verdict["decision"], "info")
            watch.emit(
                _line(
                    watch.name, number, seconds, elapsed, figures["new"], figures["old"], verdict, record["releases"]
                ),
                level,
            )
            if verdict["decision"] != "running":
                break
            watch.lock.check()
            time.sleep(
                max(0.0, started + (int(elapsed / settings["window"]) + 1) * settings["window"] - time.monotonic())
            )
    finally:
        # Not waited for: a rollback goes at once.
        stop_listening(watch, place)
    watch.old_seen = _utils("saltfleet_analysis.merge")(watch.old_seen, old_tasks)
    lean = _event(watch, record)
    watch.journal({k: v for k, v in lean.items() if k not in ("type", "id", "at")})
    return {k: v for k, v in lean.items() if k not in ("type", "id", "at", "event")}


def _point(record):
    """One window of the step, for the page's lines: when, and each side's failure rate and p95 so far."""
    sides = {side: {k: record[side][k] for k in ("failure_rate", "p95")} for side in ("new", "old")}
    return {"at": record["updated"], "elapsed": record["elapsed"], **sides}


def _event(watch, record):
    """The step's record as a rollout line (``analysis``): figures lean (``_lean``), for the bus and the ledger."""
    lean = {k: v for k, v in record.items() if k not in ("deployment", "rollout", "updated", "new", "old")}
    line = {"type": "rollout", "id": watch.rid, "at": record["updated"], "event": "analysis"}
    return {**line, **lean, "new": _lean(record["new"]), "old": _lean(record["old"])}


def _copy(tasks):
    return {name: {**row, "runtime": dict(row.get("runtime", {}))} for name, row in tasks.items()}


def pause(watch, why):
    """Wait for the operator's verdict (``fleet.promote``/``fleet.abort``): it, {verdict, user, at}."""
    name = watch.name
    watch.emit(
        f"{name}: paused: {why}; `salt-run fleet.promote {name}` goes on, `salt-run fleet.abort {name}` rolls back",
        "warn",
    )
    watch.journal({"event": "pause", "why": why})
    live_file = _live_path(watch.opts, name)
    last = _utils("saltfleet_files.read_json")(live_file, None)
    if last and last.get("rollout") == watch.rid:
        _utils("saltfleet_files.write_json")(live_file, {**last, "paused": why}, 0o600)
    while True:
        watch.lock.check()
        said = watch.lock.told()
        if said:
            watch.journal({"event": said["verdict"], "user": said["user"]})
            watch.emit(f"{name}: {said['verdict']} by {said['user']}", "ok" if said["verdict"] == "promote" else "warn")
            return said
        time.sleep(POLL)
