"""
How a deployment's programs move to what a plan asks (saltfleet_plan):
starting supervisord when it does not run, handing a new release (or
virtualenv) over with one of the strategies below, starting a new
supervisord when the env changed, or reconfiguring the serving one when only
the programs' config changed.

The strategies, by pillar ``handover`` (the schema takes its list from here):

``overlap``
    The new release starts under a new generation (a second supervisord)
    beside the serving one; once its programs are RUNNING (and its Celery
    workers answer), the manifest and links switch to it, and the old
    generation drains in the background: Celery workers stop consuming, finish
    their tasks in hand, then stop. If the new programs do not start, they
    are stopped and nothing was switched: the old programs never stopped.
``stop-first``
    For programs that hold a port or must never run twice (celery beat): the
    serving supervisord stops the old programs, then starts the new ones; if
    those fail, the old config is put back and its programs started again.

Adding a strategy is one entry in ``STRATEGIES`` and its tests. Each step
that completes is noted in the apply's :class:`Outcome`, so a state that
fails half way reports what it already changed.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_handover"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


@dataclass
class Outcome:
    """What an apply did so far: the changes made, warnings, and the drainer it left running."""

    done: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    drain_pid: int = None


def outcome():
    """A new apply's :class:`Outcome` (Salt's loader hands out functions, not classes)."""
    return Outcome()


def _fmt(failed):
    return ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))


def _socket(p, gen):
    return _utils("saltfleet_paths.generation")(p, gen)["socket"]


def _fault(p, point):
    _utils("saltfleet_files.fault_point")(p["root"], point)


def _paths(ctx, plan):
    release = _utils("saltfleet_paths.release")(ctx.p, plan.release)
    return release, _utils("saltfleet_paths.venv")(ctx.p, plan.digest)


def write_conf(ctx, gen, text):
    """Root's, readable by the deployment's user alone: supervisord rereads it as the user. It holds no env."""
    conf = _utils("saltfleet_paths.generation")(ctx.p, gen)["conf"]
    _utils("saltfleet_files.write_atomic")(conf, text, 0o600, reader=ctx.uid)


def write_generation(ctx, plan):
    """
    The plan's generation's config and env (readable by the user alone), and
    its boot script (root's). A number an ended generation had starts without
    its logs: they hold what it ran with (a secret pillar changed since, and
    nothing hides any more).
    """
    if plan.gen != plan.host.serving:
        globs = _utils("saltfleet_paths.generation_logs")(plan.gen)
        _utils("saltfleet_user.remove_named")(ctx.user, ctx.p["home"], ctx.p["logs"], *globs)
    write_conf(ctx, plan.gen, plan.conf)
    g = _utils("saltfleet_paths.generation")(ctx.p, plan.gen)
    _utils("saltfleet_files.write_atomic")(g["env"], plan.env, 0o600, reader=ctx.uid)
    _utils("saltfleet_files.write_atomic")(g["boot"], plan.boot, 0o700)


def draining(plan):
    """The draining generations the manifest records ({gen: {pid, start, release, venv, until}})."""
    return {
        g: {k: i[k] for k in ("pid", "start", "release", "venv", "until") if k in i}
        for g, i in {**plan.host.draining, **plan.host.orphans}.items()
    }


def record(ctx, **fields):
    """The manifest, updated with ``fields`` (saltfleet_manifest.record)."""
    return _utils("saltfleet_manifest.record")(ctx.p, ctx.cfg, ctx.pillar_rev, **fields)


def serve(ctx, plan, outcome, drains):
    """
    The switch, once the new programs run: the manifest says what serves (the
    one fact every reader and the next apply trust), then the links follow.
    """
    record(
        ctx,
        release=plan.release,
        subject=_subject(ctx, plan.release),
        venv=plan.digest,
        rebuild=_utils("saltfleet_manifest.intent")(ctx.manifest).rebuild,
        held=plan.holds,
        generation=plan.gen,
        history=list(plan.history),
        draining=drains,
    )
    _utils("saltfleet_supervisor.link_serving")(ctx.p, plan.gen)
    built = plan.asked.build_release or plan.asked.build_venv
    if not built and ("release" in plan.changes or "virtualenv" in plan.changes):
        # A kept release serves again, perhaps with another venv than it was built
        # with (a venv rebuilt since, and the old one pruned): its link follows.
        _utils("saltfleet_build.link_venv")(ctx, plan.release, plan.digest)
    project = Path(ctx.p["releases"].name) / plan.release
    _utils("saltfleet_user.relink")(ctx.user, ctx.p["home"], ctx.p["project"], project)
    for key in ("release", "virtualenv", "env"):
        if key in plan.changes:
            outcome.done[key] = plan.changes[key]
    _fault(ctx.p, "switched")


def _subject(ctx, release):
    """What the release is to people (the fleet page, the grains): its commit's subject, read once per release."""
    if release == ctx.manifest.get("release") and "subject" in ctx.manifest:
        return ctx.manifest["subject"]
    secrets = _utils("saltfleet_git.secrets_of")(ctx.p)
    return _utils("saltfleet_git.subject")(ctx.p["mirror"], release, ctx.cfg, secrets)


def _stop_seconds(conf_text):
    """How long a supervisord of this config may take to stop its programs."""
    return _utils("saltfleet_supervisor_conf.stop_seconds")(conf_text)


# ------------------------------------------------------------------ actions


def start(ctx, plan, outcome):
    """supervisord was not running: start it with the (new) release."""
    sup, gen, current = "saltfleet_supervisor", plan.gen, ctx.manifest.get("release")
    write_generation(ctx, plan)
    failed = {}
    try:
        _utils(f"{sup}.start")(ctx.cfg, ctx.tools["supervisord"], ctx.p, gen, ctx.uid)
        failed = _utils(f"{sup}.wait_running")(_socket(ctx.p, gen), ctx.uid)
    except CommandExecutionError as exc:
        failed = {"supervisord": str(exc)}
    if failed and plan.switch and current:
        _utils(f"{sup}.shutdown")(_socket(ctx.p, gen), ctx.uid)
        if plan.host.old_conf is not None and gen == plan.host.serving:
            write_conf(ctx, gen, plan.host.old_conf)
        raise CommandExecutionError(
            f"deployments:{ctx.name}: release {plan.release[:12]} did not start ({_fmt(failed)}; see "
            f"{ctx.p['logs']}); {current[:12]} stays the recorded release"
        )
    serve(ctx, plan, outcome, draining(plan))
    outcome.done["supervisord"] = {"old": "stopped", "new": "running"}
    if failed:
        raise CommandExecutionError(
            f"deployments:{ctx.name}: programs not RUNNING: {_fmt(failed)}; see {ctx.p['logs']}"
        )


def overlap(ctx, plan, outcome):
    """The ``overlap`` strategy (see the module)."""
    sup, gen, uid = "saltfleet_supervisor", plan.gen, ctx.uid
    release, venv = _paths(ctx, plan)
    write_generation(ctx, plan)
    try:
        started = _utils(f"{sup}.start")(ctx.cfg, ctx.tools["supervisord"], ctx.p, gen, uid)
        failed = _utils(f"{sup}.wait_running")(_socket(ctx.p, gen), uid)
    except CommandExecutionError as exc:
        started, failed = None, {"supervisord": str(exc)}
    if not failed and plan.workers:
        try:
            missing = _utils("saltfleet_celery.wait_ready")(ctx.cfg, ctx.p, release, venv, plan.workers)
        except CommandExecutionError as exc:
            missing = {"celery": str(exc)}
        failed = {node: f"Celery: {why}" for node, why in missing.items()}
    _fault(ctx.p, "started")
    current = (ctx.manifest.get("release") or "")[:12]
    if failed:
        _utils(f"{sup}.shutdown")(_socket(ctx.p, gen), uid)
        if started:
            _utils(f"{sup}.wait_exited")({gen: started}, 60)
        _utils("saltfleet_paths.generation")(ctx.p, gen)["conf"].unlink(missing_ok=True)
        raise CommandExecutionError(
            f"deployments:{ctx.name}: release {plan.release[:12]} did not start ({_fmt(failed)}; see "
            f"{ctx.p['logs']}); {current} keeps serving: its programs never stopped"
        )
    old, old_info = plan.host.serving, plan.host.serving_info
    drains = draining(plan)
    seconds = _stop_seconds(plan.host.old_conf)
    if old_info:
        drains[old] = {
            "pid": old_info["pid"],
            "start": old_info["start"],
            "release": ctx.manifest.get("release"),
            "venv": ctx.manifest.get("venv"),
        }
        outcome.drain_pid = old_info["pid"]
    serve(ctx, plan, outcome, drains)
    if old_info and _drain(ctx, plan, outcome, seconds):
        # A drainer took it over. Until this is recorded (a kill just before), the
        # next apply finds it answering and stops it; after, it does once overdue.
        drains[old]["until"] = time.time() + seconds + 120
        record(ctx, draining=drains)
    else:
        _utils(f"{sup}.shutdown")(_socket(ctx.p, old), uid)
    _fault(ctx.p, "signalled")


def _drain(ctx, plan, outcome, seconds):
    """
    Hand the old generation to a drainer when it runs Celery workers: they stop
    consuming now, and supervisord is told to stop once they hold no task
    (within ``seconds``). False when there is nothing for Celery to drain.
    """
    old = _utils("saltfleet_celery.workers_in")(_utils("saltfleet_supervisor_conf.sections_of")(plan.host.old_conf))
    if not old or not ctx.manifest.get("release"):
        return False
    release = _utils("saltfleet_paths.release")(ctx.p, ctx.manifest["release"])
    venv = _utils("saltfleet_paths.venv")(ctx.p, ctx.manifest.get("venv"))
    try:
        sock = _socket(ctx.p, plan.host.serving)
        unconfirmed = _utils("saltfleet_celery.drain")(ctx.cfg, ctx.p, release, venv, old, sock, seconds)
    except CommandExecutionError as exc:
        # The new release serves already; the old workers still stop on SIGTERM.
        outcome.warnings.append(f"deployments:{ctx.name}: the old workers were sent SIGTERM without a drain: {exc}")
        return False
    if unconfirmed:
        outcome.warnings.append(
            f"deployments:{ctx.name}: {', '.join(unconfirmed)} did not confirm they stopped consuming; "
            "they stop once their tasks are done"
        )
    return True


def renew(ctx, plan, outcome):
    """
    A stop-first handover to a new supervisord (the env changed, and
    supervisord holds it): the serving one stops with its programs (each
    finishes its task in hand, up to stopwaitsecs), then the new generation
    starts; if its programs do not, the old generation starts again.
    """
    sup, old = "saltfleet_supervisor", plan.host.serving
    _utils(f"{sup}.shutdown")(_socket(ctx.p, old), ctx.uid)
    if plan.host.serving_info:
        _utils(f"{sup}.wait_exited")({old: plan.host.serving_info}, _stop_seconds(plan.host.old_conf))
    try:
        start(ctx, plan, outcome)
    except CommandExecutionError:
        _utils(f"{sup}.start")(ctx.cfg, ctx.tools["supervisord"], ctx.p, old, ctx.uid)
        raise


def stop_first(ctx, plan, outcome):
    """The ``stop-first`` strategy (see the module): the serving supervisord runs the new release's programs."""
    reconfigure(ctx, plan, outcome)


def reconfigure(ctx, plan, outcome):
    """
    Bring the serving supervisord to the plan's config: only the groups that
    changed stop and start (the whole set for a stop-first switch); the old
    config is put back if they fail.
    """
    sup, gen, uid = "saltfleet_supervisor", plan.gen, ctx.uid
    sock = _socket(ctx.p, gen)
    diff = _utils("saltfleet_supervisor_conf.diff_groups")(plan.host.old_conf, plan.conf)
    started = plan.changes.get("programs", {}).get("started", [])
    write_conf(ctx, gen, plan.conf)
    try:
        _utils(f"{sup}.apply_group_changes")(sock, uid, diff, _stop_seconds(plan.host.old_conf))
        _utils(f"{sup}.start_groups")(sock, uid, started)
        failed = _utils(f"{sup}.wait_running")(sock, uid, groups={*diff["added"], *diff["changed"], *started})
    except CommandExecutionError as exc:
        failed = {"supervisord": str(exc)}
    if failed and plan.host.old_conf is not None:
        write_conf(ctx, gen, plan.host.old_conf)
        back = _utils("saltfleet_supervisor_conf.diff_groups")(plan.conf, plan.host.old_conf)
        try:
            _utils(f"{sup}.apply_group_changes")(sock, uid, back, _stop_seconds(plan.conf))
            still = _utils(f"{sup}.wait_running")(sock, uid, groups={*back["added"], *back["changed"]})
        except CommandExecutionError as exc:
            still = {"supervisord": str(exc)}
        what = f"release {plan.release[:12]}" if plan.switch else "the new config"
        raise CommandExecutionError(
            f"deployments:{ctx.name}: {what} did not start ({_fmt(failed)}; see {ctx.p['logs']}); "
            "the previous config was put back"
            + (f", and its programs did not start either: {_fmt(still)}" if still else ", and its programs serve")
        )
    if plan.switch:
        serve(ctx, plan, outcome, draining(plan))
    else:
        record(ctx, generation=gen, held=plan.holds, draining=draining(plan))
    for key in ("programs", "supervisord_conf"):
        if key in plan.changes:
            outcome.done[key] = plan.changes[key]
    if failed:
        raise CommandExecutionError(
            f"deployments:{ctx.name}: programs not RUNNING: {_fmt(failed)}; see {ctx.p['logs']}"
        )


@dataclass(frozen=True)
class Strategy:
    """How a new release takes over from the serving one."""

    switch: Callable
    new_generation: bool  # it starts under a new supervisord, beside the serving one
    drains: bool  # the old generation finishes its tasks after the switch (its release is kept meanwhile)


STRATEGIES = {
    "overlap": Strategy(overlap, new_generation=True, drains=True),
    "stop-first": Strategy(stop_first, new_generation=False, drains=False),
}


def names():
    """The handover modes pillar may name."""
    return tuple(STRATEGIES)


def strategy(name):
    return STRATEGIES[name]


def apply(ctx, plan, outcome):
    """Move the programs as the plan's action says; ``outcome`` notes what was done."""
    if plan.action == "start":
        start(ctx, plan, outcome)
    elif plan.action == "handover":
        strategy(ctx.cfg["handover"]).switch(ctx, plan, outcome)
    elif plan.action == "renew":
        renew(ctx, plan, outcome)
    elif plan.action == "reconfigure":
        reconfigure(ctx, plan, outcome)
    else:
        record(ctx, draining=draining(plan))
