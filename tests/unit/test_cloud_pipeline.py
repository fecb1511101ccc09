"""
The one create pipeline every salt-cloud driver runs (saltfleet_cloud.create),
fed by a cloud that records its calls: what is launched, what is removed on
which failure, keep_failed, the autosign ticket recorded and revoked, and
salt-cloud's events in order. The cloud (the driver's API calls) and the
master's event bus are the parts stood in; the ticket index and the user-data
are the real ones, under a temporary root.
"""

import pytest
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

from localfleet.config import REPO, saltfleet_utils
from tests.support.cloud import PROVIDER, master_opts
from tests.support.cloud import bus as event_bus

# A stand-in for the minion key salt-cloud holds (never sent in user-data).
KEY = (REPO / "tests" / "fixtures" / "not-a-deploy-key").read_text()

utils = saltfleet_utils()
sfc = utils.saltfleet_cloud
tickets = utils.saltfleet_tickets

NAME = "w-1"
INSTANCE = "i-0123"


@pytest.fixture
def opts(tmp_path):
    return master_opts(tmp_path)


@pytest.fixture
def bus(monkeypatch):
    return event_bus(monkeypatch)


class Cloud:
    """A cloud for one create: its API calls, recorded in order; ``fail`` makes the call of that name raise."""

    def __init__(self, fail=None, error=None, remove_error=None):
        self.calls = []
        self.fail = fail
        self.error = error or SaltCloudSystemExit(f"{NAME}: the cloud said no")
        self.remove_error = remove_error
        self.request = self.grains = None

    def _call(self, name):
        self.calls.append(name)
        if self.fail == name:
            raise self.error

    def preflight(self, mode):
        self._call("preflight")
        return sfc.facts(region="zone-1", size="small", image="img-1")

    def launch(self, request):
        self._call("launch")
        self.request = request
        return sfc.launched(INSTANCE)

    def wait(self, machine):
        self._call("wait")
        return {"id": machine.instance_id, "public": ["192.0.2.7"], "private": ["10.0.0.7"]}

    def bootstrap(self, machine, grains):
        self._call("bootstrap")
        self.grains = grains
        return {"deployed": True}

    def remove(self, machine):
        self.calls.append(f"remove {machine.instance_id}")
        if self.remove_error:
            raise self.remove_error

    def driver(self, **options):
        return sfc.driver(
            "fake",
            preflight=self.preflight,
            launch=self.launch,
            wait=self.wait,
            addresses=lambda machine: (machine["public"], machine["private"]),
            row=lambda machine: {"id": machine["id"], "name": NAME, "state": "running"},
            remove=self.remove,
            **{"bootstrap": self.bootstrap, **options},
        )


def vm(**settings):
    """salt-cloud's VM for profile ``worker`` of provider ``fake``."""
    return {"name": NAME, "profile": "worker", "driver": PROVIDER, "provider": PROVIDER, **settings}


def cloud_events(bus):
    """salt-cloud's events of the VM, by their last tag part."""
    prefix = f"salt/cloud/{NAME}/"
    return [tag.removeprefix(prefix) for tag in bus.tags(prefix)]


def create(opts, cloud, **settings):
    return sfc.create(vm(**settings), opts, cloud.driver())


# ---------------------------------------------------------------- a create that works


def test_a_create_runs_the_cloud_s_calls_in_order_and_answers_salt_cloud(opts, bus):
    cloud = Cloud()
    ret = create(opts, cloud, deployments=["daily-fetcher"])
    assert cloud.calls == ["preflight", "launch", "wait", "bootstrap"]
    assert ret == {"id": INSTANCE, "name": NAME, "state": "running", "deploy": "ssh", "deployed": True}
    assert cloud_events(bus) == ["creating", "requesting", "waiting_for_address", "deploying", "created"]
    created = bus.events[-1][1]
    assert (created["instance_id"], created["profile"], created["region"]) == (INSTANCE, "worker", "zone-1")
    assert cloud.request.deployments == ("daily-fetcher",)
    assert cloud.request.user_data is None
    assert cloud.grains["saltfleet_cloud"] == {
        "provider": "fake",
        "region": "zone-1",
        "size": "small",
        "image": "img-1",
        "profile": "worker",
        "deployments": ["daily-fetcher"],
        "instance_id": INSTANCE,
        "public_ips": ["192.0.2.7"],
        "private_ips": ["10.0.0.7"],
    }
    assert tickets.autosign_tickets(opts) == {}


def test_cloud_init_sends_user_data_without_a_key_and_records_the_ticket(opts, bus):
    cloud = Cloud()
    ret = create(opts, cloud, bootstrap="cloud-init", priv_key=KEY)
    assert ret["deploy"] == "cloud-init"
    assert cloud.calls == ["preflight", "launch", "wait"]  # the host bootstraps itself
    user_data = cloud.request.user_data
    assert f"SALTFLEET_MINION_ID={NAME}" in user_data
    assert "PRIVATE KEY" not in user_data
    assert "rejected_retry: true" in user_data
    ticket = tickets.autosign_tickets(opts)[INSTANCE]
    assert ticket["name"] == NAME
    assert "used" not in ticket
    assert cloud_events(bus) == ["creating", "requesting", "waiting_for_address", "created"]


def test_launch_only_bootstraps_nothing(opts, bus):
    cloud = Cloud()
    assert create(opts, cloud, deploy=False)["deploy"] == "none"
    assert cloud.calls == ["preflight", "launch", "wait"]


# ------------------------------------------------------- failing before the launch


