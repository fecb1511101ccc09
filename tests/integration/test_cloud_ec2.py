"""The ec2 salt-cloud driver, driven by the real salt-cloud CLI against moto's EC2 server on 127.0.0.1.

Every outcome is read back through boto3: what the driver asked EC2 for is what moto holds.
"""

import base64
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import saltfleet_utils

# The AMI the shipped `worker` profile names; moto is started with it as its only image.
PROFILE_AMI = "ami-0123456789abcdef0"
REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    # Never let boto3 look for a real instance role or a real shared config.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    """moto's server on 127.0.0.1 with one image: the AMI the shipped worker profile names."""
    amis = tmp_path_factory.mktemp("moto") / "amis.json"
    amis.write_text(
        json.dumps(
            [
                {
                    "ami_id": PROFILE_AMI,
                    "state": "available",
                    "public": True,
                    "owner_id": "099720109477",
                    "image_location": "amazon/ubuntu-jammy-22.04",
                    "root_device_type": "ebs",
                    "root_device_name": "/dev/sda1",
                    "description": "Ubuntu 22.04 (test image)",
                    "image_type": "machine",
                    "platform": None,
                    "architecture": "x86_64",
                    "name": "ubuntu-jammy-22.04-amd64-server",
                    "virtualization_type": "hvm",
                    "hypervisor": "xen",
                }
            ]
        )
    )
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    env = {**os.environ, **AWS_ENV, "MOTO_AMIS_PATH": str(amis)}
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ec2(moto_endpoint):
    """boto3 against moto, with the key pair and security group the worker profile names."""
    client = boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_key_pair(KeyName="saltfleet")
    vpc = client.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    client.create_security_group(GroupName="saltfleet-worker", Description="saltfleet workers", VpcId=vpc)
    return client


@pytest.fixture(scope="module")
def conf_dir(salt_master):
    return Path(salt_master.config["root_dir"]) / "conf"


@pytest.fixture(scope="module")
def cloud(salt_master, moto_endpoint, ec2, conf_dir, repo_root):
    """The real salt-cloud CLI, with the repo's profiles and a provider pointing at moto."""
    cli = salt_master.salt_cloud_cli(environ={**os.environ, **AWS_ENV}, timeout=300)
    provider = {
        "ec2": {
            "driver": "ec2",
            "region": REGION,
            "endpoint_url": moto_endpoint,
            "retries": {"max_attempts": 3},
            "minion": {"master": "127.0.0.1"},
            "image_owners": ["099720109477"],
        }
    }
    (conf_dir / "cloud.providers.d" / "ec2.conf").write_text(yaml.safe_dump(provider))
    shutil.copy(repo_root / "cloud.profiles.d" / "ec2.conf", conf_dir / "cloud.profiles.d" / "ec2.conf")
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    error_profiles = {
        "bad-ami": {"extends": "worker", "image": "ami-deadbeef"},
        "bad-keyname": {"extends": "worker", "keyname": "nobody", "securitygroup": ["no-such-group"]},
        "no-address": {
            "extends": "worker",
            "subnet": subnet,
            "assign_public_ip": False,
            "wait_for_ip_timeout": 2,
            "wait_for_ip_interval": 0.5,
        },
        "no-address-kept": {"extends": "no-address", "keep_failed": True},
        "protected": {"extends": "worker", "termination_protection": True},
        # salt-cloud generates and pre-accepts a key pair for the VM when deploy is on.
        "worker-deploy": {"extends": "worker", "deploy": True},
    }
    (conf_dir / "cloud.profiles.d" / "errors.conf").write_text(yaml.safe_dump(error_profiles))
    return cli


