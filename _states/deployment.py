"""
Converge saltfleet deployments: a Git checkout of an app at a revision, a
virtualenv built from its requirements, its own supervisord running its
programs, and its sysfiles (cron.d and the like).

Each deployment's settings come from pillar ``deployments:<name>`` (see
``pillar.example``); the state takes the name and reads the rest itself, so
deploy keys and DSNs never travel in the state's arguments or its return.

.. code-block:: yaml

    deployment-daily-fetcher:
      deployment.present:
        - name: daily-fetcher

    deployment-old-fetcher:
      deployment.absent:
        - name: old-fetcher

A new revision is checked out into its own release directory and switched in
only once its checkout and virtualenv are complete. Its programs start under a
second supervisord beside the serving one; once they are RUNNING the old
programs get SIGTERM and finish their tasks (up to ``stopwaitsecs``) in the
background (``handover: stop-first`` stops the old programs first instead). If
the new programs do not come up, the previous release is switched back in.
Pillar is validated first: a mistake fails the state with a message naming the
key and the fix, and nothing on the host changes.
"""

import logging
import os
import shutil
import time
import xmlrpc.client
from pathlib import Path

log = logging.getLogger(__name__)

__virtualname__ = "deployment"


def __virtual__():
    try:
        import git  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        import supervisor  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    except ImportError as exc:
        return False, f"deployment states need GitPython and supervisor: {exc}"
    if "saltfleet.validate" not in __utils__:
        return False, "saltfleet's _utils are not synced: run saltutil.sync_all"
    return __virtualname__


def _u(name):
    return __utils__[f"saltfleet.{name}"]


def _error(ret, exc):
    ret["result"] = False
    ret["comment"] = str(exc)
    return ret


def present(name, **kwargs):
    """
    Ensure deployment ``name`` runs as pillar ``deployments:<name>`` says.

    name
        The deployment, a key of pillar ``deployments``.

    Any other keyword (``repo``, ``rev``, ``programs``, ...) overrides that
    key of the deployment's pillar, for SLS files that manage a deployment
    without pillar.
    """
    ret = {"name": name, "result": True, "changes": {}, "comment": ""}
    test = bool(__opts__["test"])
    try:
        settings, cfg = __salt__["deployment.config"](name, **_state_kwargs(kwargs))
        plan = _plan(settings, cfg, test)
        ret["changes"] = plan["changes"]
        if test:
            ret["result"] = None if plan["changes"] else True
            ret["comment"] = _describe(cfg, plan, dry=True)
            return ret
        if plan["changes"]:
            _apply(settings, cfg, plan)
    except Exception as exc:  # pylint: disable=broad-except
        if not _is_ours(exc):
            log.exception("deployment.present %s failed", name)
            exc = f"deployments:{name}: {type(exc).__name__}: {exc} (the minion log has the traceback)"
        return _error(ret, exc)
    ret["comment"] = _describe(cfg, plan, dry=False)
    if plan["changes"]:
        _mine_send()
    return ret


def absent(name, purge=None):
    """
    Ensure deployment ``name`` is not running: its supervisord stopped (its
    programs gracefully), its sysfiles and its secrets removed. With ``purge``
    (default: pillar ``saltfleet:purge_removed``) its releases, virtualenvs
    and logs go too.
    """
    ret = {"name": name, "result": True, "changes": {}, "comment": ""}
    try:
        settings = __salt__["deployment.settings"]()
        if purge is None:
            purge = settings["purge_removed"]
        changes = __salt__["deployment.remove"](name, purge=purge, test=bool(__opts__["test"]))
    except Exception as exc:  # pylint: disable=broad-except
        return _error(ret, exc)
    ret["changes"] = changes
    if not changes:
        ret["comment"] = f"Deployment {name} is not installed"
    elif __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"Deployment {name} would be removed"
    else:
        ret["comment"] = f"Deployment {name} removed"
        _mine_send()
    return ret


def pillar_valid(name):
    """
    Fail, changing nothing, when this minion's saltfleet pillar breaks the
    schema; the comment lists every error with its key and fix.

    .. code-block:: yaml

        saltfleet-pillar:
          deployment.pillar_valid:
            - name: saltfleet
    """
    errors = __salt__["deployment.validate"]()
    return {
        "name": name,
        "result": not errors,
        "changes": {},
        "comment": "\n".join(errors) or "saltfleet pillar is valid",
    }


