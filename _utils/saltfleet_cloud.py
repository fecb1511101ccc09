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

What a new host is given to become a trusted minion (its grains, minion
config, keys, user-data, the bootstrap modes): ``saltfleet_cloud_minion``.
"""

import dataclasses
import datetime
import functools
import logging
from collections.abc import Callable
from typing import Any

import salt.config
import salt.loader.context
import salt.utils.cloud
from salt.exceptions import (
    LoaderError,
    SaltCloudConfigError,
    SaltCloudException,
    SaltCloudExecutionTimeout,
    SaltCloudSystemExit,
)

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_cloud"


def __virtual__():
    return __virtualname__


def _minion(name):
    return _utils(f"saltfleet_cloud_minion.{name}")


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
    modes: tuple[str, ...] | None = None


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
    ``openstack``), ``user_data_limit`` (bytes), ``modes`` (the bootstrap modes it
    takes; every one by default).

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
    mode = _minion("bootstrap_mode")(vm_, opts)
    if cloud.modes is not None and mode not in cloud.modes:
        raise SaltCloudConfigError(
            f"{name}: bootstrap: {mode} is not one the {cloud.provider} driver takes ({', '.join(cloud.modes)})"
        )
    wanted = _minion("deployments")(vm_, opts)
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
    _minion("forget_preaccepted_key")(vm_, opts)
    grains = _minion("cloud_grains")(
        vm_, opts, cloud.provider, region=checked.region, size=checked.size, image=checked.image
    )
    minion = _minion("minion_config")(vm_, opts, grains=grains, mode="cloud-init")
    user_data = _minion("render_user_data")(vm_, opts, minion, metadata=cloud.metadata)
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
        _utils("saltfleet_tickets.record_autosign_ticket")(opts, _minion("minion_id_of")(vm_, opts), instance_id, ttl)
    fire_event(opts, name, "waiting for address", {"instance_id": instance_id})
    ready = cloud.wait(machine)
    public, private = cloud.addresses(ready)
    grains = _minion("cloud_grains")(
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
    return {"deploy": mode, **(_minion("bootstrap_ssh")(vm_, opts, host, grains=grains) or {})}


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
