"""
Removing a deployment from a host: its supervisord stopped (its programs
finish their tasks in hand), its sysfiles, config, secrets and record gone,
and with ``purge`` its releases, virtualenvs and logs. The user's part (their
trees, the deployment's run/) is removed as the user; root removes only its
own, the manifest last, so a removal that fails half way is known to the
next apply and finished by it.
"""

import contextlib
import os
import time

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_removal"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


class Removal:
    """An installed deployment about to be removed: what would go (:meth:`plan`), and its removal."""

    def __init__(self, root, name, manifest):
        self.root, self.name, self.manifest = root, name, manifest
        self.user = manifest["user"]
        self.p = _utils("saltfleet_paths.paths")(root, self.user, name)
        self.uid = _utils("saltfleet_user.account")(self.user, f"deployments:{name}").pw_uid

    def _trees(self, purge):
        p, plain = self.p, _utils("saltfleet_user.plain_path")
        keys = ("project", "releases", "venvs", "logs") if purge else ()
        trees = [p[k] for k in keys if p[k].exists() or p[k].is_symlink()]
        return [t for t in trees if plain(p["home"], t, link=t == p["project"])]

    def plan(self, purge):
        """The changes removing it makes."""
        changes = {}
        try:
            running = _utils("saltfleet_supervisor.generations")(self.p, self.uid, self.manifest.get("draining"))
        except CommandExecutionError:
            running = True  # a socket that answers what supervisord never would: its cgroup is stopped all the same
        if running:
            changes["supervisord"] = {"old": "running", "new": "stopped"}
        sysfiles = _utils("saltfleet_sysfiles.diff")(self.name, {}, self.root)
        if sysfiles:
            changes["sysfiles"] = sysfiles
        changes["removed"] = [str(self.p["state"]), *map(str, self._trees(purge))]
        return changes

    def remove(self, purge):
        """
        Root's secrets go first, whatever the user's side does; the user's
        run/ is removed as the user, or set aside (root's rename, in its own
        folder) when the user keeps it from being emptied; the manifest last.
        """
        p, files = self.p, "saltfleet_files"
        try:
            _utils("saltfleet_supervisor.stop_all")(p, self.uid, self.manifest.get("draining"))
        except CommandExecutionError:
            # What supervisord's sockets answer is the user's word: the cgroup holds every process regardless.
            if _utils("saltfleet_cgroup.kill")(p) is None:
                raise
        # Whatever the deployment's code left running (a daemon of its own, a detached child) goes too.
        _utils("saltfleet_cgroup.kill")(p)
        _utils("saltfleet_sysfiles.apply")(self.name, {}, self.root)
        _utils(f"{files}.remove_root_tree")(p["state"], spare=(p["run"].name, p["manifest"].name))
        _utils("saltfleet_user.remove")(self.user, p["home"], *self._trees(purge))
        try:
            _utils("saltfleet_user.remove_own_dir")(self.user, p["home"], p["run"])
        except (CommandExecutionError, OSError):
            aside = _utils(f"{files}.root_dir")(_utils("saltfleet_paths.registry")(self.root) / "removed", 0o700)
            os.rename(p["run"], aside / f"{self.name}.{int(time.time())}.run")
        _utils(f"{files}.remove_root_tree")(p["state"])
        # The removal's own commands as the user ran in the cgroup too: it goes with the deployment.
        _utils("saltfleet_cgroup.kill")(p)


@contextlib.contextmanager
def locked(root, name, test):
    """The :class:`Removal` of deployment ``name`` under its lock (shared for a dry run); None when not installed."""
    manifest = _utils("saltfleet_manifest.installed")(root).get(name)
    if not manifest:
        yield _Nothing()
        return
    removal = Removal(root, name, manifest)
    if test and not removal.p["lock"].exists():
        with _hiding(removal):
            yield removal
        return
    with _utils("saltfleet_files.lock")(removal.p["lock"], f"state deployment.absent {name}", shared=test):
        with _hiding(removal):
            yield removal


def _hiding(removal):
    """What its supervisords answer while it goes hides the env they ran with (pillar's is gone)."""
    return _utils("saltfleet_user.hiding")(_utils("saltfleet_supervisor.secrets")(removal.p, {}))


class _Nothing:
    """What removing a deployment that is not installed does."""

    def plan(self, purge):  # pylint: disable=unused-argument
        return {}

    def remove(self, purge):  # pylint: disable=unused-argument
        return None
