"""
saltfleet through a real master: a salt-master and local salt-minions, each
minion a sandbox of its own (its root_dir), all on 127.0.0.1.

The master's settings are localfleet.config.master_config() (what
etc/master.d/saltfleet.conf gives a real master) plus this fleet's pillar,
paths and ports. Minion keys are generated here and pre-accepted by copying
the public key into the master's pki/minions, as salt-cloud does.
"""

import contextlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from bench.env import BIN, USER, UV_CACHE, BenchError, run, stop_supervisords
from localfleet import procs
from localfleet.config import REPO, master_config

# Each fan-out deployment runs a program that costs nothing: 100 supervisords must
# not mean 100 Celery workers on a 2-core machine.
FANOUT_DEPLOYMENTS = ("fa", "fb")
IDLE_PROGRAM = {"idle": {"command": "sleep 3600"}}
NOP_SLS = "saltfleet_bench_nop"


def _free_ports(count):
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def fanout_pillar(repo):
    """Every minion gets the same two deployments; saltfleet:root defaults to each minion's root_dir."""
    return {
        "saltfleet": {"user": USER, "uv_cache": str(UV_CACHE)},
        "deployments": {
            name: {"repo": str(repo), "rev": "v1", "programs": IDLE_PROGRAM} for name in FANOUT_DEPLOYMENTS
        },
    }


