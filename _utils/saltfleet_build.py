"""
Building a release, as the deployment's user: the checkout from root's
mirror, the virtualenv, and the deployment's own build steps (pillar
``build``: collectstatic, compiling translations, ``npm ci``...), each in the
new release with its venv first on PATH and the deployment's env, each with a
timeout (``build_timeout``). Only a release whose steps all passed is marked
complete; a release that built once never builds again.

A release that fails is marked (its ``.git/saltfleet-failed``, with why) and
never serves: the old release serves on. A checkout or virtualenv that failed
is tried again by the next apply; build steps that failed are not, until the
release or the steps change (the marker names the steps it ran). What a step
printed comes back as its tail, the deployment's env values hidden.

A build that ran out of room on the user's filesystem says so first, naming
the deployment; its release is marked failed for lack of room (an empty
marker when even the reason does not fit), and is built anew, steps and all,
by the next apply, which removes it when it asks for another release.
"""

import json
import logging
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_build"

TAIL_LINES = 20
# What the user's tools print when their filesystem is full (ENOSPC's text in the C locale they run in).
NO_ROOM = "no space left on device"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def user_dirs(ctx):
    """
    The user's home (root hands it over, 0700, when missing), their
    deployment's folders, and root's run/ for them: each the user's alone
    (0700, made and kept so as the user), so no other account reads a
    checkout of the private repository or what the programs logged.
    """
    files, p = "saltfleet_files", ctx.p
    if not p["home"].exists():
        _utils(f"{files}.root_dir")(p["home"].parent, 0o755, enforce=False)
        _utils(f"{files}.user_dir")(p["home"], ctx.uid, ctx.gid, 0o700)
    _utils(f"{files}.user_dir")(p["run"], ctx.uid, ctx.gid, 0o700)
    folders = [p["releases"], p["venvs"], p["logs"].parent, p["logs"]]
    missing = [folder for folder in folders if not folder.is_dir()]
    if missing:
        _utils("saltfleet_user.makedirs")(ctx.user, p["home"], *missing)
    shared = [folder for folder in folders if folder.stat().st_mode & 0o077]
    if shared:
        _utils("saltfleet_user.private")(ctx.user, p["home"], *shared)


def build(ctx, plan):
    """As the user: check out the release, build its venv, run the build steps; a failure leaves it marked."""
    user, home, p = ctx.user, ctx.p["home"], ctx.p
    release = _utils("saltfleet_paths.release")(p, plan.release)
    venv = _utils("saltfleet_paths.venv")(p, plan.digest)
    markers = _utils("saltfleet_paths.markers")(release)
    want = plan.asked
    steps_ran = False
    try:
        if want.build_release:
            _utils("saltfleet_git.clone_release")(user, p, release, plan.release, ctx.cfg["repo"])
        _utils("saltfleet_files.fault_point")(p["root"], "build")
        if want.build_venv:
            _utils("saltfleet_venv.build")(ctx.cfg, ctx.settings, ctx.tools["uv"], home, venv, release)
        link_venv(ctx, plan.release, plan.digest)
        if want.build_release and want.build_steps:
            steps_ran = True
            run_steps(ctx, release, venv, want.build_steps)
        _utils("saltfleet_user.remove")(user, home, markers["failed"])
        _utils("saltfleet_user.write")(user, home, markers["complete"], plan.digest)
    except Exception as exc:
        # The user's word (their tools' output) decides only that the build is retried and how it reads.
        full = NO_ROOM in str(exc).lower()
        # A complete release whose new venv failed (a rebuild) is still whole: it stays complete, and serves on.
        if want.build_release and (release / ".git").is_dir():
            # Steps that failed are not run again; steps that had no room are, once there is.
            digest = _utils("saltfleet_plan.build_digest")(want.build_steps) if steps_ran and not full else None
            record = {"reason": str(exc)[:2000], "build": digest}
            mark_failed(ctx, markers, {**record, "no_room": True} if full else record)
        if full:
            raise CommandExecutionError(no_room(ctx, plan, exc)) from None
        raise


def mark_failed(ctx, markers, record):
    """
    Mark a release failed, as the user, with ``record`` (why). On a full disk
    the record may not fit: the marker is then left empty, which takes no
    block and reads as failed for lack of room. Whatever happens here, the
    error that failed the build is the one reported.
    """
    user, home = ctx.user, ctx.p["home"]
    write = _utils("saltfleet_user.write")
    try:
        _utils("saltfleet_user.remove")(user, home, markers["complete"])
        write(user, home, markers["failed"], json.dumps(record))
    except CommandExecutionError:
        try:
            write(user, home, markers["failed"], "")
        except CommandExecutionError as exc:
            log.warning("deployments:%s: the failed release could not be marked: %s", ctx.name, exc)


def no_room(ctx, plan, exc):
    """The error of a build that ran out of room: what an operator does first, then what failed."""
    what = f"release {plan.release[:12]}" if plan.asked.build_release else f"virtualenv {plan.digest}"
    serving = ctx.manifest.get("release")
    then = f"release {serving[:12]} serves on" if serving else "nothing of it was started"
    return (
        f"deployments:{ctx.name}: no space left on device for {ctx.user}'s files in {ctx.p['home']} while "
        f"building {what}; {then}. Free space there (or grow its filesystem) and apply again: the next "
        f"apply removes what this one left half built and builds it anew.\n{exc}"
    )


def link_venv(ctx, sha, digest):
    """
    ~/Projects-<name>/venv, as the seed's users know it: release ``sha``'s
    link to the venv it runs with (relative, as the user).
    """
    p = ctx.p
    release = _utils("saltfleet_paths.release")(p, sha)
    _utils("saltfleet_user.relink")(ctx.user, p["home"], release / "venv", Path("..") / ".." / p["venvs"].name / digest)


def run_steps(ctx, release, venv, steps):
    """Each build step in ``release``, as the user, with the venv and env; at the first that fails, its tail."""
    env = _utils("saltfleet_venv.environ")(venv, ctx.cfg["env"])
    timeout = ctx.cfg["build_timeout"]
    for step in steps:
        argv = ["/bin/sh", "-c", step] if isinstance(step, str) else [str(word) for word in step]
        shown = step if isinstance(step, str) else " ".join(argv)
        try:
            proc = _utils("saltfleet_user.run")(ctx.user, argv, ctx.p["home"], cwd=release, env=env, timeout=timeout)
        except CommandExecutionError:
            raise CommandExecutionError(f"deployments:{ctx.name}:build: `{shown}` ran over {timeout} s") from None
        if proc.returncode:
            # Hidden first, then cut: a value is never split before it is looked for.
            said = _utils("saltfleet_user.scrub")(proc.stdout + proc.stderr, ctx.cfg["env"])
            said = "\n".join(said.strip().split("\n")[-TAIL_LINES:])
            raise CommandExecutionError(
                f"deployments:{ctx.name}:build: `{shown}` exited {proc.returncode}" + (f":\n{said}" if said else "")
            )
