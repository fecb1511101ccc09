"""saltfleet's _utils as Salt's loader loads them, for tests that need a module's own classes."""

import types

from localfleet.config import saltfleet_utils

utils = saltfleet_utils()


def module(name):
    """
    What utils file ``name`` defines (its classes and constants too: Salt's
    loader exposes only its functions), as this loader loaded it: another
    loader's copy in ``sys.modules`` may have replaced it there.
    """
    utils._load_all()  # pylint: disable=protected-access  (the loader loads a module when first asked)
    functions = [f for key, f in utils.items() if key.startswith(f"{name}.") and callable(f)]
    return types.SimpleNamespace(**functions[0].func.__globals__)
