"""
Converge saltfleet deployments: a Git checkout of an app at a revision, a
virtualenv built from its requirements, the deployment's build steps, its
own supervisord running its programs, and its sysfiles (cron.d and the like).

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

Each state reads as its steps: pillar validated (a mistake fails it naming
the key and the fix, before anything changes), the context read once and the
plan computed once (saltfleet_plan; a dry run returns it), then done: the
release built as the user (saltfleet_build), the programs handed over
(saltfleet_handover), the sysfiles installed. A failure reports what was done.
"""

import contextlib
import logging

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
    "saltfleet_build.build",
    "saltfleet_celery.per_generation",
    "saltfleet_git.write_secrets",
    "saltfleet_handover.apply",
    "saltfleet_manifest.read",
    "saltfleet_paths.paths",
    "saltfleet_plan.decide",
    "saltfleet_schema.validate_deployment",
    "saltfleet_supervisor.serving",
    "saltfleet_supervisor_conf.render",
    "saltfleet_sysfiles.check",
    "saltfleet_user.account",
    "saltfleet_venv.digest",
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


def _failed(ret, name, exc, done=None):
    """The state's return for an error, with what was already changed: Salt's own errors as they read."""
    if isinstance(exc, CommandExecutionError):
        comment = str(exc)
        if not comment.startswith(("deployments:", "saltfleet:", "deployments ")):
            comment = f"deployments:{name}: {comment}"
    else:
        log.exception("deployment %s failed", name)
        comment = f"deployments:{name}: {type(exc).__name__}: {exc} (the minion log has the traceback)"
    ret.update(result=False, comment=comment, changes=dict(done or {}))
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
    ret, test = _ret(name), bool(__opts__["test"])
    outcome = __utils__["saltfleet_handover.outcome"]()
    try:
        overrides = {k: v for k, v in kwargs.items() if not k.startswith("__") and k not in STATE_ARGS}
        settings, cfg = _config(name, overrides)
        ctx = __utils__["saltfleet_plan.context"](
            settings, cfg, _pillar_rev(name), "rev" in overrides, __pillar__.get("saltfleet_revs"), __opts__["id"]
        )
        with _locked(ctx.p, f"state deployment.present {name}", test):
            # Read under the lock: no other run adds a generation meanwhile.
            secrets = __utils__["saltfleet_supervisor.secrets"](ctx.p, ctx.cfg["env"])
            with __utils__["saltfleet_user.hiding"](secrets):
                plan = _plan(ctx, test)
                if plan.changes and not test:
                    _apply(ctx, plan, outcome)
    except Exception as exc:  # pylint: disable=broad-except
        return _failed(ret, name, exc, outcome.done)
    ret["changes"] = plan.changes
    ret["comment"] = __utils__["saltfleet_plan.describe"](ctx, plan, test, outcome.drain_pid)
    # Salt's output shows warnings even where it shows no comment (state_output: changes, terse).
    warnings = ([f"deployments:{name}: {ctx.pinned}"] if ctx.pinned else []) + outcome.warnings
    if warnings:
        ret["warnings"] = warnings
    if test:
        ret["result"] = None if plan.changes else True
    elif plan.changes:
        _tell()
    return ret


def _pillar_rev(name):
    deployments = __pillar__.get("deployments")
    spec = deployments.get(name) if isinstance(deployments, dict) else None
    return spec.get("rev", "HEAD") if isinstance(spec, dict) else None


def _plan(ctx, test):
    """What the host runs, what pillar asks (its sources rendered for the commit it names), and the plan."""
    sha, digest, written = __utils__["saltfleet_plan.resolve"](ctx, test)
    sections, files = __utils__["saltfleet_sources.deployment"](_master(), ctx.cfg, ctx.p, sha, digest)
    boot, entry = __utils__["saltfleet_supervisor_conf.boot_entry"](ctx.cfg, ctx.p)
    files[boot] = entry
    errors = __utils__["saltfleet_sysfiles.check"](ctx.name, files, ctx.settings["root"])
    if errors:
        raise CommandExecutionError("\n".join(errors))
    asked = __utils__["saltfleet_plan.asked"](ctx, sha, digest, sections, files, written)
    return __utils__["saltfleet_plan.decide"](ctx, __utils__["saltfleet_plan.on_host"](ctx), asked)


