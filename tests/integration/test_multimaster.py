"""
Two salt-masters in failover, and saltfleet on them: two real minions list
both masters (``master_type: failover``), the first master is stopped, the
minions fail over to the second, a state.apply through the second converges
deployments of the sample Celery app, and the second master's fleet.inventory
and deploy ledger are right (README, "Scaling").

Both masters serve the same file and pillar roots, hold the same master key
pair and both minions' keys. Each keeps its own minion data cache (what
fleet.inventory reads); their ``<cachedir>/saltfleet`` (the deploy ledger and
locks) is one shared folder.

The daemons, hosts and deployments are the module's: the fixtures take them
through the story once (deploy through the first master, stop it, fail over),
in order, and each test checks one part of it.
"""

import contextlib
import copy
import os
import shutil

import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import stop_deployments
from tests.apps import celery_client, run_task, sample_repo
from tests.conftest import broker_folder, sandbox_root, short_tmpdir, wait_for

HEARTBEAT = 4  # seconds; pillar/fleet.sls says 60, tests cannot wait that long
APP, REPORT = "mm-app", "mm-report"


@pytest.fixture(scope="module")
def places(deploy_user, second_user, second_uv_cache):
    """
    The sample app's repo, the broker folder the workers and the tests share
    (REPORT's own: it runs as the second user), a sandbox root per host, the ledger.
    """
    base = short_tmpdir("sfm-")
    repo, shas = sample_repo(base)
    data = short_tmpdir("sfd-", owner=deploy_user)
    for folder in ("queue", "control", "results", "processed", "executions"):
        (data / folder).mkdir()
        shutil.chown(data / folder, deploy_user.pw_uid, deploy_user.pw_gid)
    report = broker_folder(second_user)
    (report / "executions").mkdir()
    shutil.chown(report / "executions", second_user.pw_uid, second_user.pw_gid)
    own = {"user": second_user.pw_name, "uv_cache": str(second_uv_cache)}
    roots = [sandbox_root("sfh-", deploy_user) for _ in range(2)]
    # The shared folder both masters keep saltfleet's records in (root's and private, as the ledger makes it).
    ledger = short_tmpdir("sfl-")
    ledger.chmod(0o700)
    yield {"repo": repo, "shas": shas, "data": data, "report": report, "own": own, "roots": roots, "ledger": ledger}
    for root in roots:
        stop_deployments(root, timeout=60)
    for path in (base, data, report, ledger, *roots):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pillar_root(tmp_path_factory, repo_root):
    """The pillar tree both masters serve: the repository's fleet.sls (a faster heartbeat) and a file per host."""
    path = tmp_path_factory.mktemp("mm-pillar")
    fleet = (
        (repo_root / "pillar" / "fleet.sls").read_text().replace("set heartbeat = 60", f"set heartbeat = {HEARTBEAT}")
    )
    assert f"set heartbeat = {HEARTBEAT}" in fleet
    (path / "fleet.sls").write_text(fleet)
    return path


def master_overrides(saltfleet_master_config, pillar_root):
    overrides = copy.deepcopy(saltfleet_master_config)
    overrides["pillar_roots"] = {"base": [str(pillar_root)]}
    overrides["interface"] = "127.0.0.1"
    return overrides


@pytest.fixture(scope="module")
def masters(salt_factories, saltfleet_master_config, pillar_root, places):
    """
    Two masters with one key pair (the minions cache the master's public key
    and refuse another) and the same ports, the second on 127.0.0.2: a
    failover minion notices a dead master by its lost connection to the
    master's publish port (``master_alive_interval``, Salt's status.master),
    one port number for every master, as masters on hosts of their own have.
    Both stay on the loopback.
    """
    overrides = master_overrides(saltfleet_master_config, pillar_root)
    first = salt_factories.salt_master_daemon(random_string("mm-first-"), overrides=overrides)
    second_overrides = copy.deepcopy(overrides)
    second_overrides.update(
        interface="127.0.0.2", ret_port=first.config["ret_port"], publish_port=first.config["publish_port"]
    )
    second = salt_factories.salt_master_daemon(random_string("mm-second-"), overrides=second_overrides)
    with contextlib.ExitStack() as stack:
        stack.enter_context(first.started(start_timeout=120))
        pki = second.config["pki_dir"]
        os.makedirs(pki, mode=0o700, exist_ok=True)
        for name in ("master.pem", "master.pub"):
            shutil.copy2(os.path.join(first.config["pki_dir"], name), os.path.join(pki, name))
        stack.enter_context(second.started(start_timeout=120))
        for master in (first, second):
            os.symlink(places["ledger"], os.path.join(master.config["cachedir"], "saltfleet"))
        yield first, second
        # The first master is stopped half way through the module; the ExitStack copes with that.


