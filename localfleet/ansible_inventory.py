#!/usr/bin/env python3
"""
An Ansible dynamic-inventory script over `salt-run fleet.ansible_inventory`.

    ansible all -i localfleet/ansible_inventory.py -m setup

It asks the master on this machine (config dir from SALT_CONFIG_DIR, default
/etc/salt; `make demo`'s is .demo/etc/salt) and answers Ansible's `--list`
and `--host NAME` (hostvars are all in `--list`'s `_meta`, so `--host` is empty).

Ansible runs it with the system's python3 and the user's PATH, where Salt need
not be: salt-run is the one beside the Python running this, else the
repository's own venv (.venv/bin, what `make demo` runs), else the one on PATH.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def salt_run():
    """The salt-run to ask, or None when there is none."""
    for candidate in (Path(sys.executable).with_name("salt-run"), REPO / ".venv" / "bin" / "salt-run"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("salt-run")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="the whole inventory (Ansible's default call)")
    parser.add_argument("--host", help="one host's variables (empty: they are in --list's _meta)")
    args = parser.parse_args(argv)
    if args.host:
        print("{}")
        return 0
    config_dir = os.environ.get("SALT_CONFIG_DIR", "/etc/salt")
    command = salt_run()
    if not command:
        print(
            f"salt-run not found beside {sys.executable}, in {REPO / '.venv' / 'bin'} or on PATH; "
            "run `make venv`, or install Salt",
            file=sys.stderr,
        )
        return 1
    proc = subprocess.run(
        [command, "-c", config_dir, "-l", "quiet", "fleet.ansible_inventory", "--out=json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        print(proc.stderr or proc.stdout, file=sys.stderr)
        return proc.returncode
    try:
        inventory = json.loads(proc.stdout)
    except ValueError:
        inventory = None
    if not isinstance(inventory, dict):
        # salt-run exits 0 even when the runner is missing ("... is not available.").
        print(
            f"salt-run -c {config_dir} fleet.ansible_inventory gave no inventory: {proc.stdout.strip()[:500]}\n"
            "SALT_CONFIG_DIR must be the config dir of a master with saltfleet's runners "
            "(etc/master.d/saltfleet.conf; `make demo`'s: .demo/etc/salt)",
            file=sys.stderr,
        )
        return 1
    json.dump(inventory, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
