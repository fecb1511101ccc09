"""A master's opts for tests that load saltfleet's runners without daemons: one place for what they share."""

from pathlib import Path

import salt.config

from localfleet.config import REPO


def master_opts(root, **overrides):
    """
    Salt's master opts with every path under ``root`` (keys pki, cache,
    sockets, file and pillar roots, each made), saltfleet's runner, utils and
    outputter dirs, JSON output; ``overrides`` on top.
    """
    root = Path(root)
    opts = salt.config.master_config(None)
    opts.update(
        root_dir=str(root),
        pki_dir=str(root / "pki"),
        cachedir=str(root / "cache"),
        sock_dir=str(root / "sock"),
        file_roots={"base": [str(root / "files")]},
        pillar_roots={"base": [str(root / "pillar")]},
        output="json",
        color=False,
        runner_dirs=[str(REPO / "_runners")],
        utils_dirs=[str(REPO / "_utils")],
        outputter_dirs=[str(REPO / "_output")],
    )
    opts.update(overrides)
    for folder in ("minions", "minions_pre", "minions_rejected", "minions_denied"):
        (root / "pki" / folder).mkdir(parents=True, exist_ok=True)
    for folder in ("files", "pillar"):
        (root / folder).mkdir(exist_ok=True)
    return opts
