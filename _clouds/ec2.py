"""
EC2 salt-cloud driver for saltfleet, built on boto3.

Salt 3008 ships no EC2 driver; this one covers what salt-cloud users use and
works against any EC2-compatible API (``endpoint_url``). A provider, e.g.
``/etc/salt/cloud.providers.d/ec2.conf`` (see ``cloud.providers.d/ec2.conf.example``):

.. code-block:: yaml

    ec2:
      driver: ec2
      region: eu-west-1
      minion:
        master: salt.example.com

Credentials come from boto3's chain (environment, ``aws_profile``/shared config,
instance role); they never need to be in the file. A profile
(``cloud.profiles.d/worker.conf``):

.. code-block:: yaml

    worker:
      provider: ec2
      image: ami-0123456789abcdef0
      size: t3.small
      bootstrap: cloud-init        # or ssh (salt-cloud's deploy script)
      deploy: False                # cloud-init installs the minion, not salt-cloud over SSH
      deployments: [daily-fetcher]

.. code-block:: bash

    salt-cloud -p worker worker-7
    salt-cloud -Q / -F / -S
    salt-cloud -a reboot worker-7
    salt-cloud -d worker-7

Every instance this driver creates is tagged ``Name`` (the minion id),
``saltfleet:profile`` and ``saltfleet:deployments``; the driver lists and
destroys only instances tagged ``saltfleet:profile``, so it never touches the
rest of an account.
"""

import logging
import uuid

import salt.loader.context
from salt.exceptions import SaltCloudConfigError, SaltCloudException, SaltCloudSystemExit

try:
    import boto3
    import botocore.config
    import botocore.exceptions
    import botocore.session

    HAS_BOTO3 = True
except ImportError:
    HAS_BOTO3 = False

log = logging.getLogger(__name__)

__virtualname__ = "ec2"

MANAGED_TAG = "saltfleet:profile"
DEPLOYMENTS_TAG = "saltfleet:deployments"
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
# Errors about one setting of a profile: the preflight reports all of them at once.
NOT_FOUND = {
    "InvalidAMIID.NotFound",
    "InvalidAMIID.Malformed",
    "InvalidAMIID.Unavailable",
    "InvalidKeyPair.NotFound",
    "InvalidInstanceType",
    "InvalidSubnetID.NotFound",
    "InvalidGroup.NotFound",
}

# What an operator can do about an EC2 error code; {placeholders} come from the request.
HINTS = {
    "InvalidAMIID.NotFound": "image: {image} does not exist in {region} (AMI ids are per region); "
    "`salt-cloud --list-images {provider}` lists the images you can use",
    "InvalidAMIID.Malformed": "image: {image} is not an AMI id (ami-...)",
    "InvalidAMIID.Unavailable": "image: {image} is not available (deregistered?) in {region}",
    "InvalidKeyPair.NotFound": "keyname: {keyname} is not a key pair in {region}; import your public key "
    "(`aws ec2 import-key-pair --region {region} --key-name {keyname} ...`) or fix keyname",
    "InvalidInstanceType": "size: {size} is not an instance type in {region}; "
    "`salt-cloud --list-sizes {provider}` lists them",
    "InvalidSubnetID.NotFound": "subnet: {subnet} does not exist in {region}",
    "InvalidGroup.NotFound": "securitygroup: a security group in {securitygroup} does not exist",
    "AuthFailure": "EC2 rejected the credentials; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "aws_profile or the instance role",
    "UnauthorizedOperation": "the credentials may not do this; grant the IAM permission named in the message",
    "RequestLimitExceeded": "EC2 kept throttling after {attempts} attempts; raise `retries: {{max_attempts: N}}` "
    "in the provider or retry later",
    "Throttling": "EC2 kept throttling after {attempts} attempts; raise `retries: {{max_attempts: N}}` "
    "in the provider or retry later",
    "InsufficientInstanceCapacity": "{region} has no capacity for {size} now; try another size or subnet",
    "OperationNotPermitted": "termination protection is on; "
    "`salt-cloud -a disable_term_protect {name}` first if you really mean to destroy it",
}


def __virtual__():
    if not HAS_BOTO3:
        return False, "the saltfleet ec2 driver needs boto3 (pip install boto3)"
    if get_configured_provider() is False:
        return False, "no provider with driver: ec2 is configured"
    return __virtualname__


def get_configured_provider():
    """The provider's configuration (nothing is required: credentials come from boto3's chain)."""
    return __utils__["saltfleet_cloud.configured_provider"](__opts__, __active_provider_name__, __virtualname__)


