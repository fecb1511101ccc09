"""
Rackspace Cloud Servers for salt-cloud, built on pyrax.

Salt 3008 ships no Rackspace (nor nova or openstack) driver; this one gives the
usual salt-cloud commands for Rackspace, and provisions a host exactly like the
EC2 driver does (``_utils/saltfleet_cloud.py``): keys made on the master and
pre-accepted, the minion configured through cloud-init user-data or SSH.

Provider (``/etc/salt/cloud.providers.d/rackspace.conf``):

.. code-block:: yaml

    rackspace:
      driver: rackspace
      username: myuser              # or RACKSPACE_USERNAME in the environment
      api_key: sdb://secrets/rax    # or RACKSPACE_API_KEY in the environment
      region: DFW
      minion:
        master: salt.example.com

Profile (``/etc/salt/cloud.profiles.d/rackspace.conf``):

.. code-block:: yaml

    worker-rackspace:
      provider: rackspace
      image: Ubuntu 22.04 LTS (Jammy Jellyfish) (PVHVM)
      size: 2 GB General Purpose v1
      deployments: [daily-fetcher]

Then ``salt-cloud -p worker-rackspace worker-7``, ``salt-cloud -Q``,
``salt-cloud -a reboot worker-7``, ``salt-cloud -d worker-7``.
"""

import logging
import os
import warnings

import salt.loader.context
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

from salt import config

try:
    with warnings.catch_warnings():
        # pyrax and its novaclient warn about deprecated APIs on import.
        warnings.simplefilter("ignore")
        import novaclient.exceptions as nova_exc
        import pyrax
        import pyrax.exceptions as pyrax_exc
        import requests
        from pyrax.base_identity import Service

    HAS_PYRAX = True
except ImportError:
    HAS_PYRAX = False

log = logging.getLogger(__name__)

__virtualname__ = "rackspace"

DEFAULT_IDENTITY_URL = "https://identity.api.rackspacecloud.com/v2.0/"
# The Cloud Servers entry of the catalog; Rackspace accounts (and mimic) list
# more than one `compute` service, and pyrax would pick the last one.
DEFAULT_COMPUTE_NAME = "cloudServersOpenStack"
METADATA_DEPLOYMENTS = "saltfleet-deployments"
# Set by create on every server (the profile's name); the driver lists, acts on
# and deletes only servers that carry it, never the rest of the account.
METADATA_PROFILE = "saltfleet-profile"
ENV_USERNAME = "RACKSPACE_USERNAME"
ENV_API_KEY = "RACKSPACE_API_KEY"


def __virtual__():
    if not HAS_PYRAX:
        return False, "the rackspace cloud driver requires pyrax (pip install pyrax)"
    if get_configured_provider() is False:
        return False, "no rackspace provider is configured"
    return __virtualname__


def _provider_name():
    return __utils__["saltfleet_cloud.provider_name"](__active_provider_name__, __virtualname__)


def get_configured_provider():
    """The provider configuration in use (credentials may come from the environment)."""
    return __utils__["saltfleet_cloud.configured_provider"](__opts__, __active_provider_name__, __virtualname__)


def _setting(name, vm_=None, default=None):
    """A setting of the VM, its profile or its provider (the provider alone without ``vm_``)."""
    return __utils__["saltfleet_cloud.provider_setting"](
        __opts__, __active_provider_name__, __virtualname__, name, vm_, default
    )


def _provider_label():
    return _provider_name().split(":")[0]


# ---------------------------------------------------------------- connection


