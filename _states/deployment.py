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

A new revision is checked out (as the deployment's user) into its own release
directory and its virtualenv built; its programs then start under a second
supervisord beside the serving one. Only once they are RUNNING does the new
release serve (manifest, ``supervisord.conf`` and ``Projects-<name>`` links),
and the old programs get SIGTERM and finish their tasks (up to
``stopwaitsecs``) in the background. ``handover: stop-first`` stops the old
programs first instead, and puts the old config back if the new ones do not
start. Pillar is validated first: a mistake fails the state with a message
naming the key and the fix, and nothing on the host changes.
"""

import contextlib
import logging
import time
from pathlib import Path

import salt.utils.path
import salt.utils.templates
from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "deployment"

# Pillar keys a state may override with its own arguments (``rev`` for deployment.update_code).
STATE_ARGS = ("fun", "state", "order", "name")
# Where mod_init leaves the master's listing of deployments/ for the run's states.
LISTING = "saltfleet.deployments_listing"
# One function of each utils module a deployment state uses (the loader loads a module by a function).
PRELOAD = (
    "saltfleet_celery.per_generation",
    "saltfleet_files.read_manifest",
    "saltfleet_git.write_secrets",
    "saltfleet_paths.paths",
    "saltfleet_schema.validate_deployment",
    "saltfleet_supervisor.serving",
    "saltfleet_supervisor_conf.render",
    "saltfleet_sysfiles.check",
    "saltfleet_user.account",
    "saltfleet_venv.complete",
)


def __virtual__():
    if not salt.utils.path.which("git"):
        return False, "deployment states need git on the minion's PATH"
    try:
        import supervisor  # noqa: F401  pylint: disable=unused-import
    except ImportError:
        return False, "deployment states need supervisor installed beside Salt (pip install supervisor)"
    if "saltfleet_schema.validate" not in __utils__:
        return False, "saltfleet's _utils are not synced: run saltutil.sync_all"
    return __virtualname__


def _ret(name):
    return {"name": name, "result": True, "changes": {}, "comment": ""}


def _failed(ret, name, exc):
    """The state's return for an error: Salt's own errors as they read, anything else with its traceback logged."""
    if isinstance(exc, CommandExecutionError):
        comment = str(exc)
        if not comment.startswith(("deployments:", "saltfleet:", "deployments ")):
            comment = f"deployments:{name}: {comment}"
    else:
        log.exception("deployment %s failed", name)
        comment = f"deployments:{name}: {type(exc).__name__}: {exc} (the minion log has the traceback)"
    ret.update(result=False, comment=comment, changes={})
    return ret


# ------------------------------------------------------------------- states


def present(name, **kwargs):
    """
    Ensure deployment ``name`` runs as pillar ``deployments:<name>`` says.

    name
        The deployment, a key of pillar ``deployments``.

    Any other keyword (``repo``, ``rev``, ``programs``, ...) overrides that
    key of the deployment's pillar, for SLS files that manage a deployment
    without pillar.

    .. code-block:: yaml

        deployment-daily-fetcher:
          deployment.present:
            - name: daily-fetcher
    """
    ret = _ret(name)
    test = bool(__opts__["test"])
    try:
        settings, cfg = _config(
            name, {k: v for k, v in kwargs.items() if not k.startswith("__") and k not in STATE_ARGS}
        )
        _check_tools(settings, cfg)
        p = __utils__["saltfleet_paths.paths"](settings["root"], cfg["user"], name)
        with _locked(p, f"state deployment.present {name}", test):
            pinned = _pinned(cfg, __utils__["saltfleet_files.read_manifest"](p), "rev" in kwargs)
            plan = _plan(settings, cfg, p, test)
            plan["pinned"] = pinned
            if plan["changes"] and not test:
                _apply(settings, cfg, p, plan)
    except Exception as exc:  # pylint: disable=broad-except
        return _failed(ret, name, exc)
    ret["changes"] = plan["changes"]
    ret["comment"] = _describe(cfg, plan, dry=test)
    warnings = ([f"deployments:{name}: {pinned}"] if pinned else []) + plan.get("warnings", [])
    if warnings:
        ret["warnings"] = warnings
    if test:
        ret["result"] = None if plan["changes"] else True
    elif plan["changes"]:
        _tell()
    return ret


def _check_tools(settings, cfg):
    """Refuse, before any change, a tool root would run that is not root's alone."""
    for tool in ("uv", "supervisord"):
        __utils__["saltfleet_files.trusted_tool"](tool, settings[tool])
    if cfg["python"].startswith("/"):
        __utils__["saltfleet_files.check_trusted"](cfg["python"], f"deployments:{cfg['name']}:python")


def absent(name, purge=None):
    """
    Ensure deployment ``name`` is not running: its supervisord stopped (its
    programs gracefully), its sysfiles, config and secrets removed. With
    ``purge`` (default: pillar ``saltfleet:purge_removed``) its releases,
    virtualenvs and logs go too.

    .. code-block:: yaml

        deployment-old-fetcher:
          deployment.absent:
            - name: old-fetcher
            - purge: true
    """
    ret = _ret(name)
    test = bool(__opts__["test"])
    try:
        settings = _settings()
        purge = settings["purge_removed"] if purge is None else purge
        changes = _remove(settings["root"], name, purge, test)
    except Exception as exc:  # pylint: disable=broad-except
        return _failed(ret, name, exc)
    ret["changes"] = changes
    if not changes:
        ret["comment"] = f"Deployment {name} is not installed"
    elif test:
        ret.update(result=None, comment=f"Deployment {name} would be removed")
    else:
        ret["comment"] = f"Deployment {name} removed"
        _tell()
    return ret


def _tell():
    """
    Tell the master what changed, unless a ``deployment.reported`` state of
    this run does it once for all (as the fleet SLS has): ``state.single``
    and SLS files without one tell it for each deployment that changed.
    """
    try:
        chunks = __lowstate__  # pylint: disable=undefined-variable
    except NameError:
        chunks = []
    if any(isinstance(c, dict) and (c.get("state"), c.get("fun")) == ("deployment", "reported") for c in chunks):
        return
    try:
        __salt__["deployment.report"]()
    except Exception:  # pylint: disable=broad-except
        # What changed is done; the heartbeat tells the master within a minute.
        log.warning("telling the master what changed failed", exc_info=True)


def reported(name):
    """
    Tell the master now what this host runs (``deployment.report``: the
    mine's ``deployment.status`` and the grains cache), once, after the
    deployments changed: give it ``onchanges`` on their states, as the fleet
    SLS does. In a run without one, each deployment state that changed tells
    the master itself.

    .. code-block:: yaml

        saltfleet-report:
          deployment.reported:
            - name: saltfleet
            - onchanges:
              - deployment: deployment-daily-fetcher
    """
    ret = _ret(name)
    if __opts__["test"]:
        return {**ret, "result": None, "comment": "The master would be told what changed"}
    try:
        told = __salt__["deployment.report"]()
    except Exception as exc:  # pylint: disable=broad-except
        # What changed is done; the heartbeat tells the master within a minute.
        log.warning("telling the master what changed failed", exc_info=True)
        return {**ret, "comment": f"The master was not told what changed ({exc}); the heartbeat will tell it"}
    if not told:
        return {**ret, "comment": "No master to tell (salt-call --local)"}
    return {**ret, "comment": "The master was told what changed (mine and grains)"}


def pillar_valid(name):
    """
    Fail, changing nothing, when this minion's saltfleet pillar breaks the
    schema; the comment lists every error with its key and fix.

    .. code-block:: yaml

        saltfleet-pillar:
          deployment.pillar_valid:
            - name: saltfleet
    """
    _, _, errors = __utils__["saltfleet_schema.validate"](dict(__pillar__), _default_root())
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

    .. code-block:: yaml

        saltfleet-common-sysfiles:
          deployment.sysfiles:
            - name: common
    """
    ret = _ret(name)
    test = bool(__opts__["test"])
    try:
        root = _settings()["root"]
        files = _sysfile_sources(name, {"name": name})
        errors = __utils__["saltfleet_sysfiles.check"](name, files, root)
        if errors:
            raise CommandExecutionError("\n".join(errors))
        changes = __utils__["saltfleet_sysfiles.diff"](name, files, root)
        if changes and not test:
            __utils__["saltfleet_sysfiles.apply"](name, files, root)
    except Exception as exc:  # pylint: disable=broad-except
        return _failed(ret, name, exc)
    if changes:
        ret.update(changes={"sysfiles": changes}, result=None if test else True)
        ret["comment"] = f"Sysfiles of {name} {'would be ' if test else ''}updated"
    else:
        ret["comment"] = f"Sysfiles of {name} are in place"
    return ret


# ------------------------------------------------------------------- config


def _default_root():
    return __opts__.get("root_dir") or "/"


def _settings():
    host, errors = __utils__["saltfleet_schema.validate_host"](__pillar__.get("saltfleet"), _default_root())
    if errors:
        raise CommandExecutionError("\n".join(errors))
    return host


def _config(name, overrides):
    """(host settings, deployment config) from pillar with ``overrides`` on top, validated."""
    host, errors = __utils__["saltfleet_schema.validate_host"](__pillar__.get("saltfleet"), _default_root())
    deployments = __pillar__.get("deployments") or {}
    spec = deployments.get(name) if isinstance(deployments, dict) else None
    if spec is None and not overrides:
        errors.append(f"deployments:{name}: not in this minion's pillar; assign it in pillar/top.sls")
        raise CommandExecutionError("\n".join(errors))
    cfg, more = __utils__["saltfleet_schema.validate_deployment"](name, dict(spec or {}, **overrides), host)
    errors.extend(more)
    if errors:
        raise CommandExecutionError("\n".join(errors))
    return host, cfg


def _pinned(cfg, manifest, asked):
    """
    The rev an operator set with deployment.update_code or rollback, which
    wins over pillar's until pillar says the same (or deployment.unpin): the
    returned note says so, for the state's comment and its warnings (which
    Salt's state output shows even when it shows no comment of an unchanged
    state, as ``state_output: changes`` or ``terse`` do). ``asked``: the
    state was given a rev itself.
    """
    pin = (manifest.get("operator") or {}).get("rev")
    if not pin or asked or pin["value"] == cfg["rev"]:
        return None
    note = (
        f"rev '{pin['value']}' set by {pin['by']} at {pin['at']} is kept, though pillar says '{cfg['rev']}' "
        f"(`salt {__opts__['id']} deployment.unpin {cfg['name']}` follows pillar again)"
    )
    cfg["rev"] = pin["value"]
    return note


@contextlib.contextmanager
def _locked(p, holder, test):
    """The deployment's lock: exclusive for a change, shared for a dry run; none before its first install."""
    if test and not p["lock"].exists():
        yield
        return
    if not test:
        _root_dirs(p)
    with __utils__["saltfleet_files.lock"](p["lock"], holder, shared=test):
        yield