def _setting(name, vm_=None, default=None):
    """A setting of the VM, its profile or its provider (the provider alone without ``vm_``)."""
    return __utils__["saltfleet_cloud.provider_setting"](
        __opts__, __active_provider_name__, __virtualname__, name, vm_, default
    )


def _provider_label(vm_=None):
    return (vm_ or {}).get("provider") or __utils__["saltfleet_cloud.provider_name"](
        __active_provider_name__, __virtualname__
    )


def _known_regions():
    session = botocore.session.get_session()
    regions = set()
    for partition in session.get_available_partitions():
        regions.update(session.get_available_regions("ec2", partition))
    return regions


def _client(vm_=None):
    """A boto3 EC2 client for the provider (and the VM's overrides), retries from ``retries``."""
    region = _setting("region", vm_) or boto3.session.Session().region_name
    if not region:
        raise SaltCloudConfigError(
            f"{_provider_label(vm_)}: no region; set `region:` in the provider (or AWS_DEFAULT_REGION)"
        )
    if _setting("check_region", vm_, True) and region not in _known_regions():
        raise SaltCloudConfigError(
            f"{_provider_label(vm_)}: region: {region!r} is not an EC2 region "
            f"(e.g. {', '.join(sorted(_known_regions())[:4])}, ...); "
            "set check_region: False for a region newer than this boto3"
        )
    retries = {"max_attempts": 10, "mode": "standard", **(_setting("retries", vm_) or {})}
    attempts = retries["max_attempts"]  # botocore consumes the dict
    session = boto3.session.Session(profile_name=_setting("aws_profile", vm_), region_name=region)
    client = session.client(
        "ec2",
        endpoint_url=_setting("endpoint_url", vm_),
        config=botocore.config.Config(
            retries=retries,
            connect_timeout=_setting("connect_timeout", vm_, 10),
            read_timeout=_setting("read_timeout", vm_, 60),
        ),
    )
    client.saltfleet_attempts = attempts
    return client


class _Api:
    """Turn boto3 errors into SaltCloudSystemExit messages that name the setting and the fix."""

    def __init__(self, client, what, **context):
        self.client = client
        self.what = what
        self.context = context

    def __enter__(self):
        return self.client

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, SaltCloudException):
            return False
        region = self.client.meta.region_name
        context = {
            "region": region,
            "provider": self.context.get("provider", __virtualname__),
            "attempts": getattr(self.client, "saltfleet_attempts", "?"),
            **self.context,
        }
        if isinstance(exc, botocore.exceptions.ClientError):
            retried = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
            if retried is not None:
                context["attempts"] = retried + 1
            code = exc.response.get("Error", {}).get("Code", "")
            message = exc.response.get("Error", {}).get("Message", str(exc))
            hint = HINTS.get(code, "")
            try:
                hint = hint.format(**{k: context.get(k) for k in _fields(hint)})
            except (KeyError, IndexError, ValueError):
                pass
            error = SaltCloudSystemExit(f"{self.what}: {code}: {message}" + (f"; {hint}" if hint else ""))
            error.ec2_code = code
            raise error from exc
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            raise SaltCloudSystemExit(
                f"{self.what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "`aws_profile:` in the provider, or run on an instance with an IAM role"
            ) from exc
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
            raise SaltCloudSystemExit(
                f"{self.what}: cannot reach the EC2 endpoint of {region} ({exc}); "
                "check region, endpoint_url and the network"
            ) from exc
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            raise SaltCloudSystemExit(f"{self.what}: {exc}") from exc
        return False


def _fields(template):
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _tags(instance):
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _name(instance):
    return _tags(instance).get("Name") or instance["InstanceId"]


def _instances(client, names=None, instance_ids=None):
    filters = [
        {"Name": "tag-key", "Values": [MANAGED_TAG]},
        {"Name": "instance-state-name", "Values": LIVE_STATES},
    ]
    if names:
        filters.append({"Name": "tag:Name", "Values": list(names)})
    kwargs = {"Filters": filters}
    if instance_ids:
        kwargs["InstanceIds"] = list(instance_ids)
    found = []
    for page in client.get_paginator("describe_instances").paginate(**kwargs):
        for reservation in page["Reservations"]:
            found.extend(reservation["Instances"])
    return found


def _row(instance):
    return __utils__["saltfleet_cloud.node_row"](
        instance["InstanceId"],
        _name(instance),
        instance["State"]["Name"],
        image=instance.get("ImageId"),
        size=instance.get("InstanceType"),
        public_ips=[instance.get("PublicIpAddress")],
        private_ips=[instance.get("PrivateIpAddress")],
    )


