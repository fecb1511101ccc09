"""deployments/common/user_data.sh and the provisioning helpers of _utils/saltfleet_cloud.py, without a cloud."""

import http.server
import importlib.util
import json
import os
import subprocess
import threading

import pytest
import yaml
from salt.exceptions import SaltCloudConfigError

from localfleet.config import REPO

spec = importlib.util.spec_from_file_location("saltfleet_cloud", REPO / "_utils" / "saltfleet_cloud.py")
sfc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sfc)

INSTANCE_ID = "i-0abc1234def567890"


class FakeImds(http.server.BaseHTTPRequestHandler):
    """EC2's metadata service, IMDSv2 only: no token, no instance id."""

    token = "tok-123"

    def do_PUT(self):
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self.reply(400, "")
        return self.reply(200, self.token)

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self.reply(401, "")
        if self.path != "/latest/meta-data/instance-id":
            return self.reply(404, "")
        return self.reply(200, INSTANCE_ID)

    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def opts(tmp_path):
    pki = tmp_path / "pki"
    (pki / "minions").mkdir(parents=True)
    return {
        "providers": {"ec2": {"ec2": {"driver": "ec2"}}},
        "profiles": {"worker": {"provider": "ec2:ec2"}},
        "pki_dir": str(pki),
        "autosign_grains_dir": str(tmp_path / "autosign_grains"),
        "sock_dir": str(tmp_path / "sock"),
    }


def vm(**settings):
    return {"name": "worker-7", "profile": "worker", "driver": "ec2", "provider": "ec2:ec2", **settings}


