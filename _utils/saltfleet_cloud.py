"""
Provisioning shared by saltfleet's salt-cloud drivers (``ec2``, ``rackspace``, ``local``).

One create pipeline for every driver (:func:`create`): validate the profile,
check every resource the cloud will need, render the user-data, launch, record
the autosign ticket, wait until the machine runs with an address, bootstrap
its minion, and answer salt-cloud; fire salt-cloud's events on the way
(creating, requesting, waiting for address, deploying, created, failed); and
once the machine exists, remove it whatever fails (unless the profile says
``keep_failed: True``), revoke its ticket and say what became of it. A driver
feeds it its own API calls as a :func:`driver` (preflight, launch, wait,
addresses, row, remove), so a driver's ``create`` is one line and every
provider provisions alike. Drivers call these functions as
``__utils__["saltfleet_cloud.<name>"](...)`` and pass ``__opts__`` in (the
salt-cloud options, which include the master's).

How a new host becomes a trusted minion (``bootstrap`` in a profile):

``ssh`` (default, needs ``deploy: True``)
    salt-cloud's own way: salt-cloud generates the minion's key pair on the
    master and accepts its public key before the host exists; the pipeline then
    logs in over SSH and runs salt's deploy script, which installs salt-minion
    with that key and the minion config built by :func:`minion_config` (a
    driver may bootstrap its own way instead: the local driver starts a
    sandbox's minion).

``cloud-init``
    The host installs and configures salt-minion itself at first boot, from
    user-data rendered out of ``deployments/common/user_data.sh``
    (:func:`render_user_data`). User-data is readable by any process on the
    host (instance metadata), so it carries no private key and no secret; the
    minion generates its own key, and the master accepts it by *ticket*
    (``saltfleet_tickets``, whose docstring has the details):

    - right after its cloud API returned the instance id, the pipeline records
      the ticket ``instance id -> minion id`` in the master's ticket index;
    - at boot the script reads the instance id from the provider's metadata
      service into the grain ``saltfleet_instance_id``, which the minion sends
      with its authentication (``autosign_grains``);
    - the master puts the new key in pending and fires ``salt/auth`` with the
      grain (``auth_events_autosign_grains: [pend, reject]``); saltfleet's reactor
      (``etc/reactor/saltfleet_autosign.sls``) runs ``fleet.admit``, which
      accepts the pending key only when the ticket of that instance names
      this very minion id, the pending key is the one the event carried and
      came after the ticket, and marks the ticket used: it admits one key, once.

    A minion that presents an instance id whose ticket names *another* minion
    id is an impostor (any process on a new host can read its instance id):
    its key is **rejected** (``salt-key -L`` lists it under Rejected, so
    ``salt-key -A`` cannot accept it by mistake). A key held under the minion
    id before the host exists, or claiming it without the ticket's instance,
    is set aside (rejected) so that the host's own key is not denied for it.
    A key for an instance with no open ticket (expired, revoked, or not
    launched here) stays **pending** for the operator. A second key for a
    minion id already accepted is refused by Salt itself (``minions_denied``).
    Tickets expire after ``autosign_ticket_ttl`` seconds (default 1800); every
    driver drops expired ones on create and list, and destroy revokes the
    instance's. Salt's own ``autosign_grains_dir`` is not used: it accepts any
    minion id that presents a listed grain value. An instance id is not a
    secret, only hard to guess before the host exists, so keep the master's
    ports reachable from the fleet's network only.

``none``
    Launch only (``deploy: False`` with ``bootstrap: ssh``): no minion.

Every host gets the same grains from every driver (:func:`cloud_grains`):
``saltfleet_cloud`` (provider, region, size, image, profile, deployments,
instance_id, public_ips, private_ips) and ``saltfleet_instance_id``. A
cloud-init host completes them at boot from its metadata service.
"""

