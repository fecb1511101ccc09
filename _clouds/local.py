"""
Local "instances" for salt-cloud: each one a sandbox on the master's machine.

An instance is a directory (the minion's ``root_dir``: its own config, pki,
cache, logs and the deployments it converges) and a salt-minion process on
127.0.0.1 pointed at the master. It is provisioned the way EC2 and Rackspace
hosts are: salt-cloud generates the minion's keys on the master and
pre-accepts them, the driver writes the minion config (with the cloud facts as
grains) and starts the minion, waits until it has authenticated, then syncs
saltfleet's modules to it once (``saltutil.sync_all``). Only the
machine is local. ``make demo`` builds its fleet with it.

Provider (``cloud.providers.d/local.conf``):

.. code-block:: yaml

    local:
      driver: local
      # One directory per instance. Keep it short: supervisord's socket paths
      # inside a sandbox must stay under 108 bytes.
      sandbox_dir: /srv/saltfleet-local
      minion:
        master: 127.0.0.1       # master_port defaults to the master's ret_port

Profile (``cloud.profiles.d/local.conf``):

.. code-block:: yaml

    local-worker:
      provider: local
      size: sandbox

Then ``salt-cloud -p local-worker worker-1``, ``salt-cloud -Q``,
``salt-cloud -a stop worker-1`` (stops its minion and its deployments'
supervisords), ``salt-cloud -a start worker-1``, ``salt-cloud -d worker-1``
(stops it, removes its key and its sandbox).
"""

import contextlib
import getpass
import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import salt.loader.context
import salt.utils.yaml
from salt.exceptions import SaltCloudSystemExit

log = logging.getLogger(__name__)

__virtualname__ = "local"

DEFAULT_SANDBOX_DIR = "/srv/saltfleet-local"
DEFAULT_SIZE = "sandbox"
DEFAULT_IMAGE = "this-machine"
DEFAULT_LOCATION = "local"
INSTANCE_FILE = "instance.json"
MINION_PIDFILE = ("var", "run", "salt-minion.pid")
PIDFILE_GRACE = 20
# An instance name is a directory name and a minion id: nothing that could leave sandbox_dir.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def __virtual__():
    if get_configured_provider() is False:
        return False, "no local provider is configured"
    return __virtualname__


def get_configured_provider():
    """The provider's configuration, or False when none uses this driver."""
    return __utils__["saltfleet_cloud.configured_provider"](__opts__, __active_provider_name__, __virtualname__)


def _setting(name, vm_=None, default=None):
    """A setting of the VM, its profile or its provider (the provider alone without ``vm_``)."""
    return __utils__["saltfleet_cloud.provider_setting"](
        __opts__, __active_provider_name__, __virtualname__, name, vm_, default
    )


# ------------------------------------------------------------------ sandboxes


def _sandbox_dir(vm_=None):
    # Normalized, links kept: a short link to a long folder keeps the minions' socket paths short.
    return Path(os.path.abspath(Path(_setting("sandbox_dir", vm_, DEFAULT_SANDBOX_DIR)).expanduser()))


def _sandbox(name, vm_=None):
    if not isinstance(name, str) or not NAME_RE.match(name):
        profile = f" (profile {vm_['profile']})" if vm_ and vm_.get("profile") else ""
        raise SaltCloudSystemExit(
            f"{name!r}{profile}: not a valid local instance name; use only letters, digits, '-' and '_', "
            "e.g. demo-worker-3"
        )
    return _sandbox_dir(vm_) / name


def _instances():
    """{name: instance record} of every sandbox under sandbox_dir."""
    found = {}
    base = _sandbox_dir()
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            record = __utils__["saltfleet_files.read_json"](entry / INSTANCE_FILE)
            if record:
                found[entry.name] = record
    return found


