"""
Look at and drive the saltfleet deployments on a host: what the old Fabric
tasks did, through Salt. Every function that changes something takes the
deployment's lock, so it never interleaves with a ``state.apply``; code and
virtualenv changes go through the ``deployment.present`` state itself.

.. code-block:: bash

    salt 'worker-*' deployment.status
    salt 'worker-7' deployment.restart daily-fetcher
    salt 'worker-7' deployment.update_code daily-fetcher v2.3
    salt 'worker-7' deployment.hold daily-fetcher reason='db maintenance'
    salt 'worker-7' deployment.run daily-fetcher python manage.py migrate
"""

import concurrent.futures
import contextlib
import contextvars
import logging
import re
import shlex
import time

import salt.utils.args
import salt.utils.data
from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "deployment"
__func_alias__ = {"list_": "list"}


def __virtual__():
    if "saltfleet_schema.validate" not in __utils__:
        return False, "saltfleet's _utils are not synced: run saltutil.sync_all"
    return __virtualname__


def _root():
    return __utils__["saltfleet_schema.host_root"](__pillar__, __opts__)


def _hint(command):
    """``command`` as the operator types it on the master, for this host: `salt <id> <command>`."""
    return f"`salt {__opts__['id']} {command}`"


def _installed(name):
    """(paths, manifest, uid) of an installed deployment; a clear error when it is not installed."""
    root = _root()
    manifest = __utils__["saltfleet_manifest.installed"](root).get(name)
    if not manifest:
        raise CommandExecutionError(
            f"deployment {name} is not installed on this host; {_hint('deployment.list')} shows those that are"
        )
    p = __utils__["saltfleet_paths.paths"](root, manifest["user"], name)
    uid = __utils__["saltfleet_user.account"](manifest["user"], f"deployments:{name}").pw_uid
    return p, manifest, uid


def _answering_socket(p, uid):
    """The serving generation's supervisord socket, when that supervisord answers; else None."""
    gen = __utils__["saltfleet_supervisor.serving"](p)
    sock = __utils__["saltfleet_paths.generation"](p, gen)["socket"] if gen else None
    return sock if sock and __utils__["saltfleet_supervisor.answers"](sock, uid) else None


def _serving_socket(name, p, uid):
    sock = _answering_socket(p, uid)
    if not sock:
        raise CommandExecutionError(
            f"deployment {name}: its supervisord is not running; {_hint(f'deployment.start {name}')} starts it"
        )
    return sock


def _stop_timeout(p):
    """How long the serving programs may take to stop, as root's config gives them."""
    return __utils__["saltfleet_supervisor_conf.stop_seconds"](p["conf"].read_text())


@contextlib.contextmanager
def _changing(name, what):
    p, manifest, uid = _installed(name)
    with __utils__["saltfleet_files.lock"](p["lock"], f"deployment.{what} {name}"):
        with __utils__["saltfleet_user.hiding"](_secrets(name, p)):
            yield p, manifest, uid


def validate():
    """
    Check this host's pillar against saltfleet's schema; return the errors
    (an empty list when all is well).

    CLI Example:

    .. code-block:: bash

        salt '*' deployment.validate
    """
    _, _, errors = __utils__["saltfleet_schema.validate"](dict(__pillar__), __opts__.get("root_dir") or "/")
    return errors


def settled(name):
    """
    True when deployment ``name`` serves what this host's pillar asks (repo,
    rev as pinned or the commit the master resolved it to for this wave, and
    its virtualenv's inputs), so no build is needed: the fleet SLS then checks
    it in the job's own process instead of starting one for it. The plan of
    ``deployment.present`` takes the same predicate.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.settled daily-fetcher
    """
    manifest = __utils__["saltfleet_manifest.installed"](_root()).get(name)
    host, _ = __utils__["saltfleet_schema.validate_host"](__pillar__.get("saltfleet"), __opts__.get("root_dir") or "/")
    spec = (__pillar__.get("deployments") or {}).get(name) if isinstance(__pillar__.get("deployments"), dict) else None
    if not manifest or not isinstance(spec, dict):
        return False
    cfg, errors = __utils__["saltfleet_schema.validate_deployment"](name, dict(spec), host)
    if errors:
        return False
    rev, _ = __utils__["saltfleet_manifest.wanted_rev"](manifest, cfg["rev"])
    known = (__pillar__.get("saltfleet_revs") or {}).get(name) or {}
    fleet = known.get("sha") if (known.get("repo"), known.get("rev")) == (cfg["repo"], rev) else None
    return __utils__["saltfleet_manifest.settled"](manifest, {**cfg, "rev": rev}, fleet)