@pytest.fixture(scope="module")
def minions(masters):
    """Two minions listing both masters, the first one first; their keys accepted on both."""
    first, second = masters
    port = first.config["ret_port"]
    overrides = {
        "master": [f"{first.config['interface']}:{port}", f"{second.config['interface']}:{port}"],
        "master_type": "failover",
        # The publish port of every master: the channel's, and the one whose connection the alive check looks for.
        "publish_port": first.config["publish_port"],
        "master_alive_interval": 5,
        "master_tries": -1,
        "retry_dns": 0,
        "log_level_logfile": "info",
    }
    factories = sorted(
        (first.salt_minion_daemon(random_string(f"mm-host{n}-"), overrides=overrides) for n in (1, 2)),
        key=lambda f: f.id,
    )
    with contextlib.ExitStack() as stack:
        for factory in factories:
            stack.enter_context(factory.started(start_timeout=120))
        # salt-factories accepted each key on the first master; the second holds the same keys.
        for factory in factories:
            src = os.path.join(first.config["pki_dir"], "minions", factory.id)
            dst_dir = os.path.join(second.config["pki_dir"], "minions")
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copy2(src, os.path.join(dst_dir, factory.id))
        yield factories


class Pair:
    """The two masters' CLIs, the hosts' pillar and the Celery client."""

    def __init__(self, masters, minions, pillar_root, places, user, settings):
        self.first, self.second = masters
        self.ids = [m.id for m in minions]
        self.pillar_root, self.places, self.user, self.settings = pillar_root, places, user, settings
        self.tasks = {APP: celery_client(places["data"]), REPORT: celery_client(places["report"])}
        self.cli = {m.id: m.salt_cli(timeout=900) for m in masters}
        self.run_cli = {m.id: m.salt_run_cli(timeout=300) for m in masters}

    def salt(self, master, *args, **kwargs):
        return self.cli[master.id].run("-L", *args, minion_tgt=",".join(self.ids), **kwargs)

    def salt_run(self, master, *args, **kwargs):
        return self.run_cli[master.id].run(*args, **kwargs)

    def queue(self, name, host):
        return f"{name}.h{self.ids.index(host) + 1}"

    def spec(self, name, host, rev):
        queue = self.queue(name, host)
        data = self.places["report" if name == REPORT else "data"]
        return {
            "repo": str(self.places["repo"]),
            "rev": rev,
            "env": {"SAMPLEAPP_DATA": str(data)},
            "programs": {
                "worker": {"command": f"celery -A sampleapp worker -Q {queue} -c 1 -n {queue}@%%h", "startsecs": 3}
            },
            # A deployment's user is its own: REPORT runs as the second user.
            **(self.places["own"] if name == REPORT else {}),
        }

    def write_pillar(self, deployments):
        """``deployments``: {name: rev}, the same on both hosts, each host's workers on queues of their own."""
        top = {"base": {"*": ["fleet"], **{minion: [f"host{n}"] for n, minion in enumerate(self.ids, 1)}}}
        (self.pillar_root / "top.sls").write_text(yaml.safe_dump(top))
        for n, (minion, root) in enumerate(zip(self.ids, self.places["roots"], strict=True), 1):
            host = {"root": str(root), **self.settings}
            specs = {name: self.spec(name, minion, rev) for name, rev in deployments.items()}
            (self.pillar_root / f"host{n}.sls").write_text(yaml.safe_dump({"saltfleet": host, "deployments": specs}))

    def apply(self, master, deployments):
        """state.apply through ``master`` with ``deployments`` in pillar: {minion: {state id: return}}."""
        self.write_pillar(deployments)
        ret = self.salt(master, "saltutil.refresh_pillar", "wait=True")
        assert ret.returncode == 0, ret
        ret = self.salt(master, "state.apply", _timeout=900)
        assert ret.returncode == 0, ret
        states = {minion: {s["__id__"]: s for s in ret.data[minion].values()} for minion in self.ids}
        for minion in self.ids:
            assert all(s["result"] is True for s in states[minion].values()), states[minion]
        return states

    def versions(self, name):
        """The app version that serves a task on each host (in host order)."""
        return [run_task(self.tasks[name], self.queue(name, minion), timeout=120)["version"] for minion in self.ids]

    def inventory(self, master):
        ret = self.salt_run(master, "fleet.inventory")
        assert ret.returncode == 0, ret
        return {row["id"]: row for row in ret.data}

    def inventory_when(self, master, check, what):
        """The inventory of ``master`` once ``check(rows)`` holds (a heartbeat or two away)."""

        def rows():
            found = self.inventory(master)
            return found if check(found) else None

        return wait_for(rows, 120, what)

    def answering(self, master):
        """The hosts that answer test.ping through ``master``."""
        ret = self.salt(master, "--timeout=5", "test.ping")
        return sorted(m for m, v in (ret.data or {}).items() if v is True) if isinstance(ret.data, dict) else []


def serving(rows, ids, name, release):
    """True when every host of ``ids`` is up in ``rows`` with ``name`` at ``release``, its worker RUNNING."""
    for minion in ids:
        row = rows.get(minion) or {}
        facts = row.get("deployments", {}).get(name) or {}
        if row.get("status") != "up" or facts.get("release") != release or facts.get("running") != 1:
            return False
    return True


