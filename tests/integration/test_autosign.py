"""
A new cloud host cannot be impersonated: an autosign ticket admits exactly the
minion id salt-cloud launched the instance as, once.

Real salt-master (with etc/master.d/saltfleet.conf's auth events and reactor)
and real salt-minion daemons on 127.0.0.1, each minion sending grain
``saltfleet_instance_id`` through ``autosign_grains`` as a cloud-init host
does. The master accepts nothing by itself here: salt-factories' own
accept-every-pending-key hook is switched off, so a key is accepted only by
saltfleet's reactor and ``fleet.admit``.
"""

import copy
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import saltfleet_utils
from tests.conftest import short_tmpdir, wait_for

tickets = saltfleet_utils().saltfleet_tickets

pytestmark = pytest.mark.timeout(900)

BIN = Path(sys.executable).parent
GRAIN = "saltfleet_instance_id"


@pytest.fixture(scope="module")
def salt_master(salt_factories, saltfleet_master_config, pillar_dir):
    overrides = copy.deepcopy(saltfleet_master_config)
    overrides["pillar_roots"] = {"base": [str(pillar_dir)]}
    overrides["interface"] = "127.0.0.1"
    factory = salt_factories.salt_master_daemon(
        random_string("master-"),
        overrides=overrides,
        # salt-factories accepts every pending key itself unless told otherwise.
        on_auth_event_callback=lambda master, payload: None,
    )
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="module")
def cloud_opts(salt_master):
    """What salt-cloud passes the provisioning code on this master: its options, a provider and a profile."""
    return {
        **salt_master.config,
        "providers": {"ec2": {"ec2": {"driver": "ec2"}}},
        "profiles": {"worker": {"provider": "ec2:ec2"}},
    }


@pytest.fixture(scope="module")
def utils():
    return saltfleet_utils()


def launch(utils, cloud_opts, minion_id, **settings):
    """What the create pipeline does once the cloud returned an instance id: the ticket. Returns the instance id."""
    instance_id = random_string("i-", uppercase=False)
    vm_ = {"name": minion_id, "profile": "worker", "driver": "ec2:ec2", **settings}
    ttl = utils.saltfleet_cloud.config_value("autosign_ticket_ttl", vm_, cloud_opts)
    tickets.record_autosign_ticket(
        cloud_opts, utils.saltfleet_cloud_minion.minion_id_of(vm_, cloud_opts), instance_id, ttl
    )
    return instance_id


def keys(salt_master):
    """salt-key -L: {"minions": [...], "minions_pre": [...], "minions_rejected": [...], "minions_denied": [...]}."""
    ret = salt_master.salt_key_cli().run("-L")
    assert ret.returncode == 0, ret
    return ret.data


def pub_keys(salt_master, minion_id):
    """{state: public key} of every key the master holds under minion_id (salt-key -p)."""
    ret = salt_master.salt_key_cli().run("-p", minion_id)
    assert ret.returncode == 0, ret
    return {state: found[minion_id] for state, found in (ret.data or {}).items() if minion_id in (found or {})}