import copy
import dataclasses
import datetime
import functools
import json
import logging
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import salt.config
import salt.loader.context
import salt.utils.cloud
import salt.utils.crypt
import salt.utils.files
import salt.utils.yaml
from salt.exceptions import (
    LoaderError,
    SaltCloudConfigError,
    SaltCloudException,
    SaltCloudExecutionTimeout,
    SaltCloudSystemExit,
)

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_cloud"

REPO = Path(__file__).resolve().parents[1]
USER_DATA_SCRIPT = REPO / "deployments" / "common" / "user_data.sh"
SETTINGS_MARKER = "# @saltfleet-settings@"
BOOTSTRAP_MODES = ("ssh", "cloud-init")
TICKET_GRAIN = "saltfleet_instance_id"
CLOUD_GRAIN = "saltfleet_cloud"
DEFAULT_SALT_VERSION = "3008.4"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


# --- configuration -----------------------------------------------------------


def provider_name(active_provider_name, driver):
    """The ``alias:driver`` salt-cloud is running the driver for (``__active_provider_name__``), else ``driver``."""
    name = active_provider_name
    if name is not None and not isinstance(name, str):
        # Outside salt-cloud's calls (``__virtual__``) the driver holds the loader's packed
        # default (None), which reads as a LoaderError from this module's loader.
        try:
            name = name.value()
        except (AttributeError, LoaderError):
            name = None
    return name or driver


def configured_provider(opts, active_provider_name, driver, required=()):
    """The driver's provider configuration, or False when none is configured or a ``required`` key is missing.

    A driver's ``get_configured_provider`` is this with its ``__opts__``,
    ``__active_provider_name__``, ``__virtualname__`` and required keys.
    """
    return salt.config.is_provider_configured(opts, provider_name(active_provider_name, driver), tuple(required))


def provider_setting(opts, active_provider_name, driver, name, vm_=None, default=None):
    """A setting of ``vm_`` (VM, profile, provider: salt's lookup order), or of the provider alone without ``vm_``.

    Every driver reads its settings through this, as ``_setting(name, vm_=None, default=None)``.
    """
    provider = (vm_ or {}).get("provider")
    if not (isinstance(provider, str) and ":" in provider):
        provider = provider_name(active_provider_name, driver)
    return config_value(name, {**(vm_ or {}), "provider": provider}, opts, default=default)


def config_value(name, vm_, opts, default=None, search_global=False):
    """A setting from the VM, its profile or its provider (salt's lookup order), else ``default``."""
    # Salt finds the provider by vm_["driver"] read as "alias:driver"; salt-cloud's vm_ holds the bare
    # driver there, which Salt reads as an alias: another provider's settings, credentials included.
    provider = vm_.get("provider")
    if isinstance(provider, str) and ":" in provider:
        vm_ = {**vm_, "driver": provider}
    return salt.config.get_cloud_config_value(name, vm_, opts, default=default, search_global=search_global)


def bootstrap_mode(vm_, opts):
    """How the host gets its minion: ``"ssh"``, ``"cloud-init"`` or ``"none"`` (see the module docstring)."""
    mode = config_value("bootstrap", vm_, opts, default="ssh")
    if mode not in BOOTSTRAP_MODES:
        raise SaltCloudConfigError(
            f"{vm_['name']}: bootstrap: {mode!r} is not one of {', '.join(BOOTSTRAP_MODES)} "
            "(set it in the profile or the provider)"
        )
    if mode == "ssh" and not config_value("deploy", vm_, opts, default=True):
        return "none"
    return mode


def deployments(vm_, opts):
    """The profile's ``deployments`` as a list of names (a string is one name); the error names the bad entry."""
    value = config_value("deployments", vm_, opts, default=[]) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) and item for item in value):
        raise SaltCloudConfigError(
            f"{vm_['name']}: deployments: {value!r} must be a list of deployment names, e.g. [daily-fetcher]"
        )
    return list(value)