def instance(ec2, name, states=("pending", "running")):
    found = [
        i
        for r in ec2.describe_instances(
            Filters=[
                {"Name": "tag:Name", "Values": [name]},
                {"Name": "instance-state-name", "Values": list(states)},
            ]
        )["Reservations"]
        for i in r["Instances"]
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


def tags(inst):
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


def user_data(ec2, instance_id):
    value = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def tickets(salt_master):
    """The master's autosign tickets: {instance id: {"name": minion id, ...}}."""
    return saltfleet_utils().saltfleet_tickets.autosign_tickets(salt_master.config)


def nodes(result):
    """{name: node} from `salt-cloud -Q/-F/-S` (provider alias -> driver -> nodes; absent when there are none)."""
    assert result.returncode == 0, result
    return (result.data or {}).get("ec2", {}).get("ec2", {})


def unique(prefix="w"):
    return random_string(f"{prefix}-", uppercase=False)


@pytest.fixture
def create(cloud, ec2):
    """``create(profile)``: an instance made by ``salt-cloud -p profile <unique name>``; (name, salt-cloud's
    data). Whatever a test leaves running is terminated afterwards."""
    names = []

    def make(profile="worker", prefix="w", log=None):
        name = unique(prefix)
        names.append(name)
        ret = cloud.run(*(["-l", "info"] if log is not None else []), "-p", profile, name)
        assert ret.returncode == 0, ret
        if log is not None:
            log.append(ret.stdout + ret.stderr)
        return name, ret.data[name]

    yield make
    for name in names:
        inst = instance(ec2, name, states=("pending", "running", "stopping", "stopped"))
        if inst:
            ec2.modify_instance_attribute(InstanceId=inst["InstanceId"], DisableApiTermination={"Value": False})
            ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def run_user_data(script, root, instance_id):
    """The user-data run in a sandbox as cloud-init would, with the instance id the metadata service gives."""
    return subprocess.run(
        ["sh", "-c", script],
        env={
            "PATH": os.environ["PATH"],
            "SALTFLEET_ROOT": str(root),
            "SALTFLEET_INSTANCE_ID": instance_id,
            "SALTFLEET_INSTALL": "skip",
            "SALTFLEET_START": "no",
        },
        capture_output=True,
        text=True,
        check=False,
    )


def test_create_worker_from_profile(cloud, ec2, salt_master, event_listener, tmp_path):
    name = unique()
    start = time.time()
    ret = cloud.run("-p", "worker", name)
    assert ret.returncode == 0, ret
    events = event_listener.wait_for_events(
        [(salt_master.id, f"salt/cloud/{name}/{tag}") for tag in ("creating", "requesting", "created")],
        after_time=start,
        timeout=30,
    )
    assert events.found_all_events, events.missed
    created = ret.data[name]
    inst = instance(ec2, name)
    (created_event,) = [e for e in events.matches if e.tag.endswith("/created")]
    assert created_event.data["instance_id"] == inst["InstanceId"]
    assert created["id"] == inst["InstanceId"]
    assert created["deploy"] == "cloud-init"
    assert inst["ImageId"] == PROFILE_AMI
    assert inst["InstanceType"] == "t3.small"
    assert inst["KeyName"] == "saltfleet"
    assert [g["GroupName"] for g in inst["SecurityGroups"]] == ["saltfleet-worker"]
    assert tags(inst) == {
        "Name": name,
        "team": "data",
        "saltfleet:profile": "worker",
        "saltfleet:deployments": "",
    }
    assert inst["MetadataOptions"]["HttpTokens"] == "required"

    # user-data: the seed's entry point, configured for this minion.
    script = user_data(ec2, inst["InstanceId"])
    assert script.startswith("#!/bin/sh\n")
    assert f"SALTFLEET_MINION_ID={name}" in script
    # ... run in a sandbox, it writes the minion config pointing at the master with the right id.
    root = tmp_path / "root"
    run = run_user_data(script, root, inst["InstanceId"])
    assert run.returncode == 0, run.stderr
    minion = yaml.safe_load((root / "etc/salt/minion.d/saltfleet.conf").read_text())
    assert minion["master"] == "127.0.0.1"
    assert minion["id"] == name
    assert minion["autosign_grains"] == ["saltfleet_instance_id"]
    assert minion["master_finger"]
    assert (root / "etc/salt/minion_id").read_text().strip() == name
    assert yaml.safe_load((root / "etc/salt/grains").read_text()) == {
        "saltfleet_instance_id": inst["InstanceId"],
        "saltfleet_cloud": {
            "provider": "ec2",
            "region": REGION,
            "size": "t3.small",
            "image": PROFILE_AMI,
            "profile": "worker",
            "deployments": [],
            "instance_id": inst["InstanceId"],
            # Read from the metadata service at boot; none here (the id was given).
            "public_ips": [],
            "private_ips": [],
        },
    }

    # The master will accept one key of this minion id from that instance, and holds no pre-accepted key.
    assert tickets(salt_master)[inst["InstanceId"]]["name"] == name
    assert not (Path(salt_master.config["pki_dir"]) / "minions" / name).exists()


def test_cloud_init_never_ships_the_key_salt_cloud_generated(cloud, ec2, salt_master, create):
    """With deploy on, salt-cloud makes the VM a key pair and pre-accepts it; cloud-init must drop both."""
    log = []
    name, created = create("worker-deploy", log=log)
    assert created["deploy"] == "cloud-init"
    # A key pair was made and pre-accepted (so there was one that could have shipped), then dropped.
    assert f"{name}: removed the pre-accepted key; the host generates its own" in log[0], log[0][-3000:]
    script = user_data(ec2, created["id"])
    assert f"SALTFLEET_MINION_ID={name}" in script
    assert "PRIVATE KEY" not in script
    assert "BEGIN PUBLIC KEY" not in script
    # The generated public key would let the matching private key in: it is gone from the master.
    assert name not in salt_master.salt_key_cli().run("-L").data["minions"]
    assert tickets(salt_master)[created["id"]]["name"] == name


def test_worker_fetcher_profile_assigns_deployments(ec2, create):
    name, _ = create("worker-fetcher")
    inst = instance(ec2, name)
    assert inst["InstanceType"] == "t3.medium"
    assert tags(inst)["saltfleet:deployments"] == "daily-fetcher"
    assert '"deployments": ["daily-fetcher"]' in user_data(ec2, inst["InstanceId"])


def test_query_and_full_query_list_the_workers(cloud, ec2, create):
    worker, _ = create("worker")
    fetcher, _ = create("worker-fetcher")
    # An instance saltfleet did not create is none of salt-cloud's business.
    ec2.run_instances(
        ImageId=PROFILE_AMI,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "someone-else"}]}],
    )
    ret = cloud.run("-Q")
    assert ret.returncode == 0, ret
    nodes = ret.data["ec2"]["ec2"]
    assert {worker, fetcher} <= set(nodes)
    assert "someone-else" not in nodes
    inst = instance(ec2, worker)
    assert nodes[worker]["id"] == inst["InstanceId"]
    assert nodes[worker]["state"] == "running"
    assert nodes[worker]["size"] == "t3.small"
    assert nodes[worker]["public_ips"] == [inst["PublicIpAddress"]]
    assert nodes[worker]["private_ips"] == [inst["PrivateIpAddress"]]

    full = cloud.run("-F").data["ec2"]["ec2"]
    assert "someone-else" not in full
    assert full[fetcher]["tags"]["saltfleet:deployments"] == "daily-fetcher"
    assert full[fetcher]["Placement"]["AvailabilityZone"].startswith(REGION)