def list_():
    """
    The deployments installed on this host (those saltfleet recorded).

    CLI Example:

    .. code-block:: bash

        salt '*' deployment.list
    """
    return sorted(__utils__["saltfleet_manifest.installed"](_root()))


def _status(root, name, manifest):
    p = __utils__["saltfleet_paths.paths"](root, manifest["user"], name)
    row = {
        "release": manifest.get("release"),
        "rev": manifest.get("rev"),
        "repo": manifest.get("repo"),
        "user": manifest.get("user"),
        "path": str(p["project"]),
        "supervisord": "stopped",
        "programs": {},
        "running": 0,
        "draining": [],
        "draining_tasks": {},
        "workers": {},
    }
    secrets = _secrets(name, p)
    try:
        with __utils__["saltfleet_user.hiding"](secrets):
            _answers(name, p, manifest, row)
    except Exception as exc:  # pylint: disable=broad-except
        # What the user's side answered fails this deployment's row, never the others'.
        if not isinstance(exc, CommandExecutionError):
            log.warning("deployment.status %s failed", name, exc_info=True)
        # Its text may quote an answer (saltfleet_xmlrpc.said hid the secrets first) or name what root read.
        row["supervisord"] = "unknown: " + __utils__["saltfleet_user.scrub"](str(exc), secrets)
    row["running"] = sum(1 for s in row["programs"].values() if s == "RUNNING")
    holds = __utils__["saltfleet_manifest.intent"](manifest).holds
    row["held"] = {p: h.get("reason") for p, h in holds.items()}
    pin = (manifest.get("operator") or {}).get("rev")
    # The rev an operator set (update_code, rollback), kept over pillar's until deployment.unpin.
    row["pinned"] = {"rev": pin.get("value"), "by": pin.get("by"), "at": pin.get("at")} if pin else None
    held = {p for p in row["programs"] if "*" in holds or p.split(":")[0] in holds}
    down = sorted(f"{p} {s}" for p, s in row["programs"].items() if s != "RUNNING" and p not in held)
    if row["supervisord"] != "running":
        row["state"], row["summary"] = "down", f"down: supervisord {row['supervisord']}"
    else:
        row["state"] = "down" if down else "up"
        row["summary"] = f"{row['state']}: {row['running']}/{len(row['programs'])} RUNNING"
        row["summary"] += "".join(f"; {d}" for d in down) + (f"; {len(held)} held" if held else "")
    return row


def _answers(name, p, manifest, row):
    """What the deployment's supervisords and Celery workers answer, into its status ``row``."""
    sup = "saltfleet_supervisor"
    uid = __utils__["saltfleet_user.account"](manifest["user"]).pw_uid
    serving = __utils__[f"{sup}.serving"](p)
    gens = __utils__[f"{sup}.generations"](p, uid, manifest.get("draining"))
    if gens.get(serving, {}).get("state") == "RUNNING":
        sock = __utils__["saltfleet_paths.generation"](p, serving)["socket"]
        infos = __utils__[f"{sup}.process_info"](sock, uid)
        row["programs"] = {__utils__[f"{sup}.proc_name"](i): i["statename"] for i in infos}
        row["supervisord"] = "running"
        row["workers"] = _workers(name, p, manifest, serving)
    row["draining"] = sorted(i["pid"] for g, i in gens.items() if g != serving)
    row["draining_tasks"] = _draining_tasks(name, p, manifest, {g: i for g, i in gens.items() if g != serving})


def _env(name):
    """The deployment's env in pillar."""
    deployments = __pillar__.get("deployments")
    spec = deployments.get(name) if isinstance(deployments, dict) else None
    env = spec.get("env") if isinstance(spec, dict) else None
    return env if isinstance(env, dict) else {}


