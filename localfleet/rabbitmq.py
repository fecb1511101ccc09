"""
A private RabbitMQ (Debian's ``rabbitmq-server``) on 127.0.0.1, for the tests
and the bench: its own node name, ports, data, logs, Erlang cookie and epmd,
all under one folder, so it never meets the machine's own RabbitMQ (if any)
nor another test run's.

Everything it opens listens on loopback only: AMQP, the Erlang distribution
port, and its epmd (a private port, so stopping it stops nobody else's); the
``rabbitmqctl`` it runs does not listen at all. It runs as the ``rabbitmq``
user when started by root, as the Debian package's own scripts do.

    with RabbitMQ() as broker:
        url = broker.vhost("test-1")     # amqp://guest:guest@127.0.0.1:PORT/test-1
"""

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from localfleet import procs
from localfleet.daemons import LOOPBACK, FleetError, free_ports

# Debian's rabbitmq-server package: the scripts behind /usr/sbin's wrappers (which `su` and reset the environment).
SBIN = Path("/usr/lib/rabbitmq/bin")
USER = "rabbitmq"


def installed():
    """True when Debian's rabbitmq-server (and Erlang's epmd) are on this machine."""
    return (SBIN / "rabbitmq-server").exists() and (SBIN / "rabbitmqctl").exists() and shutil.which("epmd") is not None


class RabbitMQ:
    """
    One rabbitmq-server node with everything under ``base`` (a new folder in
    /tmp by default, removed by :meth:`stop`): mnesia, logs, config, cookie.
    """

    def __init__(self, base=None):
        if not installed():
            raise FleetError("rabbitmq-server is not installed: apt-get install rabbitmq-server (.ci/run does)")
        self.own_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="sfmq-", dir="/tmp"))
        self.port, self.dist_port, self.epmd_port = free_ports(3)
        self.node = f"sf{secrets.token_hex(4)}@localhost"
        self.account = pwd.getpwnam(USER) if os.geteuid() == 0 else None
        self.proc = None
        self.snapshot = {}

    # ------------------------------------------------------------- paths

    @property
    def log(self):
        return self.base / "log" / "rabbit.log"

    def url(self, vhost="/"):
        """The AMQP URL of ``vhost`` (guest may log in from 127.0.0.1 only, RabbitMQ's default)."""
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/{vhost.replace('/', '%2F')}"

    def _env(self):
        # Only what RabbitMQ needs: no caller's RABBITMQ_* or ERL_* leaks in, /etc/rabbitmq is not read.
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.base),  # the Erlang cookie
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

    def _prepare(self):
        for folder in (self.base, self.base / "mnesia", self.base / "log"):
            folder.mkdir(mode=0o700, exist_ok=True)
        files = {
            "rabbitmq-env.conf": "# empty: the environment says everything\n",
            "rabbitmq.conf": f"listeners.tcp.default = {LOOPBACK}:{self.port}\n",
            "advanced.config": "[].\n",
            # No plugin: the management plugin would listen on every interface.
            "enabled_plugins": "[].\n",
            ".erlang.cookie": secrets.token_hex(16).upper(),
        }
        for name, text in files.items():
            (self.base / name).write_text(text)
        (self.base / ".erlang.cookie").chmod(0o400)
        if self.account is not None:
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, self.account.pw_uid, self.account.pw_gid, follow_symlinks=False)

    # ------------------------------------------------------------- life

    def start(self, timeout=120):
        """Start the node and wait until it accepts AMQP logins; a FleetError (with its log's tail) if it does not."""
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
                self.snapshot = procs.tree([self.proc.pid])
                return self
            time.sleep(0.3)
        self.stop()
        raise FleetError(f"rabbitmq-server did not accept AMQP logins within {timeout} s: {self._tail()}")

    def _answers(self):
        import amqp

        conn = amqp.Connection(host=f"{LOOPBACK}:{self.port}", connect_timeout=2)
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
        """A new virtual host ``name`` that guest may use: its URL. Each test's queues and messages stay in its own."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return self.url(name)

    def stop(self, timeout=60):
        """Stop the node (rabbitmqctl stop), then its epmd; kill what is left of either; remove ``base`` if ours."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(FleetError, subprocess.TimeoutExpired):
                self.ctl("stop", timeout=timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc is not None:
            procs.stop([*procs.still_running(self.snapshot), self.proc.pid], timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._stop_epmd()
        if self.own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def _stop_epmd(self):
        # Our epmd alone: it listens on our private port (epmd daemonizes, so it is no child of the node).
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [shutil.which("epmd") or "epmd", "-port", str(self.epmd_port), "-kill"],
                env=self._env(),
                capture_output=True,
                timeout=10,
                check=False,
            )
        pids = _listeners(self.epmd_port)
        if pids:
            procs.stop(pids, timeout=10)

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