class Minion:
    """A real salt-minion daemon in its own sandbox, with its own key, claiming an instance id."""

    def __init__(self, master, minion_id, instance_id):
        self.id = minion_id
        self.root = short_tmpdir("sfa-")
        self.conf = self.root / "etc" / "salt"
        self.conf.mkdir(parents=True)
        self.log = self.root / "minion.log"
        config = {
            "id": minion_id,
            "master": "127.0.0.1",
            "master_port": master.config["ret_port"],
            "transport": master.config["transport"],
            "root_dir": str(self.root),
            "user": getpass.getuser(),
            "log_file": str(self.log),
            "log_level_logfile": "info",
            # As user_data.sh configures a cloud-init host.
            "grains": {GRAIN: instance_id},
            "autosign_grains": [GRAIN],
            # Ask again soon while the key is pending (Salt's default is 10 s).
            "acceptance_wait_time": 1,
            "acceptance_wait_time_max": 1,
        }
        (self.conf / "minion").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [str(BIN / "salt-minion"), "-c", str(self.conf), "-l", "quiet"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def pub(self):
        return (self.conf / "pki" / "minion" / "minion.pub").read_text().strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def minions(salt_master):
    """Start minions for a test (``minions(minion_id, instance_id)``); stopped, and their keys deleted, afterwards."""
    started = []

    def start(minion_id, instance_id):
        minion = Minion(salt_master, minion_id, instance_id)
        started.append(minion)
        return minion

    yield start
    for minion in started:
        minion.stop()
    for minion_id in {minion.id for minion in started}:
        salt_master.salt_key_cli().run("-y", "-d", minion_id)


def admitted(event_listener, salt_master, minion_id, since):
    """The results fleet.admit returned for minion_id since ``since`` (the reactor's runner jobs)."""
    results = []
    for event in event_listener.get_events([(salt_master.id, "salt/run/*/ret")], after_time=since):
        ret = event.data.get("return")
        if event.data.get("fun") == "runner.fleet.admit" and isinstance(ret, dict) and ret["minion_id"] == minion_id:
            results.append(ret)
    return results


def answers(salt_master, minion_id):
    return salt_master.salt_cli(timeout=30).run("-t", "10", "test.ping", minion_tgt=minion_id).data is True


def test_two_minions_one_ticket_only_the_launched_id_gets_in(salt_master, utils, cloud_opts, minions):
    host = random_string("host-", uppercase=False)
    instance_id = launch(utils, cloud_opts, host)

    # Any process on the new host can read the instance id; here one enrols under another id.
    impostor = minions(random_string("other-", uppercase=False), instance_id)
    wait_for(lambda: impostor.id in keys(salt_master)["minions_rejected"], 180, f"{impostor.id}'s key rejected")
    assert pub_keys(salt_master, impostor.id) == {"minions_rejected": impostor.pub()}
    assert impostor.id not in keys(salt_master)["minions"]
    # The impostor used nothing up: the ticket still admits the minion it names.
    ticket = tickets.autosign_tickets(cloud_opts)[instance_id]
    assert ticket["name"] == host
    assert "used" not in ticket

    real = minions(host, instance_id)
    wait_for(lambda: host in keys(salt_master)["minions"], 180, f"{host}'s key accepted")
    assert pub_keys(salt_master, host) == {"minions": real.pub()}
    wait_for(lambda: answers(salt_master, host), 120, f"{host} answering test.ping")
    assert "used" in tickets.autosign_tickets(cloud_opts)[instance_id]
    assert impostor.id in keys(salt_master)["minions_rejected"]


def test_the_ticket_admits_its_minion_once(salt_master, utils, cloud_opts, minions, event_listener):
    host = random_string("host-", uppercase=False)
    instance_id = launch(utils, cloud_opts, host)
    real = minions(host, instance_id)
    wait_for(lambda: host in keys(salt_master)["minions"], 180, f"{host}'s key accepted")
    wait_for(lambda: answers(salt_master, host), 120, f"{host} answering test.ping")

    # A replay: another key under the same id and instance. Salt itself denies it.
    replay = minions(host, instance_id)
    wait_for(lambda: host in keys(salt_master)["minions_denied"], 180, f"the second key of {host} denied")
    held = pub_keys(salt_master, host)
    assert held["minions"] == real.pub()
    assert held["minions_denied"] == replay.pub() != real.pub()

    # The used ticket admits no other id either: that key is rejected.
    late = minions(random_string("other-", uppercase=False), instance_id)
    wait_for(lambda: late.id in keys(salt_master)["minions_rejected"], 180, f"{late.id}'s key rejected")
    assert late.id not in keys(salt_master)["minions"]
    assert answers(salt_master, host)

    # Its accepted key deleted, the same id and instance with a new key: the used ticket admits it no more.
    real.stop()
    replay.stop()
    since = time.time()
    assert salt_master.salt_key_cli().run("-y", "-d", host).returncode == 0
    again = minions(host, instance_id)
    results = wait_for(lambda: admitted(event_listener, salt_master, host, since), 180, f"fleet.admit on {host}")
    assert results[0]["result"] == "pending", results
    assert f"the ticket of instance {instance_id!r} was used at" in results[0]["reason"]
    assert pub_keys(salt_master, host) == {"minions_pre": again.pub()}


def test_a_key_whose_ticket_expired_stays_pending(salt_master, utils, cloud_opts, minions, event_listener):
    since = time.time()
    host = random_string("host-", uppercase=False)
    instance_id = launch(utils, cloud_opts, host, autosign_ticket_ttl=-1)
    late = minions(host, instance_id)
    results = wait_for(
        lambda: admitted(event_listener, salt_master, host, since), 180, f"fleet.admit deciding on {host}"
    )
    assert results[0]["result"] == "pending"
    assert f"no open ticket for instance {instance_id!r}" in results[0]["reason"]
    assert pub_keys(salt_master, host) == {"minions_pre": late.pub()}
    assert instance_id not in tickets.autosign_tickets(cloud_opts)


def boot(salt_master, utils, cloud_opts, host, instance_id, root):
    """deployments/common/user_data.sh on a new host (``root``), run as cloud-init would with the settings
    salt-cloud's code renders: it waits until the master accepts its key (and syncs once)."""
    vm_ = {
        "name": host,
        "profile": "worker",
        "driver": "ec2:ec2",
        "bootstrap": "cloud-init",
        "deployments": ["daily-fetcher"],
        "minion": {
            "master": "127.0.0.1",
            "master_port": salt_master.config["ret_port"],
            "transport": salt_master.config["transport"],
            "root_dir": str(root),
            "user": getpass.getuser(),
            "acceptance_wait_time": 1,
        },
    }
    grains = utils.saltfleet_cloud_minion.cloud_grains(
        vm_, cloud_opts, "ec2", region="eu-west-1", size="t3.small", image="ami-1"
    )
    minion = utils.saltfleet_cloud_minion.minion_config(vm_, cloud_opts, grains=grains, mode="cloud-init")
    script = utils.saltfleet_cloud_minion.render_user_data(vm_, cloud_opts, minion, metadata="ec2")
    return subprocess.run(
        ["sh", "-c", script],
        env={
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "SALTFLEET_ROOT": str(root),
            "SALTFLEET_INSTANCE_ID": instance_id,
            "SALTFLEET_INSTALL": "skip",
            "SALTFLEET_START": "sync",
            "SALTFLEET_ACCEPT_WAIT": "1",
            "SALTFLEET_ACCEPT_TRIES": "150",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def fingers(salt_master, minion_id):
    """{state: fingerprint} of every key the master holds under minion_id (salt-key -f)."""
    ret = salt_master.salt_key_cli().run("-f", minion_id)
    assert ret.returncode == 0, ret
    return {state: found[minion_id] for state, found in (ret.data or {}).items() if minion_id in (found or {})}


def console_finger(stderr):
    """The fingerprint user_data.sh printed on the host's console."""
    match = re.search(r"waits for the master to accept its key, fingerprint (\S+)", stderr)
    assert match, stderr
    return match.group(1)


@pytest.fixture
def host_root():
    root = short_tmpdir("sfu-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_user_data_waits_until_its_ticket_admits_it(salt_master, utils, cloud_opts, host_root):
    host = random_string("host-", uppercase=False)
    try:
        instance_id = launch(utils, cloud_opts, host)
        run = boot(salt_master, utils, cloud_opts, host, instance_id, host_root)
        assert run.returncode == 0, run.stderr
        assert f"the master accepted minion {host}" in run.stderr
        conf = host_root / "etc" / "salt"
        assert pub_keys(salt_master, host) == {"minions": (conf / "pki/minion/minion.pub").read_text().strip()}
        # The console shows the key's fingerprint as the master does: the operator can tell it from another.
        assert console_finger(run.stderr) == fingers(salt_master, host)["minions"]
        assert "used" in tickets.autosign_tickets(cloud_opts)[instance_id]
        # It synced saltfleet's modules once, and carries the cloud facts as grains.
        assert (host_root / "var/cache/salt/minion/extmods/utils/saltfleet_cloud_minion.py").exists()
        local = subprocess.run(
            [str(BIN / "salt-call"), "-c", str(conf), "--local", "--out=json", "grains.item", "saltfleet_cloud"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        cloud = json.loads(local.stdout)["local"]["saltfleet_cloud"]
        assert (cloud["provider"], cloud["instance_id"], cloud["deployments"]) == (
            "ec2",
            instance_id,
            ["daily-fetcher"],
        )
    finally:
        salt_master.salt_key_cli().run("-y", "-d", host)


def test_a_host_that_took_the_id_first_neither_gets_in_nor_keeps_the_launched_host_out(
    salt_master, utils, cloud_opts, minions, host_root
):
    """An unaccepted host registers the minion id before salt-cloud launches the instance that will carry it."""
    host = random_string("host-", uppercase=False)
    squatter = minions(host, random_string("i-", uppercase=False))  # it cannot know the instance id yet
    wait_for(lambda: host in keys(salt_master)["minions_pre"], 180, f"the first key of {host} pending")
    instance_id = launch(utils, cloud_opts, host)
    # fleet.admit by hand, with the instance id and the key the master holds under the id: not admitted.
    (held,) = pub_keys(salt_master, host).values()
    admit = salt_master.salt_run_cli(timeout=120).run("fleet.admit", host, instance_id, "--", held)
    assert admit.returncode == 0, admit
    assert admit.data["finger"] == tickets.finger(squatter.pub(), cloud_opts)
    assert admit.data["result"] != "accepted", admit.data
    assert host not in keys(salt_master)["minions"]

    run = boot(salt_master, utils, cloud_opts, host, instance_id, host_root)
    assert run.returncode == 0, run.stderr
    real = (host_root / "etc/salt/pki/minion/minion.pub").read_text().strip()
    held = pub_keys(salt_master, host)
    assert held["minions"] == real
    assert held.get("minions_denied") != real
    assert console_finger(run.stderr) == fingers(salt_master, host)["minions"]
    squatter_finger = tickets.finger(squatter.pub(), cloud_opts)
    assert tickets.autosign_tickets(cloud_opts)[instance_id]["set_aside"] == [squatter_finger]


def test_a_host_that_takes_the_id_before_the_launched_one_boots_is_set_aside(
    salt_master, utils, cloud_opts, minions, host_root
):
    """Between the launch and the boot, a host registers the reserved id, with another instance id or none."""
    host = random_string("host-", uppercase=False)
    instance_id = launch(utils, cloud_opts, host)
    squatter = minions(host, random_string("i-", uppercase=False))
    wait_for(lambda: host in keys(salt_master)["minions_rejected"], 180, f"the squatter's key of {host} set aside")
    assert pub_keys(salt_master, host) == {"minions_rejected": squatter.pub()}

    run = boot(salt_master, utils, cloud_opts, host, instance_id, host_root)
    assert run.returncode == 0, run.stderr
    held = pub_keys(salt_master, host)
    real = (host_root / "etc/salt/pki/minion/minion.pub").read_text().strip()
    assert held["minions"] == real != squatter.pub()
    assert held.get("minions_denied") != real
