"""
saltfleet through a real master: a salt-master and local salt-minions, each
minion a sandbox of its own (its root_dir), all on 127.0.0.1, started with
localfleet's harness (the demo's).

The master's settings are localfleet.config.master_config() (what
etc/master.d/saltfleet.conf gives a real master) plus this fleet's pillar,
paths and ports. Minion keys are generated here and pre-accepted by copying
the public key into the master's pki/minions, as salt-cloud does.
"""

import json
import subprocess
import time
from pathlib import Path

import yaml

from bench.env import BIN, USER, UV_CACHE, BenchError, run, stop_everything_under, stop_supervisords
from localfleet import procs
from localfleet.config import REPO
from localfleet.daemons import Master, free_ports, start_minions

# Each fan-out deployment runs a program that costs nothing: 100 supervisords must
# not mean 100 Celery workers on a 2-core machine.
FANOUT_DEPLOYMENTS = ("fa", "fb")
IDLE_PROGRAM = {"idle": {"command": "sleep 3600"}}
NOP_SLS = "saltfleet_bench_nop"
NOP_ENV = "saltfleet_bench_nop"


def fanout_pillar(url):
    """
    Every minion gets the same two deployments of branch master of the repo at
    ``url``; saltfleet:root defaults to each minion's root_dir.
    """
    return {
        "saltfleet": {"user": USER, "uv_cache": str(UV_CACHE)},
        "deployments": {name: {"repo": url, "rev": "master", "programs": IDLE_PROGRAM} for name in FANOUT_DEPLOYMENTS},
    }


