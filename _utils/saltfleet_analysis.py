"""
Judging a release by what its Celery tasks do: the analysis of a rollout's
``analyse`` step, from the hosts' counts (``deployment.task_events``).

The counts of every host are added per release: the new release (the one the
rollout deploys) against the others together (the releases it replaces,
draining generations included). For each: tasks succeeded, failed and retried,
the failure rate (failed / (succeeded + failed): a retry that ends in success
is no failure), and the 50th and 95th percentiles of the run time of the
tasks that succeeded.

A step decides, with the thresholds of ``saltfleet_schema.ANALYSIS``:

- **failed** at once when a program of the new release crashed (its pid
  changed, it left RUNNING) or one of its nodes went offline;
- **failed** before its time when the new release fails beyond doubt: the
  one-sided Wilson score lower bound of its failure rate, at ``confidence``,
  is above the limit: ``max_failure_rate``, or the old release's rate plus
  ``failure_margin`` when the old release ran ``min_tasks`` or more, whichever
  is lower;
- at its full time: **inconclusive** with fewer than ``min_tasks`` tasks of
  the new release; else **failed** when its failure rate is above the limit,
  or when its 95th percentile run time is above ``runtime_ratio`` times the
  old release's (both with ``min_tasks`` successes); else **passed**.
"""

import statistics

import salt.loader.context

__virtualname__ = "saltfleet_analysis"

RUNNING, PASSED, FAILED, INCONCLUSIVE = "running", "passed", "failed", "inconclusive"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def wilson(failed, total, confidence):
    """(low, high): the Wilson score bounds of a rate of ``failed`` in ``total``, each one-sided at ``confidence``."""
    if not total:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(confidence)
    rate = failed / total
    centre = rate + z * z / (2 * total)
    spread = z * ((rate * (1 - rate) + z * z / (4 * total)) / total) ** 0.5
    scale = 1 + z * z / total
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def quantile(histogram, share):
    """The run time (seconds) below which ``share`` of the histogram's tasks ran; None when it holds none."""
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for bucket in sorted(histogram, key=int):
        seen += histogram[bucket]
        if seen >= share * total:
            return round(_utils("saltfleet_taskevents.seconds_of")(bucket), 6)
    return None


def summary(tasks):
    """A release's figures from its counts per task name ({task: {succeeded, failed, retried, runtime}})."""
    total = {"succeeded": 0, "failed": 0, "retried": 0, "runtime": {}}
    by_task = {}
    for name, row in sorted(tasks.items()):
        _utils("saltfleet_taskevents.add")(total, row)
        by_task[name or "(unnamed)"] = _figures(row)
    return {**_figures(total), "tasks": by_task}


def _figures(row):
    finished = row["succeeded"] + row["failed"]
    return {
        "succeeded": row["succeeded"],
        "failed": row["failed"],
        "retried": row["retried"],
        "failure_rate": round(row["failed"] / finished, 4) if finished else None,
        "p50": quantile(row["runtime"], 0.5),
        "p95": quantile(row["runtime"], 0.95),
        "runtime": dict(row["runtime"]),
    }


def merge(into, tasks):
    """
    Add ``tasks`` ({task: counts}) into ``into``, in place; as on a host, names
    past the first hundred add up as one (every host's names meet here).
    """
    named = _utils("saltfleet_taskevents.named")
    for name, row in tasks.items():
        _utils("saltfleet_taskevents.add")(into.setdefault(named(into, name), {}), {"runtime": {}, **row})
    return into


def limit(old, settings):
    """The failure rate above which the new release fails, against ``old`` (its figures, or None)."""
    ceiling = settings["max_failure_rate"]
    if old and old["succeeded"] + old["failed"] >= settings["min_tasks"]:
        return round(min(ceiling, old["failure_rate"] + settings["failure_margin"]), 4)
    return ceiling


def judge(new, old, crashed, elapsed, seconds, settings):
    """
    The decision of a step (see the module) from the figures (``summary``) of
    the new release and the old ones, the new release's crashes (words), the
    seconds elapsed of the step's ``seconds``: {decision, why, limit}.
    """
    ceiling = limit(old, settings)
    finished = new["succeeded"] + new["failed"]
    rate = new["failure_rate"] or 0.0
    if crashed:
        return {"decision": FAILED, "why": f"the new release's workers crashed: {'; '.join(crashed)}", "limit": ceiling}
    low, _ = wilson(new["failed"], finished, settings["confidence"])
    if finished and low > ceiling:
        why = (
            f"{new['failed']} of {finished} tasks failed ({rate:.1%}): at {settings['confidence']:.0%} confidence "
            f"the failure rate is at least {low:.1%}, above the limit of {ceiling:.1%}"
        )
        return {"decision": FAILED, "why": why, "limit": ceiling, "early": elapsed < seconds}
    if elapsed < seconds:
        return {"decision": RUNNING, "why": f"{elapsed:.0f} of {seconds} s", "limit": ceiling}
    if finished < settings["min_tasks"]:
        why = f"{finished} tasks of the new release finished, fewer than min_tasks ({settings['min_tasks']})"
        return {"decision": INCONCLUSIVE, "why": why, "limit": ceiling}
    if rate > ceiling:
        why = f"{new['failed']} of {finished} tasks failed ({rate:.1%}), above the limit of {ceiling:.1%}"
        return {"decision": FAILED, "why": why, "limit": ceiling}
    slow = _slower(new, old, settings)
    if slow:
        return {"decision": FAILED, "why": slow, "limit": ceiling}
    why = f"{finished} tasks, {rate:.1%} failed (limit {ceiling:.1%})"
    if old and old["p95"] and new["p95"]:
        why += f", p95 {new['p95']:.3g} s against {old['p95']:.3g} s"
    return {"decision": PASSED, "why": why, "limit": ceiling}


def _slower(new, old, settings):
    """Why the new release is too slow (p95 above runtime_ratio times the old one's), or None."""
    enough = settings["min_tasks"]
    if not old or new["succeeded"] < enough or old["succeeded"] < enough or not (old["p95"] and new["p95"]):
        return None
    ratio = new["p95"] / old["p95"]
    if ratio <= settings["runtime_ratio"]:
        return None
    return (
        f"its tasks' p95 run time is {new['p95']:.3g} s, {ratio:.1f} times the old release's {old['p95']:.3g} s "
        f"(runtime_ratio {settings['runtime_ratio']})"
    )
