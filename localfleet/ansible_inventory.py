#!/usr/bin/env python3
"""
An Ansible dynamic-inventory script over `salt-run fleet.ansible_inventory`.

    ansible all -i localfleet/ansible_inventory.py -m setup

It asks the master on this machine (config dir from SALT_CONFIG_DIR, default
/etc/salt; `make demo`'s is .demo/etc/salt) and answers Ansible's `--list`
and `--host NAME` (hostvars are all in `--list`'s `_meta`, so `--host` is empty).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def salt_run():
    beside = Path(sys.executable).with_name("salt-run")
    return str(beside) if beside.exists() else shutil.which("salt-run") or "salt-run"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="the whole inventory (Ansible's default call)")
    parser.add_argument("--host", help="one host's variables (empty: they are in --list's _meta)")
    args = parser.parse_args(argv)
    if args.host:
        print("{}")
        return 0
    config_dir = os.environ.get("SALT_CONFIG_DIR", "/etc/salt")
    proc = subprocess.run(
        [salt_run(), "-c", config_dir, "-l", "quiet", "fleet.ansible_inventory", "--out=json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        print(proc.stderr or proc.stdout, file=sys.stderr)
        return proc.returncode
    json.dump(json.loads(proc.stdout), sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
