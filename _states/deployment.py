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
only once its checkout and virtualenv are complete; the programs then restart
gracefully (SIGTERM, up to ``stopwaitsecs``). If they do not come up, the
previous release is switched back in. Pillar is validated first: a mistake
fails the state with a message naming the key and the fix, and nothing on the
host changes.
"""

import logging
import shutil
import time
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
        _apply(settings, cfg, plan)
    except Exception as exc:  # pylint: disable=broad-except
        if not _is_ours(exc):
            log.exception("deployment.present %s failed", name)
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
        raise _u("error")("\n".join(errors))
    conf = sources["conf"]
    current = u("current_release")(p["project"])

    changes = {}
    plan = {"paths": p, "manifest": manifest, "current": current, "conf": conf, "sysfiles": files}
    secrets = u("write_git_secrets")(cfg, test=True)
    if secrets:
        changes["secrets"] = secrets

    # The revision: decided without git when pillar pins the SHA that serves.
    if current and cfg["rev"] == current == manifest.get("release") and _release_ok(p, current):
        sha, digest = current, manifest.get("venv")
    else:
        sha, digest = _resolve(cfg, test, plan)
    plan["sha"], plan["digest"] = sha, digest
    plan["new_release"] = sha != current or not _release_ok(p, sha)
    if plan["new_release"]:
        changes["release"] = {"old": current, "new": sha}
    venv = p["venvs"] / digest
    plan["build_venv"] = not u("venv_complete")(venv)
    if plan["build_venv"] or digest != manifest.get("venv"):
        changes["virtualenv"] = {"old": manifest.get("venv"), "new": digest}

    old_conf = p["conf"].read_text() if p["conf"].exists() else None
    plan["conf_changed"] = old_conf != conf
    running = u("supervisord_running")(p["socket"])
    plan["running"] = running
    diff = u("diff_groups")(old_conf if running else None, conf)
    plan["diff"] = diff
    programs = {}
    if not running:
        changes["supervisord"] = {"old": "stopped", "new": "running"}
    else:
        for key in ("added", "changed", "removed"):
            if diff[key]:
                programs[key] = diff[key]
        if plan["new_release"] and diff["kept"]:
            programs["restarted"] = diff["kept"]
        elif not plan["conf_changed"]:
            idle = sorted({i["group"] for i in u("process_info")(p["socket"]) if i["statename"] != "RUNNING"})
            if idle:
                programs["started"] = idle
    if programs:
        changes["programs"] = programs
    if plan["conf_changed"] and running and not programs:
        changes["supervisord_conf"] = "rewritten"
    sys_changes = u("diff_sysfiles")(name, files, root)
    if sys_changes:
        changes["sysfiles"] = sys_changes
    plan["changes"] = changes
    return plan


def _release_ok(p, sha):
    release = p["releases"] / sha
    return (release / ".git" / "saltfleet-complete").exists()


def _resolve(cfg, test, plan):
    """Resolve rev to a SHA and the digest of its requirements."""
    u = _u
    if not test:
        # The real run needs the key before it can reach a private repo.
        u("write_git_secrets")(cfg)
    with u("repo_view")(cfg, test) as (view_cfg, repo):
        sha = u("resolve")(view_cfg, repo)
        show = u("show_file")
        digest = u("requirements_digest")(lambda rel: show(repo, sha, rel, view_cfg), cfg)
    return sha, digest


def _apply(settings, cfg, plan):
    u = _u
    p, sha, name = plan["paths"], plan["sha"], cfg["name"]
    for folder in (p["state"], p["logs"]):
        u("makedirs")(folder, cfg["user"], 0o700 if folder == p["state"] else 0o755)
    if plan["new_release"] or plan["build_venv"]:
        _build_release(settings, cfg, plan)

    if plan["conf_changed"]:
        u("write_atomic")(p["conf"], plan["conf"], 0o600, cfg["user"])
    previous = plan["current"]
    if plan["new_release"]:
        u("link_atomic")(p["project"], Path(p["releases"].name) / sha)

    failed = _run_programs(settings, cfg, plan)
    if failed and plan["new_release"] and previous and _release_ok(p, previous):
        u("link_atomic")(p["project"], Path(p["releases"].name) / previous)
        still = u("restart_groups")(p["socket"], sorted(u("groups_of")(plan["conf"])))
        _mark_failed(p["releases"] / sha, f"programs did not start: {_fmt(failed)}")
        raise _u("error")(
            f"deployments:{name}: release {sha[:12]} did not start ({_fmt(failed)}; see {p['logs']}); "
            f"rolled back to {previous[:12]}"
            + (f", which did not start either: {_fmt(still)}" if still else ", which keeps serving")
        )
    if failed:
        raise _u("error")(f"deployments:{name}: programs not RUNNING: {_fmt(failed)}; see {p['logs']}")

    u("apply_sysfiles")(name, plan["sysfiles"], settings["root"])
    history = [r for r in plan["manifest"].get("history", []) if r != sha] + [sha]
    history = _prune(cfg, p, history)
    record = {
        "name": name,
        "user": cfg["user"],
        "repo": cfg["repo"],
        "rev": cfg["rev"],
        "release": sha,
        "venv": plan["digest"],
        "history": history,
    }
    if {k: plan["manifest"].get(k) for k in record} != record:
        record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        u("write_manifest")(p["manifest"], record)


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
        link = release / "venv"
        target = Path("..") / ".." / p["venvs"].name / plan["digest"]
        if not link.is_symlink() or Path(link.readlink()) != target:
            u("link_atomic")(link, target)
        (release / ".git" / "saltfleet-failed").unlink(missing_ok=True)
        (release / ".git" / "saltfleet-complete").write_text(plan["digest"] + "\n")
        u("chown_tree")(release, cfg["user"])
    except Exception as exc:
        _mark_failed(release, str(exc))
        raise


def _mark_failed(release, why):
    git_dir = Path(release) / ".git"
    if git_dir.is_dir():
        (git_dir / "saltfleet-complete").unlink(missing_ok=True)
        (git_dir / "saltfleet-failed").write_text(why + "\n")


def _venv_of(p, sha):
    link = p["releases"] / sha / "venv"
    try:
        return Path(link.readlink()).name
    except OSError:
        return None


def _run_programs(settings, cfg, plan):
    """Start supervisord or bring its programs to the new config and release; return failures."""
    u = _u
    p, diff = plan["paths"], plan["diff"]
    if not plan["running"]:
        u("start_supervisord")(cfg, settings)
        return u("wait_running")(p["socket"])
    touched = set()
    if plan["conf_changed"]:
        u("apply_group_changes")(p["socket"], diff)
        touched |= set(diff["added"]) | set(diff["changed"])
    restart = diff["kept"] if plan["new_release"] else plan["changes"].get("programs", {}).get("started", [])
    u("restart_groups")(p["socket"], restart)
    touched |= set(restart)
    return u("wait_running")(p["socket"], names=touched) if touched else {}


def _prune(cfg, p, history):
    """Keep the newest keep_releases releases (the serving one among them) and their venvs."""
    keep = history[-cfg["keep_releases"] :]
    for sha in history[: -cfg["keep_releases"]]:
        shutil.rmtree(p["releases"] / sha, ignore_errors=True)
    # A release that failed to build stays for inspection until it is retried.
    used = {_venv_of(p, sha) for sha in keep}
    if p["venvs"].is_dir():
        for venv in p["venvs"].iterdir():
            if venv.name not in used:
                shutil.rmtree(venv, ignore_errors=True)
    return keep


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
    if "sysfiles" in changes:
        parts.append(f"sysfiles {verb} updated")
    if "secrets" in changes:
        parts.append(f"{', '.join(changes['secrets'])} {verb} written")
    return f"Deployment {name}: " + "; ".join(parts or [f"configuration {verb} updated"])


def _mine_send():
    try:
        __salt__["mine.send"]("deployment.status")
    except Exception:  # pylint: disable=broad-except
        log.debug("mine.send deployment.status failed", exc_info=True)