def _root_dirs(p):
    files = "saltfleet_files"
    __utils__[f"{files}.root_dir"](p["state"].parent, 0o755)
    __utils__[f"{files}.root_dir"](p["state"], 0o711)


# ------------------------------------------------------------------ sources


def _context(cfg, p, project, venv):
    """What a deployment's templates see: its paths, env, and pillar ``context`` keys."""
    context = dict(cfg.get("context") or {})
    context.update(
        name=cfg["name"],
        user=cfg["user"],
        home=str(p["home"]),
        project_dir=str(project),
        venv=str(venv),
        log_dir=str(p["logs"]),
        env=dict(cfg.get("env") or {}),
        context=dict(cfg.get("context") or {}),
    )
    return context


def mod_init(low):  # pylint: disable=unused-argument
    """
    Once per state run, before its first deployment state (and so before any
    runs in a process of its own): the master's files under ``deployments/``,
    in one request, for every deployment state of the run.
    """
    __context__[LISTING] = __salt__["cp.list_master"](prefix="deployments/")
    # Loaded here, once: each parallel state's process inherits them instead of loading its own.
    for util in PRELOAD:
        __utils__[util]  # pylint: disable=pointless-statement
    return True


def _listing(prefix):
    """The master's files under ``prefix``: this run's listing, or the master's own outside a state run."""
    listing = __context__.get(LISTING)
    if listing is None:
        listing = __salt__["cp.list_master"](prefix=prefix)
    return [path for path in listing if path.startswith(prefix)]