def test_select_query_and_show_instance(cloud, conf_dir, create):
    name, _ = create("worker")
    (conf_dir / "cloud.conf.d").mkdir(exist_ok=True)
    (conf_dir / "cloud.conf.d" / "select.conf").write_text(yaml.safe_dump({"query.selection": ["id", "KeyName"]}))
    try:
        ret = cloud.run("-S")
        assert ret.returncode == 0, ret
        assert set(ret.data["ec2"]["ec2"][name]) == {"id", "KeyName"}
    finally:
        (conf_dir / "cloud.conf.d" / "select.conf").unlink()
    shown = cloud.run("-a", "show_instance", name, "-y")
    assert shown.returncode == 0, shown
    assert shown.data["ec2"]["ec2"][name]["KeyName"] == "saltfleet"


def test_list_images_sizes_locations(cloud):
    images = cloud.run("--list-images", "ec2")
    assert images.returncode == 0, images
    assert images.data["ec2"]["ec2"][PROFILE_AMI]["name"] == "ubuntu-jammy-22.04-amd64-server"
    sizes = cloud.run("--list-sizes", "ec2").data["ec2"]["ec2"]
    assert sizes["t3.small"]["vcpus"] == 2
    locations = cloud.run("--list-locations", "ec2").data["ec2"]["ec2"]
    assert "us-east-1a" in locations[REGION]["zones"]