def cloud_grains(
    vm_, opts, provider, *, region=None, size=None, image=None, instance_id=None, public_ips=(), private_ips=()
):
    """The grains every saltfleet host carries, from every driver: ``saltfleet_cloud`` and ``saltfleet_instance_id``.

    ``saltfleet_cloud`` holds provider, region, size, image, profile, deployments,
    instance_id, public_ips and private_ips; ``saltfleet_instance_id`` is top level
    because a minion's ``autosign_grains`` sends flat values. A cloud-init host
    learns its instance id and addresses at boot (``user_data.sh`` fills them in).
    """
    grains = {
        CLOUD_GRAIN: {
            "provider": provider,
            "region": region,
            "size": size,
            "image": image,
            "profile": vm_.get("profile"),
            "deployments": deployments(vm_, opts),
            "instance_id": instance_id,
            "public_ips": [ip for ip in public_ips if ip],
            "private_ips": [ip for ip in private_ips if ip],
        }
    }
    if instance_id:
        grains[TICKET_GRAIN] = instance_id
    return grains


def minion_config(vm_, opts, grains=None, mode=None):
    """The minion configuration for the new host, as a dict.

    salt's own merge (``minion:`` and ``grains:`` from VM, profile and provider,
    id = VM name, master defaults to ``salt``), plus ``grains``, the master's
    public key fingerprint (``master_finger``, so the minion only talks to this
    master), ``autoload_dynamic_modules: False`` unless the profile's ``minion:``
    says otherwise, and, for ``mode="cloud-init"``,
    ``autosign_grains: [saltfleet_instance_id]`` and ``rejected_retry: True``.

    ``autoload_dynamic_modules`` on (Salt's default) makes every ``state.apply``
    run a ``saltutil.sync_all`` first: some twenty round trips to the master,
    most of a no-op apply's time. saltfleet hosts sync once when provisioned
    (the local driver, ``user_data.sh``; ``sync_after_install`` for ``ssh``), and
    after that when the operator runs ``salt '*' saltutil.sync_all``.
    """
    vm_ = dict(vm_)
    vm_["grains"] = {**(config_value("grains", vm_, opts, default={}, search_global=True) or {}), **(grains or {})}
    minion = salt.utils.cloud.minion_config(opts, vm_)
    minion.setdefault("autoload_dynamic_modules", False)
    if "master_finger" not in minion:
        finger = master_finger(opts)
        if finger:
            minion["master_finger"] = finger
    if mode == "cloud-init":
        autosign = list(minion.get("autosign_grains") or [])
        if TICKET_GRAIN not in autosign:
            autosign.append(TICKET_GRAIN)
        minion["autosign_grains"] = autosign
        # A key held under the id before the host existed is set aside (rejected): the host's own key then
        # meets a rejected id until fleet.admit accepts it, and must ask again rather than exit.
        minion.setdefault("rejected_retry", True)
    return minion


def master_finger(opts):
    """The fingerprint of this master's public key (``master_finger`` on minions), or ``""`` if it has none yet."""
    pki_dir = opts.get("pki_dir")
    if not pki_dir:
        return ""
    return salt.utils.crypt.pem_finger(os.path.join(pki_dir, "master.pub"), sum_type=opts.get("hash_type", "sha256"))


# --- keys on the master --------------------------------------------------------


def preaccept_keys(vm_, opts):
    """Generate the minion's key pair on the master (unless ``vm_`` has one) and accept its public key.

    salt-cloud does this itself before ``create`` when ``deploy`` is on; a driver
    calls it when it bootstraps over SSH outside that path. Returns the minion id.
    """
    if not vm_.get("pub_key") or not vm_.get("priv_key"):
        vm_["priv_key"], vm_["pub_key"] = salt.utils.cloud.gen_keys(config_value("keysize", vm_, opts, default=2048))
    minion_id = minion_id_of(vm_, opts)
    salt.utils.cloud.accept_key(opts["pki_dir"], vm_["pub_key"], minion_id)
    return minion_id


def minion_id_of(vm_, opts):
    """The minion id salt-cloud gives the VM: its ``minion: id`` setting, else its name."""
    return config_value("minion", vm_, opts, default={}).get("id", vm_["name"])


