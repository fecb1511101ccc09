"""
What a new cloud host is given to become a trusted minion, for the create
pipeline of ``saltfleet_cloud`` (which calls these through the utils loader,
as the drivers do): the grains every host carries, its minion config, the
keys on the master, the cloud-init user-data, and salt-cloud's SSH bootstrap.

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
import json
import logging
import os
import shlex
from pathlib import Path

import salt.loader.context
import salt.utils.cloud
import salt.utils.crypt
import salt.utils.files
import salt.utils.yaml
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_cloud_minion"

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
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _config_value(*args, **kwargs):
    return _utils("saltfleet_cloud.config_value")(*args, **kwargs)


# --- the host's grains and minion config ---------------------------------------------


def bootstrap_mode(vm_, opts):
    """How the host gets its minion: ``"ssh"``, ``"cloud-init"`` or ``"none"`` (see the module docstring)."""
    mode = _config_value("bootstrap", vm_, opts, default="ssh")
    if mode not in BOOTSTRAP_MODES:
        raise SaltCloudConfigError(
            f"{vm_['name']}: bootstrap: {mode!r} is not one of {', '.join(BOOTSTRAP_MODES)} "
            "(set it in the profile or the provider)"
        )
    if mode == "ssh" and not _config_value("deploy", vm_, opts, default=True):
        return "none"
    return mode


def deployments(vm_, opts):
    """The profile's ``deployments`` as a list of names (a string is one name); the error names the bad entry."""
    value = _config_value("deployments", vm_, opts, default=[]) or []
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
    vm_["grains"] = {**(_config_value("grains", vm_, opts, default={}, search_global=True) or {}), **(grains or {})}
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
        vm_["priv_key"], vm_["pub_key"] = salt.utils.cloud.gen_keys(_config_value("keysize", vm_, opts, default=2048))
    minion_id = minion_id_of(vm_, opts)
    salt.utils.cloud.accept_key(opts["pki_dir"], vm_["pub_key"], minion_id)
    return minion_id


def minion_id_of(vm_, opts):
    """The minion id salt-cloud gives the VM: its ``minion: id`` setting, else its name."""
    return _config_value("minion", vm_, opts, default={}).get("id", vm_["name"])


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
    path = Path(script or _config_value("user_data_script", vm_, opts, default=None) or USER_DATA_SCRIPT)
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
        "SALTFLEET_SALT_VERSION": str(_config_value("salt_version", vm_, opts, default=DEFAULT_SALT_VERSION)),
        "SALTFLEET_MINION_CONFIG": salt.utils.yaml.safe_dump(minion, default_flow_style=False),
        "SALTFLEET_CLOUD": json.dumps(_utils("saltfleet_cloud.json_safe")(cloud), sort_keys=True),
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
