"""deployments/common/user_data.sh and what _utils/saltfleet_cloud_minion.py gives a new host, without a cloud."""

import http.server
import json
import os
import subprocess
import threading

import pytest
import salt.utils.cloud
import yaml
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

from localfleet.config import REPO, master_config, saltfleet_utils

# Through Salt's own utils loader, as salt-cloud's drivers reach it (it calls its siblings through the loader).
sfc = saltfleet_utils().saltfleet_cloud
sfm = saltfleet_utils().saltfleet_cloud_minion

INSTANCE_ID = "i-0abc1234def567890"
PRIVATE_IP = "172.31.5.9"
PUBLIC_IP = "203.0.113.7"


class FakeImds(http.server.BaseHTTPRequestHandler):
    """EC2's metadata service, IMDSv2 only: no token, no instance id."""

    token = "tok-123"

    def do_PUT(self):
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self.reply(400, "")
        return self.reply(200, self.token)

    meta_data = {"instance-id": INSTANCE_ID, "local-ipv4": PRIVATE_IP, "public-ipv4": PUBLIC_IP}

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self.reply(401, "")
        item = self.path.removeprefix("/latest/meta-data/")
        if item not in self.meta_data:
            return self.reply(404, "")
        return self.reply(200, self.meta_data[item])

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
    """salt-cloud's options on a master configured with etc/master.d/saltfleet.conf."""
    pki = tmp_path / "pki"
    (pki / "minions").mkdir(parents=True)
    snippet = master_config()
    return {
        "providers": {"ec2": {"ec2": {"driver": "ec2"}}},
        "profiles": {"worker": {"provider": "ec2:ec2"}},
        "pki_dir": str(pki),
        "sock_dir": str(tmp_path / "sock"),
        **{key: snippet[key] for key in ("auth_events", "auth_events_autosign_grains", "reactor")},
    }


def vm(**settings):
    return {"name": "worker-7", "profile": "worker", "driver": "ec2", "provider": "ec2:ec2", **settings}


def test_user_data_run_in_a_sandbox_configures_the_minion(tmp_path, opts, imds):
    # deploy: True makes salt-cloud generate a key pair for the VM and pre-accept it: the
    # private half must never reach user-data, and the host makes its own key.
    priv, pub = salt.utils.cloud.gen_keys(2048)
    (tmp_path / "pki" / "minions" / "worker-7").write_text(pub)
    vm_ = vm(
        minion={"master": "10.0.0.5"},
        deployments=["daily-fetcher"],
        bootstrap="cloud-init",
        priv_key=priv,
        pub_key=pub,
    )
    grains = sfm.cloud_grains(vm_, opts, "ec2", region="eu-west-1", size="t3.small", image="ami-1")
    assert sfm.forget_preaccepted_key(vm_, opts) is True
    minion = sfm.minion_config(vm_, opts, grains=grains, mode="cloud-init")
    script = sfm.render_user_data(vm_, opts, minion, metadata="ec2")
    key_body = "".join(priv.strip().splitlines()[1:-1])
    assert key_body[:64] not in script.replace("\n", "")
    assert "PRIVATE KEY" not in script
    assert not (tmp_path / "pki" / "minions" / "worker-7").exists()

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
    # The facts grain lives in the grains file alone: a config grain would shadow it.
    assert "saltfleet_cloud" not in written.get("grains", {})
    assert (root / "etc/salt/minion_id").read_text() == "worker-7\n"
    assert yaml.safe_load((root / "etc/salt/grains").read_text()) == {
        "saltfleet_instance_id": INSTANCE_ID,
        "saltfleet_cloud": {
            "provider": "ec2",
            "region": "eu-west-1",
            "size": "t3.small",
            "image": "ami-1",
            "profile": "worker",
            "deployments": ["daily-fetcher"],
            "instance_id": INSTANCE_ID,
            "public_ips": [PUBLIC_IP],
            "private_ips": [PRIVATE_IP],
        },
    }


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
    with pytest.raises(SaltCloudSystemExit, match="private key"):
        sfm.render_user_data(vm_, opts, sfm.minion_config(vm_, opts))


def test_bootstrap_modes(opts):
    assert sfm.bootstrap_mode(vm(), opts) == "ssh"
    assert sfm.bootstrap_mode(vm(deploy=False), opts) == "none"
    assert sfm.bootstrap_mode(vm(bootstrap="cloud-init", deploy=False), opts) == "cloud-init"
    with pytest.raises(SaltCloudConfigError, match="bootstrap: 'ansible'"):
        sfm.bootstrap_mode(vm(bootstrap="ansible"), opts)


def test_forget_preaccepted_key_only_removes_salt_clouds_own(opts):
    path = os.path.join(opts["pki_dir"], "minions", "worker-7")
    vm_ = vm(pub_key="PUB-A", priv_key="PRIV-A")
    with open(path, "w") as handle:
        handle.write("PUB-LIVE")
    assert sfm.forget_preaccepted_key(vm_, opts) is False
    assert os.path.exists(path)
    assert vm_["priv_key"] is None
    with open(path, "w") as handle:
        handle.write("PUB-A\n")
    assert sfm.forget_preaccepted_key(vm(pub_key="PUB-A"), opts) is True
    assert not os.path.exists(path)


def test_wait_for_says_what_did_not_happen():
    checks = []
    with pytest.raises(SaltCloudSystemExit, match=r"worker-7 got an address did not happen within 0\.3 s"):
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
    networks = [
        {"id": "network0", "type": "ipv4", "ip_address": "23.253.12.4"},  # PublicNet
        {"id": "network1", "type": "ipv6", "ip_address": "2001:4802:7800:1::be"},
        {"id": "network2", "type": "ipv4", "ip_address": "10.176.3.4"},  # ServiceNet
        {"id": "network3", "type": "ipv4_dhcp"},
    ]
    (drive / "openstack/latest/network_data.json").write_text(json.dumps({"links": [], "networks": networks}))
    # Nothing answers on the metadata URL: the id can only come from the drive.
    grains, run = run_openstack_user_data(
        tmp_path,
        SALTFLEET_CONFIG_DRIVE=str(drive),
        SALTFLEET_METADATA_URL="http://127.0.0.1:9",
        SALTFLEET_CLOUD=json.dumps({"provider": "rackspace", "region": "ORD"}),
    )
    assert run.returncode == 0, run.stderr
    assert grains == {
        "saltfleet_instance_id": UUID,
        "saltfleet_cloud": {
            "provider": "rackspace",
            "region": "ORD",
            "instance_id": UUID,
            "public_ips": ["23.253.12.4", "2001:4802:7800:1::be"],
            "private_ips": ["10.176.3.4"],
        },
    }


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
    assert grains == {
        "saltfleet_instance_id": UUID,
        "saltfleet_cloud": {"instance_id": UUID, "public_ips": [], "private_ips": []},
    }


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