def _run_env(name, p, gen):
    """The env generation ``gen`` runs with (root's env file, as its supervisord sourced it), else pillar's."""
    env = __utils__["saltfleet_supervisor.generation_env"](p, gen)
    return _env(name) if env is None else env


def _secrets(name, p):
    """What the deployment's output must not show: its env in pillar and each kept generation's."""
    return __utils__["saltfleet_supervisor.secrets"](p, _env(name))


def _celery_spec(name, manifest, p, gen):
    return {"name": name, "user": manifest["user"], "env": _run_env(name, p, gen)}


def _workers(name, p, manifest, gen):
    """{node: {queues, active}} of the serving generation's Celery workers ({} when it runs none)."""
    conf = __utils__["saltfleet_paths.generation"](p, gen)["conf"]
    sections = __utils__["saltfleet_supervisor_conf.sections_of"](conf.read_text())
    workers = __utils__["saltfleet_celery.workers_in"](sections)
    if not workers or not manifest.get("release"):
        return {}
    release = __utils__["saltfleet_paths.release"](p, manifest["release"])
    venv = __utils__["saltfleet_paths.venv"](p, manifest["venv"])
    try:
        spec = _celery_spec(name, manifest, p, gen)
        return __utils__["saltfleet_celery.serving"](spec, p, release, venv, workers)
    except CommandExecutionError as exc:
        return {"error": str(exc)}


def _draining_tasks(name, p, manifest, draining):
    """{supervisord pid: Celery tasks still in hand} of the draining generations whose workers still answer."""
    found = {}
    for gen, info in draining.items():
        conf = __utils__["saltfleet_paths.generation"](p, gen)["conf"]
        if not info.get("answering") or not info.get("release") or not conf.exists():
            continue
        workers = __utils__["saltfleet_celery.workers_in"](
            __utils__["saltfleet_supervisor_conf.sections_of"](conf.read_text())
        )
        if workers:
            release = __utils__["saltfleet_paths.release"](p, info["release"])
            venv = __utils__["saltfleet_paths.venv"](p, info["venv"])
            spec = _celery_spec(name, manifest, p, gen)
            counts = __utils__["saltfleet_celery.active"](spec, p, release, venv, workers)
            found[info["pid"]] = sum(counts.values())
    return found


def status(name=None):
    """
    Release, supervisord and program states of the installed deployments
    (or of ``name``), asked of each deployment's own supervisord: ``state``
    up or down and a one-line ``summary``, ``held`` programs with their
    reasons, ``pinned``, the rev an operator set (``update_code``,
    ``rollback``) that ``state.apply`` keeps over pillar's, and ``draining``,
    the supervisords of earlier releases still finishing their tasks. The
    job fails (retcode 1) when a program that should run does not.

    CLI Example:

    .. code-block:: bash

        salt '*' deployment.status
        salt 'worker-7' deployment.status daily-fetcher
    """
    root = _root()
    manifests = __utils__["saltfleet_manifest.installed"](root)
    if name is not None:
        if name not in manifests:
            raise CommandExecutionError(
                f"deployment {name} is not installed on this host; {_hint('deployment.list')} shows those that are"
            )
        manifests = {name: manifests[name]}
    # Each deployment asks its own supervisord and Celery workers: all at once, each in the loader's context.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(manifests)))) as pool:
        futures = {n: pool.submit(contextvars.copy_context().run, _status, root, n, m) for n, m in manifests.items()}
        rows = {n: future.result() for n, future in futures.items()}
    if any(row["state"] == "down" for row in rows.values()):
        # So `salt -b`, scripts and monitoring can act on it.
        __context__["retcode"] = 1
    return rows


def report():
    """
    Tell the master now what this host runs, rather than at its next
    heartbeat: the mine's ``deployment.status`` (what ``fleet.inventory``,
    ``fleet.queues`` and ``fleet.deploy`` read) and the grains cache (what
    ``-G 'saltfleet_deployments:NAME:*'`` matches). A change does this by
    itself: once per ``state.apply`` of the fleet SLS, once per
    ``deployment.present`` run without it (``state.single``, the verbs here).
    Returns False, doing nothing, under ``salt-call --local``: there is no master.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.report
    """
    return __utils__["saltfleet_report.tell_master"](__salt__, __opts__)


