"""`python -m localfleet up|down`: what `make demo` and `make demo-down` run."""

import argparse
import sys

from localfleet import demo
from localfleet.daemons import FleetError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m localfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the demo fleet (or converge the running one) and print how to drive it")
    sub.add_parser("down", help="stop every process the demo started")
    args = parser.parse_args(argv)
    try:
        demo.up() if args.command == "up" else demo.down()
    except FleetError as exc:
        print(f"\nmake demo{'' if args.command == 'up' else '-down'} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