def _minion_pid(sandbox):
    """The pid of the sandbox's salt-minion when it runs, else None."""
    try:
        pid = int(Path(sandbox, *MINION_PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_sandbox_process(pid, sandbox) else None


def _is_sandbox_process(pid, sandbox):
    """True when pid is alive and runs with the sandbox's config (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # Salt retitles its processes, which joins the arguments: look for the path anywhere,
    # as given or through the links on it (a short link to the sandbox).
    configs = {Path(sandbox) / "etc" / "salt", Path(os.path.realpath(sandbox)) / "etc" / "salt"}
    return any(os.fsencode(str(config)) in cmdline for config in configs)


def _state(sandbox):
    return "running" if _minion_pid(sandbox) else "stopped"


def _node(name, record, full=False):
    sandbox = Path(record["sandbox"])
    node = __utils__["saltfleet_cloud.node_row"](
        record["instance_id"],
        name,
        _state(sandbox),
        image=record.get("image", DEFAULT_IMAGE),
        size=record.get("size", DEFAULT_SIZE),
        public_ips=record.get("public_ips", []),
        private_ips=record.get("private_ips", []),
    )
    if full:
        node.update(
            {
                "location": record.get("location", DEFAULT_LOCATION),
                "profile": record.get("profile"),
                "created": record.get("created"),
                "sandbox": str(sandbox),
                "config_dir": str(sandbox / "etc" / "salt"),
                "pid": _minion_pid(sandbox),
                "log_file": str(sandbox / "var" / "log" / "salt" / "minion"),
            }
        )
    return node


def _unspecified(address):
    """True for the any-address a master may bind (its minions still reach it on loopback)."""
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def _minion_config(vm_, grains, sandbox):
    """saltfleet's minion config for vm_ (as for every provider), made to live in the sandbox."""
    minion = __utils__["saltfleet_cloud_minion.minion_config"](vm_, __opts__, grains=grains)
    interface = __opts__.get("interface") or "127.0.0.1"
    if minion.get("master") in (None, "salt"):
        minion["master"] = "127.0.0.1" if _unspecified(interface) else interface
    minion.setdefault("master_port", __opts__.get("ret_port", 4506))
    minion["root_dir"] = str(sandbox)
    minion["user"] = getpass.getuser()
    minion.setdefault("log_level_logfile", "info")
    return minion


def _start_minion(name, sandbox, timeout):
    """Start the sandbox's salt-minion and wait until the master has accepted it."""
    if _minion_pid(sandbox):
        return
    binary = _salt_binary(name, "salt-minion")
    master_pub = sandbox / "etc" / "salt" / "pki" / "minion" / "minion_master.pub"
    with contextlib.suppress(FileNotFoundError):
        master_pub.unlink()
    log_file = sandbox / "var" / "log" / "salt" / "minion"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(binary), "-c", str(sandbox / "etc" / "salt"), "-d"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        cwd=str(sandbox),
    )
    if proc.returncode:
        raise SaltCloudSystemExit(f"{name}: salt-minion did not start: {(proc.stderr or proc.stdout).strip()[-500:]}")

    started = time.monotonic()

    def accepted():
        # The minion writes the master's key once the master has accepted its own.
        if not _minion_pid(sandbox):
            # The daemon writes its pidfile a moment after `-d` returns.
            if time.monotonic() - started > PIDFILE_GRACE:
                raise SaltCloudSystemExit(f"{name}: salt-minion is not running")
            return False
        return master_pub.exists()

    try:
        __utils__["saltfleet_cloud.wait_for"](accepted, timeout, f"{name}: the master accepting the minion", 0.2)
    except SaltCloudSystemExit as exc:
        tail = "".join(log_file.read_text(errors="replace").splitlines(True)[-10:]) if log_file.exists() else ""
        raise SaltCloudSystemExit(
            f"{exc} (master {_master_address(sandbox)}: is it running?); log {log_file}:\n{tail}"
        ) from None


def _salt_binary(name, command):
    binary = Path(sys.executable).with_name(command)
    if not binary.exists():
        binary = shutil.which(command)
    if not binary:
        raise SaltCloudSystemExit(f"{name}: no {command} beside {sys.executable} nor on PATH")
    return binary


def _sync_minion(name, sandbox, timeout):
    """
    The new host syncs saltfleet's modules, states and utils once: its minion
    config turns autoload_dynamic_modules off, so state.apply no longer does.
    """
    try:
        proc = subprocess.run(
            [
                str(_salt_binary(name, "salt-call")),
                "-c",
                str(sandbox / "etc" / "salt"),
                "--retcode-passthrough",
                "--out=quiet",
                "-l",
                "quiet",
                "saltutil.sync_all",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            cwd=str(sandbox),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise SaltCloudSystemExit(f"{name}: saltutil.sync_all did not finish within {timeout} s") from None
    if proc.returncode:
        raise SaltCloudSystemExit(
            f"{name}: saltutil.sync_all failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}"
        )


def _master_address(sandbox):
    try:
        minion = salt.utils.yaml.safe_load(Path(sandbox, "etc", "salt", "minion").read_text()) or {}
    except OSError:
        return "?"
    return f"{minion.get('master')}:{minion.get('master_port')}"


def _stop_deployments(sandbox):
    """Stop every deployment's supervisords in the sandbox, draining ones too (their programs stop with them)."""
    stopped = []
    timeout = _setting("stop_timeout", default=600)
    for name, manifest in __utils__["saltfleet_manifest.installed"](sandbox).items():
        user = manifest["user"]
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            raise SaltCloudSystemExit(
                f"{sandbox}: deployment {name} runs as user {user}, who does not exist on this machine; "
                f"stop its supervisord by hand or recreate the user"
            ) from None
        p = __utils__["saltfleet_paths.paths"](sandbox, user, name)
        if __utils__["saltfleet_supervisor.stop_all"](p, uid, manifest.get("draining"), timeout):
            stopped.append(name)
    return stopped


def _stop_minion(sandbox, timeout=30):
    pid = _minion_pid(sandbox)
    if not pid:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _is_sandbox_process(pid, sandbox):
        time.sleep(0.1)
    if _is_sandbox_process(pid, sandbox):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        Path(sandbox, *MINION_PIDFILE).unlink()
    return True


# -------------------------------------------------------------------- create


def create(vm_):
    """
    Create a sandbox instance and start its minion (saltfleet_cloud's pipeline
    runs the steps; a sandbox whose minion does not start is removed, unless the
    profile says ``keep_failed: True``).

    .. code-block:: bash

        salt-cloud -p local-worker worker-1
    """
    return __utils__["saltfleet_cloud.create"](vm_, __opts__, _Create(vm_).driver())


class _Create:
    """One create's sandbox for saltfleet_cloud's pipeline: the sandbox's folder is the machine."""

    def __init__(self, vm_):
        self.vm_ = vm_
        self.sandbox = None

    def driver(self):
        return __utils__["saltfleet_cloud.driver"](
            "local",
            # The pipeline calls back into this module: in this module's loader, where its __utils__ are.
            loader=salt.loader.context.loader_ctxvar.get(),
            preflight=self.preflight,
            launch=self.launch,
            wait=lambda machine: machine.handle,
            addresses=lambda record: (record["public_ips"], record["private_ips"]),
            row=lambda record: {**_node(record["name"], record, full=True), "deployed": False},
            remove=lambda machine: self.remove(),
            bootstrap=self.bootstrap,
            noun="sandbox",
            removed="removed",
            # The sandbox's minion is started here, with the keys salt-cloud pre-accepted.
            modes=("ssh", "none"),
        )

    def preflight(self, mode):
        vm_, name = self.vm_, self.vm_["name"]
        self.sandbox = _sandbox(name, vm_)
        if (self.sandbox / INSTANCE_FILE).exists():
            raise SaltCloudSystemExit(
                f"{name}: a local instance already exists at {self.sandbox}; destroy it first (salt-cloud -d {name})"
            )
        return __utils__["saltfleet_cloud.facts"](
            region=_setting("location", vm_, DEFAULT_LOCATION),
            size=_setting("size", vm_, DEFAULT_SIZE),
            image=_setting("image", vm_, DEFAULT_IMAGE),
        )

    def launch(self, request):
        """The sandbox's folder and its instance record (its minion comes with the bootstrap)."""
        vm_ = self.vm_
        record = {
            "name": vm_["name"],
            "instance_id": f"local-{uuid.uuid4().hex[:12]}",
            "profile": vm_.get("profile"),
            "size": _setting("size", vm_, DEFAULT_SIZE),
            "image": _setting("image", vm_, DEFAULT_IMAGE),
            "location": _setting("location", vm_, DEFAULT_LOCATION),
            "public_ips": ["127.0.0.1"],
            "private_ips": ["127.0.0.1"],
            "sandbox": str(self.sandbox),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            (self.sandbox / "etc" / "salt").mkdir(parents=True, exist_ok=True)
            __utils__["saltfleet_files.write_json"](self.sandbox / INSTANCE_FILE, record)
        except BaseException:
            # A half-made instance would block the next create: leave nothing behind.
            shutil.rmtree(self.sandbox, ignore_errors=True)
            raise
        return __utils__["saltfleet_cloud.launched"](record["instance_id"], handle=record)

    def bootstrap(self, record, grains):
        """The minion's keys (salt-cloud's, pre-accepted) and config in the sandbox, its minion started and synced."""
        vm_, name, etc = self.vm_, self.vm_["name"], self.sandbox / "etc" / "salt"
        if not vm_.get("pub_key") or not vm_.get("priv_key"):
            raise SaltCloudSystemExit(f"{name}: salt-cloud passed no minion keys (is deploy disabled?)")
        pki = etc / "pki" / "minion"
        pki.mkdir(parents=True, exist_ok=True, mode=0o700)
        write = __utils__["saltfleet_files.write_atomic"]
        write(pki / "minion.pem", vm_["priv_key"], 0o400)
        write(pki / "minion.pub", vm_["pub_key"], 0o644)
        write(etc / "minion", __utils__["cloud.salt_config_to_yaml"](_minion_config(vm_, grains, self.sandbox)))
        timeout = _setting("wait_for_minion_timeout", vm_, 120)
        _start_minion(name, self.sandbox, timeout)
        _sync_minion(name, self.sandbox, timeout)
        log.info("Created local instance %s in %s", name, self.sandbox)
        return {"deploy": "sandbox", "deployed": True}

    def remove(self):
        _stop_minion(self.sandbox)
        shutil.rmtree(self.sandbox)


# ------------------------------------------------------------------- destroy


def destroy(name, call=None):
    """
    Stop an instance (its deployments and its minion) and remove its sandbox.
    salt-cloud then deletes its key on the master. Returns
    ``{"name", "instance_id", "state": "destroyed"}``.

    .. code-block:: bash

        salt-cloud -d worker-1
    """
    __utils__["saltfleet_cloud.check_call"]("destroy", call, "destroy")
    sandbox = _sandbox(name)
    record = __utils__["saltfleet_files.read_json"](sandbox / INSTANCE_FILE)
    if not record:
        raise SaltCloudSystemExit(f"{name}: no local instance of that name in {_sandbox_dir()}")
    instance_id = record["instance_id"]
    __utils__["saltfleet_cloud.fire_event"](__opts__, name, "destroying", {"instance_id": instance_id})
    _stop_deployments(sandbox)
    _stop_minion(sandbox)
    shutil.rmtree(sandbox)
    provider = __utils__["saltfleet_cloud.provider_name"](__active_provider_name__, __virtualname__)
    return __utils__["saltfleet_cloud.destroyed"](__opts__, name, instance_id, provider, "destroyed")


# ------------------------------------------------------------------- actions


def _action_target(name, call, action):
    __utils__["saltfleet_cloud.check_call"](action, call, "action")
    sandbox = _sandbox(name)
    record = __utils__["saltfleet_files.read_json"](sandbox / INSTANCE_FILE)
    if not record:
        raise SaltCloudSystemExit(f"{name}: no local instance of that name in {_sandbox_dir()}")
    return sandbox, record


def stop(name, call=None):
    """
    Stop an instance the way a machine goes down: its deployments' supervisords
    (and their programs, gracefully) and its minion. The sandbox stays.

    .. code-block:: bash

        salt-cloud -a stop worker-1
    """
    sandbox, _ = _action_target(name, call, "stop")
    deployments = _stop_deployments(sandbox)
    minion = _stop_minion(sandbox)
    return {"state": "stopped", "minion_was_running": minion, "stopped_deployments": deployments}


def start(name, call=None):
    """
    Start a stopped instance's minion; the next ``state.apply`` brings its
    deployments back.

    .. code-block:: bash

        salt-cloud -a start worker-1
    """
    sandbox, _ = _action_target(name, call, "start")
    was_running = bool(_minion_pid(sandbox))
    _start_minion(name, sandbox, _setting("wait_for_minion_timeout", default=120))
    return {"state": "running", "was_running": was_running}


def reboot(name, call=None):
    """
    Stop then start an instance. ``was_running``: whether its minion ran
    before the reboot; its deployments come back with the next ``state.apply``.

    .. code-block:: bash

        salt-cloud -a reboot worker-1
    """
    stopped = stop(name, call)
    started = start(name, call)
    return {
        **started,
        "was_running": stopped["minion_was_running"],
        "stopped_deployments": stopped["stopped_deployments"],
    }


def show_instance(name, call=None):
    """
    Everything known about one instance.

    .. code-block:: bash

        salt-cloud -a show_instance worker-1
    """
    __utils__["saltfleet_cloud.check_call"]("show_instance", call, "action")
    nodes = list_nodes_full()
    if name not in nodes:
        raise SaltCloudSystemExit(f"{name}: no local instance of that name in {_sandbox_dir()}")
    return nodes[name]


# ------------------------------------------------------------------- listing


def list_nodes(call=None):
    """
    The instances and whether their minion runs (``salt-cloud -Q``).
    """
    __utils__["saltfleet_cloud.check_call"]("list_nodes", call, "function")
    __utils__["saltfleet_tickets.prune_autosign_tickets"](__opts__)
    return {name: _node(name, record) for name, record in _instances().items()}


def list_nodes_full(call=None):
    """
    The instances with their sandbox, config dir and minion pid (``salt-cloud -F``).
    """
    __utils__["saltfleet_cloud.check_call"]("list_nodes_full", call, "function")
    __utils__["saltfleet_tickets.prune_autosign_tickets"](__opts__)
    return {name: _node(name, record, full=True) for name, record in _instances().items()}


def list_nodes_select(call=None):
    """
    The fields of ``query.selection`` for each instance (``salt-cloud -S``).
    """
    return __utils__["saltfleet_cloud.select"](list_nodes_full(), __opts__, call)


def avail_images(call=None):
    __utils__["saltfleet_cloud.check_call"]("avail_images", call, "function")
    return {DEFAULT_IMAGE: {"name": DEFAULT_IMAGE, "description": "this machine's own system, shared by every sandbox"}}


def avail_sizes(call=None):
    __utils__["saltfleet_cloud.check_call"]("avail_sizes", call, "function")
    return {DEFAULT_SIZE: {"name": DEFAULT_SIZE, "description": "a directory and a salt-minion process"}}


def avail_locations(call=None):
    __utils__["saltfleet_cloud.check_call"]("avail_locations", call, "function")
    return {DEFAULT_LOCATION: {"name": DEFAULT_LOCATION, "description": "this machine"}}