class GitServer:
    """
    ``git daemon`` serving a bare repo on 127.0.0.1, logging each request:
    how many times the fleet asks the git server (ls-remote and fetch alike).
    """

    def __init__(self, repo, log):
        self.repo, self.log = Path(repo), Path(log)
        [self.port] = free_ports(1)
        self.url = f"git://127.0.0.1:{self.port}/{self.repo.name}"
        self.proc = None

    def start(self, timeout=30):
        # No cap on clients (git daemon's is 32, past which it resets connections): 50 hosts fetch at once.
        argv = ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={self.port}", "--export-all"]
        argv += ["--max-connections=0"]
        argv += ["--verbose", f"--base-path={self.repo.parent}", str(self.repo.parent)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while "Ready to rumble" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"git daemon did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def requests(self):
        """Requests served so far."""
        return self.log.read_text(errors="replace").count("Request upload-pack for")

    def stop(self):
        if self.proc is not None:
            procs.stop([self.proc.pid], timeout=10)
            self.proc.wait()


class Fleet:
    def __init__(self, base, repo, heartbeat=True):
        self.base = Path(base)
        self.pillar_dir = self.base / "pillar"
        self.minion_dir = self.base / "m"
        self.minions = {}
        self.pillar_dir.mkdir(parents=True)
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump({"base": {"*": ["fleet", "bench"]}}))
        # The heartbeat and mine functions every saltfleet host gets (fleet.inventory reads them).
        # Without heartbeat, only the mine functions: 50 minions sharing 2 cores each run a
        # mine.update job every heartbeat interval otherwise (most of a core at 30 s).
        fleet = (REPO / "pillar" / "fleet.sls").read_text()
        if not heartbeat:
            fleet = fleet.split("\nschedule:", 1)[0] + "\n"
        (self.pillar_dir / "fleet.sls").write_text(fleet)
        self.git = GitServer(repo, self.base / "git-daemon.log")
        (self.pillar_dir / "bench.sls").write_text(yaml.safe_dump(fanout_pillar(self.git.url)))
        # Salt's own floor beside saltfleet's apply: the same `state.apply` (a highstate:
        # top file, its SLS) of one test.nop state, from an environment of its own.
        nop_tree = self.base / "nop"
        nop_tree.mkdir()
        (nop_tree / "top.sls").write_text(yaml.safe_dump({NOP_ENV: {"*": [NOP_SLS]}}))
        (nop_tree / f"{NOP_SLS}.sls").write_text(yaml.safe_dump({"bench-nop": {"test.nop": []}}))
        self.master = Master(self.base, {"id": "bench-master", "log_level_logfile": "warning"})
        self.master.config["file_roots"] = {**self.master.config["file_roots"], NOP_ENV: [str(nop_tree)]}
        self.master.config["pillar_roots"] = {"base": [str(self.pillar_dir)]}
        self.master.write()
        self.etc = self.master.etc

    # ------------------------------------------------------------- daemons

    def start_master(self, timeout=120):
        self.git.start()
        self.master.start(timeout)

    def add_minions(self, count, timeout=600):
        """Start count more minions; wait until each answers; sync saltfleet's modules to them. Returns their ids."""
        first = len(self.minions) + 1
        ids = [f"m{n:02d}" for n in range(first, first + count)]
        self.minions.update(start_minions(self.master, {mid: self.minion_dir / mid for mid in ids}, timeout=timeout))
        return ids

    # ------------------------------------------------------------- commands

    def salt(self, tgt, fun, *args, timeout=900, list_tgt=False):
        """The real `salt` CLI; returns {minion: return}."""
        ret, proc = self.master.salt(tgt, fun, *args, timeout=timeout, list_tgt=list_tgt)
        if ret is None:
            raise BenchError(
                f"salt {tgt} {fun}: no JSON (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        return ret

    @staticmethod
    def check_all(ret, ids, ok):
        missing = sorted(set(ids) - set(ret))
        bad = {k: v for k, v in ret.items() if not ok(v)}
        if missing or bad:
            raise BenchError(f"no answer from {missing}; failed: {json.dumps(bad, default=str)[:3000]}")
        return ret

    def apply(self, tgt="*", ids=None, saltenv="base"):
        """
        salt <tgt> state.apply saltenv=<saltenv> (each environment's own top
        file alone); raise unless every minion answered and every state succeeded.
        """
        ids = ids or list(self.minions)
        list_tgt = tgt != "*"
        if list_tgt:
            tgt = ",".join(ids)

        def ok(states):
            return isinstance(states, dict) and states and all(s.get("result") is True for s in states.values())

        return self.check_all(self.salt(tgt, "state.apply", f"saltenv={saltenv}", list_tgt=list_tgt), ids, ok)

    def apply_nop(self):
        """Salt alone: salt '*' state.apply of one test.nop state, no saltfleet state in it."""
        return self.apply(saltenv=NOP_ENV)

    def inventory_cli(self):
        """salt-run fleet.inventory --out=json; check it lists every minion with its deployments."""
        proc = run([BIN / "salt-run", "-c", self.etc, "--out=json", "-l", "quiet", "fleet.inventory"])
        rows = json.loads(proc.stdout)
        self._check_rows(rows)
        return rows

    def runner_client(self):
        import salt.config
        import salt.runner

        opts = salt.config.master_config(str(self.etc / "master"))
        opts["output"] = "json"
        return salt.runner.RunnerClient(opts)

    @staticmethod
    def close_runner_client(client):
        # Salt 3008.4's RunnerClient.destroy() leaves the MasterMinion it made for
        # the jobs, and MasterMinion.__del__ takes even a destroyed one for
        # unclosed (it checks for None where destroy() leaves {}): without this,
        # "unclosed MasterMinion" at exit (salt#70174, fixed by salt PR #70177).
        mminion = getattr(client, "_mminion", None)
        client.destroy()
        if mminion is not None:
            mminion.destroy()
            mminion.returners = mminion.functions = mminion.utils = None

    def inventory_in_process(self, client):
        rows = client.cmd("fleet.inventory", print_event=False, full_return=False)
        self._check_rows(rows)
        return rows

    def _check_rows(self, rows):
        if not isinstance(rows, list):
            raise BenchError(f"fleet.inventory gave {type(rows).__name__}: {str(rows)[:500]}")
        found = {r["id"]: r for r in rows}
        missing = sorted(set(self.minions) - set(found))
        if missing:
            raise BenchError(f"fleet.inventory lacks {missing}")
        short = sorted(m for m in self.minions if set(found[m]["deployments"]) != set(FANOUT_DEPLOYMENTS))
        if short:
            raise BenchError(f"fleet.inventory lacks deployments of {short}: {found[short[0]]['deployments']}")

    # ------------------------------------------------------------- teardown

    def stop(self):
        """Stop the deployments' supervisords, the minions and the master (by their pids)."""
        roots = [m.sandbox for m in self.minions.values()]
        for root in roots:
            stop_supervisords(root)
        procs.stop([pid for pid in (m.pid() for m in self.minions.values()) if pid], timeout=30)
        self.master.stop()
        self.git.stop()
        stop_everything_under(self.base, roots)
