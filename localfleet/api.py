"""
salt-api on a local master (the demo's, the bench's): the fleet page's
settings (``etc/master.d/saltfleet-page.conf`` with the repository's paths)
on a free port of 127.0.0.1, and Salt's ``file`` eauth with generated
passwords in place of PAM (no system account), written into the master's
``master.d/``; the daemon found by its pidfile.

The password file holds SHA-256 digests only; each password is made anew
when the file is written, and printed once.
"""

import hashlib
import os
import secrets
import time
from pathlib import Path

import yaml

from localfleet import procs
from localfleet.config import INSTALL_PATH, REPO
from localfleet.daemons import LOOPBACK, FleetError, _daemonize, _listening, command, free_ports, port_free

PAGE_CONF = "saltfleet-page.conf"
APP_PATH = "/fleet"
# Salt's ACL for the local users: the page reads fleet.overview; the demo user may also do all it offers.
READ = r"fleet\.overview$"
ACT = r"fleet\.(overview|deploy|rollback|promote|abort)$"
USERS = {"demo": [{"@runner": [ACT]}], "viewer": [{"@runner": [READ]}]}


def page_settings(port, users_file, acl, api_dir=None, repo=REPO):
    """
    The master settings of the fleet page: etc/master.d/saltfleet-page.conf
    with ``repo``'s paths, ``port``, and a file eauth (``users_file``,
    SHA-256 digests) with ``acl`` ({user: [permissions]}) in place of PAM;
    with ``api_dir``, salt-api's pidfile and log there: relative to the
    master's root_dir, which Salt puts before every path of a daemon (the
    demo's is a short link to .demo/).
    """
    text = (Path(repo) / "etc" / "master.d" / PAGE_CONF).read_text()
    settings = yaml.safe_load(text.replace(INSTALL_PATH, str(repo)))
    settings["rest_cherrypy"].update(host=LOOPBACK, port=port)
    settings["external_auth"] = {"file": {"^filename": str(users_file), "^hashtype": "sha256", **acl}}
    if api_dir is not None:
        settings["api_pidfile"] = str(Path(api_dir) / "run" / "salt-api.pid")
        settings["api_logfile"] = str(Path(api_dir) / "log" / "salt-api")
    return settings


def write_users(path, names):
    """A file eauth's users file: a new random password for each of ``names`` (returned), digests only on disk."""
    passwords = {name: secrets.token_urlsafe(12) for name in names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.writelines(f"{name}:{hashlib.sha256(pw.encode()).hexdigest()}\n" for name, pw in passwords.items())
    os.replace(path.with_suffix(".tmp"), path)
    return passwords


def _started_at(pid):
    """When process ``pid`` started (epoch seconds), from /proc."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    lines = Path("/proc/stat").read_text().splitlines()
    boot = next(int(line.split()[1]) for line in lines if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class Api:
    """
    salt-api beside the local master whose root_dir is ``base`` (localfleet's
    layout: config in etc/salt): its settings in the master's master.d/, its
    pidfile and log under var/api/.
    """

    def __init__(self, base, users=None):
        self.base = Path(base)
        self.etc = self.base / "etc" / "salt"
        self.dropin = self.etc / "master.d" / PAGE_CONF
        self.users_file = self.etc / "page-users"
        self.api_dir = self.base / "var" / "api"
        self.users = users or USERS

    @property
    def pidfile(self):
        return self.api_dir / "run" / "salt-api.pid"

    @property
    def log_file(self):
        return self.api_dir / "log" / "salt-api"

    def settings(self):
        """What the master's master.d/ holds for the page (None when not written yet)."""
        try:
            return yaml.safe_load(self.dropin.read_text())
        except OSError:
            return None

    @property
    def port(self):
        return (self.settings() or {}).get("rest_cherrypy", {}).get("port")

    @property
    def url(self):
        return f"http://{LOOPBACK}:{self.port}{APP_PATH}"

    def pid(self):
        """salt-api's pid while it runs, else None (its pidfile, and a command line naming this config folder)."""
        return procs.pid_from_file(self.pidfile, str(self.etc))

    def configure(self):
        """Write the drop-in (the port of the last run while still free) and new passwords: {user: password}."""
        port = self.port
        if not port or not (self.pid() or port_free(port)):
            [port] = free_ports(1)
        settings = page_settings(port, self.users_file, self.users, self.api_dir.relative_to(self.base))
        text = "# Written by localfleet/api.py; rewritten at every run.\n"
        text += yaml.safe_dump(settings, default_flow_style=False, sort_keys=True)
        if not self.dropin.exists() or self.dropin.read_text() != text:
            self.dropin.parent.mkdir(parents=True, exist_ok=True)
            self.dropin.write_text(text)
        for folder in ("run", "log"):
            (self.api_dir / folder).mkdir(parents=True, exist_ok=True)
        return write_users(self.users_file, self.users)

    def read_by(self, master_pid):
        """True when the master ``master_pid`` started after the drop-in last changed (it reads eauth at its start)."""
        return bool(master_pid) and _started_at(master_pid) >= self.dropin.stat().st_mtime

    def start(self, timeout=60):
        """Start salt-api and wait until it answers on its port; False when it already ran."""
        if self.pid():
            return False
        _daemonize([command("salt-api"), "-c", str(self.etc), "-d"], self.base, "salt-api", self.log_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() and _listening(self.port):
                return True
            time.sleep(0.2)
        raise FleetError(f"salt-api did not answer on {LOOPBACK}:{self.port} within {timeout} s; see {self.log_file}")

    def stop(self, timeout=10):
        """
        Stop salt-api and every process it started; the pid it had, or None.
        SIGKILL after ``timeout``: a salt-api stopping waits for its event
        streams, and a stream waits for the master's next event.
        """
        pid = self.pid()
        if pid:
            started = procs.tree([pid])
            procs.stop(list(started), timeout=timeout)
            deadline = time.monotonic() + 10
            while procs.still_running(started) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = procs.still_running(started)
            if left:
                raise FleetError(f"salt-api processes still run: {left}")
        return pid


# ------------------------------------------------------------------ the demo


def _shown(path):
    path = Path(path)
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def up(master, timeout=120):
    """
    `make demo`'s page: salt-api beside the running demo ``master``, its
    settings and new passwords written (the master restarted if it started
    before them), then the page's URL and the passwords printed.
    """
    api = Api(master.base)
    passwords = api.configure()
    print(f"\n==> the fleet page: salt-api on {LOOPBACK}:{api.port}, settings in {_shown(api.dropin)}", flush=True)
    if not api.read_by(master.pid()):
        print("salt-master restarts to read them (external_auth is read at its start)", flush=True)
        master.stop()
        master.start(timeout)
        minions = sorted(p.name for p in master.accepted_keys.iterdir())
        if minions:
            master.wait_for_minions(minions, timeout)
    if api.start():
        print(f"salt-api runs (pid {api.pid()}), log {_shown(api.log_file)}")
    else:
        print(f"salt-api already runs (pid {api.pid()})")
    print(
        f"""
The fleet page: {api.url}   (eauth: file)
    user demo    password {passwords["demo"]}   (reads, deploys, rolls back)
    user viewer  password {passwords["viewer"]}   (reads only)
New passwords at every `make demo`. A real master uses PAM and TLS: README, "The fleet page".
""",
        flush=True,
    )
    return api


def down(base):
    """`make demo-down`: stop the demo's salt-api, before the master it talks to."""
    pid = Api(base).stop()
    if pid:
        print(f"==> stopped salt-api (pid {pid})", flush=True)
