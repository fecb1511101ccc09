"""
A private RabbitMQ (Debian's ``rabbitmq-server``) on 127.0.0.1, for the tests,
the bench and the demo: its own node name, ports, data, logs, Erlang cookie,
epmd and login, all under one folder, so it never meets the machine's own
RabbitMQ (if any) nor another run's.

Everything it opens listens on loopback only: AMQP, the Erlang distribution
port, and its epmd (a private port, so stopping it stops nobody else's; epmd
always adds the IPv6 loopback to the addresses it is given); the
``rabbitmqctl`` it runs does not listen at all. It runs as the ``rabbitmq``
user when started by root, as the Debian package's own scripts do, or as
whoever starts it (``user=None``). Its one login (no ``guest``) has a random
password, given in its config file and its folder's ``url`` file, never on a
command line.

    with RabbitMQ() as broker:
        url = broker.vhost("test-1")     # amqp://broker:PASSWORD@127.0.0.1:PORT/test-1

A node in a folder of the caller's (``base``) is kept: its settings stay in
``base/node.json``, so a later process finds it running (:meth:`pid`), or
starts it again with the same name, data and login (:meth:`start`), and
:meth:`stop` stops it whoever started it.
"""

import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from localfleet import procs
from localfleet.daemons import LOOPBACK, FleetError, free_ports, port_free

# Debian's rabbitmq-server package: the scripts behind /usr/sbin's wrappers (which `su` and reset the environment).
SBIN = Path("/usr/lib/rabbitmq/bin")
USER = "rabbitmq"
LOGIN = "broker"


def installed():
    """True when Debian's rabbitmq-server (and Erlang's epmd) are on this machine."""
    return (SBIN / "rabbitmq-server").exists() and (SBIN / "rabbitmqctl").exists() and shutil.which("epmd") is not None


