"""
Look at and drive the saltfleet deployments on a host: what the old Fabric
tasks did, through Salt. Every function that changes something takes the
deployment's lock, so it never interleaves with a ``state.apply``.

.. code-block:: bash

    salt 'worker-*' deployment.status
    salt 'worker-7' deployment.restart daily-fetcher
    salt '*' deployment.validate
"""

import contextlib
import logging

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


def _installed(name):
    """(paths, manifest, uid) of an installed deployment; a clear error when it is not installed."""
    root = _root()
    manifest = __utils__["saltfleet_files.installed"](root).get(name)
    if not manifest:
        raise CommandExecutionError(
            f"deployment {name} is not installed on this host; deployment.list shows those that are"
        )
    p = __utils__["saltfleet_paths.paths"](root, manifest["user"], name)
    uid = __utils__["saltfleet_user.account"](manifest["user"], f"deployments:{name}").pw_uid
    return p, manifest, uid


def _serving_socket(name, p, uid):
    gen = __utils__["saltfleet_supervisor.serving"](p)
    sock = __utils__["saltfleet_paths.generation"](p, gen)["socket"] if gen else None
    if not sock or not __utils__["saltfleet_supervisor.answers"](sock, uid):
        raise CommandExecutionError(
            f"deployment {name}: its supervisord is not running; `salt-call state.apply` starts it"
        )
    return sock


@contextlib.contextmanager
def _changing(name, what):
    p, manifest, uid = _installed(name)
    with __utils__["saltfleet_files.lock"](p["lock"], f"deployment.{what} {name}"):
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


def list_():
    """
    The deployments installed on this host (those saltfleet recorded).

    CLI Example:

    .. code-block:: bash

        salt '*' deployment.list
    """
    return sorted(__utils__["saltfleet_files.installed"](_root()))


def _status(root, name, manifest):
    sup = "saltfleet_supervisor"
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
    }
    try:
        uid = __utils__["saltfleet_user.account"](manifest["user"]).pw_uid
        serving = __utils__[f"{sup}.serving"](p)
        gens = __utils__[f"{sup}.generations"](p, uid, manifest.get("draining"))
        if gens.get(serving, {}).get("state") == "RUNNING":
            sock = __utils__["saltfleet_paths.generation"](p, serving)["socket"]
            infos = __utils__[f"{sup}.process_info"](sock, uid)
            row["programs"] = {__utils__[f"{sup}.proc_name"](i): i["statename"] for i in infos}
            row["supervisord"] = "running"
        row["draining"] = sorted(i["pid"] for g, i in gens.items() if g != serving)
    except CommandExecutionError as exc:
        row["supervisord"] = f"unknown: {exc}"
    row["running"] = sum(1 for s in row["programs"].values() if s == "RUNNING")
    return row


def status(name=None):
    """
    Release, supervisord and program states of the installed deployments
    (or of ``name``), asked of each deployment's own supervisord; ``draining``
    lists the supervisords of earlier releases still finishing their tasks.

    CLI Example:

    .. code-block:: bash

        salt '*' deployment.status
        salt 'worker-7' deployment.status daily-fetcher
    """
    root = _root()
    manifests = __utils__["saltfleet_files.installed"](root)
    if name is not None:
        if name not in manifests:
            raise CommandExecutionError(
                f"deployment {name} is not installed on this host; deployment.list shows those that are"
            )
        manifests = {name: manifests[name]}
    return {n: _status(root, n, m) for n, m in manifests.items()}


def restart(name, program=None):
    """
    Restart a deployment's programs (or one program group) gracefully: SIGTERM,
    then up to ``stopwaitsecs`` for the tasks in hand to finish.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.restart daily-fetcher
        salt 'worker-7' deployment.restart daily-fetcher fetcher-instagram
    """
    sup = "saltfleet_supervisor"
    with _changing(name, "restart") as (p, _, uid):
        sock = _serving_socket(name, p, uid)
        groups = sorted({i["group"] for i in __utils__[f"{sup}.process_info"](sock, uid)})
        if program is not None:
            if program not in groups:
                raise CommandExecutionError(
                    f"deployment {name} has no program group {program!r}; it has: {', '.join(groups)}"
                )
            groups = [program]
        failed = __utils__[f"{sup}.restart_groups"](sock, uid, groups)
    if failed:
        raise CommandExecutionError(
            f"deployment {name}: not RUNNING after the restart: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
        )
    return {"restarted": groups}


def stop(name):
    """
    Stop a deployment's supervisord and its programs (gracefully), draining
    generations too; the next ``state.apply`` starts it again.

    CLI Example:

    .. code-block:: bash

        salt 'worker-7' deployment.stop daily-fetcher
    """
    with _changing(name, "stop") as (p, manifest, uid):
        stopped = __utils__["saltfleet_supervisor.stop_all"](p, uid, manifest.get("draining"))
    return {"stopped": bool(stopped)}