def _sources(cfg, p, sha, digest):
    """
    The program sections of a release (template rendered with that release's
    own paths, so a new generation runs the new code) and the deployment's
    sysfiles (rendered with the ``Projects-<name>`` link's paths).
    """
    name = cfg["name"]
    prefix = f"deployments/{name}/"
    release = __utils__["saltfleet_paths.release"](p, sha)
    venv = __utils__["saltfleet_paths.venv"](p, digest)
    sections = {}
    template = cfg.get("supervisord_conf")
    if not template:
        for candidate in ("files/supervisord.conf.jinja", "files/supervisord.conf"):
            if prefix + candidate in _listing(prefix):
                template = f"salt://{prefix}{candidate}"
                break
    if template:
        text = _fetch(template, name, "supervisord_conf")
        if template.endswith(".jinja"):
            text = _render(text, _context(cfg, p, release, venv), name, template)
        sections.update(__utils__["saltfleet_supervisor_conf.template_sections"](text, name, template))
    for section, opts in __utils__["saltfleet_supervisor_conf.pillar_sections"](cfg).items():
        if section in sections:
            raise CommandExecutionError(
                f"deployments:{name}:programs:{section.split(':', 1)[1]}: also defined in {template}; keep one"
            )
        sections[section] = opts
    if not sections:
        raise CommandExecutionError(
            f"deployments:{name}:programs: the deployment runs nothing: set pillar programs or ship "
            f"deployments/{name}/files/supervisord.conf(.jinja). If you added that file a moment ago: "
            "the master lists its files from a cache up to fileserver_list_cache_time seconds old "
            "(20 by default); `salt-run fileserver.clear_file_list_cache` refreshes it, then apply again"
        )
    files = _sysfile_sources(name, _context(cfg, p, p["project"], p["project"] / "venv"))
    return sections, files


def _sysfile_sources(name, context):
    """The files of ``deployments/<name>/sysfiles/`` as {path under root: bytes}; ``*.jinja`` rendered."""
    prefix = f"deployments/{name}/sysfiles/"
    found = {}
    for path in sorted(_listing(prefix)):
        rel = path[len(prefix) :]
        text = _fetch(f"salt://{path}", name, "sysfiles")
        if rel.endswith(".jinja"):
            rel = rel.removesuffix(".jinja")
            text = _render(text, context, name, path)
        found[rel] = text.encode()
    return found


def _fetch(url, name, key):
    text = __salt__["cp.get_file_str"](url)
    if text is False or text is None:
        raise CommandExecutionError(f"deployments:{name}:{key}: {url} not found on the master's file server")
    return text


def _render(text, context, name, source):
    out = salt.utils.templates.TEMPLATE_REGISTRY["jinja"](
        text,
        from_str=True,
        to_str=True,
        context=context,
        saltenv=__opts__.get("saltenv") or "base",
        grains=__grains__,
        pillar=__pillar__,
        salt=__salt__,
        opts=__opts__,
    )
    if not out.get("result"):
        raise CommandExecutionError(f"deployments:{name}: rendering {source} failed: {out.get('data')}")
    data = out["data"]
    return data.decode() if isinstance(data, bytes) else data


# --------------------------------------------------------------------- plan