def _full_row(instance):
    row = __utils__["saltfleet_cloud.json_safe"](instance)
    row.update(_row(instance))
    row["tags"] = _tags(instance)
    return row


def _by_name(rows):
    nodes = {}
    for instance in rows:
        name = _name(instance)
        if name in nodes:
            log.warning(
                "two live instances are named %s (%s, %s); listing the first", name, nodes[name]["id"], instance
            )
            continue
        nodes[name] = instance
    return nodes


# --- listing ----------------------------------------------------------------------


def list_nodes(call=None):
    """The instances this driver manages: id, name, state, image, size, public_ips, private_ips (``salt-cloud -Q``)."""
    __utils__["saltfleet_cloud.check_call"]("list_nodes", call, "function")
    client = _client()
    __utils__["saltfleet_tickets.prune_autosign_tickets"](__opts__)
    with _Api(client, "listing instances"):
        instances = _instances(client)
    return {name: _row(instance) for name, instance in _by_name(instances).items()}


def list_nodes_full(call=None):
    """Everything EC2 says about each instance, plus the list_nodes fields and ``tags`` (``salt-cloud -F``)."""
    __utils__["saltfleet_cloud.check_call"]("list_nodes_full", call, "function")
    client = _client()
    __utils__["saltfleet_tickets.prune_autosign_tickets"](__opts__)
    with _Api(client, "listing instances"):
        instances = _instances(client)
    return {name: _full_row(instance) for name, instance in _by_name(instances).items()}


def list_nodes_select(call=None):
    """The fields of ``query.selection`` (``salt-cloud -S``)."""
    return __utils__["saltfleet_cloud.select"](list_nodes_full("function"), __opts__, call)


def show_instance(name, call=None):
    """One instance, as in list_nodes_full: ``salt-cloud -a show_instance worker-7``."""
    __utils__["saltfleet_cloud.check_call"]("show_instance", call, "action")
    return _full_row(_find(_client(), name))


def avail_images(call=None):
    """AMIs owned by ``image_owners`` (provider; default ``[self]``): ``salt-cloud --list-images ec2``."""
    __utils__["saltfleet_cloud.check_call"]("avail_images", call, "function")
    client = _client()
    owners = _setting("image_owners", None, ["self"])
    with _Api(client, "listing images"):
        images = client.describe_images(Owners=list(owners))["Images"]
    return {
        image["ImageId"]: {
            "name": image.get("Name"),
            "description": image.get("Description"),
            "architecture": image.get("Architecture"),
            "creation_date": image.get("CreationDate"),
        }
        for image in images
    }


def avail_sizes(call=None):
    """Instance types offered in the region with vCPUs and memory: ``salt-cloud --list-sizes ec2``."""
    __utils__["saltfleet_cloud.check_call"]("avail_sizes", call, "function")
    client = _client()
    sizes = {}
    with _Api(client, "listing instance types"):
        for page in client.get_paginator("describe_instance_types").paginate():
            for item in page["InstanceTypes"]:
                sizes[item["InstanceType"]] = {
                    "vcpus": item.get("VCpuInfo", {}).get("DefaultVCpus"),
                    "memory_mib": item.get("MemoryInfo", {}).get("SizeInMiB"),
                    "architectures": item.get("ProcessorInfo", {}).get("SupportedArchitectures", []),
                }
    return sizes


def avail_locations(call=None):
    """Regions and their availability zones: ``salt-cloud --list-locations ec2``."""
    __utils__["saltfleet_cloud.check_call"]("avail_locations", call, "function")
    client = _client()
    with _Api(client, "listing regions"):
        regions = client.describe_regions()["Regions"]
        zones = client.describe_availability_zones()["AvailabilityZones"]
    ret = {r["RegionName"]: {"endpoint": r.get("Endpoint"), "opt_in": r.get("OptInStatus")} for r in regions}
    here = client.meta.region_name
    if here in ret:
        ret[here]["zones"] = sorted(z["ZoneName"] for z in zones)
    return ret


# --- create ------------------------------------------------------------------------