def forget_preaccepted_key(vm_, opts):
    """Remove the key salt-cloud pre-accepted for this VM when the host will generate its own (cloud-init).

    Only a key identical to ``vm_["pub_key"]`` is removed, so a live minion's key is never touched.
    The private key is dropped from ``vm_`` so nothing can ship it.
    """
    pub = vm_.get("pub_key")
    vm_["priv_key"] = None
    if not pub or not opts.get("pki_dir"):
        return False
    minion_id = minion_id_of(vm_, opts)
    path = os.path.join(opts["pki_dir"], "minions", minion_id)
    try:
        with salt.utils.files.fopen(path, "r") as handle:
            same = handle.read().strip() == pub.strip()
    except OSError:
        return False
    if same:
        os.remove(path)
        log.info("%s: removed the pre-accepted key; the host generates its own (bootstrap: cloud-init)", minion_id)
    return same


# --- user-data -------------------------------------------------------------------


def render_user_data(vm_, opts, minion, metadata="ec2", script=None):
    """The cloud-init user-data (a shell script) that installs salt-minion and writes ``minion`` as its config.

    ``metadata`` names the provider's metadata service the script reads the
    instance id and addresses from at boot (``ec2`` or ``openstack``). The
    ``saltfleet_cloud`` grain goes to the script apart from the config, which
    completes it with those and writes it as a static grain. ``script``
    defaults to the profile's ``user_data_script`` or
    ``deployments/common/user_data.sh``. The result holds no key
    (:func:`assert_no_secret`).
    """
    path = Path(script or config_value("user_data_script", vm_, opts, default=None) or USER_DATA_SCRIPT)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SaltCloudConfigError(f"{vm_['name']}: user_data_script: cannot read {path}: {exc.strerror}") from exc
    if SETTINGS_MARKER not in text:
        raise SaltCloudConfigError(f"{vm_['name']}: {path} lacks the line {SETTINGS_MARKER!r} where settings go")
    minion = copy.deepcopy(minion)
    # Config grains would shadow the grains file the script writes: the facts grain goes there alone.
    cloud = (minion.get("grains") or {}).pop(CLOUD_GRAIN, {})
    if not minion.get("grains"):
        minion.pop("grains", None)
    settings = {
        "SALTFLEET_MINION_ID": minion["id"],
        "SALTFLEET_METADATA": metadata,
        "SALTFLEET_SALT_VERSION": str(config_value("salt_version", vm_, opts, default=DEFAULT_SALT_VERSION)),
        "SALTFLEET_MINION_CONFIG": salt.utils.yaml.safe_dump(minion, default_flow_style=False),
        "SALTFLEET_CLOUD": json.dumps(json_safe(cloud), sort_keys=True),
    }
    block = "\n".join(f"{key}={shlex.quote(value)}" for key, value in settings.items())
    user_data = text.replace(SETTINGS_MARKER, f"{SETTINGS_MARKER}\n{block}", 1)
    assert_no_secret(user_data, vm_["name"])
    return user_data


def assert_no_secret(user_data, name="user-data"):
    """Raise if ``user_data`` contains a private key (it is readable from the host's metadata service)."""
    if "PRIVATE KEY" in user_data:
        raise SaltCloudSystemExit(f"{name}: refusing to send user-data that contains a private key")


# --- bootstrap ------------------------------------------------------------------


def bootstrap_ssh(vm_, opts, host, grains=None):
    """Install salt-minion on ``host`` over SSH with salt-cloud's deploy script; returns salt's deploy result.

    Uses the key pair salt-cloud pre-accepted (or :func:`preaccept_keys`),
    ``ssh_username``/``ssh_keyfile``/``script`` from the profile, and a minion config
    from :func:`minion_config` with ``grains``.
    """
    if not vm_.get("pub_key"):
        preaccept_keys(vm_, opts)
    vm_["ssh_host"] = host
    vm_["minion"] = {k: v for k, v in minion_config(vm_, opts, grains=grains).items() if k not in ("id",)}
    vm_["grains"] = vm_["minion"].pop("grains", {})
    return salt.utils.cloud.bootstrap(vm_, opts)


