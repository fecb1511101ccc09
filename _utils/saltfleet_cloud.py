"""
Provisioning shared by saltfleet's salt-cloud drivers (``ec2``, ``rackspace``, ``local``).

A driver creates the machine with its own API; everything around that is here,
so every provider bootstraps a minion the same way. Drivers call these functions
as ``__utils__["saltfleet_cloud.<name>"](...)`` and pass ``__opts__`` in (the
salt-cloud options, which include the master's), so the functions work the same
when imported directly by tests.

How a new host becomes a trusted minion (``bootstrap`` in a profile):

``ssh`` (default, needs ``deploy: True``)
    salt-cloud's own way: salt-cloud generates the minion's key pair on the
    master and accepts its public key before the host exists; the driver then
    logs in over SSH and runs salt's deploy script, which installs salt-minion
    with that key and the minion config built by :func:`minion_config`.

``cloud-init``
    The host installs and configures salt-minion itself at first boot, from
    user-data rendered out of ``deployments/common/user_data.sh``
    (:func:`render_user_data`). User-data is readable by any process on the
    host (instance metadata), so it carries no private key and no secret; the
    minion generates its own key. The master accepts that key without an open
    autosign through a *ticket*: the driver writes the instance id that its
    cloud API returned into ``<autosign_grains_dir>/saltfleet_instance_id``
    (:func:`record_autosign_ticket`); at boot the script reads the instance id
    from the provider's metadata service into the grain
    ``saltfleet_instance_id`` and sends it with its first authentication
    (``autosign_grains``). The master signs only keys whose instance id it
    launched itself, and the ticket is one-shot: it is dropped as soon as a key
    for the minion id is accepted, when the instance is destroyed, and after
    ``autosign_ticket_ttl`` seconds (default 1800) whichever comes first
    (:func:`prune_autosign_tickets` runs on every create, destroy and list).
    Salt's autosign cannot bind the ticket to a minion id, so keep the
    master's ports reachable from the fleet's network only; an instance id is
    not a secret, only hard to guess before the host exists.

``none``
    Launch only (``deploy: False`` with ``bootstrap: ssh``): no minion.

Every function is documented with what a driver gets; the signatures are stable.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shlex
import tempfile
import time
from pathlib import Path

import salt.config
import salt.utils.cloud
import salt.utils.crypt
import salt.utils.event
import salt.utils.files
import salt.utils.yaml
from salt.exceptions import LoaderError, SaltCloudConfigError, SaltCloudException, SaltCloudSystemExit

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_cloud"

REPO = Path(__file__).resolve().parents[1]
USER_DATA_SCRIPT = REPO / "deployments" / "common" / "user_data.sh"
SETTINGS_MARKER = "# @saltfleet-settings@"
BOOTSTRAP_MODES = ("ssh", "cloud-init")
TICKET_GRAIN = "saltfleet_instance_id"
CLOUD_GRAIN = "saltfleet_cloud"
DEFAULT_TICKET_TTL = 1800
DEFAULT_SALT_VERSION = "3008.4"
TICKET_LOCK_TIMEOUT = 60


def __virtual__():
    return __virtualname__


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
    """A setting of ``vm_`` (VM, profile, provider: salt's lookup order), or of the provider alone without ``vm_``."""
    source = vm_ if vm_ is not None else (configured_provider(opts, active_provider_name, driver) or {})
    return salt.config.get_cloud_config_value(name, source, opts, default=default, search_global=False)


def config_value(name, vm_, opts, default=None, search_global=False):
    """A setting from the VM, its profile or its provider (salt's lookup order), else ``default``."""
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


def cloud_grains(vm_, opts, provider, *, region=None, size=None, image=None, instance_id=None):
    """The grains every saltfleet host carries: ``saltfleet_cloud`` (a dict) and ``saltfleet_instance_id``.

    ``saltfleet_cloud`` holds provider, region, size, image, profile and deployments;
    ``saltfleet_instance_id`` is top level because autosign_grains compares flat values.
    """
    grains = {
        CLOUD_GRAIN: {
            "provider": provider,
            "region": region,
            "size": size,
            "image": image,
            "profile": vm_.get("profile"),
            "deployments": deployments(vm_, opts),
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
    ``autosign_grains: [saltfleet_instance_id]``.

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
    minion_id = config_value("minion", vm_, opts, default={}).get("id", vm_["name"])
    salt.utils.cloud.accept_key(opts["pki_dir"], vm_["pub_key"], minion_id)
    return minion_id


def forget_preaccepted_key(vm_, opts):
    """Remove the key salt-cloud pre-accepted for this VM when the host will generate its own (cloud-init).

    Only a key identical to ``vm_["pub_key"]`` is removed, so a live minion's key is never touched.
    The private key is dropped from ``vm_`` so nothing can ship it.
    """
    pub = vm_.get("pub_key")
    vm_["priv_key"] = None
    if not pub or not opts.get("pki_dir"):
        return False
    minion_id = config_value("minion", vm_, opts, default={}).get("id", vm_["name"])
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


# --- autosign tickets (bootstrap: cloud-init) --------------------------------------


def check_autosign_ready(vm_, opts):
    """Raise a clear error (before anything is launched) if the master cannot autosign a cloud-init minion."""
    _ticket_paths(opts, vm_["name"])


def _ticket_paths(opts, vm_name=None):
    grains_dir = opts.get("autosign_grains_dir")
    if not grains_dir:
        raise SaltCloudConfigError(
            f"{vm_name or 'bootstrap: cloud-init'}: the master has no autosign_grains_dir, so it cannot accept "
            "the new minion's key; add `autosign_grains_dir: /etc/salt/autosign_grains` to the master config "
            "(etc/master.d/saltfleet.conf does)"
        )
    return Path(grains_dir) / TICKET_GRAIN, Path(opts["pki_dir"]) / "saltfleet_autosign_tickets.json"


def write_atomic(path, text, mode=0o644):
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path, data, mode=0o644):
    """``data`` as indented JSON, written atomically (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def read_json(path, default=None):
    """The JSON in ``path``, or ``default`` when it is missing or unreadable."""
    try:
        with salt.utils.files.fopen(path, "r") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def _write_tickets(opts, tickets):
    grain_file, index = _ticket_paths(opts)
    lines = ["# Instance ids saltfleet launched and whose minion has not authenticated yet (one-shot).\n"]
    lines += [f"{instance_id}\n" for instance_id in sorted(tickets)]
    write_json(index, tickets, 0o600)
    write_atomic(grain_file, "".join(lines), 0o600)  # the master ignores a group/world-writable autosign file


@contextlib.contextmanager
def _ticket_lock(opts, timeout=TICKET_LOCK_TIMEOUT):
    """An exclusive ``flock`` on the ticket index's lock file, held while the tickets are read, changed and written.

    The kernel drops the lock when its holder exits, so a killed salt-cloud never leaves a stale lock behind.
    """
    _, index = _ticket_paths(opts)
    index.parent.mkdir(parents=True, exist_ok=True)
    lock_path = index.with_name(f"{index.name}.lock")
    with open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "r+") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SaltCloudSystemExit(
                        f"the autosign ticket index {index} stayed locked for {timeout} s; another salt-cloud holds "
                        f"{lock_path} (`fuser {lock_path}` shows which); retry when it is done"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _with_ticket_lock(opts, change):
    with _ticket_lock(opts):
        _, index = _ticket_paths(opts)
        tickets = read_json(index, {})
        result = change(tickets)
        _write_tickets(opts, tickets)
        return result


def record_autosign_ticket(vm_, opts, instance_id):
    """Let the master accept the first key that presents grain ``saltfleet_instance_id: <instance_id>``.

    Call it right after the cloud API returned the instance id, before the host
    boots. The ticket expires after ``autosign_ticket_ttl`` seconds.
    """
    ttl = int(config_value("autosign_ticket_ttl", vm_, opts, default=DEFAULT_TICKET_TTL))
    minion_id = config_value("minion", vm_, opts, default={}).get("id", vm_["name"])

    def add(tickets):
        tickets[instance_id] = {"name": minion_id, "expires": time.time() + ttl}

    check_autosign_ready(vm_, opts)
    _with_ticket_lock(opts, add)
    log.info("%s: master will accept the key of instance %s for %ss", minion_id, instance_id, ttl)


def revoke_autosign_ticket(opts, instance_id=None, name=None):
    """Drop the tickets of an instance id and/or a minion id (destroy, failed create). Returns what was dropped."""
    if not opts.get("autosign_grains_dir"):
        return []

    def drop(tickets):
        gone = [iid for iid, t in tickets.items() if iid == instance_id or (name and t.get("name") == name)]
        for iid in gone:
            del tickets[iid]
        return gone

    return _with_ticket_lock(opts, drop)


def prune_autosign_tickets(opts):
    """Drop expired tickets and those whose minion's key the master has accepted. Returns what was dropped."""
    if not opts.get("autosign_grains_dir") or not os.path.exists(_ticket_paths(opts)[1]):
        return []
    accepted = Path(opts["pki_dir"]) / "minions"

    def prune(tickets):
        now = time.time()
        gone = [
            iid for iid, t in tickets.items() if t.get("expires", 0) < now or (accepted / str(t.get("name"))).exists()
        ]
        for iid in gone:
            del tickets[iid]
        return gone

    return _with_ticket_lock(opts, prune)


# --- user-data -------------------------------------------------------------------


def render_user_data(vm_, opts, minion, metadata="ec2", script=None):
    """The cloud-init user-data (a shell script) that installs salt-minion and writes ``minion`` as its config.

    ``metadata`` names the provider's metadata service the script reads the
    instance id from at boot (``ec2`` or ``openstack``). ``script`` defaults to
    the profile's ``user_data_script`` or ``deployments/common/user_data.sh``.
    The result holds no key: check with :func:`assert_no_secret`.
    """
    path = Path(script or config_value("user_data_script", vm_, opts, default=None) or USER_DATA_SCRIPT)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SaltCloudConfigError(f"{vm_['name']}: user_data_script: cannot read {path}: {exc.strerror}") from exc
    if SETTINGS_MARKER not in text:
        raise SaltCloudConfigError(f"{vm_['name']}: {path} lacks the line {SETTINGS_MARKER!r} where settings go")
    settings = {
        "SALTFLEET_MINION_ID": minion["id"],
        "SALTFLEET_METADATA": metadata,
        "SALTFLEET_SALT_VERSION": str(config_value("salt_version", vm_, opts, default=DEFAULT_SALT_VERSION)),
        "SALTFLEET_MINION_CONFIG": salt.utils.yaml.safe_dump(minion, default_flow_style=False),
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


def provision(vm_, opts, host, grains):
    """After the host runs: bootstrap it per :func:`bootstrap_mode`; returns the deploy result to merge into create's.

    ``ssh`` -> :func:`bootstrap_ssh`; ``cloud-init`` and ``none`` -> nothing to do now.
    """
    mode = bootstrap_mode(vm_, opts)
    if mode == "ssh":
        return {"deploy": "ssh", **(bootstrap_ssh(vm_, opts, host, grains=grains) or {})}
    return {"deploy": mode}


# --- waiting ----------------------------------------------------------------------


def wait_for(check, timeout, what, interval=2.0):
    """Call ``check()`` until it returns something truthy, and return that.

    Raises SaltCloudSystemExit("<what> did not happen within <timeout> s") when time
    runs out; ``check`` may raise SaltCloudSystemExit itself to stop early.
    """
    deadline = time.monotonic() + float(timeout)
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise SaltCloudSystemExit(f"{what} did not happen within {timeout} s")
        time.sleep(min(float(interval), max(0.0, deadline - time.monotonic())) or 0.05)


# --- a create that failed -----------------------------------------------------------------


def creation_failed(vm_, opts, instance_id, exc, removal, what="instance", ticket=False):
    """Report a create that failed once the cloud had the machine; return the SaltCloudSystemExit to raise.

    ``exc`` may be any exception (a bug, a network error, a library's own). The
    driver has already removed the machine unless the profile says
    ``keep_failed: True`` (it must: its API calls need its own loader context),
    and says how in ``removal``: ``None`` (kept), ``True`` (removed) or the
    exception the removal raised. This fires ``failed``, drops the instance's
    autosign ticket (``ticket``), and words the error: the VM, its profile, the
    cause and what became of the machine. Never raises itself.
    """
    name = vm_["name"]
    cause = str(exc) if isinstance(exc, SaltCloudException) else f"{type(exc).__name__}: {exc}"
    cause = cause.removeprefix(f"{name}: ")
    # A traceback only for what saltfleet did not foresee (a salt error says all there is to say).
    traceback = None if isinstance(exc, SaltCloudException) else exc
    log.error("%s: create failed after %s %s was requested: %s", name, what, instance_id, cause, exc_info=traceback)
    fire_event(opts, name, "failed", {"instance_id": instance_id, "profile": vm_.get("profile"), "error": cause})
    if ticket:
        try:
            revoke_autosign_ticket(opts, instance_id=instance_id)
        except Exception as revoke_exc:  # the ticket expires by itself; the machine matters more
            log.warning("%s: could not revoke the autosign ticket of %s: %s", name, instance_id, revoke_exc)
    if removal is None:
        outcome = f"kept {what} {instance_id} for inspection (keep_failed: True); `salt-cloud -d {name}` removes it"
    elif removal is True:
        verb = "deleted" if what == "server" else "terminated"
        outcome = f"{verb} {what} {instance_id} (set keep_failed: True to keep it)"
    else:
        failure = f"{type(removal).__name__}: {removal}"
        outcome = f"could not remove {what} {instance_id} ({failure}): remove it by hand"
    return SaltCloudSystemExit(f"{name} (profile {vm_.get('profile') or '-'}): {cause}; {outcome}")


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


# --- events -----------------------------------------------------------------------------


def fire_event(opts, vm_name, event, args=None):
    """Fire ``salt/cloud/<vm_name>/<event>`` on the master's bus, as salt-cloud drivers do.

    ``event`` is one of creating, requesting, waiting for address, created,
    destroying, destroyed, failed (any string works); ``args`` are filtered by
    the cloud config's ``filter_events`` like salt's own. Never raises.
    """
    tag = f"salt/cloud/{vm_name}/{event.replace(' ', '_')}"
    data = {"name": vm_name, **json_safe(args or {})}
    keys = list(data)
    for ktag, spec in (opts.get("filter_events") or {}).items():
        if ktag == event.replace(" ", "_"):
            keys = list(spec.get("keys", [])) + (["name"] if spec.get("use_defaults", True) else [])
    data = {k: v for k, v in data.items() if k in keys}
    try:
        with salt.utils.event.get_event("master", opts["sock_dir"], listen=False, opts=opts) as bus:
            bus.fire_event({"event": f"{event} instance", **data}, tag)
    except Exception as exc:  # an event is a notification; losing it must not fail a create
        log.debug("could not fire %s: %s", tag, exc)
