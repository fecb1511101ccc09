"""
How the README's command blocks become the commands typed against the demo
(tests/integration/readme.py): every block accounted for, the README's
grammar expanded, nothing adapted but the config dir and names.
"""

import pytest

from tests.integration import readme


def test_every_block_of_the_readme_is_run_or_says_why_not():
    blocks = readme.blocks()
    assert [b.line for b in blocks if len(b.planned) != 1] == [], "a README block the plan does not know (or twice)"
    used = {start for b in blocks for start in b.planned}
    assert sorted(set(readme.PLAN) - used) == [], "a plan entry no README block starts with"
    # Most of it runs.
    assert sum(1 for b in blocks if readme.plan(b)[0] is None) >= 7


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "salt 'worker-7' deployment.stop|start NAME [PROGRAM]  # comment; not a command",
            [
                "salt -c .demo/etc/salt 'demo-worker-1' deployment.stop sample-fetcher",
                "salt -c .demo/etc/salt 'demo-worker-1' deployment.start sample-fetcher",
                "salt -c .demo/etc/salt 'demo-worker-1' deployment.stop sample-fetcher fetcher-twitter",
                "salt -c .demo/etc/salt 'demo-worker-1' deployment.start sample-fetcher fetcher-twitter",
            ],
        ),
        (
            "salt-run fleet.rollback NAME [release=SHA] [batch=1|20%] [test=True]",
            [
                "salt-run -c .demo/etc/salt fleet.rollback sample-fetcher",
                "salt-run -c .demo/etc/salt fleet.rollback sample-fetcher release={release} batch=1 test=True",
                "salt-run -c .demo/etc/salt fleet.rollback sample-fetcher release={release} batch=20% test=True",
            ],
        ),
        (
            "salt-cloud -Q; salt-cloud -y -a reboot worker-7",
            ["salt-cloud -c .demo/etc/salt -Q", "salt-cloud -c .demo/etc/salt -y -a reboot demo-worker-3"],
        ),
        (
            "salt-cloud -p worker worker-7   # or worker-fetcher; -P",
            ["salt-cloud -c .demo/etc/salt -p local-worker demo-worker-3"],
        ),
        (
            "salt -C 'G@saltfleet_deployments:daily-fetcher:* and worker-*' test.ping",
            ["salt -c .demo/etc/salt -C 'G@saltfleet_deployments:sample-fetcher:* and demo-worker-*' test.ping"],
        ),
        (
            "salt 'worker-7' deployment.run NAME 'env LEVEL=2 python manage.py check'  # KEY=value # words",
            [
                "salt -c .demo/etc/salt 'demo-worker-1' deployment.run sample-fetcher "
                "'env LEVEL=2 python manage.py check'"
            ],
        ),
        (
            "SALT_CONFIG_DIR=.demo/etc/salt ansible all -i localfleet/ansible_inventory.py --list-hosts",
            ["SALT_CONFIG_DIR=.demo/etc/salt ansible all -i localfleet/ansible_inventory.py --list-hosts"],
        ),
        (
            "salt-run -c .demo/etc/salt fleet.deploy sample-fetcher rev=v2       # host by host",
            ["salt-run -c .demo/etc/salt fleet.deploy sample-fetcher rev=v2"],
        ),
    ],
)
def test_a_readme_line_becomes_the_demo_commands_it_shows(line, expected):
    assert [readme.adapt(v) for c in readme.commands(line) for v in readme.variants(c)] == expected