def task_events(name, watch, seconds=60, stop=False):
    """
    What this host's Celery workers of deployment ``name`` did with their
    tasks since watch ``watch`` began, per release: for each task name the
    tasks succeeded, failed and retried and a histogram of run times, from
    Celery's own task events (switched on for these nodes while the watch
    listens, off after). The first call of a watch starts its listeners, for
    ``seconds`` at most; ``stop=True`` ends them. Also each release's programs
    (state and pid), and the nodes that went offline. A rollout's analysis
    (``fleet.deploy`` with ``analyse`` steps) calls it; the broker must carry
    events (RabbitMQ, Redis: kombu's filesystem transport does not).

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.task_events daily-fetcher watch=look seconds=60
        salt 'worker-7' deployment.task_events daily-fetcher watch=look stop=True
    """
    p, manifest, uid = _installed(name)
    events = "saltfleet_taskevents"
    if salt.utils.data.is_true(stop):
        return {"stopped": __utils__[f"{events}.stop"](p, str(watch))}
    secrets = _secrets(name, p)
    # What supervisord and Celery answer (the user's side) goes to the master without the env.
    with __utils__["saltfleet_user.hiding"](secrets):
        return _task_events(name, p, manifest, uid, str(watch), int(seconds), secrets)


def _task_events(name, p, manifest, uid, watch, seconds, secrets):
    events, sup = "saltfleet_taskevents", "saltfleet_supervisor"
    serving = __utils__[f"{sup}.serving"](p)
    gens = __utils__[f"{sup}.generations"](p, uid, manifest.get("draining"))
    releases = {g: (manifest.get("release") if g == serving else i.get("release")) for g, i in gens.items()}
    apps = __utils__[f"{events}.nodes_by_release"](p, releases)
    if apps and manifest.get("release") and not __utils__[f"{events}.listening"](p, watch):
        release = __utils__["saltfleet_paths.release"](p, manifest["release"])
        venv = __utils__["saltfleet_paths.venv"](p, manifest["venv"])
        spec = _celery_spec(name, manifest, p, serving)
        __utils__[f"{events}.listen"](spec, p, watch, apps, release, venv, seconds, __opts__["id"])
    counted, offline, problems = __utils__[f"{events}.counted"](p, watch, apps, secrets)
    # A draining generation's workers go offline once their tasks are done: only the serving one's going is news.
    now_serving = __utils__[f"{events}.nodes_by_release"](p, {serving: releases.get(serving)})
    offline = [node for node in offline if any(node in nodes for nodes in now_serving.values())]
    # What supervisord answers (the user's side: names, refusals quoting it) goes to the master without the env.
    scrub = __utils__["saltfleet_user.scrub"]
    programs = {}
    for gen, release in releases.items():
        sock = __utils__["saltfleet_paths.generation"](p, gen)["socket"]
        if release and (gens[gen].get("state") == "RUNNING" or gens[gen].get("answering")):
            try:
                infos = __utils__[f"{sup}.process_info"](sock, uid)
            except CommandExecutionError as exc:
                problems.append(scrub(f"generation {gen}: {exc}"))
                continue
            into = programs.setdefault(release, {})
            name = __utils__[f"{sup}.proc_name"]
            into.update({scrub(name(i)): {"state": i["statename"], "pid": i["pid"]} for i in infos})
    return {"tasks": counted, "programs": programs, "offline": offline, "problems": problems}