# --- waiting ----------------------------------------------------------------------


def wait_for(check, timeout, what, interval=2.0):
    """Call ``check()`` every ``interval`` s until it returns something truthy, and return that.

    Salt's own ``wait_for_ip`` loop; raises SaltCloudSystemExit("<what> did not
    happen within <timeout> s") when time runs out. ``check`` may raise to stop early.
    """
    try:
        return salt.utils.cloud.wait_for_ip(lambda: check() or None, timeout=float(timeout), interval=float(interval))
    except SaltCloudExecutionTimeout:
        raise SaltCloudSystemExit(f"{what} did not happen within {timeout} s") from None


# --- the create pipeline ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the cloud will launch, checked before anything is: the grains' region, size and image."""

    region: str | None = None
    size: str | None = None
    image: str | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """What :func:`create` asks a driver to launch: the bootstrap mode, the profile's deployments, the user-data."""

    mode: str
    deployments: tuple[str, ...]
    user_data: str | None


@dataclasses.dataclass(frozen=True)
class Launched:
    """A machine the cloud has: from here on a failed create removes it.

    ``handle`` is whatever the driver's own calls need (pyrax's server);
    ``password`` a root password the cloud generated, for ``bootstrap: ssh``
    when the profile names neither ``ssh_keyfile`` nor ``password``.
    """

    instance_id: str
    handle: Any = None
    password: str | None = None


@dataclasses.dataclass(frozen=True)
class Driver:
    """One cloud's API calls, in the order :func:`create` runs them (see :func:`driver`)."""

    provider: str
    preflight: Callable[[str], Facts]
    launch: Callable[[Request], Launched]
    wait: Callable[[Launched], Any]
    addresses: Callable[[Any], tuple[list, list]]
    row: Callable[[Any], dict]
    remove: Callable[[Launched], None]
    bootstrap: Callable[[Any, dict], dict] | None = None
    noun: str = "instance"
    removed: str = "terminated"
    metadata: str = "ec2"
    user_data_limit: int | None = None
    modes: tuple[str, ...] = (*BOOTSTRAP_MODES, "none")


def driver(provider, *, preflight, launch, wait, addresses, row, remove, loader=None, **options):
    """A driver's API calls for :func:`create`, one create's worth (they may share its client).

    ``preflight(mode)``
        check every setting and resource before anything is launched (errors
        name the VM, the setting and the fix); returns :func:`facts`.
    ``launch(request)``
        request the machine (a :class:`Request`: mode, deployments,
        user-data); returns :func:`launched`. It leaves nothing behind when it raises.
    ``wait(launched)``
        until the machine runs with an address; returns the cloud's record of it
        (``addresses`` and ``row`` read it).
    ``addresses(machine)``
        ``(public_ips, private_ips)``.
    ``row(machine)``
        what create returns: list_nodes_full's entry.
    ``remove(launched)``
        remove a machine this create launched (raises if it cannot).

    ``options``: ``bootstrap(machine, grains)`` (the driver's own minion
    bootstrap in place of salt-cloud's SSH deploy, returning what create adds to
    its answer), ``noun`` (``instance``), ``removed`` (the verb: ``terminated``),
    ``metadata`` (the metadata service ``user_data.sh`` reads: ``ec2`` or
    ``openstack``), ``user_data_limit`` (bytes), ``modes`` (the bootstrap modes it takes).

    ``loader``: the driver module's own loader (``loader_ctxvar.get()`` in its
    ``create``). The pipeline runs in the utils loader, where the driver's
    ``__utils__`` and ``__opts__`` are not; each call goes back through it.
    """
    calls = {"preflight": preflight, "launch": launch, "wait": wait, "addresses": addresses, "row": row}
    calls["remove"] = remove
    if options.get("bootstrap") is not None:
        calls["bootstrap"] = options.pop("bootstrap")
    if loader is not None:
        calls = {name: functools.partial(loader.run, call) for name, call in calls.items()}
    return Driver(provider, **calls, **options)