def sysfiles(name):
    """
    Install the tree ``deployments/<name>/sysfiles/`` under the host's root and
    remove the files it no longer ships. ``name: common`` installs what every
    host gets (``deployments/common/sysfiles/``).
    """
    ret = {"name": name, "result": True, "changes": {}, "comment": ""}
    try:
        settings = __salt__["deployment.settings"]()
        files = __salt__["deployment.sysfiles_sources"](name)
        errors = _u("check_sysfiles")(name, files, settings["root"])
        if errors:
            raise _u("error")("\n".join(errors))
        changes = _u("diff_sysfiles")(name, files, settings["root"])
        if changes and not __opts__["test"]:
            _u("apply_sysfiles")(name, files, settings["root"])
    except Exception as exc:  # pylint: disable=broad-except
        return _error(ret, exc)
    if changes:
        ret["changes"] = {"sysfiles": changes}
        ret["result"] = None if __opts__["test"] else True
        ret["comment"] = f"Sysfiles of {name} {'would be ' if __opts__['test'] else ''}updated"
    else:
        ret["comment"] = f"Sysfiles of {name} are in place"
    return ret


# --------------------------------------------------------------------------


def _state_kwargs(kwargs):
    return {k: v for k, v in kwargs.items() if not k.startswith("__") and k not in ("fun", "state", "order")}


def _is_ours(exc):
    return type(exc).__name__ == "DeploymentError"


def _plan(settings, cfg, test):
    """
    Everything present() would change, found by the code path that makes the
    change: git is asked through a throwaway view in test mode, the rest is
    compared with what is on the host.
    """
    u = _u
    name, root = cfg["name"], settings["root"]
    p = u("paths")(root, cfg["user"], name)
    u("check_user")(cfg)
    manifest = u("read_json")(p["manifest"], {}) or {}
    sources = __salt__["deployment.sources"](name, cfg)
    boot, entry = u("boot_entry")(cfg, settings)
    files = dict(sources["sysfiles"], **{boot: entry})
    errors = u("check_sysfiles")(name, files, root)
    if errors:
        raise u("error")("\n".join(errors))
    current = u("current_release")(p["project"])
    old_conf = p["conf"].read_text() if p["conf"].exists() else None
    plan = {"paths": p, "manifest": manifest, "current": current, "conf": sources["conf"], "old_conf": old_conf}
    plan["sections"] = sources["sections"]
    plan["sysfiles"] = files
    changes = {}
    secrets = u("write_git_secrets")(cfg, test=True)
    if secrets:
        changes["secrets"] = secrets

    sha, digest = _resolve(cfg, test, plan)
    plan["sha"], plan["digest"] = sha, digest
    plan["new_release"] = sha != current or not _release_ok(p, sha)
    if plan["new_release"]:
        changes["release"] = {"old": current, "new": sha}
    plan["build_venv"] = not u("venv_complete")(p["venvs"] / digest)
    # Requirements or Python changed on the same commit: the serving release gets the new venv.
    plan["new_venv"] = plan["new_release"] or _venv_of(p, sha) != digest
    if plan["build_venv"] or digest != manifest.get("venv"):
        changes["virtualenv"] = {"old": manifest.get("venv"), "new": digest}

    plan["conf_changed"] = old_conf != plan["conf"]
    plan["running"] = running = u("supervisord_running")(p["socket"])
    # The new programs start beside the serving ones, which then drain (see _handover).
    plan["overlap"] = running and plan["new_venv"] and cfg["handover"] == "overlap"
    plan["diff"] = diff = u("diff_groups")(old_conf if running else None, plan["conf"])
    programs = {}
    if not running:
        changes["supervisord"] = {"old": "stopped", "new": "running"}
    else:
        programs = {key: diff[key] for key in ("added", "changed", "removed") if diff[key]}
        if plan["new_venv"] and diff["kept"]:
            programs["restarted"] = diff["kept"]
        else:
            idle = [g for g in u("idle_groups")(p["socket"]) if g in diff["kept"]]
            if idle:
                programs["started"] = idle
    if programs:
        changes["programs"] = programs
    elif plan["conf_changed"] and running:
        changes["supervisord_conf"] = "rewritten"
    sys_changes = u("diff_sysfiles")(name, files, root)
    if sys_changes:
        changes["sysfiles"] = sys_changes

    plan["history"], plan["prune"] = _retention(cfg, p, manifest, sha, digest, current if plan["overlap"] else None)
    if plan["prune"]:
        changes["pruned"] = [str(path) for path in plan["prune"]]
    plan["changes"] = changes
    return plan


def _release_ok(p, sha):
    return (p["releases"] / sha / ".git" / "saltfleet-complete").exists()