def test_actions_stop_start_reboot(cloud, ec2, create):
    name, _ = create("worker")
    assert cloud.run("-a", "stop", name, "-y").returncode == 0
    assert instance(ec2, name, states=("stopping", "stopped"))
    assert cloud.run("-a", "start", name, "-y").returncode == 0
    assert instance(ec2, name, states=("pending", "running"))
    ret = cloud.run("-a", "reboot", name, "-y")
    assert ret.returncode == 0, ret


def test_destroy_terminates_and_revokes_the_ticket(cloud, ec2, salt_master, create, event_listener):
    name, created = create("worker")
    instance_id = created["id"]
    assert instance_id in tickets(salt_master)
    start = time.time()
    ret = cloud.run("-d", name, "-y")
    assert ret.returncode == 0, ret
    assert ret.data["ec2"]["ec2"][name] == {"name": name, "instance_id": instance_id, "state": "shutting-down"}
    events = event_listener.wait_for_events(
        [(salt_master.id, f"salt/cloud/{name}/{tag}") for tag in ("destroying", "destroyed")],
        after_time=start,
        timeout=30,
    )
    assert events.found_all_events, events.missed
    assert {e.data["instance_id"] for e in events.matches} == {instance_id}
    assert instance(ec2, name) is None
    assert instance(ec2, name, states=("shutting-down", "terminated"))["InstanceId"] == instance_id
    assert instance_id not in tickets(salt_master)
    assert name not in nodes(cloud.run("-Q"))


def test_parallel_create(cloud, ec2):
    ret = cloud.run("-P", "-p", "worker", "par-1", "par-2")
    assert ret.returncode == 0, ret
    for name in ("par-1", "par-2"):
        inst = instance(ec2, name)
        assert inst is not None, name
        assert tags(inst)["saltfleet:profile"] == "worker"
    assert cloud.run("-d", "par-1", "par-2", "-y").returncode == 0
    assert instance(ec2, "par-1") is None
    assert instance(ec2, "par-2") is None


def test_map_creates_and_destroys_a_set(cloud, ec2, tmp_path):
    fleet = tmp_path / "fleet.map"
    fleet.write_text(yaml.safe_dump({"worker": ["map-1", "map-2"], "worker-fetcher": ["map-fetch"]}))
    ret = cloud.run("-m", str(fleet), "-y")
    assert ret.returncode == 0, ret
    assert tags(instance(ec2, "map-fetch"))["saltfleet:deployments"] == "daily-fetcher"
    assert instance(ec2, "map-1") and instance(ec2, "map-2")
    ret = cloud.run("-m", str(fleet), "-d", "-y")
    assert ret.returncode == 0, ret
    assert [instance(ec2, n) for n in ("map-1", "map-2", "map-fetch")] == [None, None, None]


def test_termination_protection_is_honoured(cloud, ec2):
    assert cloud.run("-p", "protected", "guarded-1").returncode == 0
    ret = cloud.run("-d", "guarded-1", "-y")
    assert "termination protection" in ret.stdout + ret.stderr
    assert "disable_term_protect guarded-1" in ret.stdout + ret.stderr
    assert instance(ec2, "guarded-1") is not None
    assert cloud.run("-a", "disable_term_protect", "guarded-1", "-y").returncode == 0
    assert cloud.run("-d", "guarded-1", "-y").returncode == 0
    assert instance(ec2, "guarded-1") is None


def launched(ec2, name):
    """Every instance ever launched under this name, whatever its state."""
    return [
        i
        for r in ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": [name]}])["Reservations"]
        for i in r["Instances"]
    ]