def facts(region=None, size=None, image=None):
    """What a driver's preflight found the machine will be (:class:`Facts`)."""
    return Facts(region, size, image)


def launched(instance_id, handle=None, password=None):
    """What a driver's launch got from the cloud (:class:`Launched`)."""
    return Launched(instance_id, handle, password)


def create(vm_, opts, cloud):
    """salt-cloud's ``create`` for every driver: ``cloud`` (a :func:`driver`) does the cloud's part.

    Fires ``creating``; validates bootstrap and deployments; drops expired
    tickets; ``preflight``; renders the user-data (``cloud-init``: the master
    must run fleet.admit, and the key salt-cloud pre-accepted is dropped);
    fires ``requesting``; ``launch``. Then, the machine existing: records its
    autosign ticket (``cloud-init``), fires ``waiting for address``, ``wait``,
    bootstraps the minion (``ssh``: salt-cloud's deploy script, or the driver's
    own after ``deploying``), fires ``created`` and returns ``row`` plus
    ``deploy`` (how the minion was bootstrapped). If anything fails once the
    machine exists, it is removed (``keep_failed: True`` keeps it), ``failed``
    fires, its ticket is revoked, and the error says what became of it.
    """
    name = vm_["name"]
    fire_event(opts, name, "creating", {"profile": vm_.get("profile"), "provider": vm_.get("driver")})
    mode = bootstrap_mode(vm_, opts)
    if mode not in cloud.modes:
        raise SaltCloudConfigError(
            f"{name}: bootstrap: {mode} is not one the {cloud.provider} driver takes ({', '.join(cloud.modes)})"
        )
    wanted = deployments(vm_, opts)
    _utils("saltfleet_tickets.prune_autosign_tickets")(opts)
    checked = cloud.preflight(mode)
    user_data = _user_data(vm_, opts, cloud, checked) if mode == "cloud-init" else None
    fire_event(opts, name, "requesting", {"image": checked.image, "size": checked.size, "region": checked.region})
    machine = cloud.launch(Request(mode, tuple(wanted), user_data))
    log.info("%s: launched %s %s", name, cloud.noun, machine.instance_id)
    # From here on the machine exists: whatever fails, it is removed (or kept when asked).
    try:
        return _provision(vm_, opts, cloud, mode, checked, machine)
    except Exception as exc:
        raise _failed(vm_, opts, cloud, machine, exc, ticket=mode == "cloud-init") from exc


def _user_data(vm_, opts, cloud, checked):
    """The cloud-init user-data, once the master is known to pass the host's key to fleet.admit."""
    _utils("saltfleet_tickets.check_autosign_ready")(opts, vm_["name"])
    forget_preaccepted_key(vm_, opts)
    grains = cloud_grains(vm_, opts, cloud.provider, region=checked.region, size=checked.size, image=checked.image)
    minion = minion_config(vm_, opts, grains=grains, mode="cloud-init")
    user_data = render_user_data(vm_, opts, minion, metadata=cloud.metadata)
    size = len(user_data.encode())
    if cloud.user_data_limit and size > cloud.user_data_limit:
        raise SaltCloudConfigError(
            f"{vm_['name']}: user-data is {size} bytes; {cloud.provider} takes {cloud.user_data_limit}"
        )
    return user_data


def _provision(vm_, opts, cloud, mode, checked, machine):
    """The rest of create once the cloud has the machine: ticket, wait, bootstrap, answer."""
    name, instance_id = vm_["name"], machine.instance_id
    if mode == "cloud-init":
        ttl = config_value("autosign_ticket_ttl", vm_, opts, default=None)
        _utils("saltfleet_tickets.record_autosign_ticket")(opts, minion_id_of(vm_, opts), instance_id, ttl)
    fire_event(opts, name, "waiting for address", {"instance_id": instance_id})
    ready = cloud.wait(machine)
    public, private = cloud.addresses(ready)
    grains = cloud_grains(
        vm_,
        opts,
        cloud.provider,
        region=checked.region,
        size=checked.size,
        image=checked.image,
        instance_id=instance_id,
        public_ips=public,
        private_ips=private,
    )
    deploy = _bootstrap(vm_, opts, cloud, mode, machine, ready, grains)
    ret = json_safe(cloud.row(ready))
    ret.update(deploy)
    fire_event(
        opts,
        name,
        "created",
        {
            "instance_id": instance_id,
            "profile": vm_.get("profile"),
            "provider": vm_.get("driver"),
            "region": checked.region,
        },
    )
    return ret