def _preflight(client, vm_, context):
    """Check every named resource before launching; one error lists all the problems."""
    problems = []
    subnet_vpc = None

    def check(fun):
        try:
            fun()
        except SaltCloudSystemExit as exc:
            if getattr(exc, "ec2_code", None) not in NOT_FOUND:
                raise  # throttling, credentials, network: nothing else would get through either
            problems.append(str(exc))

    def image():
        with _Api(client, f"{vm_['name']}: image", **context) as c:
            if not c.describe_images(ImageIds=[context["image"]])["Images"]:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "InvalidAMIID.NotFound", "Message": f"{context['image']} not found"}},
                    "DescribeImages",
                )

    def size():
        with _Api(client, f"{vm_['name']}: size", **context) as c:
            c.describe_instance_types(InstanceTypes=[context["size"]])

    def keyname():
        with _Api(client, f"{vm_['name']}: keyname", **context) as c:
            c.describe_key_pairs(KeyNames=[context["keyname"]])

    def subnet():
        nonlocal subnet_vpc
        with _Api(client, f"{vm_['name']}: subnet", **context) as c:
            subnet_vpc = c.describe_subnets(SubnetIds=[context["subnet"]])["Subnets"][0]["VpcId"]

    check(image)
    check(size)
    if context.get("keyname"):
        check(keyname)
    if context.get("subnet"):
        check(subnet)

    group_ids = list(_setting("securitygroupid", vm_, []) or [])
    names = _setting("securitygroup", vm_, []) or []
    names = [names] if isinstance(names, str) else list(names)
    if names and not (context.get("subnet") and subnet_vpc is None):  # no VPC to look in if the subnet is bad
        with _Api(client, f"{vm_['name']}: securitygroup", **context) as c:
            vpc = subnet_vpc
            if vpc is None:
                vpcs = c.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
                vpc = vpcs[0]["VpcId"] if vpcs else None
            filters = [{"Name": "group-name", "Values": names}]
            if vpc:
                filters.append({"Name": "vpc-id", "Values": [vpc]})
            groups = c.describe_security_groups(Filters=filters)["SecurityGroups"]
        found = {g["GroupName"]: g["GroupId"] for g in groups}
        missing = [n for n in names if n not in found]
        if missing:
            problems.append(
                f"{vm_['name']}: securitygroup: {', '.join(missing)} not found in VPC {vpc} of {context['region']}; "
                "create it or fix the name"
            )
        group_ids += [found[n] for n in names if n in found]
    if problems:
        raise SaltCloudSystemExit("; ".join(problems))
    return group_ids


def _volumes(vm_):
    mappings = []
    for volume in _setting("volumes", vm_, []) or []:
        if "device" not in volume:
            raise SaltCloudConfigError(f"{vm_['name']}: volumes: {volume!r} needs a device, e.g. /dev/sdf")
        ebs = {"DeleteOnTermination": volume.get("delete_on_termination", True)}
        for key, api in (
            ("size", "VolumeSize"),
            ("type", "VolumeType"),
            ("iops", "Iops"),
            ("throughput", "Throughput"),
            ("snapshot", "SnapshotId"),
            ("encrypted", "Encrypted"),
            ("kms_key_id", "KmsKeyId"),
        ):
            if volume.get(key) is not None:
                ebs[api] = volume[key]
        mappings.append({"DeviceName": volume["device"], "Ebs": ebs})
    return mappings


def _run_params(vm_, context, group_ids, user_data, deployments):
    tags = {str(k): str(v) for k, v in (_setting("tag", vm_, {}) or {}).items()}
    tags.update({"Name": vm_["name"], MANAGED_TAG: vm_.get("profile") or "", DEPLOYMENTS_TAG: ",".join(deployments)})
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    params = {
        "ImageId": context["image"],
        "InstanceType": context["size"],
        "MinCount": 1,
        "MaxCount": 1,
        # One token per create: boto3's retries of a throttled request cannot launch a second instance.
        "ClientToken": f"{vm_['name'][:27]}-{uuid.uuid4()}",
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
        # IMDSv2 only: user_data.sh uses a session token; v1 is the SSRF-prone one.
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
    }
    if context.get("keyname"):
        params["KeyName"] = context["keyname"]
    assign_public = _setting("assign_public_ip", vm_)
    if assign_public is not None:
        interface = {"DeviceIndex": 0, "AssociatePublicIpAddress": bool(assign_public)}
        if context.get("subnet"):
            interface["SubnetId"] = context["subnet"]
        if group_ids:
            interface["Groups"] = group_ids
        params["NetworkInterfaces"] = [interface]
    else:
        if context.get("subnet"):
            params["SubnetId"] = context["subnet"]
        if group_ids:
            params["SecurityGroupIds"] = group_ids
    iam = _setting("iam_profile", vm_)
    if iam:
        params["IamInstanceProfile"] = {"Arn": iam} if str(iam).startswith("arn:") else {"Name": iam}
    zone = _setting("availability_zone", vm_)
    if zone:
        params["Placement"] = {"AvailabilityZone": zone}
    volumes = _volumes(vm_)
    if volumes:
        params["BlockDeviceMappings"] = volumes
    spot = _setting("spot", vm_)
    if spot:
        spot = spot if isinstance(spot, dict) else {}
        options = {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": spot.get("interruption", "terminate"),
        }
        if spot.get("max_price") is not None:
            options["MaxPrice"] = str(spot["max_price"])
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
    if user_data:
        params["UserData"] = user_data
    return params


