"""
Grains that describe a saltfleet host: the deployments it runs and where it runs.

``saltfleet_deployments``
    Each deployment installed on the host (from the manifests the deployment
    states write under ``<root>/var/lib/saltfleet/deployments/<name>/``), with the
    revision pillar asked for, the release (commit SHA) it serves and that
    commit's subject, its repo, user and when it last changed:

    .. code-block:: yaml

        saltfleet_deployments:
          daily-fetcher:
            rev: master
            release: 3f1c...e9
            subject: Fetch instagram stories too
            repo: git@github.com:example/app.git
            user: ubuntu
            updated: '2024-05-01T10:00:00Z'

``saltfleet_cloud`` (not from this module)
    The cloud facts (provider, instance_id, region, size, image, profile,
    public_ips, private_ips): the saltfleet cloud drivers write them into the
    minion config's ``grains:`` when they create the host, since the host
    itself cannot know most of them. ``fleet.inventory`` falls back to the
    core ``ipv4`` grain for a host that has none.

The root is pillar ``saltfleet:root`` when the minion has its pillar, else the
minion's own ``root_dir`` (the sandbox of a local instance, ``/`` elsewhere).
The grains are refreshed by ``saltutil.refresh_grains`` (the deployment states
ask for it after a change) and on the minion's start.
"""


def deployments():
    """The deployments installed on this host, with revision and release."""
    root = __utils__["saltfleet_schema.host_root"](__pillar__, __opts__)
    installed = __utils__["saltfleet_manifest.installed"](root)
    public = __utils__["saltfleet_manifest.public"]
    return {"saltfleet_deployments": {name: public(manifest) for name, manifest in sorted(installed.items())}}
