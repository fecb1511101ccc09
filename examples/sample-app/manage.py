"""
The sample app's one-off commands, in the shape of a Django app's
``manage.py`` (what ``deployment.run NAME python manage.py migrate`` runs on a
real fleet): ``migrate`` makes sure the data folder is there, ``check`` says
what it checked. Both name the release that ran them (``VERSION``).
"""

import os
import sys
from pathlib import Path

import sampleapp


def main(argv):
    command = argv[1] if len(argv) > 1 else "help"
    if command == "migrate":
        Path(sampleapp.DATA).mkdir(parents=True, exist_ok=True)
        print(f"sample-app {sampleapp.VERSION}: {sampleapp.DATA} ready; no migrations to apply")
        return 0
    if command == "check":
        level = os.environ.get("LEVEL", "1")
        print(f"sample-app {sampleapp.VERSION}: system check at level {level} identified no issues")
        return 0
    print(f"usage: python manage.py migrate|check (got {command!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