class Fleet:
    def __init__(self, base, repo, heartbeat=True):
        self.base = Path(base)
        self.etc = self.base / "etc" / "salt"
        self.pillar_dir = self.base / "pillar"
        self.minion_dir = self.base / "m"
        self.minions = []
        self.pidfile = self.base / "var" / "run" / "salt-master.pid"
        self.publish_port, self.ret_port = _free_ports(2)
        self.pillar_dir.mkdir(parents=True)
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump({"base": {"*": ["fleet", "bench"]}}))
        # The heartbeat and mine functions every saltfleet host gets (fleet.inventory reads them).
        # Without heartbeat, only the mine functions: 50 minions sharing 2 cores each run a
        # mine.update job every heartbeat interval otherwise (most of a core at 30 s).
        fleet = (REPO / "pillar" / "fleet.sls").read_text()
        if not heartbeat:
            fleet = fleet.split("\nschedule:", 1)[0] + "\n"
        (self.pillar_dir / "fleet.sls").write_text(fleet)
        (self.pillar_dir / "bench.sls").write_text(yaml.safe_dump(fanout_pillar(repo)))
        # Salt's own floor beside saltfleet's apply: the same fan-out of one test.nop state.
        nop_tree = self.base / "nop"
        nop_tree.mkdir()
        (nop_tree / f"{NOP_SLS}.sls").write_text(yaml.safe_dump({"bench-nop": {"test.nop": []}}))
        master = master_config()
        master["file_roots"] = {"base": [*master["file_roots"]["base"], str(nop_tree)]}
        master.update(
            {
                "id": "bench-master",
                "root_dir": str(self.base),
                "conf_file": str(self.etc / "master"),
                "pki_dir": str(self.etc / "pki" / "master"),
                "cachedir": str(self.base / "var" / "cache" / "salt" / "master"),
                "sock_dir": str(self.base / "var" / "run" / "salt" / "master"),
                "pidfile": str(self.pidfile),
                "log_file": str(self.base / "var" / "log" / "salt" / "master"),
                "log_level_logfile": "warning",
                "user": USER,
                "interface": "127.0.0.1",
                "publish_port": self.publish_port,
                "ret_port": self.ret_port,
                "pillar_roots": {"base": [str(self.pillar_dir)]},
                "open_mode": False,
                "auto_accept": False,
            }
        )
        self.master = master
        self.etc.mkdir(parents=True)
        (self.etc / "master").write_text(yaml.safe_dump(master))

    # ------------------------------------------------------------- daemons

    def master_pid(self):
        return procs.pid_from_file(self.pidfile, str(self.etc))

    def start_master(self, timeout=120):
        for key in ("pki_dir", "cachedir", "sock_dir"):
            Path(self.master[key]).mkdir(parents=True, exist_ok=True)
        (Path(self.master["pki_dir"]) / "minions").mkdir(parents=True, exist_ok=True)
        Path(self.master["log_file"]).parent.mkdir(parents=True, exist_ok=True)
        run([BIN / "salt-master", "-c", self.etc, "-d"], cwd=self.base)
        deadline = time.monotonic() + timeout
        pub_ipc = Path(self.master["sock_dir"]) / "master_event_pub.ipc"
        while time.monotonic() < deadline:
            if self.master_pid() and pub_ipc.exists():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.ret_port), 1):
                    return
            time.sleep(0.2)
        raise BenchError(f"salt-master did not start within {timeout} s; see {self.master['log_file']}")

    def _prepare_minion(self, minion_id):
        from salt.crypt import gen_keys

        sandbox = self.minion_dir / minion_id
        conf = sandbox / "etc" / "salt"
        pki = conf / "pki" / "minion"
        pki.mkdir(parents=True)
        priv, pub = gen_keys(2048)
        (pki / "minion.pem").write_text(priv if isinstance(priv, str) else priv.decode())
        (pki / "minion.pem").chmod(0o400)
        pub = pub if isinstance(pub, str) else pub.decode()
        (pki / "minion.pub").write_text(pub)
        (Path(self.master["pki_dir"]) / "minions" / minion_id).write_text(pub)
        minion = {
            "id": minion_id,
            "master": "127.0.0.1",
            "master_port": self.ret_port,
            "root_dir": str(sandbox),
            "pki_dir": str(pki),
            "user": USER,
            "log_level_logfile": "warning",
            "acceptance_wait_time": 1,
            "random_reauth_delay": 0,
            # As salt-cloud provisions saltfleet hosts (_utils/saltfleet_cloud.py): state.apply does
            # not sync_all first; add_minions syncs once.
            "autoload_dynamic_modules": False,
        }
        (conf / "minion").write_text(yaml.safe_dump(minion))
        return sandbox

    def _minion_pid(self, sandbox):
        return procs.pid_from_file(sandbox / "var" / "run" / "salt-minion.pid", str(sandbox / "etc" / "salt"))

    def add_minions(self, count, timeout=600):
        """Start count more minions; wait until each answers; sync saltfleet's modules to them. Returns their ids."""
        first = len(self.minions) + 1
        ids = [f"m{n:02d}" for n in range(first, first + count)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            sandboxes = list(pool.map(self._prepare_minion, ids))
        for sandbox in sandboxes:
            run([BIN / "salt-minion", "-c", sandbox / "etc" / "salt", "-d"], cwd=sandbox)
        self.minions.extend(ids)
        self.wait_for(ids, timeout)
        self.check_all(self.salt(",".join(ids), "saltutil.sync_all", "-L", timeout=timeout), ids, lambda r: True)
        return ids

    def wait_for(self, ids, timeout):
        deadline = time.monotonic() + timeout
        missing = set(ids)
        while missing and time.monotonic() < deadline:
            ret = self.salt(",".join(sorted(missing)), "test.ping", "-L", timeout=10, check=False)
            missing -= {k for k, v in ret.items() if v is True}
            if missing:
                time.sleep(1)
        if missing:
            raise BenchError(
                f"minions {sorted(missing)} did not answer within {timeout} s (logs under {self.minion_dir})"
            )

    # ------------------------------------------------------------- commands

    def salt(self, tgt, fun, *args, timeout=900, check=True):
        """The real `salt` CLI; returns {minion: return}."""
        flags = [a for a in args if a.startswith("-")]
        fargs = [a for a in args if not a.startswith("-")]
        proc = run(
            [
                BIN / "salt",
                "-c",
                self.etc,
                "-t",
                str(timeout),
                "--out=json",
                "--static",
                "-l",
                "quiet",
                *flags,
                tgt,
                fun,
                *fargs,
            ],
            check=False,
            timeout=timeout + 120,
        )
        try:
            return json.loads(proc.stdout or "{}")
        except ValueError:
            if check:
                raise BenchError(
                    f"salt {tgt} {fun}: no JSON (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
                ) from None
            return {}

    @staticmethod
    def check_all(ret, ids, ok):
        missing = sorted(set(ids) - set(ret))
        bad = {k: v for k, v in ret.items() if not ok(v)}
        if missing or bad:
            raise BenchError(f"no answer from {missing}; failed: {json.dumps(bad, default=str)[:3000]}")
        return ret

    def apply(self, tgt="*", ids=None, sls=None):
        """salt <tgt> state.apply [sls]; raise unless every minion answered and every state succeeded."""
        ids = ids or self.minions
        if tgt != "*":
            tgt, extra = ",".join(ids), ("-L",)
        else:
            extra = ()

        def ok(states):
            return isinstance(states, dict) and states and all(s.get("result") is True for s in states.values())

        return self.check_all(self.salt(tgt, "state.apply", *extra, *filter(None, [sls])), ids, ok)

    def apply_nop(self):
        """Salt alone: salt '*' state.apply of one test.nop state, no saltfleet state in it."""
        return self.apply(sls=NOP_SLS)

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
        with contextlib.suppress(Exception):
            stop_supervisords(self.minion_dir)
        pids = [self._minion_pid(self.minion_dir / m) for m in self.minions]
        pids.append(self.master_pid())
        procs.stop([p for p in pids if p], timeout=30)
        leftovers = procs.processes_under(self.base) if self.base.exists() else {}
        if leftovers:
            procs.stop(list(leftovers), timeout=15)