def _plan(settings, cfg, p, test):
    """
    Everything present() would change, found by the code path that makes the
    change: git is asked through a throwaway view in test mode, the rest is
    compared with what is on the host.
    """
    sup = "saltfleet_supervisor"
    account = __utils__["saltfleet_user.account"](cfg["user"], f"deployments:{cfg['name']}")
    manifest = __utils__["saltfleet_files.read_manifest"](p)
    plan = {"uid": account.pw_uid, "gid": account.pw_gid, "manifest": manifest, "current": manifest.get("release")}
    changes = {}
    secrets = __utils__["saltfleet_git.write_secrets"](cfg, __utils__["saltfleet_git.secrets_of"](p), test=True)
    if secrets:
        changes["secrets"] = secrets

    operator = manifest.get("operator") or {}
    plan["rebuild"] = operator.get("venv_rebuild", 0)
    sha, digest = _resolve(cfg, p, manifest, test, plan["rebuild"])
    sections, files = _sources(cfg, p, sha, digest)
    plan["holds"] = holds = operator.get("holds") or {}
    for section, opts in sections.items():
        program = section.partition(":")[2]
        if section.startswith(("program:", "fcgi-program:", "eventlistener:")) and (program in holds or "*" in holds):
            # Held by an operator: supervisord neither starts it now nor after a reboot.
            opts["autostart"] = "false"
    boot, entry = __utils__["saltfleet_supervisor_conf.boot_entry"](cfg, p)
    files[boot] = entry
    errors = __utils__["saltfleet_sysfiles.check"](cfg["name"], files, settings["root"])
    if errors:
        raise CommandExecutionError("\n".join(errors))
    release = __utils__["saltfleet_paths.release"](p, sha)
    venv = __utils__["saltfleet_paths.venv"](p, digest)
    plan.update(sha=sha, digest=digest, release=release, venv=venv, sections=sections, sysfiles=files)
    plan["build_release"] = not _release_ok(release)
    plan["build_venv"] = not __utils__["saltfleet_venv.complete"](venv)
    if sha != plan["current"] or plan["build_release"]:
        changes["release"] = {"old": plan["current"], "new": sha}
    elif plan["current"] and manifest.get("rev") != cfg["rev"]:
        # The serving release is what rev names now (a pin dropped, a rev naming the same commit): recorded,
        # so grains and the inventory say which rev the host follows.
        changes["rev"] = {"old": manifest.get("rev"), "new": cfg["rev"]}
    if digest != manifest.get("venv") or plan["build_venv"]:
        changes["virtualenv"] = {"old": manifest.get("venv"), "new": digest}
    # The programs move to another release or venv: a new generation takes over.
    plan["switch"] = sha != plan["current"] or digest != manifest.get("venv")

    serving = __utils__[f"{sup}.serving"](p)
    draining = manifest.get("draining") or {}
    gens = __utils__[f"{sup}.generations"](p, plan["uid"], draining)
    plan["running"] = running = serving is not None and gens.get(serving, {}).get("state") == "RUNNING"
    plan["serving"], plan["serving_info"] = serving, gens.get(serving)
    # Not serving, yet taking work: left by an apply that was interrupted. It drains now.
    # So is a drain whose drainer should have finished long ago.
    plan["orphans"] = {
        g: i
        for g, i in gens.items()
        if g != serving and (i["state"] == "RUNNING" or (i.get("answering") and i.get("until", 0) < time.time()))
    }
    plan["draining"] = {g: i for g, i in gens.items() if g != serving and g not in plan["orphans"]}
    if plan["orphans"]:
        changes["generations"] = {"stopped": sorted(i["pid"] for i in plan["orphans"].values())}

    old_conf = _read(__utils__["saltfleet_paths.generation"](p, serving)["conf"]) if serving else None
    plan["old_conf"] = old_conf
    plan["env_changed"] = running and _env_changes(settings, cfg, p, serving, changes)
    # supervisord holds the env in its own environment: a new env, a new supervisord.
    plan["switch"] = plan["switch"] or plan["env_changed"]
    if not running:
        plan["gen"] = serving if serving and serving not in gens else __utils__[f"{sup}.free_generation"](p, gens)
        changes["supervisord"] = {"old": "stopped", "new": "running"}
    elif plan["switch"] and (cfg["handover"] == "overlap" or plan["env_changed"]):
        plan["gen"] = __utils__[f"{sup}.free_generation"](p, gens)
    else:
        plan["gen"] = serving
    # Celery workers get node names of their generation: two generations never share one.
    plan["workers"] = __utils__["saltfleet_celery.per_generation"](sections, plan["gen"])
    plan["conf"] = __utils__["saltfleet_supervisor_conf.render"](cfg, sections, p, plan["gen"], release, venv)
    if running:
        programs = _program_changes(p, plan)
        if programs:
            changes["programs"] = programs
        elif old_conf != plan["conf"]:
            changes["supervisord_conf"] = "rewritten"
    sys_changes = __utils__["saltfleet_sysfiles.diff"](cfg["name"], files, settings["root"])
    if sys_changes:
        changes["sysfiles"] = sys_changes

    # Root's files only this deployment's user may read (its mirror, its configs), where others still can.
    generation = __utils__["saltfleet_paths.generation"]
    shared = [p["mirror"], *(generation(p, gen)["conf"] for gen in __utils__[f"{sup}.known_generations"](p))]
    plan["grants"] = [path for path in shared if not __utils__["saltfleet_files.granted"](path, plan["uid"])]
    if plan["grants"]:
        changes["permissions"] = [f"{path}: readable by {cfg['user']} alone" for path in plan["grants"]]
    plan["history"], plan["prune"] = _retention(cfg, p, plan)
    if plan["prune"]:
        changes["pruned"] = [str(path) for path in plan["prune"]]
    plan["changes"] = changes
    return plan


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _env_changes(settings, cfg, p, serving, changes):
    """
    True when the serving supervisord runs with another env (or supervisord)
    than pillar's: the names of the variables that differ go to ``changes``,
    never their values.
    """
    conf = "saltfleet_supervisor_conf"
    old = _read(__utils__["saltfleet_paths.generation"](p, serving)["boot"])
    if old == __utils__[f"{conf}.boot_script"](cfg, settings, p, serving):
        return False
    before = __utils__[f"{conf}.boot_env"](old or "")
    after = {k: str(v) for k, v in cfg["env"].items()}
    names = sorted(k for k in {*before, *after} - {"PATH", "LANG"} if before.get(k) != after.get(k))
    changes["env"] = names or ["supervisord"]
    return True


def _release_ok(release):
    return (release / ".git" / "saltfleet-complete").exists()


def _program_changes(p, plan):
    """What happens to the serving programs: groups added, changed, removed, restarted (new release) or started."""
    paths = __utils__["saltfleet_paths.generation"]
    old, new = plan["manifest"], plan
    # Groups that differ only by their release, venv or generation are the same program restarted.
    same = [
        (f"{text}{gen}{end}", f"{text}{end}")
        for gen in (plan["serving"], plan["gen"])
        for text, end in (("/", ".sock"), (".g", "@"), (".g", ".log"))
    ]
    if old.get("release"):
        same += [(str(__utils__["saltfleet_paths.release"](p, old["release"])), "@release@")]
    if old.get("venv"):
        same += [(str(__utils__["saltfleet_paths.venv"](p, old["venv"])), "@venv@")]
    same += [(str(new["release"]), "@release@"), (str(new["venv"]), "@venv@")]
    diff = __utils__["saltfleet_supervisor_conf.diff_groups"](plan["old_conf"], plan["conf"], same)
    programs = {key: diff[key] for key in ("added", "changed", "removed") if diff[key]}
    held, was = set(plan["holds"]), set(old.get("held") or {})
    if held != was and diff["changed"]:
        groups = set(diff["changed"])
        for key, names in (("held", held - was), ("released", was - held)):
            named = sorted(groups if "*" in names else groups & names)
            if named:
                programs[key] = named
                groups -= set(named)
        programs = {k: v for k, v in programs.items() if k != "changed"}
        if groups:
            programs["changed"] = sorted(groups)
    if plan["switch"] and diff["kept"]:
        programs["restarted"] = diff["kept"]
    elif not plan["switch"]:
        sock = paths(p, plan["serving"])["socket"]
        idle = [g for g in __utils__["saltfleet_supervisor.idle_groups"](sock, plan["uid"]) if g in diff["kept"]]
        if idle:
            programs["started"] = idle
    return programs


