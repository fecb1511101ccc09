"""
The fleet page's speed, on the fan-out fleet: salt-api beside its master
(localfleet.api: the page's settings, a file eauth), the page in Debian's
headless Chromium (localfleet.browser), logged in once.

- First load: the logged-in page opened afresh until its hosts table is
  filled (the page's own performance mark ``saltfleet:hosts``, from the
  navigation's start), beside what it is made of: ``fleet.overview`` through
  salt-api alone, and the page loaded without its data (DOMContentLoaded).
- Progress: a one-host ``salt-run fleet.deploy``; each ledger line of it
  from the runner firing it (the event's ``_stamp``) to the page showing it,
  beside a plain HTTP client reading salt-api's ``/events`` at the same time.
"""

import datetime
import json
import threading
import time

import requests

from bench.env import BIN, BenchError, run
from localfleet.api import USERS, Api
from localfleet.browser import OBSERVE_ROLLOUT, Chromium

USER = "bench"
DEPLOYMENT = "fa"
# The demo's users, and the bench's: every runner, so that it can time Salt's own floor (test.arg).
USERS = {**USERS, USER: ["@runner"]}


def _epoch(stamp):
    return datetime.datetime.fromisoformat(stamp).timestamp()


class Listener(threading.Thread):
    """A plain client of salt-api's /events: when each saltfleet/rollout line arrived ({key: (arrived, _stamp)})."""

    def __init__(self, url, token):
        super().__init__(daemon=True)
        self.response = requests.get(f"{url}/events", headers={"X-Auth-Token": token}, stream=True, timeout=(10, 600))
        if self.response.status_code != 200:
            raise BenchError(f"salt-api /events answered {self.response.status_code}")
        self.lines = {}
        self.ended = threading.Event()

    def run(self):
        buffer = b""
        try:
            # Each chunk as it arrives (iter_lines would wait for 512 bytes).
            for chunk in self.response.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.startswith(b"data:"):
                        self.take(json.loads(line[5:]), time.time())
        except (requests.RequestException, ValueError, AttributeError):
            self.ended.set()

    def take(self, event, arrived):
        data = event.get("data") or {}
        if event.get("tag", "").startswith("saltfleet/rollout/"):
            self.lines[(data.get("id"), data.get("event"), data.get("minion"))] = (arrived, data["_stamp"])
            if data.get("event") == "end":
                self.ended.set()

    def close(self):
        self.response.close()


class PageBench:
    def __init__(self, fleet, log):
        self.fleet = fleet
        self.log = log
        self.api = Api(fleet.base, users=USERS)
        self.browser = None
        self.driver = None
        self.session = None
        self.passwords = None

    @property
    def base_url(self):
        return self.api.url.rsplit("/", 1)[0]

    def configure(self):
        """Before the master starts: the page's settings in its master.d/ (eauth is read at its start)."""
        self.passwords = self.api.configure()

    def start(self):
        self.api.start()
        response = requests.post(
            f"{self.base_url}/login",
            json={"username": USER, "password": self.passwords[USER], "eauth": "file"},
            timeout=60,
        )
        if response.status_code != 200:
            raise BenchError(f"salt-api refused the bench's login: {response.status_code} {response.text[:300]}")
        self.session = response.json()["return"][0]
        self.browser = Chromium()
        self.driver = self.browser.__enter__()
        self.driver.get(self.api.url)
        # The page's own session, as its login form leaves it.
        keep = {k: self.session[k] for k in ("token", "user", "perms", "expire")}
        self.driver.execute_script("sessionStorage.setItem('saltfleet.session', arguments[0])", json.dumps(keep))

    def stop(self):
        if self.browser is not None:
            self.browser.__exit__(None, None, None)
        self.api.stop()

    def _wait(self, script, what, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.driver.execute_script(script)
            if found:
                return found
            time.sleep(0.05)
        status = self.driver.execute_script("return document.getElementById('status').textContent")
        raise BenchError(f"the fleet page: no {what} within {timeout} s (its status: {status})")

    def runner(self, fun, kwarg=None):
        """A runner function through salt-api's runner client, as the page calls one: seconds."""
        started = time.perf_counter()
        response = requests.post(
            self.base_url,
            json=[{"client": "runner", "fun": fun, "kwarg": kwarg or {}}],
            headers={"X-Auth-Token": self.session["token"], "Accept": "application/json"},
            timeout=120,
        )
        seconds = time.perf_counter() - started
        if response.status_code != 200 or "return" not in response.json():
            raise BenchError(f"{fun} through salt-api: {response.status_code} {response.text[:300]}")
        return seconds

    def overview(self):
        """fleet.overview through salt-api alone, as the page asks for it: seconds."""
        return self.runner("fleet.overview", {"perms": self.session["perms"]})

    def floor(self):
        """Salt's own floor for any runner call through salt-api (a job process of the master's): test.arg."""
        return self.runner("test.arg")

    def first_load(self, size):
        """(seconds to the filled hosts table, seconds to DOMContentLoaded) of the page opened afresh."""
        self.driver.get(self.api.url)
        filled = self._wait(
            "const mark = performance.getEntriesByName('saltfleet:hosts')[0];"
            "const rows = document.querySelectorAll('#hosts-table tbody tr[data-host]').length;"
            f"return mark && rows === {size} ? mark.startTime : null;",
            f"hosts table of {size} rows",
        )
        static = self.driver.execute_script(
            "return performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"
        )
        return filled / 1000, static / 1000

    def progress(self, rev, host):
        """
        A one-host fleet.deploy of ``rev`` through salt-run: (the page's
        longest delay from the runner firing a line to showing it, the plain
        client's), in seconds, over the rollout's lines.
        """
        self.driver.get(self.api.url)
        self._wait("return document.querySelectorAll('#hosts-table tbody tr').length", "hosts table")
        self.driver.execute_script(OBSERVE_ROLLOUT)
        listener = Listener(self.base_url, self.session["token"])
        listener.start()
        try:
            deploy = ["fleet.deploy", DEPLOYMENT, f"rev={rev}", f"tgt={host}"]
            proc = run([BIN / "salt-run", "-c", self.fleet.etc, "-l", "quiet", "--out=json", *deploy], check=False)
            if proc.returncode:
                raise BenchError(f"fleet.deploy {DEPLOYMENT} rev={rev} tgt={host}: {proc.stdout[-1500:]}")
            if not listener.ended.wait(30):
                raise BenchError("salt-api's /events never carried the rollout's end")
        finally:
            listener.close()
        [rid] = {key[0] for key in listener.lines if key[1] == "start"}
        plain = max(arrived - _epoch(stamp) for arrived, stamp in listener.lines.values())
        seen = self._wait(
            f"const s = window.__seen.filter(x => x.key.startsWith('{rid}|'));"
            "return s.some(x => x.key.includes('|end|')) ? s : null;",
            "end of the rollout",
            timeout=30,
        )
        if len(seen) != len(listener.lines):
            raise BenchError(f"the page showed {len(seen)} of the rollout's {len(listener.lines)} lines")
        page = max(item["shown"] / 1000 - _epoch(item["stamp"]) for item in seen)
        return page, plain