def _connect(vm_=None):
    """A novaclient for Cloud Servers in the configured region (plus that region's name)."""
    username = _setting("username", vm_) or os.environ.get(ENV_USERNAME)
    api_key = _setting("api_key", vm_) or os.environ.get(ENV_API_KEY)
    identity_url = _setting("identity_url", vm_, DEFAULT_IDENTITY_URL)
    compute_name = _setting("compute_name", vm_, DEFAULT_COMPUTE_NAME)
    provider = _provider_label()
    if not username or not api_key:
        raise SaltCloudSystemExit(
            f"rackspace provider '{provider}': set username and api_key in its configuration "
            f"(or {ENV_USERNAME} and {ENV_API_KEY} in salt-cloud's environment)"
        )
    identity = pyrax.create_context(id_type="rackspace", username=username, api_key=api_key)
    identity.verify_ssl = _setting("verify_ssl", vm_, True)
    identity.auth_endpoint = identity_url
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            identity.authenticate()
    except pyrax_exc.AuthenticationFailed as exc:
        raise SaltCloudSystemExit(
            f"rackspace provider '{provider}': authentication failed for user '{username}' at {identity_url} "
            f"({exc}); check username and api_key"
        ) from exc
    except (requests.exceptions.RequestException, pyrax_exc.PyraxException) as exc:
        raise SaltCloudSystemExit(
            f"rackspace provider '{provider}': cannot reach the identity service at {identity_url}: {exc}"
        ) from exc

    entries = [entry for entry in identity.service_catalog if entry.get("name") == compute_name]
    if not entries:
        names = sorted(e.get("name") for e in identity.service_catalog if e.get("type") == "compute")
        raise SaltCloudSystemExit(
            f"rackspace provider '{provider}': the service catalog has no compute service named "
            f"'{compute_name}' (compute services: {', '.join(names) or 'none'}); set compute_name"
        )
    identity.services.compute = Service(identity, entries[0])
    regions = sorted(identity.services.compute.endpoints)
    region = (_setting("region", vm_) or identity.get_default_region() or regions[0]).upper()
    if region not in regions:
        raise SaltCloudSystemExit(
            f"rackspace provider '{provider}': region '{region}' is not served by {compute_name} "
            f"(regions: {', '.join(regions)}); set region"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = pyrax.connect_to_cloudservers(region=region, context=identity, verify_ssl=identity.verify_ssl)
    client.identity = identity
    return client, region


def _quiet(fun, *args, **kwargs):
    """Call into pyrax/novaclient without their deprecation warnings on salt-cloud's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fun(*args, **kwargs)


# ------------------------------------------------------------------ catalogs


def avail_locations(call=None):
    """
    The regions that serve Cloud Servers for this account.

    .. code-block:: bash

        salt-cloud --list-locations rackspace
    """
    __utils__["saltfleet_cloud.check_call"]("avail_locations", call, "function")
    client, _ = _connect()
    endpoints = client.identity.services.compute.endpoints
    return {region: {"name": region, "url": endpoint.public_url} for region, endpoint in sorted(endpoints.items())}


def avail_images(call=None):
    """
    The images of the configured region, by name.

    .. code-block:: bash

        salt-cloud --list-images rackspace
    """
    return _catalog("avail_images", call, "images", ("id", "name", "status", "minDisk", "minRam"))


def avail_sizes(call=None):
    """
    The flavors of the configured region, by name.

    .. code-block:: bash

        salt-cloud --list-sizes rackspace
    """
    return _catalog("avail_sizes", call, "flavors", ("id", "name", "ram", "disk", "vcpus"))


def _catalog(fun, call, kind, fields):
    """{name: {field: value}} of the region's images or flavors."""
    __utils__["saltfleet_cloud.check_call"](fun, call, "function")
    client, _ = _connect()
    return {item.name: {key: getattr(item, key, None) for key in fields} for item in _quiet(getattr(client, kind).list)}


def _find(kind, wanted, items, region, vm_):
    """The image or flavor named (or with the id) `wanted`; an error naming the VM, the setting and what exists."""
    wanted = str(wanted)
    for item in items:
        if wanted in (str(item.id), item.name):
            return item
    names = ", ".join(sorted(item.name for item in items))
    setting = "size" if kind == "flavor" else kind
    raise SaltCloudSystemExit(
        f"{vm_['name']}: unknown {kind} '{wanted}' in region {region}; set {setting} in profile "
        f"{vm_.get('profile') or '-'} to one of: {names} (`salt-cloud --list-{setting}s {_provider_label()}`)"
    )


# --------------------------------------------------------------------- nodes


def _addresses(server):
    """(public, private) IPs; any network other than `public` is private (ServiceNet, cloud networks)."""
    public, private = [], []
    for network, addresses in (server.addresses or {}).items():
        for address in addresses:
            (public if network == "public" else private).append(address["addr"])
    return public, private


def _node(server, region):
    """The fields salt-cloud shows for a node (`-Q`)."""
    public, private = _addresses(server)
    image = server.image.get("id") if isinstance(server.image, dict) else server.image
    return __utils__["saltfleet_cloud.node_row"](
        server.id,
        server.name,
        server.status,
        image=image,
        size=server.flavor.get("id"),
        public_ips=public,
        private_ips=private,
        region=region,
    )


def _node_full(server, region):
    full = dict(server._info)
    full.update(_node(server, region))
    full["metadata"] = dict(server.metadata or {})
    return full


def _servers(client):
    """The servers saltfleet created (metadata ``saltfleet-profile``); others in the account are not ours."""
    return [server for server in _quiet(client.servers.list) if METADATA_PROFILE in (server.metadata or {})]


def list_nodes(call=None):
    """
    The servers of the configured region, by name.

    .. code-block:: bash

        salt-cloud -Q
    """
    __utils__["saltfleet_cloud.check_call"]("list_nodes", call, "function")
    client, region = _connect()
    __utils__["saltfleet_tickets.prune_autosign_tickets"](__opts__)
    return {server.name: _node(server, region) for server in _servers(client)}


def list_nodes_full(call=None):
    """
    Everything the API says about each server, by name.

    .. code-block:: bash

        salt-cloud -F
    """
    __utils__["saltfleet_cloud.check_call"]("list_nodes_full", call, "function")
    client, region = _connect()
    __utils__["saltfleet_tickets.prune_autosign_tickets"](__opts__)
    return {server.name: _node_full(server, region) for server in _servers(client)}


def _server_by_name(client, name, region):
    """The saltfleet server called `name`; an error naming the server, the region and the fix otherwise."""
    matches = [server for server in _servers(client) if server.name == name]
    if not matches:
        raise SaltCloudSystemExit(
            f"{name}: no server of that name created by saltfleet (metadata {METADATA_PROFILE}) in region {region} "
            f"of provider {_provider_name()}; `salt-cloud -Q` lists them. A server made outside salt-cloud is "
            "never acted on: manage it with the Rackspace tools"
        )
    if len(matches) > 1:
        ids = ", ".join(server.id for server in matches)
        raise SaltCloudSystemExit(
            f"{name}: {len(matches)} servers of that name in region {region} ({ids}); "
            "delete the extra ones with the Rackspace tools, then retry"
        )
    return matches[0]


def show_instance(name, call=None):
    """
    Everything the API says about one server.

    .. code-block:: bash

        salt-cloud -a show_instance worker-7
    """
    __utils__["saltfleet_cloud.check_call"]("show_instance", call, "action")
    client, region = _connect()
    return _node_full(_server_by_name(client, name, region), region)


def reboot(name, call=None):
    """
    Reboot a server (soft reboot; ``reboot_type: HARD`` in the profile or provider for a hard one).

    .. code-block:: bash

        salt-cloud -a reboot worker-7
    """
    __utils__["saltfleet_cloud.check_call"]("reboot", call, "action")
    client, region = _connect()
    server = _server_by_name(client, name, region)
    _quiet(server.reboot, _setting("reboot_type", default="SOFT"))
    return {"name": name, "id": server.id, "rebooted": True}


def list_nodes_select(call=None):
    """
    The fields named by ``query.selection`` for each server.

    .. code-block:: bash

        salt-cloud -S
    """
    return __utils__["saltfleet_cloud.select"](list_nodes_full(call), __opts__, call)


# ------------------------------------------------------------ create/destroy


def _metadata(vm_, deployments):
    """The server metadata: the profile's ``metadata``, the profile's name and the deployments (strings only)."""
    metadata = {str(key): str(value) for key, value in (_setting("metadata", vm_, {}) or {}).items()}
    metadata[METADATA_PROFILE] = vm_.get("profile") or ""
    metadata[METADATA_DEPLOYMENTS] = ",".join(deployments)
    too_long = {key: value for key, value in metadata.items() if len(key) > 255 or len(value) > 255}
    if too_long:
        raise SaltCloudSystemExit(
            f"{vm_['name']}: metadata keys and values are limited to 255 characters: {', '.join(too_long)}"
        )
    return metadata


def _networks(vm_):
    """``networks`` (network ids) as nova's nics; Rackspace wants PublicNet and ServiceNet listed when any is."""
    networks = _setting("networks", vm_)
    if not networks:
        return None
    if isinstance(networks, str):
        networks = [networks]
    return [{"net-id": net} if isinstance(net, str) else dict(net) for net in networks]


def _wait_until_built(client, server, vm_, timeout):
    """The server once ACTIVE with an address; an error carrying the API's fault if it goes to ERROR."""
    interval = float(_setting("wait_for_ip_interval", vm_, 5))
    name = vm_["name"]

    def built():
        try:
            current = _quiet(client.servers.get, server.id)
        except nova_exc.NotFound as exc:
            raise SaltCloudSystemExit(f"rackspace: server '{name}' ({server.id}) disappeared while building") from exc
        if current.status == "ERROR":
            fault = (current._info.get("fault") or {}).get("message") or "no fault reported"
            raise SaltCloudSystemExit(f"rackspace: server '{name}' ({server.id}) failed to build: ERROR: {fault}")
        public, private = _addresses(current)
        if current.status == "ACTIVE" and (public or private):
            return current
        log.debug("rackspace: %s is %s (%s%%)", name, current.status, current._info.get("progress", "?"))
        return None

    return __utils__["saltfleet_cloud.wait_for"](
        built, timeout, f"rackspace: server '{name}' ({server.id}) becoming ACTIVE with an address", interval
    )


def create(vm_):
    """
    Create a server from a profile, wait until it is ACTIVE with an address, and bootstrap its minion.

    .. code-block:: bash

        salt-cloud -p worker-rackspace worker-7
        salt-cloud -P -p worker-rackspace worker-8 worker-9
        salt-cloud -m fleet.map

    Returns list_nodes_full's entry plus ``deploy`` (how the minion was bootstrapped).
    saltfleet_cloud's pipeline runs the steps; a server whose build goes to
    ERROR, times out (``wait_for_ip_timeout``) or cannot be bootstrapped is
    deleted, unless the profile says ``keep_failed: True``.
    """
    if vm_.get("profile") and (
        config.is_profile_configured(__opts__, _provider_name(), vm_["profile"], vm_=vm_) is False
    ):
        return False
    return __utils__["saltfleet_cloud.create"](vm_, __opts__, _Create(vm_).driver())


class _Create:
    """One create's Cloud Servers calls for saltfleet_cloud's pipeline: one client, the image and flavor found."""

    def __init__(self, vm_):
        self.vm_ = vm_
        self.client = self.region = self.image = self.flavor = None

    def driver(self):
        return __utils__["saltfleet_cloud.driver"](
            "rackspace",
            # The pipeline calls back into this module: in this module's loader, where its __utils__ are.
            loader=salt.loader.context.loader_ctxvar.get(),
            preflight=self.preflight,
            launch=self.launch,
            wait=self.wait,
            addresses=_addresses,
            row=lambda server: _node_full(server, self.region),
            remove=lambda machine: _delete(self.client, machine.handle, self.vm_["name"]),
            noun="server",
            removed="deleted",
            # Rackspace has no metadata service: user_data.sh reads the instance id from the config drive.
            metadata="openstack",
        )

    def preflight(self, mode):
        """The client, and the image and flavor the profile names, found in the region before launching."""
        vm_, name = self.vm_, self.vm_["name"]
        self.client, self.region = _connect(vm_)
        image_wanted = _setting("image", vm_)
        flavor_wanted = _setting("size", vm_) or _setting("flavor", vm_)
        if not image_wanted or not flavor_wanted:
            raise SaltCloudConfigError(f"{name}: profile {vm_.get('profile')} needs an image and a size (a flavor)")
        self.image = _find("image", image_wanted, _quiet(self.client.images.list), self.region, vm_)
        self.flavor = _find("flavor", flavor_wanted, _quiet(self.client.flavors.list), self.region, vm_)
        return __utils__["saltfleet_cloud.facts"](region=self.region, size=self.flavor.name, image=self.image.name)

    def launch(self, request):
        vm_, name = self.vm_, self.vm_["name"]
        kwargs = {"meta": _metadata(vm_, request.deployments)}
        if _setting("key_name", vm_):
            kwargs["key_name"] = _setting("key_name", vm_)
        if _networks(vm_):
            kwargs["nics"] = _networks(vm_)
        if _setting("config_drive", vm_, request.mode == "cloud-init"):
            kwargs["config_drive"] = True
        if request.user_data:
            kwargs["userdata"] = request.user_data
        try:
            server = _quiet(self.client.servers.create, name, self.image.id, self.flavor.id, **kwargs)
        except nova_exc.ClientException as exc:
            raise SaltCloudSystemExit(
                f"{name} (profile {vm_.get('profile') or '-'}): creating the server in {self.region} failed: {exc}"
            ) from exc
        return __utils__["saltfleet_cloud.launched"](
            server.id, handle=server, password=getattr(server, "adminPass", None)
        )

    def wait(self, machine):
        timeout = int(_setting("wait_for_ip_timeout", self.vm_, 600))
        return _wait_until_built(self.client, machine.handle, self.vm_, timeout)


def _delete(client, server, name):
    """Delete a server and wait until the API no longer lists it (so its name can be reused at once)."""
    try:
        _quiet(server.delete)
    except nova_exc.NotFound:
        return

    def gone():
        try:
            return _quiet(client.servers.get, server.id).status == "DELETED"
        except nova_exc.NotFound:
            return True

    __utils__["saltfleet_cloud.wait_for"](gone, 300, f"rackspace: deletion of server '{name}' ({server.id})", 2)


def destroy(name, call=None):
    """
    Delete a server and wait until it is gone; salt-cloud then removes its minion key.
    Returns ``{"name", "instance_id", "state": "deleted"}``.

    .. code-block:: bash

        salt-cloud -d worker-7
    """
    __utils__["saltfleet_cloud.check_call"]("destroy", call, "destroy")
    client, region = _connect()
    server = _server_by_name(client, name, region)
    __utils__["saltfleet_cloud.fire_event"](__opts__, name, "destroying", {"instance_id": server.id})
    _delete(client, server, name)
    return __utils__["saltfleet_cloud.destroyed"](__opts__, name, server.id, _provider_name(), "deleted")
