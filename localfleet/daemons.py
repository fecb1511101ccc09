"""
Salt daemons on this machine, for the demo, the bench and the tests: free
ports on 127.0.0.1, a salt-master whose every file lives under one folder,
salt-minions in sandboxes of their own, and the pids of what runs.

Both the master and each minion keep Salt's own layout under their folder
(their ``root_dir``): config in ``etc/salt``, pidfile in ``var/run``, logs in
``var/log/salt``. A daemon is found by its pidfile and its command line (which
names its config folder), never by where it runs.
"""

import contextlib
import getpass
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from localfleet import procs
from localfleet.config import REPO, master_config, saltfleet_utils

# The venv's own salt-master, salt, salt-cloud...: beside the Python that runs this.
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
UV_CACHE = REPO / ".cache" / "uv"


class FleetError(Exception):
    """A daemon did not start, or a command failed; the message says which and where to look."""


# ------------------------------------------------------------------ commands


def command(name):
    """The path of a Salt (or other venv) command: the venv's own, else the one on PATH."""
    beside = BIN / name
    return str(beside) if beside.exists() else shutil.which(name) or name


def environ(**extra):
    """Every command's environment: the venv's tools first on PATH, the repository's uv cache, no Python downloads."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
    env.setdefault("UV_CACHE_DIR", str(UV_CACHE))
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env.update(extra)
    return env


# ------------------------------------------------------------------ sockets


def alias_of(folder):
    """Where :func:`short_alias` puts the short link to ``folder``: ``<tmp>/sf-<digest of its path>``."""
    digest = hashlib.sha256(os.fsencode(Path(folder).resolve())).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"sf-{digest}"


def short_alias(folder):
    """
    A short path to ``folder``: a link at :func:`alias_of`, made when missing.
    A unix socket's path holds 107 bytes, which a checkout's own path may
    nearly fill; daemons whose root_dir is the link keep their sockets' paths
    short (Salt places every path under root_dir).
    """
    folder = Path(folder).resolve()
    link = alias_of(folder)
    with contextlib.suppress(FileExistsError):
        os.symlink(folder, link)
    st = os.lstat(link)
    if not stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or Path(os.readlink(link)) != folder:
        raise FleetError(f"{link} should be your link to {folder} (a short path for its sockets); remove it")
    return link


# ------------------------------------------------------------------ ports


def free_ports(count):
    """``count`` distinct TCP ports free on 127.0.0.1 (held open together while chosen, so they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_free(port):
    """True when nothing listens on 127.0.0.1:port (so a daemon may bind it again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _run(argv, cwd, timeout=None, env=None):
    """Run a command with the environment of :func:`environ` (or ``env``), no stdin, its output captured as text."""
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env or environ(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _daemonize(argv, cwd, what, see):
    """Start a Salt daemon (``argv`` with ``-d``: it forks and returns at once); a FleetError when it refuses to."""
    # As a service runs it: caching its modules' bytecode (a shell's PYTHONDONTWRITEBYTECODE
    # would make every minion job compile saltfleet's modules afresh).
    env = {k: v for k, v in environ().items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = _run(argv, cwd, env=env)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip()[-1000:]
        raise FleetError(f"{what} exited {proc.returncode}: {tail}; see {see}")


def _listening(port):
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
        return True
    return False


def _write_yaml(path, data, header=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, default_flow_style=False, sort_keys=True))


# ------------------------------------------------------------------ master


def daemon_pid(root_dir, name):
    """
    The pid of Salt daemon ``name`` (salt-master, salt-minion) whose root_dir is
    ``root_dir`` while it runs, else None: its pidfile, and a command line that
    names its config folder (a recycled pid does not).
    """
    pidfile = Path(root_dir) / "var" / "run" / f"{name}.pid"
    # Its config folder as given, or through the links on the way (a short link to the folder).
    configs = {Path(root_dir) / "etc" / "salt", Path(os.path.realpath(root_dir)) / "etc" / "salt"}
    return next(filter(None, (procs.pid_from_file(pidfile, str(config)) for config in configs)), None)


def master_pid(base):
    return daemon_pid(base, "salt-master")


class Master:
    """
    A salt-master on 127.0.0.1 with everything under ``base``: config
    ``base/etc/salt/master`` (``etc/master.d/saltfleet.conf`` with the
    repository's path, then ``settings``), keys, cache, sockets, pidfile, log.
    ``ports`` is (publish_port, ret_port); new free ones by default.
    ``root_dir`` is another path to ``base`` (a short link: Salt puts every
    path, its sockets' too, under root_dir) for the config to name.
    """

    def __init__(self, base, settings=None, ports=None, root_dir=None):
        self.base = Path(base)
        self.etc = self.base / "etc" / "salt"
        self.pidfile = self.base / "var" / "run" / "salt-master.pid"
        root = Path(root_dir or base)
        publish_port, ret_port = ports or free_ports(2)
        self.config = master_config()
        self.config.update(
            {
                "root_dir": str(root),
                "conf_file": str(self.etc / "master"),
                "pki_dir": str(root / "etc" / "salt" / "pki" / "master"),
                "cachedir": str(root / "var" / "cache" / "salt" / "master"),
                "sock_dir": str(root / "var" / "run" / "salt" / "master"),
                "pidfile": str(root / "var" / "run" / "salt-master.pid"),
                "log_file": str(root / "var" / "log" / "salt" / "master"),
                "user": getpass.getuser(),
                "interface": LOOPBACK,
                "publish_port": publish_port,
                "ret_port": ret_port,
                "open_mode": False,
                "auto_accept": False,
            }
        )
        self.config.update(settings or {})

    @property
    def ret_port(self):
        return self.config["ret_port"]

    @property
    def log_file(self):
        return Path(self.config["log_file"])

    @property
    def accepted_keys(self):
        """The master's folder of accepted minion keys (salt-cloud and :class:`Minion` pre-accept into it)."""
        return Path(self.config["pki_dir"]) / "minions"

    def write(self, header=""):
        """Write the master's config file (``etc/salt/master``)."""
        _write_yaml(self.etc / "master", self.config, header)

    @property
    def argv(self):
        # An absolute config path: the daemon's command line names its folder (pid() checks it).
        return [command("salt-master"), "-c", str(self.etc), "-d"]

    def pid(self):
        """The master's pid while it runs, else None."""
        return master_pid(self.base)

    def start(self, timeout=120):
        """Start the master (config written first) and wait until it serves; False when it already ran."""
        if self.pid():
            return False
        for folder in ("pki_dir", "cachedir", "sock_dir"):
            Path(self.config[folder]).mkdir(parents=True, exist_ok=True)
        self.accepted_keys.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if not (self.etc / "master").exists():
            self.write()
        _daemonize(self.argv, self.base, "salt-master", self.log_file)
        # Ready once it wrote its pidfile, opened its event bus and accepts minions on ret_port.
        pub_ipc = Path(self.config["sock_dir"]) / "master_event_pub.ipc"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() and pub_ipc.exists() and _listening(self.ret_port):
                return True
            time.sleep(0.2)
        raise FleetError(f"salt-master did not start within {timeout} s; see {self.log_file}")

    def stop(self, timeout=30):
        """Stop the master (SIGTERM, then SIGKILL after timeout); the pid it had, or None."""
        pid = self.pid()
        if pid:
            procs.stop([pid], timeout=timeout)
        return pid

    # ------------------------------------------------------------- commands

    def salt(self, tgt, fun, *args, timeout=60, list_tgt=False):
        """
        ``salt`` through this master: ({minion: return}, CompletedProcess); the
        dict is empty when no minion answered, None when salt printed no JSON.
        """
        argv = [command("salt"), "-c", str(self.etc), "-t", str(timeout), "--out=json", "--static", "-l", "quiet"]
        if list_tgt:
            argv.append("-L")
        proc = _run([*argv, tgt, fun, *args], self.base, timeout=timeout + 120)
        try:
            ret = json.loads(proc.stdout or "{}")
        except ValueError:
            ret = None
        return (ret if isinstance(ret, dict) else None), proc

    def wait_for_minions(self, ids, timeout=120):
        """Until every minion of ``ids`` answers test.ping (a minion just accepted needs a moment to subscribe)."""
        deadline = time.monotonic() + timeout
        missing = set(ids)
        while missing and time.monotonic() < deadline:
            ret, _ = self.salt(",".join(sorted(missing)), "test.ping", timeout=5, list_tgt=True)
            missing -= {k for k, v in (ret or {}).items() if v is True}
            if missing:
                time.sleep(1)
        if missing:
            raise FleetError(f"{', '.join(sorted(missing))} did not answer test.ping within {timeout} s")


# ------------------------------------------------------------------ minions


def minion_pid(sandbox):
    return daemon_pid(sandbox, "salt-minion")


class Minion:
    """
    A salt-minion whose root_dir is ``sandbox``, on 127.0.0.1, its key
    generated here and pre-accepted on ``master`` (as salt-cloud does), and
    configured as salt-cloud provisions saltfleet hosts
    (``autoload_dynamic_modules: False``: it syncs once, see :meth:`sync`).
    """

    def __init__(self, master, sandbox, minion_id, settings=None):
        self.master = master
        self.sandbox = Path(sandbox)
        self.id = minion_id
        self.etc = self.sandbox / "etc" / "salt"
        self.config = {
            "id": minion_id,
            "master": LOOPBACK,
            "master_port": master.ret_port,
            "root_dir": str(self.sandbox),
            "pki_dir": str(self.etc / "pki" / "minion"),
            "user": getpass.getuser(),
            "acceptance_wait_time": 1,
            "random_reauth_delay": 0,
            "autoload_dynamic_modules": False,
            **(settings or {}),
        }

    def prepare(self):
        """Write the minion's keys (the public one accepted on the master) and its config."""
        from salt.crypt import gen_keys

        pki = Path(self.config["pki_dir"])
        pki.mkdir(parents=True, exist_ok=True, mode=0o700)
        priv, pub = (k if isinstance(k, str) else k.decode() for k in gen_keys(2048))
        (pki / "minion.pem").write_text(priv)
        (pki / "minion.pem").chmod(0o400)
        (pki / "minion.pub").write_text(pub)
        self.master.accepted_keys.mkdir(parents=True, exist_ok=True)
        (self.master.accepted_keys / self.id).write_text(pub)
        _write_yaml(self.etc / "minion", self.config)
        return self

    @property
    def log_file(self):
        return self.sandbox / "var" / "log" / "salt" / "minion"

    def pid(self):
        return minion_pid(self.sandbox)

    def start(self):
        """Start the daemon (its config and keys written first when missing); it answers once the master accepts it."""
        if self.pid():
            return False
        if not (self.etc / "minion").exists():
            self.prepare()
        argv = [command("salt-minion"), "-c", self.etc, "-d"]
        _daemonize(argv, self.sandbox, f"salt-minion {self.id}", self.log_file)
        return True


def start_minions(master, sandboxes, timeout=600, sync=True):
    """
    Start a :class:`Minion` in each of ``sandboxes`` ({id: folder}), wait until
    all answer, then sync saltfleet's modules to them once; the Minions by id.
    """
    minions = {mid: Minion(master, folder, mid) for mid, folder in sandboxes.items()}
    # Two at a time: generating RSA keys is most of a minion's preparation.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(Minion.prepare, minions.values()))
    for minion in minions.values():
        minion.start()
    master.wait_for_minions(minions, timeout)
    if sync:
        ret, proc = master.salt(",".join(minions), "saltutil.sync_all", timeout=timeout, list_tgt=True)
        missing = sorted(set(minions) - set(ret or {}))
        if missing:
            raise FleetError(f"saltutil.sync_all: no answer from {missing}: {(proc.stdout + proc.stderr)[-2000:]}")
    return minions


# ------------------------------------------------------------------ deployments


def supervisords(root):
    """
    {pid: what} of the saltfleet supervisords under a host ``root``: each
    generation of each deployment in root's registry that runs (its pidfile,
    checked against the command line, which names the generation's config).
    """
    utils = saltfleet_utils()
    found = {}
    folder = utils.saltfleet_paths.registry(root) / "deployments"
    if not folder.is_dir():
        return found
    for state in sorted(p for p in folder.iterdir() if p.is_dir()):
        # Root's state dir and run/ do not depend on the deployment's user: any name serves here.
        p = utils.saltfleet_paths.paths(root, "root", state.name)
        gens = {c.name.removeprefix("supervisord.").removesuffix(".conf") for c in state.glob("supervisord.*.conf")}
        gens |= {pidfile.stem for pidfile in p["run"].glob("*.pid")} if p["run"].is_dir() else set()
        for gen in sorted(gens):
            g = utils.saltfleet_paths.generation(p, gen)
            pid = procs.pid_from_file(g["pidfile"], str(g["conf"]))
            if pid:
                found[pid] = f"supervisord of {state.name} (generation {gen})"
    return found