def test_user_data_run_in_a_sandbox_configures_the_minion(tmp_path, opts, imds):
    vm_ = vm(minion={"master": "10.0.0.5"}, deployments=["daily-fetcher"], bootstrap="cloud-init")
    grains = sfc.cloud_grains(vm_, opts, "ec2", region="eu-west-1", size="t3.small", image="ami-1")
    minion = sfc.minion_config(vm_, opts, grains=grains, mode="cloud-init")
    script = sfc.render_user_data(vm_, opts, minion, metadata="ec2")
    assert "PRIVATE KEY" not in script

    root = tmp_path / "root"
    run = subprocess.run(
        ["sh", "-c", script],
        env={
            "PATH": os.environ["PATH"],
            "SALTFLEET_ROOT": str(root),
            "SALTFLEET_METADATA_URL": imds,
            "SALTFLEET_INSTALL": "skip",
            "SALTFLEET_START": "no",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    written = yaml.safe_load((root / "etc/salt/minion.d/saltfleet.conf").read_text())
    assert written["master"] == "10.0.0.5"
    assert written["id"] == "worker-7"
    assert written["autosign_grains"] == ["saltfleet_instance_id"]
    assert written["grains"]["saltfleet_cloud"]["deployments"] == ["daily-fetcher"]
    assert written["grains"]["saltfleet_cloud"]["provider"] == "ec2"
    assert (root / "etc/salt/minion_id").read_text() == "worker-7\n"
    assert yaml.safe_load((root / "etc/salt/grains").read_text()) == {"saltfleet_instance_id": INSTANCE_ID}


def run_user_data(root, **env):
    """deployments/common/user_data.sh as run by hand: settings in the environment, writing under root."""
    settings = {
        "PATH": os.environ["PATH"],
        "SALTFLEET_ROOT": str(root),
        "SALTFLEET_MINION_ID": "worker-7",
        "SALTFLEET_MINION_CONFIG": "master: salt\n",
        "SALTFLEET_INSTALL": "skip",
        "SALTFLEET_START": "no",
    }
    return subprocess.run(
        ["sh", str(REPO / "deployments/common/user_data.sh")],
        env={**settings, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_user_data_refuses_a_bad_instance_id(tmp_path):
    run = run_user_data(tmp_path, SALTFLEET_INSTANCE_ID="i-1; rm -rf /")
    assert run.returncode == 1
    assert "unexpected instance id" in run.stderr
    assert not (tmp_path / "etc").exists()


def test_user_data_never_carries_a_private_key(opts):
    marker = "-----BEGIN RSA " + "PRIVATE KEY-----"  # spelled in two parts: no key-looking line in the repo
    vm_ = vm(minion={"master": "salt", "note": marker})
    with pytest.raises(sfc.SaltCloudSystemExit, match="private key"):
        sfc.render_user_data(vm_, opts, sfc.minion_config(vm_, opts))


def test_autosign_tickets_are_one_shot_and_expire(opts):
    grain_file = os.path.join(opts["autosign_grains_dir"], "saltfleet_instance_id")
    sfc.record_autosign_ticket(vm(), opts, "i-1")
    sfc.record_autosign_ticket(vm(name="worker-8"), opts, "i-2")
    sfc.record_autosign_ticket(vm(name="worker-9", autosign_ticket_ttl=-1), opts, "i-3")
    assert os.stat(grain_file).st_mode & 0o777 == 0o600  # the master ignores a group/world-writable file
    # The minion worker-7 authenticated: its key is accepted, its ticket goes; i-3 has expired.
    with open(os.path.join(opts["pki_dir"], "minions", "worker-7"), "w") as handle:
        handle.write("key")
    assert sorted(sfc.prune_autosign_tickets(opts)) == ["i-1", "i-3"]
    assert sfc.revoke_autosign_ticket(opts, name="worker-8") == ["i-2"]
    with open(grain_file) as handle:
        assert [line for line in handle if not line.startswith("#")] == []


def test_tickets_recorded_in_parallel_are_all_kept(opts):
    """salt-cloud -P: several processes record tickets at once; the lock keeps every one."""
    import multiprocessing

    def record(worker):
        for n in range(5):
            sfc.record_autosign_ticket(vm(name=f"w{worker}-{n}"), opts, f"i-{worker}-{n}")

    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=record, args=(worker,)) for worker in range(6)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [process.exitcode for process in workers] == [0] * 6
    expected = sorted(f"i-{worker}-{n}" for worker in range(6) for n in range(5))
    grain_file = os.path.join(opts["autosign_grains_dir"], "saltfleet_instance_id")
    with open(grain_file) as handle:
        assert sorted(line.strip() for line in handle if not line.startswith("#")) == expected
    index = sfc.read_json(os.path.join(opts["pki_dir"], "saltfleet_autosign_tickets.json"))
    assert sorted(index) == expected
    leftovers = os.listdir(opts["pki_dir"]) + os.listdir(opts["autosign_grains_dir"])
    assert not [name for name in leftovers if name.startswith(".")]  # no temporary file left half-written


def test_cloud_init_needs_an_autosign_grains_dir(opts):
    del opts["autosign_grains_dir"]
    with pytest.raises(SaltCloudConfigError, match="autosign_grains_dir"):
        sfc.check_autosign_ready(vm(), opts)


def test_bootstrap_modes(opts):
    assert sfc.bootstrap_mode(vm(), opts) == "ssh"
    assert sfc.bootstrap_mode(vm(deploy=False), opts) == "none"
    assert sfc.bootstrap_mode(vm(bootstrap="cloud-init", deploy=False), opts) == "cloud-init"
    with pytest.raises(SaltCloudConfigError, match="bootstrap: 'ansible'"):
        sfc.bootstrap_mode(vm(bootstrap="ansible"), opts)


def test_forget_preaccepted_key_only_removes_salt_clouds_own(opts):
    path = os.path.join(opts["pki_dir"], "minions", "worker-7")
    vm_ = vm(pub_key="PUB-A", priv_key="PRIV-A")
    with open(path, "w") as handle:
        handle.write("PUB-LIVE")
    assert sfc.forget_preaccepted_key(vm_, opts) is False
    assert os.path.exists(path)
    assert vm_["priv_key"] is None
    with open(path, "w") as handle:
        handle.write("PUB-A\n")
    assert sfc.forget_preaccepted_key(vm(pub_key="PUB-A"), opts) is True
    assert not os.path.exists(path)


def test_wait_for_says_what_did_not_happen():
    checks = []
    with pytest.raises(sfc.SaltCloudSystemExit, match=r"worker-7 got an address did not happen within 0\.3 s"):
        sfc.wait_for(lambda: checks.append(1), 0.3, "worker-7 got an address", interval=0.1)
    assert len(checks) >= 2  # it kept asking until the time was up
    assert sfc.wait_for(lambda: "10.0.0.9", 1, "x") == "10.0.0.9"


UUID = "6e7c7a4e-1f0b-4f4e-9d5a-2b8f3c1d0e9a"


class FakeOpenStackMetadata(http.server.BaseHTTPRequestHandler):
    """The OpenStack metadata service: meta_data.json with the instance uuid."""

    def do_GET(self):
        if self.path != "/openstack/latest/meta_data.json":
            return FakeImds.reply(self, 404, "")
        return FakeImds.reply(self, 200, json.dumps({"uuid": UUID, "name": "worker-7"}))

    def log_message(self, *args):
        pass


def run_openstack_user_data(tmp_path, **env):
    """user_data.sh with SALTFLEET_METADATA=openstack; the instance id it wrote as a grain, and the run."""
    root = tmp_path / "root"
    run = run_user_data(root, SALTFLEET_METADATA="openstack", **env)
    grains = root / "etc/salt/grains"
    return (yaml.safe_load(grains.read_text()) if grains.exists() else None), run


def test_openstack_instance_id_from_the_config_drive(tmp_path):
    """Rackspace: no metadata service, the uuid is on the config drive (here a directory standing in for it)."""
    drive = tmp_path / "config-2"
    (drive / "openstack/latest").mkdir(parents=True)
    (drive / "openstack/latest/meta_data.json").write_text(json.dumps({"uuid": UUID, "hostname": "worker-7"}))
    # Nothing answers on the metadata URL: the id can only come from the drive.
    grains, run = run_openstack_user_data(
        tmp_path, SALTFLEET_CONFIG_DRIVE=str(drive), SALTFLEET_METADATA_URL="http://127.0.0.1:9"
    )
    assert run.returncode == 0, run.stderr
    assert grains == {"saltfleet_instance_id": UUID}


def test_openstack_instance_id_falls_back_to_the_metadata_service(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenStackMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        grains, run = run_openstack_user_data(
            tmp_path,
            SALTFLEET_CONFIG_DRIVE=str(tmp_path / "no-such-drive"),
            SALTFLEET_METADATA_URL=f"http://127.0.0.1:{server.server_address[1]}",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 0, run.stderr
    assert "no config drive" in run.stderr
    assert grains == {"saltfleet_instance_id": UUID}


def test_user_data_installs_the_pinned_salt_with_pip_in_a_venv(tmp_path):
    """No network here: python3 is a stand-in that records what the script asks of it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake_python = bin_dir / "python3"
    fake_python.write_text(
        "#!/bin/sh\n"
        f'echo "$0 $*" >> {calls}\n'
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; ln -s "$0" "$3/bin/python"; fi\n'
    )
    fake_python.chmod(0o755)
    root = tmp_path / "root"
    run = run_user_data(
        root,
        PATH=f"{bin_dir}:/usr/bin:/bin",
        SALTFLEET_INSTANCE_ID="i-1",
        SALTFLEET_SALT_VERSION="3008.4",
        SALTFLEET_INSTALL="auto",
    )
    assert run.returncode == 0, run.stderr
    venv = root / "opt/saltfleet/salt-3008.4"
    lines = calls.read_text().splitlines()
    assert f"{fake_python} -m venv {venv}" in lines
    assert any(line.endswith("-m pip install -q --disable-pip-version-check salt==3008.4") for line in lines), lines
    unit = (root / "etc/systemd/system/salt-minion.service").read_text()
    assert f"ExecStart={venv}/bin/salt-minion" in unit
    assert os.readlink(root / "usr/local/bin/salt-minion") == f"{venv}/bin/salt-minion"