def _bootstrap(vm_, opts, cloud, mode, machine, ready, grains):
    """The minion on the new machine per ``mode``; what create adds to its answer."""
    if mode != "ssh":
        return {"deploy": mode}
    if cloud.bootstrap is not None:
        fire_event(opts, vm_["name"], "deploying", {"instance_id": machine.instance_id})
        return {"deploy": mode, **(cloud.bootstrap(ready, grains) or {})}
    if machine.password and not config_value("ssh_keyfile", vm_, opts) and not config_value("password", vm_, opts):
        # No key pair: log in as root with the password the cloud generated.
        vm_["password"] = machine.password
    host = _ssh_host(vm_, opts, *cloud.addresses(ready))
    return {"deploy": mode, **(bootstrap_ssh(vm_, opts, host, grains=grains) or {})}


def _ssh_host(vm_, opts, public, private):
    """The address salt-cloud logs in to: the first IPv4 of ``ssh_interface`` (public_ips unless private_ips)."""
    order = (
        (private, public)
        if config_value("ssh_interface", vm_, opts, default="public_ips") == "private_ips"
        else (public, private)
    )
    addresses = [address for group in order for address in group if address]
    if not addresses:
        raise SaltCloudSystemExit(f"{vm_['name']}: the machine has no address to log in to")
    return next((address for address in addresses if ":" not in address), addresses[0])


def _failed(vm_, opts, cloud, machine, exc, ticket):
    """Remove (or keep) the machine of a create that failed, fire ``failed``, revoke its ticket; the error to raise.

    ``exc`` may be any exception (a bug, a network error, a library's own); the
    error names the VM, its profile, the cause and what became of the machine.
    Never raises itself.
    """
    name, instance_id = vm_["name"], machine.instance_id
    removal = None if config_value("keep_failed", vm_, opts, default=False) else _remove(cloud, machine)
    cause = str(exc) if isinstance(exc, SaltCloudException) else f"{type(exc).__name__}: {exc}"
    cause = cause.removeprefix(f"{name}: ")
    # A traceback only for what saltfleet did not foresee (a salt error says all there is to say).
    traceback = None if isinstance(exc, SaltCloudException) else exc
    log.error(
        "%s: create failed after %s %s was requested: %s", name, cloud.noun, instance_id, cause, exc_info=traceback
    )
    fire_event(opts, name, "failed", {"instance_id": instance_id, "profile": vm_.get("profile"), "error": cause})
    if ticket:
        try:
            _utils("saltfleet_tickets.revoke_autosign_ticket")(opts, instance_id=instance_id)
        except Exception as revoke_exc:  # the ticket expires by itself; the machine matters more
            log.warning("%s: could not revoke the autosign ticket of %s: %s", name, instance_id, revoke_exc)
    if removal is None:
        outcome = (
            f"kept {cloud.noun} {instance_id} for inspection (keep_failed: True); `salt-cloud -d {name}` removes it"
        )
    elif removal is True:
        outcome = f"{cloud.removed} {cloud.noun} {instance_id} (set keep_failed: True to keep it)"
    else:
        failure = f"{type(removal).__name__}: {removal}"
        outcome = f"could not remove {cloud.noun} {instance_id} ({failure}): remove it by hand"
    return SaltCloudSystemExit(f"{name} (profile {vm_.get('profile') or '-'}): {cause}; {outcome}")


def _remove(cloud, machine):
    """True once the driver removed the machine, else the exception its removal raised."""
    try:
        cloud.remove(machine)
    except Exception as exc:
        return exc
    return True