def _address(instance, interface):
    if interface == "private_ips":
        return instance.get("PrivateIpAddress")
    return instance.get("PublicIpAddress")


def _addresses(instance):
    return [instance.get("PublicIpAddress")], [instance.get("PrivateIpAddress")]


def create(vm_):
    """Launch an instance from a profile, wait until it runs and has an address, then bootstrap its minion.

    ``salt-cloud -p worker worker-7`` (also ``-P`` and ``-m``). Returns list_nodes_full's
    entry plus ``deploy`` (how the minion is bootstrapped). saltfleet_cloud's
    pipeline runs the steps; an instance whose create fails once launched is
    terminated, unless the profile says ``keep_failed: True``.
    """
    return __utils__["saltfleet_cloud.create"](vm_, __opts__, _Create(vm_).driver())


class _Create:
    """One create's EC2 calls for saltfleet_cloud's pipeline: one client, and what the preflight found."""

    def __init__(self, vm_):
        self.vm_ = vm_
        self.client = None
        self.context = {}
        self.group_ids = []

    def driver(self):
        return __utils__["saltfleet_cloud.driver"](
            "ec2",
            # The pipeline calls back into this module: in this module's loader, where its __utils__ are.
            loader=salt.loader.context.loader_ctxvar.get(),
            preflight=self.preflight,
            launch=self.launch,
            wait=self.wait,
            addresses=_addresses,
            row=_full_row,
            remove=self.remove,
            user_data_limit=16384,
        )

    def preflight(self, mode):
        """The client, every setting and every resource the profile names, checked before launching."""
        vm_, name = self.vm_, self.vm_["name"]
        self.client = _client(vm_)
        region = self.client.meta.region_name
        self.context = {
            "name": name,
            "provider": _provider_label(vm_),
            "image": _setting("image", vm_),
            "size": _setting("size", vm_),
            "keyname": _setting("keyname", vm_),
            "subnet": _setting("subnet", vm_),
            "securitygroup": _setting("securitygroup", vm_),
            "region": region,
        }
        for key in ("image", "size"):
            if not self.context[key]:
                raise SaltCloudConfigError(f"{name}: profile {vm_.get('profile')} sets no {key}")
        self.group_ids = _preflight(self.client, vm_, self.context)
        return __utils__["saltfleet_cloud.facts"](region=region, size=self.context["size"], image=self.context["image"])

    def launch(self, request):
        params = _run_params(self.vm_, self.context, self.group_ids, request.user_data, request.deployments)
        with _Api(self.client, f"{self.vm_['name']}: launching", **self.context):
            instance_id = self.client.run_instances(**params)["Instances"][0]["InstanceId"]
        return __utils__["saltfleet_cloud.launched"](instance_id)

    def wait(self, machine):
        """The instance once running with an address on ``ssh_interface``; termination protection if asked."""
        vm_, name, instance_id = self.vm_, self.vm_["name"], machine.instance_id
        interface = _setting("ssh_interface", vm_, "public_ips")

        def running_with_address():
            with _Api(self.client, f"{name}: waiting for {instance_id}", **self.context):
                reservations = self.client.describe_instances(InstanceIds=[instance_id])["Reservations"]
            instance = reservations[0]["Instances"][0] if reservations else None
            if instance is None:
                return None
            state = instance["State"]["Name"]
            if state in ("shutting-down", "terminated", "stopped", "stopping"):
                reason = instance.get("StateReason", {}).get("Message", "no reason given")
                raise SaltCloudSystemExit(f"{name}: instance {instance_id} went {state} while starting: {reason}")
            return instance if state == "running" and _address(instance, interface) else None

        instance = __utils__["saltfleet_cloud.wait_for"](
            running_with_address,
            _setting("wait_for_ip_timeout", vm_, 600),
            f"{name}: instance {instance_id} running with an address ({interface})",
            interval=_setting("wait_for_ip_interval", vm_, 5),
        )
        if _setting("termination_protection", vm_, False):
            with _Api(self.client, f"{name}: termination protection", **self.context):
                self.client.modify_instance_attribute(InstanceId=instance_id, DisableApiTermination={"Value": True})
        return instance

    def remove(self, machine):
        """Terminate the instance this create launched, even with termination protection on."""
        self.client.modify_instance_attribute(InstanceId=machine.instance_id, DisableApiTermination={"Value": False})
        self.client.terminate_instances(InstanceIds=[machine.instance_id])