def _resolve(cfg, test, plan):
    """
    The SHA pillar's rev names and the digest of its virtualenv's inputs,
    from the cheapest facts that decide them: a pinned SHA that already serves
    needs no git; a branch needs one ls-remote; only a commit not seen before
    is fetched and has its requirements read.
    """
    u = _u
    manifest, current = plan["manifest"], plan["current"]
    same_inputs = all(manifest.get(k) == cfg[k] for k in ("requirements", "python")) and manifest.get("venv")
    if same_inputs and cfg["rev"] == current == manifest.get("release") and _release_ok(plan["paths"], current):
        return current, manifest["venv"]
    if not test:
        # The real run needs the key before it can reach a private repo.
        u("write_git_secrets")(cfg)
    with u("repo_view")(cfg, test) as (view_cfg, repo):
        sha = u("resolve")(view_cfg, repo)
        if same_inputs and sha == manifest.get("release"):
            return sha, manifest["venv"]
        show = u("show_file")
        return sha, u("requirements_digest")(lambda rel: show(repo, sha, rel, view_cfg), cfg)


def _retention(cfg, p, manifest, sha, digest, draining=None):
    """
    The releases to keep (newest last) and the release and venv dirs to delete;
    a draining release keeps its dirs until its programs are gone (next apply).
    """
    history = [r for r in manifest.get("history", []) if r != sha] + [sha]
    keep = history[-cfg["keep_releases"] :]
    spared = {*keep, draining}
    prune = [p["releases"] / r for r in history if r not in spared and (p["releases"] / r).exists()]
    used = {digest} | {_venv_of(p, r) for r in spared if r and r != sha}
    if p["venvs"].is_dir():
        prune += sorted(v for v in p["venvs"].iterdir() if v.name not in used)
    return keep, prune


def _apply(settings, cfg, plan):
    u = _u
    p, sha, name = plan["paths"], plan["sha"], cfg["name"]
    if "secrets" in plan["changes"]:
        u("write_git_secrets")(cfg)
    u("make_dirs")(cfg)
    if plan["new_venv"] or plan["build_venv"]:
        _build_release(settings, cfg, plan)
    if plan["conf_changed"] and not plan["overlap"]:
        u("write_conf")(p, u("generation")(p), plan["conf"])
    previous = plan["current"]
    if plan["new_release"]:
        u("link_atomic")(p["project"], Path(p["releases"].name) / sha)
    # Recorded before the programs start, so a deployment whose first start
    # fails is still known (to deployment.list, grains, and absent).
    _record(cfg, plan, sha, plan["digest"], plan["history"])

    try:
        failed = (_handover if plan["overlap"] else _run_programs)(settings, cfg, plan)
    except xmlrpc.client.Fault as fault:
        _restore_conf(plan)
        raise u("error")(
            f"deployments:{name}:programs: supervisord refused the new config ({fault.faultString}); "
            "the previous config was put back. Check the program options"
        ) from None
    if failed and plan["new_release"] and previous and _release_ok(p, previous):
        u("link_atomic")(p["project"], Path(p["releases"].name) / previous)
        # An overlapping handover never stopped the previous programs.
        still = {} if plan["overlap"] else u("restart_groups")(p["socket"], sorted(u("groups_of")(plan["conf"])))
        _mark_failed(p["releases"] / sha, f"programs did not start: {_fmt(failed)}")
        manifest = plan["manifest"]
        _record(cfg, plan, previous, manifest.get("venv"), manifest.get("history", [previous]))
        raise u("error")(
            f"deployments:{name}: release {sha[:12]} did not start ({_fmt(failed)}; see {p['logs']}); "
            f"rolled back to {previous[:12]}"
            + (f", which did not start either: {_fmt(still)}" if still else ", which keeps serving")
        )
    if failed:
        kept = "; the programs that served before keep serving" if plan["overlap"] else ""
        raise u("error")(f"deployments:{name}: programs not RUNNING: {_fmt(failed)}; see {p['logs']}{kept}")

    u("apply_sysfiles")(name, plan["sysfiles"], settings["root"])
    for path in plan["prune"]:
        shutil.rmtree(path, ignore_errors=True)


def _record(cfg, plan, sha, digest, history):
    """Write the deployment's manifest when what it says changed."""
    record = {
        "name": cfg["name"],
        "user": cfg["user"],
        "repo": cfg["repo"],
        "rev": cfg["rev"],
        "release": sha,
        "venv": digest,
        "requirements": cfg["requirements"],
        "python": cfg["python"],
        "history": history,
    }
    old = _u("read_json")(plan["paths"]["manifest"], {}) or {}
    if {k: old.get(k) for k in record} != record:
        record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _u("write_manifest")(plan["paths"]["manifest"], record)


def _restore_conf(plan):
    p = plan["paths"]
    gen = _u("generation")(p)
    if plan["old_conf"] is None:
        _u("generation_conf")(p, gen).unlink(missing_ok=True)
    else:
        _u("write_conf")(p, gen, plan["old_conf"])