# --- listing -------------------------------------------------------------------------


def node_row(node_id, name, state, *, image=None, size=None, public_ips=(), private_ips=(), **extra):
    """One ``list_nodes`` entry in salt-cloud's standard shape (id, name, state, image, size, public/private ips)."""
    return {
        "id": node_id,
        "name": name,
        "state": state,
        "image": image,
        "size": size,
        "public_ips": [ip for ip in public_ips if ip],
        "private_ips": [ip for ip in private_ips if ip],
        **extra,
    }


def json_safe(data):
    """``data`` with datetimes as ISO strings and tuples as lists, safe for events, cache and ``--out json``."""
    if isinstance(data, dict):
        return {str(k): json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple | set):
        return [json_safe(v) for v in data]
    if isinstance(data, datetime.datetime | datetime.date):
        return data.isoformat()
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


def select(nodes_full, opts, call=None):
    """``list_nodes_select``: the fields of ``query.selection`` (salt-cloud ``-S``) from ``list_nodes_full``."""
    return salt.utils.cloud.list_nodes_select(nodes_full, opts["query.selection"], call)


def check_call(fun, call, expected):
    """Raise salt-cloud's usual error when ``fun`` is called the wrong way.

    ``expected``:

    ``"function"``
        ``-f``, or salt-cloud's own options (``-Q``, ``--list-images`` ...), which pass no ``call``; not ``-a``.
    ``"action"``
        ``-a`` only.
    ``"destroy"``
        ``-d`` (no ``call``) or ``-a destroy``; not ``-f``.
    """
    if expected == "function" and call == "action":
        raise SaltCloudSystemExit(f"The {fun} function must be called with -f or --function.")
    if expected == "action" and call != "action":
        raise SaltCloudSystemExit(f"The {fun} action must be called with -a or --action.")
    if expected == "destroy" and call == "function":
        raise SaltCloudSystemExit(f"The {fun} action must be called with -d, --destroy, -a or --action.")


# --- destroy --------------------------------------------------------------------------


def destroyed(opts, name, instance_id, provider, state):
    """What every driver's ``destroy`` ends with once the machine is gone; returns destroy's result.

    Revokes the instance's autosign ticket, fires ``destroyed``, drops salt-cloud's
    minion cache (``update_cachedir``) and returns ``{"name", "instance_id", "state"}``
    (``state``: what the provider reports after the request).
    """
    _utils("saltfleet_tickets.revoke_autosign_ticket")(opts, instance_id=instance_id, name=name)
    fire_event(opts, name, "destroyed", {"instance_id": instance_id, "provider": provider})
    if opts.get("update_cachedir", False):
        _utils("cloud.delete_minion_cachedir")(name, provider.split(":")[0], opts)
    return {"name": name, "instance_id": instance_id, "state": state}


# --- events -----------------------------------------------------------------------------


def fire_event(opts, vm_name, event, args=None):
    """Fire ``salt/cloud/<vm_name>/<event>`` on the master's bus with salt's own ``cloud.fire_event``.

    ``event`` is one of creating, requesting, waiting for address, created,
    destroying, destroyed, failed. The data are ``name`` and ``args`` (every
    driver sends the same keys: ``instance_id`` once there is one, ``profile``,
    ``provider``, ``region``, ``image``, ``size``), filtered by the cloud
    config's ``filter_events`` (``cloud.filter_event``). Never raises: an event
    is a notification, and losing one must not fail a create.
    """
    tag_event = event.replace(" ", "_")
    data = json_safe({"name": vm_name, **(args or {})})
    try:
        _utils("cloud.fire_event")(
            "event",
            f"{event} instance",
            f"salt/cloud/{vm_name}/{tag_event}",
            args=_utils("cloud.filter_event")(tag_event, data, list(data)),
            sock_dir=opts["sock_dir"],
            transport=opts.get("transport", "zeromq"),
        )
    except Exception as exc:
        log.debug("could not fire salt/cloud/%s/%s: %s", vm_name, tag_event, exc)