def restart(name, program=None):
    """
    Restart a deployment's programs (or one program group) gracefully: SIGTERM,
    then up to ``stopwaitsecs`` for the tasks in hand to finish.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.restart daily-fetcher
        salt 'worker-7' deployment.restart daily-fetcher fetcher-instagram
    """
    with _changing(name, "restart") as (p, _, uid):
        sock = _serving_socket(name, p, uid)
        groups = _groups(name, sock, uid, program)
        failed = __utils__["saltfleet_supervisor.restart_groups"](sock, uid, groups, _stop_timeout(p))
    if failed:
        raise CommandExecutionError(
            f"deployment {name}: not RUNNING after the restart: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        )
    return {"restarted": groups}


def stop(name, program=None):
    """
    Stop a deployment's supervisord and its programs (gracefully), draining
    generations too; or, given ``program``, that program group alone. Returns
    the program groups stopped. ``deployment.start`` (or the next
    ``state.apply``) starts them again; ``deployment.hold`` keeps them stopped.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.stop daily-fetcher
        salt 'worker-7' deployment.stop daily-fetcher fetcher-instagram
    """
    sup = "saltfleet_supervisor"
    with _changing(name, "stop") as (p, manifest, uid):
        if program is None:
            sock = _answering_socket(p, uid)
            groups = _groups(name, sock, uid, None) if sock else []
            __utils__[f"{sup}.stop_all"](p, uid, manifest.get("draining"))
            return {"stopped": groups}
        sock = _serving_socket(name, p, uid)
        groups = _groups(name, sock, uid, program)
        __utils__[f"{sup}.stop_groups"](sock, uid, groups, _stop_timeout(p))
    return {"stopped": groups}


# ----------------------------------------------------------- more programs


def _groups(name, sock, uid, program):
    groups = sorted({i["group"] for i in __utils__["saltfleet_supervisor.process_info"](sock, uid)})
    if program is None:
        return groups
    if program not in groups:
        raise CommandExecutionError(f"deployment {name} has no program group {program!r}; it has: {', '.join(groups)}")
    return [program]


def start(name, program=None):
    """
    Start a deployment's programs (or one program group) that are stopped;
    after ``deployment.stop NAME``, its supervisord too, with the release and
    config it served (as the boot line does). A held program stays stopped:
    ``deployment.unhold`` first.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.start daily-fetcher
        salt 'worker-7' deployment.start daily-fetcher fetcher-instagram
    """
    sup = "saltfleet_supervisor"
    with _changing(name, "start") as (p, manifest, uid):
        held = __utils__["saltfleet_manifest.held"](manifest, program)
        if held:
            raise CommandExecutionError(
                f"deployment {name}: held ({held.get('reason') or 'no reason given'}); "
                f"{_hint(f'deployment.unhold {name}')} first"
            )
        if program is None and not _answering_socket(p, uid):
            _start_supervisord(name, p, manifest, uid)
        sock = _serving_socket(name, p, uid)
        groups = _groups(name, sock, uid, program)
        __utils__[f"{sup}.start_groups"](
            sock, uid, [g for g in groups if g in __utils__[f"{sup}.idle_groups"](sock, uid)]
        )
        failed = __utils__[f"{sup}.wait_running"](sock, uid, groups=set(groups))
    if failed:
        raise CommandExecutionError(f"deployment {name}: not RUNNING: {_fmt(failed)}")
    return {"running": groups}


def _start_supervisord(name, p, manifest, uid):
    """
    The serving generation's supervisord, started from the config it served
    with (root's, as state.apply wrote it; what the boot line starts too).
    """
    gen = __utils__["saltfleet_supervisor.serving"](p)
    if not manifest.get("release") or gen is None:
        raise CommandExecutionError(f"deployment {name} has no release serving yet; {_hint('state.apply')} deploys one")
    settings, errors = __utils__["saltfleet_schema.validate_host"](
        __pillar__.get("saltfleet"), __opts__.get("root_dir") or "/"
    )
    if errors:
        raise CommandExecutionError("\n".join(errors))
    supervisord = __utils__["saltfleet_files.trusted_tool"]("supervisord", settings.get("supervisord"))
    __utils__["saltfleet_supervisor.start"]({"env": _secrets(name, p)}, supervisord, p, gen, uid)


def force_restart(name, program=None):
    """
    Restart a deployment's programs (or one program group) now: SIGKILL,
    whatever they hold (a task in hand is lost; ``deployment.restart`` waits
    for it instead).

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.force_restart daily-fetcher
    """
    sup = "saltfleet_supervisor"
    with _changing(name, "force_restart") as (p, _, uid):
        sock = _serving_socket(name, p, uid)
        groups = _groups(name, sock, uid, program)
        before = {i["pid"] for i in __utils__[f"{sup}.process_info"](sock, uid) if i["group"] in groups and i["pid"]}
        for group in groups:
            with contextlib.suppress(CommandExecutionError):
                __utils__["saltfleet_xmlrpc.call"](sock, uid, "signalProcessGroup", group, "KILL")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [i for i in __utils__[f"{sup}.process_info"](sock, uid) if i["group"] in groups]
            if not any(i["pid"] in before for i in infos):
                break
            time.sleep(0.1)
        __utils__[f"{sup}.start_groups"](
            sock, uid, [g for g in groups if g in __utils__[f"{sup}.idle_groups"](sock, uid)]
        )
        failed = __utils__[f"{sup}.wait_running"](sock, uid, groups=set(groups))
    if failed:
        raise CommandExecutionError(f"deployment {name}: not RUNNING after the restart: {_fmt(failed)}")
    return {"restarted": groups}


# supervisorctl's read and control verbs; nothing that edits or reloads its config.
SUPERVISORCTL_VERBS = ("status", "start", "stop", "restart", "signal", "pid", "tail", "maintail", "avail", "version")
SUPERVISORCTL_ARG_RE = re.compile(r"^[A-Za-z0-9_.:*+-]+$")


def supervisorctl(name, *args):
    """
    Run supervisorctl against a deployment's own supervisord, as its user:
    read and control verbs only (status, start, stop, restart, signal, pid,
    tail, maintail, avail, version), never a shell.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.supervisorctl daily-fetcher status
        salt 'worker-7' deployment.supervisorctl daily-fetcher tail fetcher-instagram
    """
    p, manifest, uid = _installed(name)
    if not args or args[0] not in SUPERVISORCTL_VERBS:
        raise CommandExecutionError(
            f"deployment.supervisorctl {name}: the first argument must be one of {', '.join(SUPERVISORCTL_VERBS)}"
        )
    bad = [a for a in map(str, args) if not SUPERVISORCTL_ARG_RE.match(a)]
    if bad:
        raise CommandExecutionError(f"deployment.supervisorctl {name}: arguments may not hold {bad[0]!r}")
    secrets = _secrets(name, p)
    with __utils__["saltfleet_user.hiding"](secrets):
        sock = _serving_socket(name, p, uid)
    ctl = __utils__["saltfleet_files.trusted_tool"]("supervisorctl", None)
    proc = __utils__["saltfleet_user.run"](
        manifest["user"], [ctl, "-s", f"unix://{sock}", *args], p["home"], timeout=120
    )
    if proc.returncode not in (0, 3):  # 3: status found a program not RUNNING, which the output says
        __context__["retcode"] = proc.returncode
    return __utils__["saltfleet_user.scrub"]((proc.stdout + proc.stderr).rstrip("\n"), secrets)


def logs(name, program=None, lines=100):
    """
    The last ``lines`` of a program's log (or of the deployment's supervisord
    log), read as the deployment's user.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.logs daily-fetcher fetcher-instagram 50
    """
    p, manifest, _ = _installed(name)
    if program is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", str(program)):
        raise CommandExecutionError(f"deployment.logs {name}: {program!r} is not a program name")
    gen = __utils__["saltfleet_supervisor.serving"](p)
    path = __utils__["saltfleet_paths.log"](p, program or "supervisord", gen)
    proc = __utils__["saltfleet_user.run"](
        manifest["user"], ["tail", "-n", str(int(lines)), "--", path], p["home"], timeout=60
    )
    secrets = _secrets(name, p)
    __utils__["saltfleet_user.check"](proc, f"deployment.logs {name}: reading {path} failed", secrets)
    return __utils__["saltfleet_user.scrub"](proc.stdout, secrets)


# -------------------------------------------------------- code and venv


def _apply(name, **kwargs):
    """deployment.present through Salt's state system: the one path to a release switch."""
    ret = __salt__["state.single"]("deployment.present", name=name, **kwargs)
    if not isinstance(ret, dict):
        raise CommandExecutionError(f"deployment {name}: " + "; ".join(map(str, ret)))
    state = next(iter(ret.values()))
    result = {key: state.get(key) for key in ("result", "changes", "comment")}
    if not state.get("result"):
        __context__["retcode"] = 1
    return result


def _operator(name, what, *args):
    """Record an operator's intent (saltfleet_manifest.<what>: a pinned rev, a hold...), under the lock."""
    with _changing(name, what) as (p, _, _):
        return __utils__[f"saltfleet_manifest.{what}"](p, *args)


def update_code(name, rev, _by="deployment.update_code"):
    """
    Deploy ``rev`` (a branch, tag or commit) of a deployment on this host now,
    through the same build-and-switch as ``state.apply``. The rev stays until
    pillar names the same one or ``deployment.unpin``: a later ``state.apply``
    keeps it and says so in its comment, it never goes back silently.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.update_code daily-fetcher v2.3
        salt -G 'saltfleet_deployments:daily-fetcher:*' deployment.update_code daily-fetcher main
    """
    rev = str(rev)
    errors = []
    __utils__["saltfleet_schema.check_rev"](f"deployment.update_code {name}: rev", rev, errors)
    if errors:
        raise CommandExecutionError(errors[0])
    previous = _operator(name, "pin", rev, _by)
    result = _apply(name, rev=rev)
    if not result["result"]:
        _operator(name, "restore_pin", previous)
    result["release"] = _installed(name)[1].get("release")
    return result


def unpin(name):
    """
    Follow pillar's rev again after ``deployment.update_code`` or
    ``deployment.rollback``. Nothing is deployed now: the host serves the
    release it serves (``serving``, and the ``comment`` says so) until the
    next ``state.apply`` deploys pillar's rev. The master hears of it at once
    (``deployment.report``): ``fleet.inventory`` no longer shows the pin.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.unpin daily-fetcher
    """
    pin = _operator(name, "unpin")
    rev = ((__pillar__.get("deployments") or {}).get(name) or {}).get("rev", "HEAD")
    serving = _installed(name)[1].get("release")
    where = f"it serves {serving[:12]}" if serving else "it serves no release yet"
    if not pin:
        comment = f"deployment {name} was not pinned: it follows pillar's rev {rev}; {where}"
        return {"pinned": False, "rev": rev, "serving": serving, "comment": comment}
    comment = (
        f"deployment {name} follows pillar's rev {rev} again, no longer {pin['value']} "
        f"(set by {pin['by']}); {where} until {_hint('state.apply')} deploys {rev}"
    )
    try:
        report()
    except Exception:  # pylint: disable=broad-except
        # The pin is gone all the same; the heartbeat tells the master within a minute.
        log.warning("telling the master deployment %s is unpinned failed", name, exc_info=True)
    return {"pinned": False, "rev": rev, "serving": serving, "comment": comment}


def update_virtualenv(name):
    """
    Build the deployment's virtualenv afresh from the same requirements (to
    pick up what unpinned requirements now resolve to) and hand the programs
    over to it, as a new release is.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.update_virtualenv daily-fetcher
    """
    _operator(name, "request_rebuild")
    return _apply(name)


def releases(name):
    """
    The releases a deployment keeps, oldest first: SHA, venv, when it was
    deployed, whether it is complete, and which one serves.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.releases daily-fetcher
    """
    p, manifest, _ = _installed(name)
    rows = []
    for entry in manifest.get("history") or []:
        release = __utils__["saltfleet_paths.release"](p, entry["release"])
        rows.append(
            {
                "release": entry["release"],
                "venv": entry.get("venv"),
                "deployed": entry.get("deployed"),
                "complete": __utils__["saltfleet_paths.markers"](release)["complete"].exists(),
                "serving": entry["release"] == manifest.get("release"),
            }
        )
    return rows


def rollback(name, release=None):
    """
    Switch back to a kept release (by default the one before the serving one;
    a SHA or its prefix picks another), through the same handover as a deploy:
    tasks in hand finish. The release stays pinned like ``update_code``'s.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.rollback daily-fetcher
        salt 'worker-7' deployment.rollback daily-fetcher 3f1c9e2
    """
    kept = [r for r in releases(name) if r["complete"]]
    if release is None:
        serving = [i for i, r in enumerate(kept) if r["serving"]]
        older = kept[: serving[0]] if serving else kept
        if not older:
            raise CommandExecutionError(f"deployment {name}: no complete release older than the serving one is kept")
        target = older[-1]["release"]
    else:
        matches = [r["release"] for r in kept if r["release"].startswith(str(release))]
        if len(matches) != 1:
            known = ", ".join(r["release"][:12] for r in kept)
            raise CommandExecutionError(
                f"deployment {name}: {release!r} names {len(matches)} of the complete releases kept ({known})"
            )
        target = matches[0]
    return update_code(name, target, _by="deployment.rollback")


# ----------------------------------------------------------------- holds


def hold(name, program=None, reason=None):
    """
    Stop a deployment's programs (or one program group) gracefully and keep
    them stopped: ``state.apply`` reports the hold and its reason instead of
    starting them, and so does a reboot, until ``deployment.unhold``.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.hold daily-fetcher reason='db maintenance until 14:00'
        salt 'worker-7' deployment.hold daily-fetcher fetcher-instagram reason='API quota'
    """
    _operator(name, "hold", program, reason, "deployment.hold")
    return _apply(name)


def unhold(name, program=None):
    """
    Release a hold (``program`` omitted: every hold of the deployment) and
    start what it kept stopped.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.unhold daily-fetcher
    """

    _operator(name, "unhold", program)
    return _apply(name)


# ------------------------------------------------------------------- run


def run(name, *command, timeout=3600, **kwargs):
    """
    Run a command in the serving release as the deployment's user, with its
    virtualenv and env (a migration, a manage.py task, a one-off Celery call);
    its exit code becomes the job's. Values of env never appear in the output
    returned: each is replaced by ``<env:NAME>``.

    The command is its words, or one argument that holds it all (split as the
    shell would, without a shell). Salt reads a word of the form ``KEY=value``
    as a keyword argument: quote such a command whole.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.run daily-fetcher python manage.py migrate
        salt 'worker-7' deployment.run daily-fetcher celery -A app inspect ping
        salt 'worker-7' deployment.run daily-fetcher 'env DJANGO_SETTINGS_MODULE=app.prod python manage.py check'
    """
    taken = salt.utils.args.clean_kwargs(**kwargs)
    if taken:
        words = " ".join(f"{k}={v}" for k, v in taken.items())
        raise CommandExecutionError(
            f"deployment.run {name}: Salt read {words} as keyword arguments, not words of the command; "
            f"give the command as one quoted argument: deployment.run {name} '...'"
        )
    if len(command) == 1 and isinstance(command[0], str) and any(c.isspace() for c in command[0]):
        command = shlex.split(command[0])
    if not command:
        raise CommandExecutionError(f"deployment.run {name}: give the command to run after the deployment's name")
    p, manifest, _ = _installed(name)
    if not manifest.get("release"):
        raise CommandExecutionError(f"deployment {name} has no release serving yet; state.apply deploys one")
    host, errors = __utils__["saltfleet_schema.validate_host"](
        __pillar__.get("saltfleet"), __opts__.get("root_dir") or "/"
    )
    spec = (__pillar__.get("deployments") or {}).get(name) or {"repo": manifest.get("repo")}
    cfg, more = __utils__["saltfleet_schema.validate_deployment"](name, dict(spec), host)
    if errors or more:
        raise CommandExecutionError("\n".join(errors + more))
    release = __utils__["saltfleet_paths.release"](p, manifest["release"])
    venv = __utils__["saltfleet_paths.venv"](p, manifest["venv"])
    env = __utils__["saltfleet_venv.environ"](venv, {k: str(v) for k, v in cfg["env"].items()})
    proc = __utils__["saltfleet_user.run"](
        manifest["user"], list(command), p["home"], cwd=release, env=env, timeout=int(timeout)
    )
    secrets = _secrets(name, p)
    scrub = __utils__["saltfleet_user.scrub"]
    if proc.returncode:
        __context__["retcode"] = proc.returncode
    return {"retcode": proc.returncode, "stdout": scrub(proc.stdout, secrets), "stderr": scrub(proc.stderr, secrets)}


def _fmt(failed):
    return ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