def _resolve(cfg, p, manifest, test, rebuild=0):
    """
    The SHA pillar's rev names and the digest of its virtualenv's inputs,
    from the cheapest facts that decide them: a pinned SHA that already serves
    needs no git; a branch needs one ls-remote; only a commit not seen before
    is fetched and has its requirements read.
    """
    git = "saltfleet_git"
    same_inputs = (
        manifest.get("venv")
        and all(manifest.get(k) == cfg[k] for k in ("requirements", "python"))
        and manifest.get("rebuild", 0) == rebuild
    )
    current = manifest.get("release")
    fleet_sha = _fleet_resolution(cfg).get("sha")
    if (
        same_inputs
        and current in (cfg["rev"], fleet_sha)
        and _release_ok(__utils__["saltfleet_paths.release"](p, current))
    ):
        return current, manifest["venv"]
    secrets = __utils__[f"{git}.secrets_of"](p)
    if not test:
        # The real run needs the key before it can reach a private repo.
        _root_dirs(p)
        __utils__[f"{git}.write_secrets"](cfg, secrets)
    with __utils__[f"{git}.view"](cfg, p["mirror"], secrets, test) as (repo, view_secrets):
        sha = __utils__[f"{git}.resolve"](cfg, repo, view_secrets, fleet_sha)
        if same_inputs and sha == current:
            return sha, manifest["venv"]
        read_file = __utils__[f"{git}.read_file"]
        read = lambda rel: read_file(repo, sha, rel, cfg, view_secrets)  # noqa: E731
        return sha, __utils__["saltfleet_venv.digest"](read, cfg, rebuild)


def _fleet_resolution(cfg):
    """{sha, at}: the commit the master resolved rev to for this wave (ext_pillar saltfleet_revs), if it applies."""
    known = (__pillar__.get("saltfleet_revs") or {}).get(cfg["name"]) or {}
    return known if (known.get("repo"), known.get("rev")) == (cfg["repo"], cfg["rev"]) else {}


def _rev_note(cfg, sha):
    """What rev is, for a comment: the branch or tag, and where it resolved to the commit."""
    known = _fleet_resolution(cfg)
    if known.get("sha") == sha:
        return f"{cfg['rev']}, which the master resolved to {sha[:12]} at {known.get('at')}"
    return cfg["rev"]


def _retention(cfg, p, plan):
    """
    The history to record (newest last, each release with its venv) and the release
    and venv directories to delete: only names saltfleet made (commit SHAs in
    its history, venv digests), never through a symlink, and none that a
    draining generation still runs.
    """
    history = plan["manifest"].get("history") or []
    entry = next((h for h in history if h["release"] == plan["sha"] and h.get("venv") == plan["digest"]), None)
    history = [h for h in history if h["release"] != plan["sha"]]
    history.append(entry or {"release": plan["sha"], "venv": plan["digest"]})
    keep = history[-cfg["keep_releases"] :]
    busy = [*keep, *plan["draining"].values(), *plan["orphans"].values()]
    if plan["running"] and plan["switch"] and cfg["handover"] == "overlap":
        busy.append(plan["manifest"])  # it drains after this apply
    spared = {h.get("release") for h in busy}
    used = {h.get("venv") for h in busy}
    plain = __utils__["saltfleet_user.plain_path"]
    prune = [
        p["releases"] / h["release"]
        for h in history
        if h["release"] not in spared and (p["releases"] / h["release"]).is_dir()
    ]
    if p["venvs"].is_dir() and not p["venvs"].is_symlink():
        prune += sorted(v for v in p["venvs"].iterdir() if len(v.name) == 16 and v.name not in used and v.is_dir())
    # A release spared only while it drains stays in the history, so a later apply prunes it.
    history = [h for h in history if h in keep or h["release"] in spared]
    return history, [path for path in prune if plain(p["home"], path)]


# -------------------------------------------------------------------- apply


def _apply(settings, cfg, p, plan):
    user, files = cfg["user"], "saltfleet_files"
    if "secrets" in plan["changes"]:
        __utils__["saltfleet_git.write_secrets"](cfg, __utils__["saltfleet_git.secrets_of"](p))
    _user_dirs(cfg, p, plan)
    if not plan["manifest"]:
        # Known from here on (deployment.list, grains, absent), even if its first start fails.
        _record(cfg, p, {"release": None, "venv": None, "history": []})
        plan["manifest"] = __utils__[f"{files}.read_manifest"](p)
    for path in [p["mirror"], *plan["grants"]]:
        if path.exists():
            __utils__[f"{files}.readable_by"](path, plan["uid"])
    if plan["build_release"] or plan["build_venv"]:
        _build(settings, cfg, p, plan)
    for gen in plan["orphans"]:
        # An interrupted apply left it taking work beside the serving one: it drains like any old generation.
        __utils__["saltfleet_supervisor.shutdown"](_socket(p, gen), plan["uid"])
    if not plan["running"]:
        _start(settings, cfg, p, plan)
    elif plan["switch"] and cfg["handover"] == "overlap":
        _overlap(settings, cfg, p, plan)
    elif plan["env_changed"]:
        _renew(settings, cfg, p, plan)
    elif plan["switch"] or "programs" in plan["changes"] or "supervisord_conf" in plan["changes"]:
        _in_place(cfg, p, plan)
    else:
        _record(cfg, p, {"draining": _draining(plan)})
    __utils__["saltfleet_sysfiles.apply"](cfg["name"], plan["sysfiles"], settings["root"])
    # The configs of generations that serve or drain stay (a drain's tells which workers it waits for).
    __utils__["saltfleet_supervisor.prune_confs"](p, {plan["gen"], plan["serving"], *_draining(plan)})
    if plan["prune"]:
        __utils__["saltfleet_user.remove"](user, p["home"], *plan["prune"])