class RabbitMQ:
    """
    One rabbitmq-server node with everything under ``base`` (a new folder in
    /tmp by default, removed by :meth:`stop`; a folder given is kept, the
    node's settings with it): mnesia, logs, config, cookie. When root starts
    it, it runs as ``user`` (None: as root).
    """

    def __init__(self, base=None, user=USER):
        if not installed():
            raise FleetError(
                "rabbitmq-server is not installed: apt-get install rabbitmq-server (make system-packages does)"
            )
        self.own_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="sfmq-", dir="/tmp"))
        self.account = pwd.getpwnam(user) if user and os.geteuid() == 0 else None
        self.proc = None
        saved = self._saved()
        self.node = saved.get("node") or f"sf{secrets.token_hex(4)}@localhost"
        self.password = saved.get("password") or secrets.token_hex(16)
        ports = (saved.get("port"), saved.get("dist_port"), saved.get("epmd_port"))
        self.port, self.dist_port, self.epmd_port = ports if all(ports) else free_ports(3)

    # ------------------------------------------------------------- paths

    @property
    def log(self):
        return self.base / "log" / "rabbit.log"

    @property
    def settings_file(self):
        return self.base / "node.json"

    @property
    def url_file(self):
        """The URL of the default virtual host, for a shell to read (``$(cat ...)``) rather than type."""
        return self.base / "url"

    def url(self, vhost="/"):
        """The AMQP URL of ``vhost`` (its login may use every virtual host this node has)."""
        return f"amqp://{LOGIN}:{quote(self.password, safe='')}@{LOOPBACK}:{self.port}/{quote(vhost, safe='')}"

    def _saved(self):
        if self.own_base:
            return {}
        try:
            saved = json.loads((self.base / "node.json").read_text())
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def _env(self):
        # Only what RabbitMQ needs: no caller's RABBITMQ_* or ERL_* leaks in, /etc/rabbitmq is not read.
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.base),  # the Erlang cookie; the node's command line names it (-home)
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # rabbitmqctl is a hidden Erlang node of its own: it needs no listener.
            "RABBITMQ_CTL_ERL_ARGS": "-dist_listen false",
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_LOGS": str(self.log),
            "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
        }

    def _popen_user(self):
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def _write(self, name, text, mode=0o600):
        path = self.base / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a 0400 file (the cookie) is replaced, not rewritten
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)

    def _prepare(self):
        for folder in (self.base, self.base / "mnesia", self.base / "log"):
            folder.mkdir(mode=0o700, exist_ok=True)
        self.base.chmod(0o700)
        settings = {
            "node": self.node,
            "password": self.password,
            "port": self.port,
            "dist_port": self.dist_port,
            "epmd_port": self.epmd_port,
        }
        files = {
            "node.json": json.dumps(settings, indent=1, sort_keys=True) + "\n",
            "url": self.url() + "\n",
            "rabbitmq-env.conf": "# empty: the environment says everything\n",
            # The login, made when the node's data is new (its first start); no guest.
            "rabbitmq.conf": (
                f"listeners.tcp.default = {LOOPBACK}:{self.port}\n"
                f"default_user = {LOGIN}\ndefault_pass = {self.password}\ndefault_vhost = /\n"
            ),
            "advanced.config": "[].\n",
            # No plugin: the management plugin would listen on every interface.
            "enabled_plugins": "[].\n",
        }
        for name, text in files.items():
            self._write(name, text)
        if not (self.base / ".erlang.cookie").exists():
            self._write(".erlang.cookie", secrets.token_hex(16).upper(), mode=0o400)
        if self.account is not None:
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, self.account.pw_uid, self.account.pw_gid, follow_symlinks=False)

    def choose_ports(self):
        """
        The ports the node starts on (its URL's too): those of its last start
        while they are free (or the epmd on ours is ours), else new ones. A
        running node keeps its own.
        """
        if self.pid():
            return
        epmd = self.epmd_pid()
        ports_free = port_free(self.port) and port_free(self.dist_port) and (epmd or port_free(self.epmd_port))
        if not ports_free:
            if epmd:
                procs.stop([epmd], timeout=10)
            self.port, self.dist_port, self.epmd_port = free_ports(3)

    # ------------------------------------------------------------- what runs

    def pid(self):
        """
        The pid of the running node's launcher (the ``rabbitmq-server`` script,
        whose child is the Erlang VM), or of the VM itself; None when it does not run.
        """
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        vm = procs.pid_from_file(self.base / "rabbit.pid", str(self.base))
        if vm is None:
            return None
        parent = procs.parent(vm)
        return parent if parent and procs.runs(parent, str(SBIN / "rabbitmq-server")) else vm

    def epmd_pid(self):
        """The pid of the epmd on this node's private port (an ``epmd`` listening there), else None."""
        return next((pid for pid in _listeners(self.epmd_port) if procs.runs(pid, "epmd")), None)

    # ------------------------------------------------------------- life

    def start(self, timeout=120):
        """
        Start the node (unless it runs already) and wait until it accepts
        AMQP logins; itself. A FleetError (with its log's tail) if it does not.
        """
        if self.pid():
            if not self._answers():
                raise FleetError(f"rabbitmq-server runs (pid {self.pid()}) but accepts no login: {self._tail()}")
            return self
        self.choose_ports()
        self._prepare()
        with open(self.base / "log" / "startup.log", "ab") as out:
            self.proc = subprocess.Popen(
                [str(SBIN / "rabbitmq-server")],
                cwd=self.base,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._popen_user(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise FleetError(f"rabbitmq-server exited {self.proc.returncode}: {self._tail()}")
            if self._answers():
                return self
            time.sleep(0.3)
        self.stop()
        raise FleetError(f"rabbitmq-server did not accept AMQP logins within {timeout} s: {self._tail()}")

    def _answers(self):
        import amqp

        conn = amqp.Connection(host=f"{LOOPBACK}:{self.port}", userid=LOGIN, password=self.password, connect_timeout=2)
        try:
            conn.connect()
        except Exception:  # not up yet: refused, reset, or a login cut short
            return False
        with contextlib.suppress(Exception):
            conn.close()
        return True

    def _tail(self):
        text = ""
        for path in (self.base / "log" / "startup.log", self.log):
            with contextlib.suppress(OSError):
                text += f"\n--- {path}:\n" + path.read_text(errors="replace")[-2000:]
        return text

    def ctl(self, *args, timeout=120):
        """``rabbitmqctl`` against this node (as its user, with its cookie); its CompletedProcess, checked."""
        proc = subprocess.run(
            [str(SBIN / "rabbitmqctl"), "-n", self.node, *args],
            cwd=self.base,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._popen_user(),
        )
        if proc.returncode:
            raise FleetError(f"rabbitmqctl {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def vhost(self, name):
        """A new virtual host ``name`` for the node's login: its URL. A test's queues and messages stay in its own."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, LOGIN, ".*", ".*", ".*")
        return self.url(name)

    def stop(self, timeout=60):
        """
        Stop the node (rabbitmqctl stop), then its epmd; kill what is left of
        either; remove ``base`` if ours. The pid it had, or None.
        """
        pid = self.pid()
        running = procs.tree([pid]) if pid else {}
        if running:
            with contextlib.suppress(FleetError, subprocess.TimeoutExpired):
                self.ctl("stop", timeout=timeout)
            deadline = time.monotonic() + timeout
            while procs.still_running(running) and time.monotonic() < deadline:
                time.sleep(0.1)
            procs.stop(list(procs.still_running(running)), timeout=10)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._stop_epmd()
        if self.own_base:
            shutil.rmtree(self.base, ignore_errors=True)
        return pid

    def _stop_epmd(self):
        # Our epmd alone: it listens on our private port (epmd daemonizes, so it is no child of the node).
        if self.epmd_pid() is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [shutil.which("epmd") or "epmd", "-port", str(self.epmd_port), "-kill"],
                env=self._env(),
                capture_output=True,
                timeout=10,
                check=False,
            )
        pid = self.epmd_pid()
        if pid:
            procs.stop([pid], timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _listeners(port):
    """The pids listening on TCP ``port`` (any address)."""
    import psutil

    found = set()
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                found.add(conn.pid)
    return sorted(found)
