"""What Salt users rely on in every saltfleet module: a manual in sys.doc, a pillar.example that is true."""

import ast
import importlib.util

import pytest
import yaml

from localfleet.config import REPO, saltfleet_utils

LOADER_DIRS = ("_modules", "_runners", "_states")
# What Salt's state machinery calls itself, never a user: no SLS example to show.
SALT_HOOKS = {"mod_init", "mod_watch", "mod_aggregate"}


def public_functions():
    for folder in LOADER_DIRS:
        for path in sorted((REPO / folder).glob("*.py")):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.name not in SALT_HOOKS:
                    yield f"{folder}/{path.name}:{node.name}", ast.get_docstring(node) or ""


@pytest.mark.parametrize(("where", "doc"), list(public_functions()), ids=[w for w, _ in public_functions()])
def test_every_public_function_has_a_cli_example(where, doc):
    """`salt '*' sys.doc deployment` reads as a manual: Salt's convention is a CLI Example block per function."""
    if where.startswith("_states/"):
        assert ".. code-block:: yaml" in doc, f"{where}: its docstring shows no SLS example"
    else:
        assert "CLI Example:" in doc and ".. code-block:: bash" in doc, f"{where}: no 'CLI Example:' block"


def schema_module():
    spec = importlib.util.spec_from_file_location("saltfleet_schema_constants", REPO / "_utils" / "saltfleet_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pillar_example_validates():
    data = yaml.safe_load((REPO / "pillar.example").read_text())
    _, configs, errors = saltfleet_utils().saltfleet_schema.validate(data)
    assert errors == []
    assert configs


def test_pillar_example_documents_every_key():
    text = (REPO / "pillar.example").read_text()
    schema = schema_module()
    keys = [*schema.HOST_DEFAULTS, *schema.DEPLOYMENT_DEFAULTS, *schema.PROGRAM_OPTIONS]
    missing = [key for key in keys if f"{key}:" not in text and f" {key}," not in text and f" {key}\n" not in text]
    assert missing == []


PROCESS_STARTERS = {
    ("subprocess", name) for name in ("run", "Popen", "call", "check_call", "check_output", "getoutput")
} | {("os", name) for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp")}


def process_starts(path):
    """Calls in ``path`` that start a process (subprocess.*, os.system, os.exec*, os.spawn*, pty.spawn...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        func = node.func if isinstance(node, ast.Call) else None
        if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
            continue
        module, name = func.value.id, func.attr
        starts = (module, name) in PROCESS_STARTERS or (module == "os" and name.startswith(("exec", "spawn")))
        spawns = "spawn" in name or "subprocess" in name
        starts = starts or (module in ("pty", "multiprocessing", "asyncio") and spawns)
        if starts:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {module}.{name}")
    return found


def test_every_process_starts_through_the_one_primitive():
    """Root starts a process for a deployment (or for itself) only through _utils/saltfleet_user.py."""
    starts = [
        start
        for folder in ("_utils", "_states", "_modules", "_runners", "_pillar", "_grains")
        for path in sorted((REPO / folder).glob("*.py"))
        if path.name != "saltfleet_user.py"
        for start in process_starts(path)
    ]
    assert starts == []
    # The check sees what it looks for.
    assert process_starts(REPO / "_utils" / "saltfleet_user.py")