def _fault(p, point):
    __utils__["saltfleet_files.fault_point"](p["root"], point)


def _socket(p, gen):
    return __utils__["saltfleet_paths.generation"](p, gen)["socket"]


def _user_dirs(cfg, p, plan):
    """The user's home (root hands it over when missing), their deployment dirs, and root's run/ for them."""
    files = "saltfleet_files"
    if not p["home"].exists():
        __utils__[f"{files}.root_dir"](p["home"].parent, 0o755, enforce=False)
        __utils__[f"{files}.user_dir"](p["home"], plan["uid"], plan["gid"], 0o755)
    __utils__[f"{files}.user_dir"](p["run"], plan["uid"], plan["gid"], 0o700)
    missing = [p[key] for key in ("releases", "venvs", "logs") if not p[key].is_dir()]
    if missing:
        __utils__["saltfleet_user.makedirs"](cfg["user"], p["home"], *missing)


def _build(settings, cfg, p, plan):
    """As the user: check out the release and build its venv; a failure leaves it marked, never serving."""
    user, release = cfg["user"], plan["release"]
    write = __utils__["saltfleet_user.write"]
    try:
        if plan["build_release"]:
            __utils__["saltfleet_git.clone_release"](user, p, release, plan["sha"], cfg["repo"])
        _fault(p, "build")
        if plan["build_venv"]:
            __utils__["saltfleet_venv.build"](cfg, settings, p["home"], plan["venv"], release)
        # ~/Projects-<name>/venv, as the seed's users know it.
        __utils__["saltfleet_user.relink"](
            user, p["home"], release / "venv", Path("..") / ".." / p["venvs"].name / plan["digest"]
        )
        __utils__["saltfleet_user.remove"](user, p["home"], release / ".git" / "saltfleet-failed")
        write(user, p["home"], release / ".git" / "saltfleet-complete", plan["digest"])
    except Exception as exc:
        if (release / ".git").is_dir():
            __utils__["saltfleet_user.remove"](user, p["home"], release / ".git" / "saltfleet-complete")
            write(user, p["home"], release / ".git" / "saltfleet-failed", str(exc)[:2000])
        raise


def _write_conf(p, plan, gen, text):
    """Root's, readable by the deployment's user alone: supervisord rereads it as the user. It holds no env."""
    conf = __utils__["saltfleet_paths.generation"](p, gen)["conf"]
    __utils__["saltfleet_files.write_atomic"](conf, text, 0o600, reader=plan["uid"])


def _write_generation(settings, cfg, p, plan, gen):
    """A new generation's config, and its boot script (root's alone: it holds the env)."""
    _write_conf(p, plan, gen, plan["conf"])
    boot = __utils__["saltfleet_paths.generation"](p, gen)["boot"]
    script = __utils__["saltfleet_supervisor_conf.boot_script"](cfg, settings, p, gen)
    __utils__["saltfleet_files.write_atomic"](boot, script, 0o700)


def _serve(cfg, p, plan, gen, draining):
    """
    The switch, once the new programs run: the manifest says what serves (the
    one fact every reader and the next apply trust), then the links follow.
    """
    # What the release is to people (the fleet page, the grains): its commit's subject, read once per release.
    subject = plan["manifest"].get("subject") if plan["sha"] == plan["current"] else None
    if subject is None:
        secrets = __utils__["saltfleet_git.secrets_of"](p)
        subject = __utils__["saltfleet_git.subject"](p["mirror"], plan["sha"], cfg, secrets)
    _record(
        cfg,
        p,
        {
            "release": plan["sha"],
            "subject": subject,
            "venv": plan["digest"],
            "rebuild": plan["rebuild"],
            "held": plan["holds"],
            "generation": gen,
            "history": plan["history"],
            "draining": draining,
        },
    )
    __utils__["saltfleet_supervisor.link_serving"](p, gen)
    __utils__["saltfleet_user.relink"](cfg["user"], p["home"], p["project"], Path(p["releases"].name) / plan["sha"])
    _fault(p, "switched")


def _draining(plan):
    return {
        g: {k: i[k] for k in ("pid", "start", "release", "venv", "until") if k in i}
        for g, i in {**plan["draining"], **plan["orphans"]}.items()
    }


def _start(settings, cfg, p, plan):
    """supervisord was not running: start it with the (new) release."""
    sup, gen = "saltfleet_supervisor", plan["gen"]
    _write_generation(settings, cfg, p, plan, gen)
    failed = {}
    try:
        __utils__[f"{sup}.start"](cfg, settings, p, gen, plan["uid"])
        failed = __utils__[f"{sup}.wait_running"](_socket(p, gen), plan["uid"])
    except CommandExecutionError as exc:
        failed = {"supervisord": str(exc)}
    if failed and plan["switch"] and plan["current"]:
        __utils__[f"{sup}.shutdown"](_socket(p, gen), plan["uid"])
        if plan["old_conf"] is not None and gen == plan["serving"]:
            _write_conf(p, plan, gen, plan["old_conf"])
        raise CommandExecutionError(
            f"deployments:{cfg['name']}: release {plan['sha'][:12]} did not start ({_fmt(failed)}; see {p['logs']}); "
            f"{plan['current'][:12]} stays the recorded release"
        )
    _serve(cfg, p, plan, gen, _draining(plan))
    if failed:
        raise CommandExecutionError(f"deployments:{cfg['name']}: programs not RUNNING: {_fmt(failed)}; see {p['logs']}")