def test_bad_ami_is_reported_and_nothing_launched(cloud, ec2):
    ret = cloud.run("-p", "bad-ami", "bad-1")
    assert ret.returncode != 0
    out = ret.stdout + ret.stderr
    assert "InvalidAMIID.NotFound" in out
    assert "image: ami-deadbeef does not exist in us-east-1" in out
    assert launched(ec2, "bad-1") == []


def test_missing_key_pair_and_group_are_reported_together(cloud, ec2):
    ret = cloud.run("-p", "bad-keyname", "bad-2")
    out = ret.stdout + ret.stderr
    assert ret.returncode != 0
    assert "keyname: nobody is not a key pair in us-east-1" in out
    assert "securitygroup: no-such-group not found" in out
    assert launched(ec2, "bad-2") == []


def test_instance_without_address_times_out_and_is_terminated(cloud, ec2, salt_master):
    ret = cloud.run("-p", "no-address", "lonely-1")
    out = ret.stdout + ret.stderr
    assert ret.returncode != 0
    assert "running with an address (public_ips) did not happen within 2 s" in out
    assert "terminated instance i-" in out
    (inst,) = launched(ec2, "lonely-1")
    assert inst["State"]["Name"] in ("shutting-down", "terminated")
    assert inst["InstanceId"] not in tickets(salt_master)


def test_instance_without_address_is_kept_when_asked(cloud, ec2):
    ret = cloud.run("-p", "no-address-kept", "lonely-2")
    out = ret.stdout + ret.stderr
    assert ret.returncode != 0
    assert "kept instance i-" in out
    assert instance(ec2, "lonely-2") is not None
    ec2.terminate_instances(InstanceIds=[instance(ec2, "lonely-2")["InstanceId"]])


class Throttler(http.server.BaseHTTPRequestHandler):
    """An EC2 endpoint that throttles every request, counting them."""

    requests = 0

    def do_POST(self):
        type(self).requests += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = (
            b"<Response><Errors><Error><Code>RequestLimitExceeded</Code>"
            b"<Message>Request limit exceeded.</Message></Error></Errors><RequestID>r</RequestID></Response>"
        )
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def extra_provider(conf_dir):
    """Write one more provider and its profile for a test, removed afterwards (it would break -Q for others)."""
    written = []

    def write(alias, provider, profile):
        for kind, data in (("providers", {alias: provider}), ("profiles", {f"{alias}-worker": profile})):
            path = conf_dir / f"cloud.{kind}.d" / f"{alias}.conf"
            path.write_text(yaml.safe_dump(data))
            written.append(path)

    yield write
    for path in written:
        path.unlink()


def test_unknown_region_is_reported(cloud, extra_provider):
    extra_provider("nowhere", {"driver": "ec2", "region": "xx-nowhere-9"}, {"extends": "worker", "provider": "nowhere"})
    ret = cloud.run("-p", "nowhere-worker", "far-1")
    assert ret.returncode != 0
    assert "region: 'xx-nowhere-9' is not an EC2 region" in ret.stdout + ret.stderr


def test_throttling_is_retried_then_reported(cloud, extra_provider):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Throttler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        extra_provider(
            "throttled",
            {"driver": "ec2", "region": REGION, "endpoint_url": endpoint, "retries": {"max_attempts": 2}},
            {"extends": "worker", "provider": "throttled"},
        )
        ret = cloud.run("-p", "throttled-worker", "busy-1")
    finally:
        server.shutdown()
        server.server_close()
    out = ret.stdout + ret.stderr
    assert ret.returncode != 0
    assert "RequestLimitExceeded" in out
    # botocore's max_attempts counts retries: 1 try + 2 retries per call.
    assert "busy-1: image: RequestLimitExceeded" in out
    assert "EC2 kept throttling after 3 attempts" in out
    # salt-cloud also lists the provider before creating: each call made its 3 attempts.
    assert Throttler.requests >= 3
    assert Throttler.requests % 3 == 0
