"""saltfleet's _utils as Salt's loader loads them, for tests that need a module's own classes."""

import sys

from localfleet.config import saltfleet_utils

utils = saltfleet_utils()


def module(name):
    """The module object of utils file ``name`` (Salt's loader exposes only its functions)."""
    functions = [f for key, f in utils.items() if key.startswith(f"{name}.") and callable(f)]
    return sys.modules[functions[0].__module__]
