"""
The Rackspace salt-cloud driver (_clouds/rackspace.py) driven through the real
salt-cloud CLI against mimic, Rackspace's own API mock, on 127.0.0.1; results are
checked through pyrax, and mimic's control API injects failures.
"""

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import saltfleet_utils

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pyrax
    from pyrax.base_identity import Service

pytestmark = pytest.mark.timeout(600)

USERNAME = "saltfleet-test"
REGION = "ORD"
MIMIC_IMAGE = "Ubuntu 14.04 LTS (Trusty Tahr) (PVHVM)"  # mimic's catalog has no newer Ubuntu
DEPLOYMENTS = ["daily-fetcher", "hourly-report"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post_json(url, body, token=None):
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["X-Auth-Token"] = token
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read()
    return json.loads(text) if text else None


class Mimic:
    """A running mimic: its URLs, a pyrax client on Cloud Servers, and its behaviour injection."""

    def __init__(self, port):
        self.url = f"http://127.0.0.1:{port}"
        self.identity_url = f"{self.url}/identity/v2.0/"

    def authenticate(self, username=USERNAME):
        body = {"auth": {"RAX-KSKEY:apiKeyCredentials": {"username": username, "apiKey": "any"}}}
        return _post_json(f"{self.identity_url}tokens", body)["access"]

    def _endpoint(self, service_name):
        access = self.authenticate()
        service = next(s for s in access["serviceCatalog"] if s["name"] == service_name)
        endpoint = next(e for e in service["endpoints"] if e["region"] == REGION)
        return endpoint["publicURL"], access["token"]["id"]

    def fail_servers_named(self, pattern, behavior, parameters=None):
        """mimic's control API: servers whose name matches `pattern` get `behavior` (error, build, fail)."""
        url, token = self._endpoint("cloudServersBehavior")
        body = {"criteria": [{"server_name": pattern}], "name": behavior, "parameters": parameters or {}}
        _post_json(f"{url}/behaviors/creation", body, token)

    def advance_clock(self, seconds):
        """mimic's clock only moves when told to (without --realtime): builds finish on a tick."""
        _post_json(f"{self.url}/mimic/v1.1/tick", {"amount": seconds})

    def fail_authentication(self, username_pattern):
        body = {"criteria": [{"username": username_pattern}], "name": "fail", "parameters": {}}
        _post_json(f"{self.url}/mimic/v1.1/IdentityControlAPI/behaviors/auth", body)

    def client(self, username=USERNAME):
        """A pyrax (novaclient) client on an account's Cloud Servers in REGION (the test account by default)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            identity = pyrax.create_context(id_type="rackspace", username=username, api_key="any")
            identity.auth_endpoint = self.identity_url
            identity.authenticate()
            entry = next(s for s in identity.service_catalog if s["name"] == "cloudServersOpenStack")
            identity.services.compute = Service(identity, entry)
            return pyrax.connect_to_cloudservers(region=REGION, context=identity)

    def servers(self, username=USERNAME):
        """{name: server} of an account in REGION (the test account by default), read through pyrax."""
        return {server.name: server for server in self.client(username).servers.list()}


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    port = _free_port()
    workdir = tmp_path_factory.mktemp("mimic")  # twistd writes twistd.pid and its log in its cwd
    twistd = Path(sys.executable).with_name("twistd")
    with open(workdir / "mimic.log", "wb") as log:
        proc = subprocess.Popen(
            [str(twistd), "-n", "mimic", "-l", f"tcp:{port}:interface=127.0.0.1"],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Mimic(port)
    deadline = time.monotonic() + 60
    while True:
        try:
            server.authenticate()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mimic did not start: {(workdir / 'mimic.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def salt_cloud(salt_master, mimic, repo_root):
    """The real salt-cloud CLI with the repository's profile and a provider pointing at mimic."""
    root = Path(salt_master.config["root_dir"])
    overrides = {
        "deploy": False,
        "query.selection": ["id", "state"],  # salt-cloud -S
    }
    cli = salt_master.salt_cloud_cli(overrides=overrides, timeout=300)
    conf_dir = root / "conf"
    provider = {
        "driver": "rackspace",
        "username": USERNAME,
        "api_key": "not-a-real-key",
        "region": REGION,
        "identity_url": mimic.identity_url,
        "wait_for_ip_interval": 0.2,
        "wait_for_ip_timeout": 60,
        "minion": {"master": "127.0.0.1"},
    }
    providers = {
        "rackspace": provider,
        "rackspace-badcreds": {**provider, "username": "bad-credentials"},
    }
    (conf_dir / "cloud.providers.d" / "rackspace.conf").write_text(yaml.safe_dump(providers))
    shutil.copy(repo_root / "cloud.profiles.d" / "rackspace.conf", conf_dir / "cloud.profiles.d" / "rackspace.conf")
    # mimic's images are old; everything else comes from the repository's profile.
    test_profiles = {
        "worker-mimic": {"extends": "worker-rackspace", "image": MIMIC_IMAGE, "deployments": DEPLOYMENTS},
        "worker-mimic-badcreds": {"extends": "worker-mimic", "provider": "rackspace-badcreds"},
        "worker-mimic-badflavor": {"extends": "worker-mimic", "size": "no-such-flavor"},
        "worker-mimic-badimage": {"extends": "worker-mimic", "image": "No Such Linux"},
        "worker-mimic-impatient": {"extends": "worker-mimic", "wait_for_ip_timeout": 2},
        "worker-mimic-keep-failed": {"extends": "worker-mimic", "keep_failed": True},
        # deploy: True makes salt-cloud generate the VM a key pair (and pre-accept it): one that could leak.
        "worker-mimic-cloudinit": {
            "extends": "worker-mimic",
            "bootstrap": "cloud-init",
            "key_name": "operators",
            "deploy": True,
        },
        "worker-mimic-ssh": {"extends": "worker-mimic", "bootstrap": "ssh", "deploy": True},
    }
    (conf_dir / "cloud.profiles.d" / "mimic.conf").write_text(yaml.safe_dump(test_profiles))
    return cli


def tickets(salt_cloud):
    """The master's autosign tickets: {instance id: {"name": minion id, ...}}."""
    return saltfleet_utils().saltfleet_tickets.autosign_tickets(salt_cloud.config)


def _nodes(result):
    """{name: node} from `salt-cloud -Q/-F --out json` (provider alias -> driver -> nodes; absent when empty)."""
    assert result.returncode == 0, result.stderr
    return (result.data or {}).get("rackspace", {}).get("rackspace", {})


def test_create_from_profile_list_query_and_destroy(salt_cloud, mimic, repo_root):
    ret = salt_cloud.run("-p", "worker-mimic", "rs-worker-1")
    assert ret.returncode == 0, ret.stderr
    created = ret.data["rs-worker-1"]
    assert created["state"] == "ACTIVE"
    assert created["public_ips"]
    assert created["deploy"] == "none"

    server = mimic.servers()["rs-worker-1"]
    client = mimic.client()
    images = {image.id: image.name for image in client.images.list()}
    flavors = {flavor.id: flavor.name for flavor in client.flavors.list()}
    profile = yaml.safe_load((repo_root / "cloud.profiles.d" / "rackspace.conf").read_text())["worker-rackspace"]
    assert images[server.image["id"]] == MIMIC_IMAGE
    assert flavors[server.flavor["id"]] == profile["size"]
    assert server.metadata == {
        **profile["metadata"],
        "saltfleet-profile": "worker-mimic",
        "saltfleet-deployments": ",".join(DEPLOYMENTS),
    }
    assert created["id"] == server.id

    query = salt_cloud.run("-Q")
    assert query.returncode == 0, query.stderr
    node = _nodes(query)["rs-worker-1"]
    assert node["id"] == server.id
    assert node["state"] == "ACTIVE"
    assert node["region"] == REGION

    full = salt_cloud.run("-F")
    assert _nodes(full)["rs-worker-1"]["metadata"]["saltfleet-deployments"] == "daily-fetcher,hourly-report"
    assert _nodes(salt_cloud.run("-S"))["rs-worker-1"] == {"id": server.id, "state": "ACTIVE"}

    shown = _nodes(salt_cloud.run("-a", "show_instance", "rs-worker-1", "-y"))["rs-worker-1"]
    assert (shown["id"], shown["name"], shown["state"], shown["region"]) == (server.id, "rs-worker-1", "ACTIVE", REGION)
    assert shown["metadata"]["saltfleet-deployments"] == "daily-fetcher,hourly-report"

    rebooted = salt_cloud.run("-a", "reboot", "rs-worker-1", "-y")
    assert rebooted.returncode == 0, rebooted.stderr
    assert mimic.servers()["rs-worker-1"].status == "REBOOT"

    gone = salt_cloud.run("-d", "rs-worker-1", "-y")
    assert gone.returncode == 0, gone.stderr
    assert _nodes(gone)["rs-worker-1"] == {"name": "rs-worker-1", "instance_id": server.id, "state": "deleted"}
    assert "rs-worker-1" not in mimic.servers()
    assert "rs-worker-1" not in _nodes(salt_cloud.run("-Q"))


def test_parallel_create_and_map(salt_cloud, mimic, tmp_path):
    ret = salt_cloud.run("-P", "-p", "worker-mimic", "rs-par-1", "rs-par-2", "rs-par-3")
    assert ret.returncode == 0, ret.stderr
    servers = mimic.servers()
    assert {"rs-par-1", "rs-par-2", "rs-par-3"} <= set(servers)
    assert len({servers[name].id for name in ("rs-par-1", "rs-par-2", "rs-par-3")}) == 3

    cloud_map = tmp_path / "fleet.map"
    cloud_map.write_text(yaml.safe_dump({"worker-mimic": ["rs-map-1", "rs-map-2"]}))
    mapped = salt_cloud.run("-m", str(cloud_map), "-y")
    assert mapped.returncode == 0, mapped.stderr
    assert {"rs-map-1", "rs-map-2"} <= set(mimic.servers())

    removed = salt_cloud.run("-m", str(cloud_map), "-d", "-y")
    assert removed.returncode == 0, removed.stderr
    gone = salt_cloud.run("-d", "rs-par-1", "rs-par-2", "rs-par-3", "-y")
    assert gone.returncode == 0, gone.stderr
    assert not {"rs-par-1", "rs-par-2", "rs-par-3", "rs-map-1", "rs-map-2"} & set(mimic.servers())


def test_catalogs(salt_cloud):
    sizes = salt_cloud.run("--list-sizes", "rackspace")
    assert sizes.returncode == 0, sizes.stderr
    assert _nodes(sizes)["2 GB General Purpose v1"]["id"] == "general1-2"
    images = salt_cloud.run("--list-images", "rackspace")
    assert MIMIC_IMAGE in _nodes(images)
    locations = salt_cloud.run("--list-locations", "rackspace")
    assert {"DFW", "ORD", "IAD"} <= set(_nodes(locations))


def _error_text(result):
    """What salt-cloud told the user about a failure (it exits non-zero with `Error: ...` on stderr)."""
    assert result.returncode != 0, result.stdout
    return f"{result.stdout}\n{result.stderr}"


def test_bad_credentials_say_so(salt_cloud, mimic):
    mimic.fail_authentication("^bad-credentials$")
    ret = salt_cloud.run("-p", "worker-mimic-badcreds", "rs-badcreds")
    text = _error_text(ret)
    assert "authentication failed for user 'bad-credentials'" in text
    assert "check username and api_key" in text
    assert "rs-badcreds" not in mimic.servers()


@pytest.mark.parametrize(
    ("profile", "message", "existing"),
    [
        (
            "worker-mimic-badflavor",
            "unknown flavor 'no-such-flavor' in region ORD; set size",
            "2 GB General Purpose v1",
        ),
        ("worker-mimic-badimage", "unknown image 'No Such Linux' in region ORD; set image", MIMIC_IMAGE),
    ],
)
def test_unknown_flavor_or_image_says_so(salt_cloud, mimic, profile, message, existing):
    ret = salt_cloud.run("-p", profile, "rs-unknown")
    text = _error_text(ret)
    assert f"rs-unknown: {message} in profile {profile} to one of: " in text
    # The error lists what exists, the one the profile should name among them.
    listed = text.split(" to one of: ", 1)[1].split(" (`salt-cloud --list-", 1)[0].split(", ")
    assert existing in listed
    assert "rs-unknown" not in mimic.servers()


def test_build_that_goes_to_error_is_reported_and_deleted(salt_cloud, mimic):
    mimic.fail_servers_named("^rs-broken", "error")
    ret = salt_cloud.run("-p", "worker-mimic", "rs-broken")
    text = _error_text(ret)
    assert "server 'rs-broken'" in text
    assert "failed to build: ERROR" in text
    assert "deleted server" in text
    assert "rs-broken" not in mimic.servers()


def test_create_waits_while_the_server_builds(salt_cloud, mimic):
    mimic.fail_servers_named("^rs-building", "build", {"duration": 30})
    done = threading.Event()

    def tick():  # each server stays in BUILD until the next tick after its creation
        while not done.wait(2):
            mimic.advance_clock(60)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        ret = salt_cloud.run("-p", "worker-mimic", "rs-building")
    finally:
        done.set()
        ticker.join()
    assert ret.returncode == 0, ret.stderr
    assert ret.data["rs-building"]["state"] == "ACTIVE"
    gone = salt_cloud.run("-d", "rs-building", "-y")
    assert gone.returncode == 0, gone.stderr


def test_failed_build_is_kept_when_asked(salt_cloud, mimic):
    mimic.fail_servers_named("^rs-kept", "error")
    ret = salt_cloud.run("-p", "worker-mimic-keep-failed", "rs-kept")
    text = _error_text(ret)
    assert "failed to build: ERROR" in text
    assert "kept server" in text
    assert mimic.servers()["rs-kept"].status == "ERROR"
    gone = salt_cloud.run("-d", "rs-kept", "-y")
    assert gone.returncode == 0, gone.stderr
    assert "rs-kept" not in mimic.servers()


def test_build_that_never_finishes_times_out_and_is_deleted(salt_cloud, mimic):
    # mimic's clock only moves when told to, so this server stays in BUILD.
    mimic.fail_servers_named("^rs-slow", "build", {"duration": 100000})
    ret = salt_cloud.run("-p", "worker-mimic-impatient", "rs-slow")
    text = _error_text(ret)
    assert "becoming ACTIVE with an address did not happen within 2 s" in text
    assert "deleted server" in text
    assert "rs-slow" not in mimic.servers()


@pytest.fixture
def cloud_client(salt_cloud, monkeypatch):
    """salt-cloud in this process (salt.cloud.CloudClient), so a test can see what the driver sends."""
    import salt.cloud

    monkeypatch.chdir(salt_cloud.config["root_dir"])
    return salt.cloud.CloudClient(path=salt_cloud.config_file)


def test_cloud_init_bootstrap_sends_user_data_and_a_ticket(salt_cloud, cloud_client, mimic, monkeypatch, caplog):
    """mimic keeps user-data to itself, so it is read on its way out of novaclient."""
    from novaclient.v2.servers import ServerManager

    sent = {}
    original = ServerManager.create

    def recording_create(self, name, image, flavor, **kwargs):
        sent.update(kwargs, name=name)
        return original(self, name, image, flavor, **kwargs)

    monkeypatch.setattr(ServerManager, "create", recording_create)
    ret = cloud_client.profile("worker-mimic-cloudinit", names=["rs-cloudinit"])
    assert ret["rs-cloudinit"]["deploy"] == "cloud-init", ret
    server = mimic.servers()["rs-cloudinit"]
    assert server.key_name == "operators"

    user_data = sent["userdata"]
    # salt-cloud generated a key pair for the VM (deploy: True): neither half ships, nor stays accepted.
    removed = "rs-cloudinit: removed the pre-accepted key; the host generates its own"
    assert any(removed in record.getMessage() for record in caplog.records)
    assert "PRIVATE KEY" not in user_data
    assert "BEGIN PUBLIC KEY" not in user_data
    assert "SALTFLEET_METADATA=openstack" in user_data
    assert "SALTFLEET_MINION_ID=rs-cloudinit" in user_data
    for pair in ('"provider": "rackspace"', f'"region": "{REGION}"', '"size": "2 GB General Purpose v1"'):
        assert pair in user_data
    assert '"deployments": ["daily-fetcher", "hourly-report"]' in user_data
    pki_dir = Path(salt_cloud.config["pki_dir"])
    assert not (pki_dir / "minions" / "rs-cloudinit").exists()  # the host makes its own key
    assert tickets(salt_cloud)[server.id]["name"] == "rs-cloudinit"

    cloud_client.destroy(["rs-cloudinit"])
    assert "rs-cloudinit" not in mimic.servers()
    assert server.id not in tickets(salt_cloud)


def test_ssh_bootstrap_gets_grains_and_a_preaccepted_key(salt_cloud, cloud_client, mimic, monkeypatch):
    """No host answers SSH on mimic's addresses: salt's deploy step is recorded instead of run."""
    import salt.utils.cloud

    deployed = {}

    def recording_bootstrap(vm_, opts=None):
        deployed.update(vm_)
        return {"deployed": True}

    monkeypatch.setattr(salt.utils.cloud, "bootstrap", recording_bootstrap)
    ret = cloud_client.profile("worker-mimic-ssh", names=["rs-ssh"])
    assert ret["rs-ssh"]["deploy"] == "ssh", ret
    server = mimic.servers()["rs-ssh"]
    assert deployed["ssh_host"] in ret["rs-ssh"]["public_ips"]
    assert deployed["password"]  # the admin password Cloud Servers generated (no ssh_keyfile given)
    grains = deployed["grains"]
    assert grains["saltfleet_instance_id"] == server.id
    assert grains["saltfleet_cloud"]["instance_id"] == server.id
    assert grains["saltfleet_cloud"]["public_ips"] == ret["rs-ssh"]["public_ips"]
    assert grains["saltfleet_cloud"]["private_ips"] == ret["rs-ssh"]["private_ips"]
    assert grains["saltfleet_cloud"]["provider"] == "rackspace"
    assert grains["saltfleet_cloud"]["region"] == REGION
    assert grains["saltfleet_cloud"]["size"] == "2 GB General Purpose v1"
    assert grains["saltfleet_cloud"]["deployments"] == DEPLOYMENTS
    assert (Path(salt_cloud.config["pki_dir"]) / "minions" / "rs-ssh").exists()

    cloud_client.destroy(["rs-ssh"])
    assert "rs-ssh" not in mimic.servers()
    assert not (Path(salt_cloud.config["pki_dir"]) / "minions" / "rs-ssh").exists()


def test_state_apply_works_in_the_venv_that_has_pyrax(tmp_path):
    """pyrax's old dependency chain once replaced msgpack and broke state.apply (not test.ping)."""
    import msgpack

    assert msgpack.version >= (1, 0)
    states = tmp_path / "states"
    states.mkdir()
    target = tmp_path / "hello.txt"
    (states / "hello.sls").write_text(yaml.safe_dump({str(target): {"file.managed": [{"contents": "hello"}]}}))
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "minion").write_text(
        yaml.safe_dump({"root_dir": str(tmp_path / "root"), "file_roots": {"base": [str(states)]}, "id": "local"})
    )
    salt_call = Path(sys.executable).with_name("salt-call")
    proc = subprocess.run(
        [str(salt_call), "--local", "-c", str(conf), "--out", "json", "state.apply", "hello"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["local"].values()
    assert result["result"] is True
    assert target.read_text().strip() == "hello"


def test_servers_saltfleet_did_not_create_are_never_touched(salt_cloud, mimic):
    """A server made in the account by other means is neither listed (-Q) nor destroyed (-d) by salt-cloud."""
    client = mimic.client()
    image = next(i for i in client.images.list() if i.name == MIMIC_IMAGE)
    flavor = next(f for f in client.flavors.list() if f.name == "2 GB General Purpose v1")
    foreign = client.servers.create("rs-foreign", image.id, flavor.id, meta={"role": "database"})
    try:
        assert "rs-foreign" in mimic.servers()
        assert "rs-foreign" not in _nodes(salt_cloud.run("-Q"))
        assert "rs-foreign" not in _nodes(salt_cloud.run("-F"))
        shown = salt_cloud.run("-a", "show_instance", "rs-foreign", "-y")
        assert shown.data == {"Not Actioned/Not Running": ["rs-foreign"], "Not Found": ["rs-foreign"]}, shown
        destroyed = salt_cloud.run("-d", "rs-foreign", "-y")
        assert "rs-foreign" not in json.dumps(destroyed.data), destroyed  # nothing reported destroyed
        assert mimic.servers()["rs-foreign"].id == foreign.id  # still there
    finally:
        client.servers.delete(foreign.id)


def test_a_failure_that_is_not_salts_still_deletes_the_server(salt_cloud, cloud_client, mimic, monkeypatch):
    """Whatever breaks after the server exists (here the SSH deploy, with an OSError), the server is not leaked."""
    import salt.exceptions
    import salt.utils.cloud

    def unreachable(vm_, opts=None):
        raise OSError(113, "No route to host")

    monkeypatch.setattr(salt.utils.cloud, "bootstrap", unreachable)
    with pytest.raises(salt.exceptions.SaltCloudSystemExit) as failed:
        cloud_client.profile("worker-mimic-ssh", names=["rs-leak"])
    message = str(failed.value)
    assert message.startswith("rs-leak (profile worker-mimic-ssh): OSError: [Errno 113] No route to host; "), message
    assert "deleted server" in message
    assert "rs-leak" not in mimic.servers()
    (Path(salt_cloud.config["pki_dir"]) / "minions" / "rs-leak").unlink(missing_ok=True)


class IdentityRecorder(http.server.BaseHTTPRequestHandler):
    """An identity endpoint in front of mimic's: passes every request on and records the credentials sent."""

    upstream = None
    sent = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("/tokens"):
            credentials = json.loads(body)["auth"].get("RAX-KSKEY:apiKeyCredentials", {})
            type(self).sent.append((credentials.get("username"), credentials.get("apiKey")))
        request = urllib.request.Request(
            f"{self.upstream}{self.path}",
            data=body,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, reply = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, reply = exc.code, exc.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def identity_recorder(mimic):
    """mimic accepts any API key, so what the driver sent is read on its way: [(username, api_key), ...]."""
    IdentityRecorder.upstream = mimic.url
    IdentityRecorder.sent = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), IdentityRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/identity/v2.0/", IdentityRecorder.sent
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def credentials_provider(salt_cloud, mimic, identity_recorder):
    """``write(alias, **settings)``: a provider with no credentials but ``settings``, and profile
    ``<alias>-worker``; both removed afterwards (a provider without credentials breaks -Q for the others)."""
    conf_dir = Path(salt_cloud.config["root_dir"]) / "conf"
    written = []
    identity_url, _ = identity_recorder

    def write(alias, **settings):
        provider = {
            "driver": "rackspace",
            "region": REGION,
            "identity_url": identity_url,
            "wait_for_ip_interval": 0.2,
            "wait_for_ip_timeout": 60,
            "minion": {"master": "127.0.0.1"},
            **settings,
        }
        # Not `extends: worker-mimic`: salt-cloud would merge in that profile's provider, credentials included.
        profile = {
            "provider": alias,
            "image": MIMIC_IMAGE,
            "size": "2 GB General Purpose v1",
            "deployments": DEPLOYMENTS,
        }
        for kind, data in (("providers", {alias: provider}), ("profiles", {f"{alias}-worker": profile})):
            path = conf_dir / f"cloud.{kind}.d" / f"{alias}.conf"
            path.write_text(yaml.safe_dump(data))
            written.append(path)
        return f"{alias}-worker"

    yield write
    for path in written:
        path.unlink()


def test_credentials_from_the_environment(salt_cloud, mimic, identity_recorder, credentials_provider):
    """RACKSPACE_USERNAME and RACKSPACE_API_KEY in salt-cloud's environment, nothing in the provider file."""
    _, sent = identity_recorder
    username, api_key = random_string("env-user-", uppercase=False), random_string("env-key-")
    profile = credentials_provider("rackspace-env")
    name = random_string("rs-env-", uppercase=False)
    env = {"RACKSPACE_USERNAME": username, "RACKSPACE_API_KEY": api_key}
    ret = salt_cloud.run("-p", profile, name, env=env)
    assert ret.returncode == 0, ret.stderr
    assert (username, api_key) in sent
    assert {u for u, _ in sent} == {username}
    # The server is in that account, not the one of the other providers.
    assert name in mimic.servers(username)
    assert name not in mimic.servers()
    gone = salt_cloud.run("-d", name, "-y", env=env)
    assert gone.returncode == 0, gone.stderr
    assert name not in mimic.servers(username)
    assert api_key not in ret.stdout + ret.stderr


def test_missing_credentials_say_where_to_put_them(salt_cloud, mimic, credentials_provider):
    profile = credentials_provider("rackspace-nocreds")
    name = random_string("rs-nocreds-", uppercase=False)
    ret = salt_cloud.run("-p", profile, name)
    text = _error_text(ret)
    assert "set username and api_key in its configuration" in text
    assert "RACKSPACE_USERNAME and RACKSPACE_API_KEY" in text
    assert name not in mimic.servers()


def test_credentials_from_an_sdb_reference(salt_cloud, mimic, identity_recorder, credentials_provider, tmp_path):
    """``api_key: sdb://...`` (and username) resolved through Salt's sdb, here its yaml driver."""
    _, sent = identity_recorder
    username, api_key = random_string("sdb-user-", uppercase=False), random_string("sdb-key-")
    secrets = tmp_path / "rackspace-secrets.yaml"
    secrets.write_text(yaml.safe_dump({"rackspace": {"username": username, "api_key": api_key}}))
    secrets.chmod(0o600)
    conf_dir = Path(salt_cloud.config["root_dir"]) / "conf"
    sdb_conf = conf_dir / "cloud.conf.d" / "saltfleet-secrets.conf"
    sdb_conf.parent.mkdir(exist_ok=True)
    sdb_conf.write_text(yaml.safe_dump({"saltfleet-secrets": {"driver": "yaml", "files": [str(secrets)]}}))
    try:
        profile = credentials_provider(
            "rackspace-sdb",
            username="sdb://saltfleet-secrets/rackspace:username",
            api_key="sdb://saltfleet-secrets/rackspace:api_key",
        )
        name = random_string("rs-sdb-", uppercase=False)
        ret = salt_cloud.run("-p", profile, name)
        assert ret.returncode == 0, ret.stderr
        assert (username, api_key) in sent
        assert not [u for u, k in sent if u.startswith("sdb://") or k.startswith("sdb://")]
        assert name in mimic.servers(username)
        gone = salt_cloud.run("-d", name, "-y")
        assert gone.returncode == 0, gone.stderr
        assert name not in mimic.servers(username)
    finally:
        sdb_conf.unlink()