def _build_release(settings, cfg, plan):
    """Check out and build the release; a failure leaves it marked, never switched in."""
    u = _u
    p, sha = plan["paths"], plan["sha"]
    release = p["releases"] / sha
    venv = p["venvs"] / plan["digest"]
    try:
        if not _release_ok(p, sha):
            release = u("checkout_release")(cfg, sha)
        if plan["build_venv"]:
            u("build_venv")(cfg, settings, venv, release)
        target = Path("..") / ".." / p["venvs"].name / plan["digest"]
        if _venv_of(p, sha) != plan["digest"]:
            u("link_atomic")(release / "venv", target)
        (release / ".git" / "saltfleet-failed").unlink(missing_ok=True)
        u("mark")(release / ".git" / "saltfleet-complete", plan["digest"])
        u("chown_tree")(release, cfg["user"])
    except Exception as exc:
        _mark_failed(release, str(exc))
        raise


def _mark_failed(release, why):
    git_dir = Path(release) / ".git"
    if git_dir.is_dir():
        (git_dir / "saltfleet-complete").unlink(missing_ok=True)
        _u("mark")(git_dir / "saltfleet-failed", why)


def _venv_of(p, sha):
    try:
        return Path(os.readlink(p["releases"] / sha / "venv")).name
    except OSError:
        return None


def _run_programs(settings, cfg, plan):
    """Start supervisord or bring its programs to the new config and release; return failures."""
    u = _u
    p, diff = plan["paths"], plan["diff"]
    if not plan["running"]:
        gen = u("generation")(p)
        u("start_supervisord")(cfg, settings, gen)
        u("link_generation")(p, gen)
        return u("wait_running")(p["socket"])
    touched = set()
    if plan["conf_changed"]:
        u("apply_group_changes")(p["socket"], diff)
        touched |= set(diff["added"]) | set(diff["changed"])
    restart = plan["changes"].get("programs", {})
    restart = restart.get("restarted") or restart.get("started") or []
    u("restart_groups")(p["socket"], restart)
    touched |= set(restart)
    return u("wait_running")(p["socket"], names=touched) if touched else {}


def _handover(settings, cfg, plan):
    """
    Start the new release's programs under a new supervisord generation while
    the serving one goes on. Once they are RUNNING the new generation serves and
    the old one is told to stop: its programs get SIGTERM and finish their tasks
    (up to stopwaitsecs) in the background. If they do not start, the new
    generation is stopped: the old programs never stopped serving.
    Returns {name: state} of the programs that did not start.
    """
    u = _u
    p = plan["paths"]
    old, gen = u("generation")(p), u("free_generation")(p)
    sock, pidfile = u("generation_paths")(p, gen)
    u("write_conf")(p, gen, u("render_supervisord_conf")(cfg, plan["sections"], gen))
    try:
        u("start_supervisord")(cfg, settings, gen)
        failed = u("wait_running")(sock)
    except Exception as exc:  # pylint: disable=broad-except
        failed = {"supervisord": str(exc)}
    if failed:
        u("stop_supervisord")(sock, pidfile)
        u("generation_conf")(p, gen).unlink(missing_ok=True)
        return failed
    u("link_generation")(p, gen)
    old_sock, old_pidfile = u("generation_paths")(p, old)
    plan["draining"] = u("read_pid")(old_pidfile)
    u("stop_supervisord")(old_sock, old_pidfile, wait=False)
    return {}


def _fmt(failed):
    return ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))


def _describe(cfg, plan, dry):
    name, sha = cfg["name"], plan["sha"]
    if not plan["changes"]:
        return f"Deployment {name} is at {sha[:12]} ({cfg['rev']}) and running"
    verb = "would be" if dry else "was"
    parts = []
    changes = plan["changes"]
    if "release" in changes:
        parts.append(f"release {verb} switched to {sha[:12]} ({cfg['rev']})")
    if changes.get("virtualenv") and plan["build_venv"]:
        parts.append(f"virtualenv {verb} built")
    if "supervisord" in changes:
        parts.append(f"supervisord {verb} started")
    if "programs" in changes:
        parts.append(
            f"programs {verb} updated: " + "; ".join(f"{k} {', '.join(v)}" for k, v in changes["programs"].items())
        )
    if plan.get("draining"):
        parts.append(f"the previous programs finish their tasks in the background (pid {plan['draining']})")
    if "sysfiles" in changes:
        parts.append(f"sysfiles {verb} updated")
    if "secrets" in changes:
        parts.append(f"{', '.join(changes['secrets'])} {verb} written")
    return f"Deployment {name}: " + "; ".join(parts or [f"configuration {verb} updated"])


def _mine_send():
    """Tell the master at once (mine and grains cache) what changed, for fleet.inventory."""
    try:
        __salt__["mine.send"]("deployment.status")
        __salt__["saltutil.refresh_grains"](refresh_pillar=False)
    except Exception:  # pylint: disable=broad-except
        log.debug("updating the mine or grains after a change failed", exc_info=True)
