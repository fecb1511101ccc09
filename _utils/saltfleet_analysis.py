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
- **failed** before its time when the new release fails beyond doubt: an
  exact one-sided binomial test at ``confidence``, i.e. so many failures in
  so many tasks would happen with a chance under 1 - confidence if its true
  failure rate were the limit (equivalently, the Clopper-Pearson lower bound
  of its rate is above the limit): ``max_failure_rate``, or the old release's rate plus
  ``failure_margin`` when the old release ran ``min_tasks`` or more, whichever
  is lower;
- at its full time: **inconclusive** with fewer than ``min_tasks`` tasks of
  the new release; else **failed** when its failure rate is above the limit,
  or when its 95th percentile run time is above ``runtime_ratio`` times the
  old release's (both with ``min_tasks`` successes); else **passed**.
"""

import math

import salt.loader.context

__virtualname__ = "saltfleet_analysis"

RUNNING, PASSED, FAILED, INCONCLUSIVE = "running", "passed", "failed", "inconclusive"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _continued_fraction(a, b, x):
    """The continued fraction of the incomplete beta function (Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return result


def _beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, 1.0 - x) / b


def at_least(failed, total, rate):
    """P(X >= failed) for X binomial(total, rate): how likely so many failures are if the true rate were ``rate``."""
    return 1.0 if failed <= 0 else _beta(failed, total - failed + 1, rate)


def lower_bound(failed, total, confidence):
    """
    The exact one-sided (Clopper-Pearson) lower bound of a failure rate at
    ``confidence``: the lowest rate under which ``failed`` of ``total`` or
    more would happen with a chance of 1 - confidence or more.
    """
    if failed <= 0 or total <= 0:
        return 0.0
    low, high = 0.0, failed / total
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if at_least(failed, total, middle) < 1 - confidence else (low, middle)
    return low


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
    # Beyond doubt: so many failures would be rarer than 1 - confidence if the true rate were the limit.
    if finished and at_least(new["failed"], finished, ceiling) < 1 - settings["confidence"]:
        low = lower_bound(new["failed"], finished, settings["confidence"])
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