# --- destroy and actions -------------------------------------------------------------


def _find(client, name):
    with _Api(client, f"{name}: looking up"):
        instances = _instances(client, names=[name])
    if not instances:
        raise SaltCloudSystemExit(f"{name}: no live instance with this Name tag (and tag {MANAGED_TAG})")
    if len(instances) > 1:
        ids = ", ".join(i["InstanceId"] for i in instances)
        raise SaltCloudSystemExit(f"{name}: several live instances carry this name ({ids}); act on them by hand")
    return instances[0]


def destroy(name, call=None):
    """Terminate an instance (``salt-cloud -d worker-7``); refuses while termination protection is on.

    Returns ``{"name", "instance_id", "state"}`` (EC2's state after the request, e.g. ``shutting-down``).
    """
    __utils__["saltfleet_cloud.check_call"]("destroy", call, "destroy")
    client = _client()
    instance = _find(client, name)
    instance_id = instance["InstanceId"]
    with _Api(client, f"{name}: destroying {instance_id}", name=name):
        protected = client.describe_instance_attribute(InstanceId=instance_id, Attribute="disableApiTermination")
        if protected["DisableApiTermination"]["Value"]:
            raise SaltCloudSystemExit(
                f"{name}: instance {instance_id} has termination protection; "
                f"`salt-cloud -a disable_term_protect {name}` first if you really mean to destroy it"
            )
        __utils__["saltfleet_cloud.fire_event"](__opts__, name, "destroying", {"instance_id": instance_id})
        result = client.terminate_instances(InstanceIds=[instance_id])["TerminatingInstances"][0]
    return __utils__["saltfleet_cloud.destroyed"](
        __opts__, name, instance_id, _provider_label(), result["CurrentState"]["Name"]
    )


def _instance_action(name, call, fun, verb):
    __utils__["saltfleet_cloud.check_call"](verb, call or "action", "action")  # also callable from code, without a call
    client = _client()
    instance = _find(client, name)
    with _Api(client, f"{name}: {verb}", name=name):
        fun(client, instance["InstanceId"])
    return {"instance_id": instance["InstanceId"], "action": verb}


def start(name, call=None):
    """Start a stopped instance: ``salt-cloud -a start worker-7``."""
    return _instance_action(name, call, lambda c, i: c.start_instances(InstanceIds=[i]), "start")


def stop(name, call=None):
    """Stop an instance: ``salt-cloud -a stop worker-7``."""
    return _instance_action(name, call, lambda c, i: c.stop_instances(InstanceIds=[i]), "stop")


def reboot(name, call=None):
    """Reboot an instance: ``salt-cloud -a reboot worker-7``."""
    return _instance_action(name, call, lambda c, i: c.reboot_instances(InstanceIds=[i]), "reboot")


def _set_term_protect(client, instance_id, value):
    client.modify_instance_attribute(InstanceId=instance_id, DisableApiTermination={"Value": value})


def enable_term_protect(name, call=None):
    """Turn termination protection on: ``salt-cloud -a enable_term_protect worker-7``."""
    return _instance_action(name, call, lambda c, i: _set_term_protect(c, i, True), "enable_term_protect")


def disable_term_protect(name, call=None):
    """Turn termination protection off, so ``-d`` can terminate: ``salt-cloud -a disable_term_protect worker-7``."""
    return _instance_action(name, call, lambda c, i: _set_term_protect(c, i, False), "disable_term_protect")


def show_term_protect(name, call=None):
    """Whether termination protection is on: ``salt-cloud -a show_term_protect worker-7``."""
    __utils__["saltfleet_cloud.check_call"]("show_term_protect", call, "action")
    client = _client()
    instance = _find(client, name)
    with _Api(client, f"{name}: show_term_protect", name=name):
        value = client.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="disableApiTermination"
        )["DisableApiTermination"]["Value"]
    return {"instance_id": instance["InstanceId"], "termination_protection": value}