@pytest.mark.parametrize("call", ["preflight", "launch"])
def test_a_failure_before_the_cloud_has_the_machine_removes_nothing(opts, bus, call):
    cloud = Cloud(fail=call)
    with pytest.raises(SaltCloudSystemExit, match="the cloud said no"):
        create(opts, cloud, bootstrap="cloud-init")
    assert not [c for c in cloud.calls if c.startswith("remove")]
    assert cloud_events(bus) == ["creating"] if call == "preflight" else ["creating", "requesting"]
    assert tickets.autosign_tickets(opts) == {}


@pytest.mark.parametrize(
    ("settings", "options", "message"),
    [
        ({"bootstrap": "cloud-init"}, {"user_data_limit": 100}, "user-data is"),
        ({"bootstrap": "cloud-init"}, {"modes": ("ssh", "none")}, "bootstrap: cloud-init is not one the fake driver"),
        ({"bootstrap": "telepathy"}, {}, "bootstrap: 'telepathy' is not one of ssh, cloud-init"),
        ({"deployments": [""]}, {}, "deployments: [''] must be a list of deployment names"),
    ],
)
def test_a_profile_the_pipeline_refuses_launches_nothing(opts, bus, settings, options, message):
    cloud = Cloud()
    with pytest.raises(SaltCloudConfigError) as failed:
        sfc.create(vm(**settings), opts, cloud.driver(**options))
    assert message in str(failed.value)
    assert "launch" not in cloud.calls


def test_cloud_init_on_a_master_that_would_not_admit_the_key_launches_nothing(tmp_path, bus):
    opts = master_opts(tmp_path, reactor=[])
    cloud = Cloud()
    with pytest.raises(SaltCloudConfigError, match="a reactor on salt/auth"):
        create(opts, cloud, bootstrap="cloud-init")
    assert cloud.calls == ["preflight"]


# -------------------------------------------------------- failing once it exists


@pytest.mark.parametrize("call", ["wait", "bootstrap"])
def test_a_failure_once_the_machine_exists_removes_it_and_says_so(opts, bus, call):
    cloud = Cloud(fail=call, error=OSError(113, "No route to host"))
    with pytest.raises(SaltCloudSystemExit) as failed:
        create(opts, cloud)
    assert cloud.calls[-1] == f"remove {INSTANCE}"
    assert cloud.calls.count(f"remove {INSTANCE}") == 1
    assert str(failed.value) == (
        f"{NAME} (profile worker): OSError: [Errno 113] No route to host; "
        f"terminated instance {INSTANCE} (set keep_failed: True to keep it)"
    )
    assert cloud_events(bus)[-1] == "failed"
    assert "created" not in cloud_events(bus)
    assert bus.events[-1][1]["error"] == "OSError: [Errno 113] No route to host"


def test_keep_failed_keeps_the_machine_and_revokes_its_ticket(opts, bus):
    cloud = Cloud(fail="wait")
    with pytest.raises(SaltCloudSystemExit) as failed:
        create(opts, cloud, bootstrap="cloud-init", keep_failed=True)
    assert not [c for c in cloud.calls if c.startswith("remove")]
    assert f"the cloud said no; kept instance {INSTANCE} for inspection (keep_failed: True)" in str(failed.value)
    assert f"`salt-cloud -d {NAME}` removes it" in str(failed.value)
    assert tickets.autosign_tickets(opts) == {}  # no host of it may enrol
    assert cloud_events(bus)[-1] == "failed"


def test_a_ticket_that_cannot_be_recorded_removes_the_machine(opts, bus):
    cloud = Cloud()
    with pytest.raises(SaltCloudSystemExit) as failed:
        create(opts, cloud, bootstrap="cloud-init", autosign_ticket_ttl="soon")
    assert cloud.calls == ["preflight", "launch", f"remove {INSTANCE}"]
    assert "ValueError" in str(failed.value)
    assert tickets.autosign_tickets(opts) == {}


def test_a_failed_removal_tells_the_operator_to_remove_it_by_hand(opts, bus):
    cloud = Cloud(fail="wait", remove_error=RuntimeError("API down"))
    with pytest.raises(SaltCloudSystemExit) as failed:
        create(opts, cloud, bootstrap="cloud-init")
    assert str(failed.value).endswith(
        f"the cloud said no; could not remove instance {INSTANCE} (RuntimeError: API down): remove it by hand"
    )
    assert tickets.autosign_tickets(opts) == {}


def test_the_driver_names_its_machine_and_how_it_goes(opts, bus):
    cloud = Cloud(fail="wait")
    with pytest.raises(SaltCloudSystemExit) as failed:
        sfc.create(vm(), opts, cloud.driver(noun="server", removed="deleted"))
    assert f"deleted server {INSTANCE}" in str(failed.value)


def test_the_driver_s_calls_run_in_the_driver_s_own_loader(opts, bus):
    """A driver module's calls read its own __utils__ and __opts__: the pipeline runs them in its loader."""
    import salt.config
    import salt.loader
    import salt.loader.context

    driver_loader = salt.loader.utils(salt.config.minion_config(None))  # not the loader the pipeline runs in
    seen = []
    cloud = Cloud()
    preflight = cloud.preflight

    def recording_preflight(mode):
        seen.append(salt.loader.context.loader_ctxvar.get())
        return preflight(mode)

    cloud.preflight = recording_preflight
    sfc.create(vm(deploy=False), opts, cloud.driver(loader=driver_loader))
    assert seen == [driver_loader]