def _apply(ctx, plan, outcome):
    """The plan, done: each step that completes is noted in ``outcome`` (what a failure reports)."""
    user, p, done = ctx.user, ctx.p, outcome.done
    if plan.asked.secrets:
        __utils__["saltfleet_git.write_secrets"](ctx.cfg, __utils__["saltfleet_git.secrets_of"](p))
        done["secrets"] = plan.changes["secrets"]
    __utils__["saltfleet_build.user_dirs"](ctx)
    if not ctx.manifest:
        # Known from here on (deployment.list, grains, absent), even if its first start fails.
        __utils__["saltfleet_handover.record"](ctx, release=None, venv=None, history=[])
    for path in [p["mirror"], *plan.host.ungranted]:
        if path.exists():
            __utils__["saltfleet_files.readable_by"](path, ctx.uid)
    if plan.host.ungranted:
        done["permissions"] = plan.changes["permissions"]
    if plan.asked.build_release or plan.asked.build_venv:
        __utils__["saltfleet_build.build"](ctx, plan)
        done["built"] = {"release": plan.release, "virtualenv": plan.digest}
    for gen in plan.host.orphans:
        # An interrupted apply left it taking work beside the serving one: it drains like any old generation.
        __utils__["saltfleet_supervisor.shutdown"](__utils__["saltfleet_paths.generation"](p, gen)["socket"], ctx.uid)
    if plan.host.orphans:
        done["generations"] = plan.changes["generations"]
    __utils__["saltfleet_handover.apply"](ctx, plan, outcome)
    if "sysfiles" in plan.changes:
        __utils__["saltfleet_sysfiles.apply"](ctx.name, plan.asked.sysfiles, ctx.settings["root"])
        done["sysfiles"] = plan.changes["sysfiles"]
    # The configs of generations that serve or drain stay (a drain's tells which workers it waits for).
    keep = {plan.gen, plan.host.serving, *__utils__["saltfleet_handover.draining"](plan)}
    __utils__["saltfleet_supervisor.prune_confs"](p, keep)
    if plan.prune:
        __utils__["saltfleet_user.remove"](user, p["home"], *plan.prune)
        done["pruned"] = plan.changes["pruned"]


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
    ret, test = _ret(name), bool(__opts__["test"])
    try:
        settings = _settings()
        purge = settings["purge_removed"] if purge is None else purge
        with __utils__["saltfleet_removal.locked"](settings["root"], name, test) as removal:
            changes = removal.plan(purge)
            if changes and not test:
                removal.remove(purge)
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


def _tell(always=False):
    """
    Tell the master what changed (saltfleet_report), unless a
    ``deployment.reported`` state of this run does it once for all (as the
    fleet SLS has; ``always``: that state itself). A failure is logged: the
    heartbeat tells the master within a minute. Returns the comment to give.
    """
    try:
        chunks = __lowstate__  # pylint: disable=undefined-variable
    except NameError:
        chunks = []
    reporter = ("deployment", "reported")
    if not always and any(isinstance(c, dict) and (c.get("state"), c.get("fun")) == reporter for c in chunks):
        return None
    try:
        told = __utils__["saltfleet_report.tell_master"](__salt__, __opts__)
    except Exception as exc:  # pylint: disable=broad-except
        log.warning("telling the master what changed failed", exc_info=True)
        return f"The master was not told what changed ({exc}); the heartbeat will tell it"
    return "The master was told what changed (mine and grains)" if told else "No master to tell (salt-call --local)"


def reported(name):
    """
    Tell the master now what this host runs (the mine's
    ``deployment.status`` and the grains cache), once, after the deployments
    changed: give it ``onchanges`` on their states, as the fleet SLS does. In
    a run without one, each deployment state that changed tells the master
    itself.

    .. code-block:: yaml

        saltfleet-report:
          deployment.reported:
            - name: saltfleet
            - onchanges:
              - deployment: deployment-daily-fetcher
    """
    if __opts__["test"]:
        return {**_ret(name), "result": None, "comment": "The master would be told what changed"}
    return {**_ret(name), "comment": _tell(always=True)}


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
    return {**_ret(name), "result": not errors, "comment": "\n".join(errors) or "saltfleet pillar is valid"}


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
    ret, test = _ret(name), bool(__opts__["test"])
    try:
        root = _settings()["root"]
        files = __utils__["saltfleet_sources.sysfiles"](_master(), name, {"name": name})
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
    """(host settings, deployment config) from pillar with ``overrides`` on top, validated: every error at once."""
    host, errors = __utils__["saltfleet_schema.validate_host"](__pillar__.get("saltfleet"), _default_root())
    deployments = __pillar__.get("deployments") or {}
    spec = deployments.get(name) if isinstance(deployments, dict) else None
    if spec is None and not overrides:
        errors.append(f"deployments:{name}: not in this minion's pillar; assign it in pillar/top.sls")
        raise CommandExecutionError("\n".join(errors))
    cfg, more = __utils__["saltfleet_schema.validate_deployment"](name, dict(spec or {}, **overrides), host)
    shared = None if more else __utils__["saltfleet_schema.shared_user"](name, cfg["user"], deployments, host)
    errors.extend([*more, *([shared] if shared else [])])
    if errors:
        raise CommandExecutionError("\n".join(errors))
    return host, cfg


@contextlib.contextmanager
def _locked(p, holder, test):
    """The deployment's lock: exclusive for a change, shared for a dry run; none before its first install."""
    if test and not p["lock"].exists():
        yield
        return
    if not test:
        __utils__["saltfleet_plan.root_dirs"](p)
    with __utils__["saltfleet_files.lock"](p["lock"], holder, shared=test):
        yield


# ------------------------------------------------------------------ sources


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


def _master():
    """The master's file server as saltfleet_sources reads it: this run's listing, files, the Jinja renderer."""

    def listing(prefix):
        found = __context__.get(LISTING)
        if found is None:
            found = __salt__["cp.list_master"](prefix=prefix)
        return [path for path in found if path.startswith(prefix)]

    def render(text, context):
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
            raise CommandExecutionError(str(out.get("data")))
        return out["data"].decode() if isinstance(out["data"], bytes) else out["data"]

    cache_time = __opts__.get("fileserver_list_cache_time", 20)
    return __utils__["saltfleet_sources.master"](listing, __salt__["cp.get_file_str"], render, cache_time)