def _overlap(settings, cfg, p, plan):
    """
    Start the new release under a new generation while the serving one goes
    on. Once its programs are RUNNING the new generation serves and the old
    one is told to stop: its programs get SIGTERM and finish their tasks (up to
    stopwaitsecs) in the background. If they do not start, the new generation
    is stopped and nothing was switched: the old programs never stopped.
    """
    sup, gen, uid = "saltfleet_supervisor", plan["gen"], plan["uid"]
    _write_generation(settings, cfg, p, plan, gen)
    try:
        started = __utils__[f"{sup}.start"](cfg, settings, p, gen, uid)
        failed = __utils__[f"{sup}.wait_running"](_socket(p, gen), uid)
    except CommandExecutionError as exc:
        started, failed = None, {"supervisord": str(exc)}
    if not failed and plan["workers"]:
        try:
            missing = __utils__["saltfleet_celery.wait_ready"](cfg, p, plan["release"], plan["venv"], plan["workers"])
        except CommandExecutionError as exc:
            missing = {"celery": str(exc)}
        failed = {node: f"Celery: {why}" for node, why in missing.items()}
    _fault(p, "started")
    if failed:
        __utils__[f"{sup}.shutdown"](_socket(p, gen), uid)
        if started:
            __utils__[f"{sup}.wait_exited"]({gen: started}, 60)
        __utils__["saltfleet_paths.generation"](p, gen)["conf"].unlink(missing_ok=True)
        raise CommandExecutionError(
            f"deployments:{cfg['name']}: release {plan['sha'][:12]} did not start ({_fmt(failed)}; see {p['logs']}); "
            f"{(plan['current'] or '')[:12]} keeps serving: its programs never stopped"
        )
    old, old_info = plan["serving"], plan["serving_info"]
    draining = _draining(plan)
    old_sections = __utils__["saltfleet_supervisor_conf.sections_of"](plan["old_conf"])
    seconds = _stop_seconds(plan["old_conf"])
    if old_info:
        draining[old] = {
            "pid": old_info["pid"],
            "start": old_info["start"],
            "release": plan["current"],
            "venv": plan["manifest"].get("venv"),
        }
        plan["drain_pid"] = old_info["pid"]
    _serve(cfg, p, plan, gen, draining)
    if old_info and _drain(cfg, p, plan, old_sections, seconds):
        # A drainer took it over. Until this is recorded (a kill just before), the
        # next apply finds it answering and stops it; after, it does once overdue.
        draining[old]["until"] = time.time() + seconds + 120
        _record(cfg, p, {"draining": draining})
    else:
        __utils__[f"{sup}.shutdown"](_socket(p, old), uid)
    _fault(p, "signalled")


def _drain(cfg, p, plan, old_sections, seconds):
    """
    Hand the old generation to a drainer when it runs Celery workers: they stop
    consuming now, and supervisord is told to stop once they hold no task
    (within ``seconds``). False when there is nothing for Celery to drain.
    """
    old = __utils__["saltfleet_celery.workers_in"](old_sections)
    if not old or not plan["current"]:
        return False
    release = __utils__["saltfleet_paths.release"](p, plan["current"])
    venv = __utils__["saltfleet_paths.venv"](p, plan["manifest"].get("venv"))
    warnings = plan.setdefault("warnings", [])
    try:
        sock = _socket(p, plan["serving"])
        unconfirmed = __utils__["saltfleet_celery.drain"](cfg, p, release, venv, old, sock, seconds)
    except CommandExecutionError as exc:
        # The new release serves already; the old workers still stop on SIGTERM.
        warnings.append(f"deployments:{cfg['name']}: the old workers were sent SIGTERM without a drain: {exc}")
        return False
    if unconfirmed:
        warnings.append(
            f"deployments:{cfg['name']}: {', '.join(unconfirmed)} did not confirm they stopped consuming; "
            "they stop once their tasks are done"
        )
    return True


def _renew(settings, cfg, p, plan):
    """
    A stop-first handover to a new supervisord (the env changed, and
    supervisord holds it): the serving one stops with its programs (each
    finishes its task in hand, up to stopwaitsecs), then the new generation
    starts; if its programs do not, the old generation starts again.
    """
    sup, uid, old = "saltfleet_supervisor", plan["uid"], plan["serving"]
    __utils__[f"{sup}.shutdown"](_socket(p, old), uid)
    if plan["serving_info"]:
        __utils__[f"{sup}.wait_exited"]({old: plan["serving_info"]}, _stop_seconds(plan["old_conf"]) + 30)
    try:
        _start(settings, cfg, p, plan)
    except CommandExecutionError:
        __utils__[f"{sup}.start"](cfg, settings, p, old, uid)
        raise


def _stop_seconds(conf_text):
    """The longest stopwaitsecs of a config's programs: how long its supervisord may take to stop."""
    sections = __utils__["saltfleet_supervisor_conf.sections_of"](conf_text)
    return max([int(o.get("stopwaitsecs", 600)) for s, o in sections.items() if s.startswith("program:")] or [0])


def _in_place(cfg, p, plan):
    """
    Bring the serving supervisord to the new config: a config change touches
    only the groups that changed; a stop-first handover stops the old programs,
    then starts the new ones, and puts the old config back if they fail.
    """
    sup, gen, uid = "saltfleet_supervisor", plan["gen"], plan["uid"]
    sock = _socket(p, gen)
    diff = __utils__["saltfleet_supervisor_conf.diff_groups"](plan["old_conf"], plan["conf"])
    started = plan["changes"].get("programs", {}).get("started", [])
    _write_conf(p, plan, gen, plan["conf"])
    try:
        __utils__[f"{sup}.apply_group_changes"](sock, uid, diff)
        __utils__[f"{sup}.start_groups"](sock, uid, started)
        failed = __utils__[f"{sup}.wait_running"](sock, uid, groups={*diff["added"], *diff["changed"], *started})
    except CommandExecutionError as exc:
        failed = {"supervisord": str(exc)}
    if failed and plan["old_conf"] is not None:
        _write_conf(p, plan, gen, plan["old_conf"])
        back = __utils__["saltfleet_supervisor_conf.diff_groups"](plan["conf"], plan["old_conf"])
        try:
            __utils__[f"{sup}.apply_group_changes"](sock, uid, back)
            still = __utils__[f"{sup}.wait_running"](sock, uid, groups={*back["added"], *back["changed"]})
        except CommandExecutionError as exc:
            still = {"supervisord": str(exc)}
        what = f"release {plan['sha'][:12]}" if plan["switch"] else "the new config"
        raise CommandExecutionError(
            f"deployments:{cfg['name']}: {what} did not start ({_fmt(failed)}; see {p['logs']}); "
            "the previous config was put back"
            + (f", and its programs did not start either: {_fmt(still)}" if still else ", and its programs serve")
        )
    if plan["switch"]:
        _serve(cfg, p, plan, gen, _draining(plan))
    else:
        _record(cfg, p, {"generation": gen, "held": plan["holds"], "draining": _draining(plan)})
    if failed:
        raise CommandExecutionError(f"deployments:{cfg['name']}: programs not RUNNING: {_fmt(failed)}; see {p['logs']}")