@pytest.fixture(scope="module")
def before(masters, minions, pillar_root, places, deploy_user, host_settings):
    """
    Through the first master: the modules synced, APP at v1 applied, then
    rolled out to v2 with fleet.deploy (a ledger entry). What each master
    showed then: {pair, keys, first, standby}.
    """
    pair = Pair(masters, minions, pillar_root, places, deploy_user, host_settings)
    first, second = masters
    wait_for(lambda: pair.answering(first) == pair.ids, 120, "both hosts answering through the first master")
    ret = pair.salt(first, "saltutil.sync_all")
    assert ret.returncode == 0, ret
    pair.apply(first, {APP: "v1"})
    assert pair.versions(APP) == ["1", "1"]
    ret = pair.salt_run(first, "fleet.deploy", APP, "rev=v2", "batch=1")
    assert ret.returncode == 0, ret
    assert pair.versions(APP) == ["2", "2"]
    v2 = places["shas"]["v2"]
    seen = {
        "pair": pair,
        "keys": second.salt_key_cli().run("-L").data,
        "first": pair.inventory_when(first, lambda rows: serving(rows, pair.ids, APP, v2), f"{APP} v2 on the first"),
        "standby": pair.inventory(second),
    }
    return seen


@pytest.fixture(scope="module")
def failed_over(before, masters):
    """The first master stopped, both hosts answering through the second: the pair."""
    pair = before["pair"]
    first, second = masters
    first.terminate()
    wait_for(lambda: pair.answering(second) == pair.ids, 180, "both hosts answering through the second master")
    return pair


def test_the_standby_holds_the_keys_and_knows_nothing_of_the_hosts_before_a_failover(before):
    pair = before["pair"]
    assert set(pair.ids) <= set(before["keys"]["minions"]), before["keys"]
    assert not before["keys"]["minions_pre"], before["keys"]
    # Each master's own cache: the one the minions report to lists them up with their deployments...
    rows = before["first"]
    assert [rows[m]["deployments"][APP]["rev"] for m in pair.ids] == ["v2", "v2"], rows
    # ...and the standby, which no minion has talked to yet, lists the same hosts, down, never seen.
    standby = before["standby"]
    assert sorted(standby) == pair.ids
    for minion in pair.ids:
        assert standby[minion]["status"] == "down", standby
        assert standby[minion]["last_seen"] is None, standby
        assert standby[minion]["deployments"] == {}, standby


def test_after_a_failover_the_second_master_lists_the_hosts_up_within_a_heartbeat(failed_over, places):
    pair = failed_over
    v2 = places["shas"]["v2"]
    rows = pair.inventory_when(
        pair.second, lambda rows: serving(rows, pair.ids, APP, v2), f"both hosts up with {APP} on the second master"
    )
    for minion in pair.ids:
        assert rows[minion]["deployments"][APP]["supervisord"] == "running", rows[minion]
        assert rows[minion]["last_seen"] is not None


def test_state_apply_through_the_second_master_converges_and_its_inventory_shows_it(failed_over, places):
    pair = failed_over
    v2 = places["shas"]["v2"]
    # A new deployment beside the one rolled out through the first master.
    states = pair.apply(pair.second, {APP: "v2", REPORT: "v2"})
    for minion in pair.ids:
        assert states[minion][f"saltfleet-deployment-{REPORT}"]["changes"], states[minion]
    assert pair.versions(REPORT) == ["2", "2"]
    assert pair.versions(APP) == ["2", "2"]
    rows = pair.inventory_when(
        pair.second,
        lambda rows: serving(rows, pair.ids, APP, v2) and serving(rows, pair.ids, REPORT, v2),
        f"{APP} and {REPORT} on both hosts in the second master's inventory",
    )
    for minion in pair.ids:
        assert sorted(rows[minion]["deployments"]) == [APP, REPORT]
        # The apply's pillar compile gave the second master the hosts' grains: their addresses.
        assert rows[minion]["private_ips"] or rows[minion]["public_ips"], rows[minion]


def test_the_deploy_ledger_outlives_the_first_master(failed_over, places):
    pair = failed_over
    ret = pair.salt_run(pair.second, "fleet.history", APP)
    assert ret.returncode == 0, ret
    [rollout] = [h for h in ret.data if h["what"] == "fleet.deploy"]
    assert rollout["rev"] == "v2"
    assert sorted(rollout["hosts"]) == pair.ids
    # One deploy lock for both masters: the second takes and frees the same one the first did.
    ret = pair.salt_run(pair.second, "fleet.unlock", APP)
    assert ret.returncode == 0, ret
    assert ret.data["state"] == "free", ret.data
    assert (places["ledger"] / "ledger.jsonl").is_file()
    assert (places["ledger"] / "locks" / f"{APP}.lock").exists(), "the first master's rollout took its lock here"