def _record(cfg, p, fields):
    """Update the deployment's manifest (root's) when what it says changed."""
    old = __utils__["saltfleet_files.read_manifest"](p)
    record = dict(old)
    record.update(
        name=cfg["name"],
        user=cfg["user"],
        repo=cfg["repo"],
        rev=cfg["rev"],
        requirements=cfg["requirements"],
        python=cfg["python"],
        **fields,
    )
    operator = record.get("operator") or {}
    if (
        (operator.get("rev") or {}).get("value")
        == cfg["rev"]
        == (__pillar__.get("deployments") or {}).get(cfg["name"], {}).get("rev")
    ):
        # Pillar caught up with the operator's rev: pillar leads again.
        record["operator"] = {k: v for k, v in operator.items() if k != "rev"}
    if record != old:
        record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for entry in record.get("history") or []:
            entry.setdefault("deployed", record["updated"])
        __utils__["saltfleet_files.write_manifest"](p, record)


# ------------------------------------------------------------------- remove


def _remove(root, name, purge, test):
    """Stop deployment ``name`` and remove its sysfiles, config, secrets and record (with ``purge`` its trees)."""
    manifest = __utils__["saltfleet_files.installed"](root).get(name)
    if not manifest:
        return {}
    user = manifest["user"]
    p = __utils__["saltfleet_paths.paths"](root, user, name)
    uid = __utils__["saltfleet_user.account"](user, f"deployments:{name}").pw_uid
    changes = {}
    with _locked(p, f"state deployment.absent {name}", test):
        running = __utils__["saltfleet_supervisor.generations"](p, uid, manifest.get("draining"))
        if running:
            changes["supervisord"] = {"old": "running", "new": "stopped"}
        sysfiles_changes = __utils__["saltfleet_sysfiles.diff"](name, {}, root)
        if sysfiles_changes:
            changes["sysfiles"] = sysfiles_changes
        plain = __utils__["saltfleet_user.plain_path"]
        trees = [
            p[k] for k in ("project", "releases", "venvs", "logs") if purge and (p[k].exists() or p[k].is_symlink())
        ]
        trees = [t for t in trees if plain(p["home"], t, link=t == p["project"])]
        changes["removed"] = [str(p["state"]), *map(str, trees)]
        if test:
            return changes
        __utils__["saltfleet_supervisor.stop_all"](p, uid, manifest.get("draining"))
        __utils__["saltfleet_sysfiles.apply"](name, {}, root)
        __utils__["saltfleet_user.remove"](user, p["home"], *trees)
        __utils__["saltfleet_user.remove_own_dir"](user, p["home"], p["run"])
        __utils__["saltfleet_files.remove_root_tree"](p["state"], last="manifest.json")
    return changes


# ----------------------------------------------------------------- describe


def _fmt(failed):
    return ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))


def _describe(cfg, plan, dry):
    name, sha = cfg["name"], plan["sha"]
    changes = plan["changes"]
    notes = [plan["pinned"]] if plan.get("pinned") else []
    notes += [f"{p} held: {h.get('reason') or 'no reason given'}" for p, h in sorted(plan["holds"].items())]
    notes = "".join(f"; {n}" for n in notes).replace("* held", "all programs held")
    if not changes:
        return f"Deployment {name} is at {sha[:12]} ({_rev_note(cfg, sha)}) and running{notes}"
    verb = "would be" if dry else "was"
    # The same for a plural subject (programs, sysfiles, old releases).
    verbs = "would be" if dry else "were"
    parts = []
    if "release" in changes:
        parts.append(f"release {verb} switched to {sha[:12]} ({_rev_note(cfg, sha)})")
    if "rev" in changes:
        parts.append(f"rev {verb} recorded as {cfg['rev']}: it names {sha[:12]}, which serves already")
    if "virtualenv" in changes and plan["build_venv"]:
        parts.append(f"virtualenv {verb} built")
    if "supervisord" in changes:
        parts.append(f"supervisord {verb} started")
    if "programs" in changes:
        parts.append(
            f"programs {verbs} updated: " + "; ".join(f"{k} {', '.join(v)}" for k, v in changes["programs"].items())
        )
    if "generations" in changes:
        pids = ", ".join(map(str, changes["generations"]["stopped"]))
        parts.append(f"supervisord {pids} left by an interrupted apply {verb} stopped")
    if plan.get("drain_pid"):
        parts.append(f"the previous programs finish their tasks in the background (pid {plan['drain_pid']})")
    if "sysfiles" in changes:
        parts.append(f"sysfiles {verbs} updated")
    if "secrets" in changes:
        parts.append(f"{', '.join(changes['secrets'])} {verbs if len(changes['secrets']) > 1 else verb} written")
    if "pruned" in changes:
        parts.append(f"{len(changes['pruned'])} old release(s) and venv(s) {verbs} pruned")
    return f"Deployment {name}: " + "; ".join(parts or [f"configuration {verb} updated"]) + notes
