"""The pillar schema (_utils/saltfleet_schema.py), through Salt's utils loader."""

import pytest

from localfleet.config import saltfleet_utils

schema = saltfleet_utils().saltfleet_schema
HOST, _ = schema.validate_host({"root": "/srv/sandbox", "user": "ubuntu"})


def errors_of(spec, name="fetcher"):
    return schema.validate_deployment(name, spec, HOST)[1]


def test_defaults_filled_and_host_settings_merged():
    cfg, errors = schema.validate_deployment("fetcher", {"repo": "git@example.com:app.git"}, HOST)
    assert errors == []
    assert cfg["rev"] == "HEAD"
    assert cfg["user"] == "ubuntu"
    assert cfg["keep_releases"] == 3
    assert cfg["handover"] == "overlap"
    assert cfg["root"] == "/srv/sandbox"


def test_root_defaults_to_the_minions_root_dir():
    host, errors = schema.validate_host({}, default_root="/var/sandbox")
    assert errors == [] and host["root"] == "/var/sandbox"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"repo": "/r", "revv": "x"}, "deployments:fetcher:revv: unknown key; did you mean 'rev'?"),
        ({"rev": "main"}, "deployments:fetcher:repo: missing"),
        (
            {"repo": "/r", "rev": 12},
            "deployments:fetcher:rev: must be a str, got int 12; quote it in pillar: rev: '12'",
        ),
        ({"repo": "/r", "requirements": "../etc/passwd"}, "must be a path inside the repository"),
        ({"repo": "/r", "env": {"1X": "a"}}, "'1X' is not a valid environment variable name"),
        ({"repo": "/r", "programs": {"w": {"comand": "x"}}}, "programs:w:comand: unknown key; did you mean 'command'?"),
        ({"repo": "/r", "programs": {"w": {"autostart": True}}}, "programs:w:command: missing"),
        ({"repo": "/r", "programs": {"w": {"command": "x", "numprocs": "2"}}}, "numprocs: must be a int"),
        ({"repo": "/r", "keep_releases": 0}, "keep_releases: must be at least 1"),
        (
            {"repo": "/r", "handover": "rolling"},
            "deployments:fetcher:handover: must be overlap or stop-first, got 'rolling'",
        ),
        ({"repo": "git@h:a.git", "deploy_key": "k"}, "known_hosts: required with deploy_key"),
        ("not a mapping", "deployments:fetcher: must be a mapping"),
        ({"repo": "https://bot:s3cret@git.example.com/app.git"}, "deployments:fetcher:repo: holds a credential"),
        ({"repo": "https://ghp_token@github.com/x/app.git"}, "deployments:fetcher:repo: holds a credential"),
        ({"repo": "/r", "env": {"KEY": "-----BEGIN\nX"}}, "deployments:fetcher:env:KEY: must be one line"),
    ],
)
def test_invalid_deployment_pillar_names_key_and_fix(spec, message):
    errors = errors_of(spec)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("name", ["../x", "/", "a b", "", ".hidden", "x" * 65, "a/b"])
def test_names_that_could_escape_their_directory_are_refused(name):
    errors = errors_of({"repo": "/r"}, name=name)
    assert errors and "is not allowed" in errors[0]


def test_common_is_reserved_for_the_shared_sysfiles():
    assert "reserved" in errors_of({"repo": "/r"}, name="common")[0]


def test_ssh_urls_with_a_user_are_fine():
    assert errors_of({"repo": "ssh://git@127.0.0.1:2222/app.git"}) == []


SOCKET_TAIL = len("/var/lib/saltfleet/deployments/fetcher/run/999.sock")


def socket_errors(root, **host):
    settings, errors = schema.validate_host({"root": root, "user": "u", **host})
    assert errors == []
    return schema.validate_deployment("fetcher", {"repo": "/r"}, settings)[1]


def test_a_socket_path_with_no_room_for_supervisords_temporary_name_is_refused():
    # supervisord binds "<socket>.<pid>" first: a 105-byte socket path (a pid of 7 digits
    # would make it 113) is refused, though it fits in sockaddr_un by itself.
    root = "/" + "x" * (105 - SOCKET_TAIL - 1)
    errors = socket_errors(root)
    assert len(errors) == 1
    assert errors[0].startswith(f"deployments:fetcher: supervisord's socket path {root}/var/lib/saltfleet/")
    assert "107 bytes" in errors[0] and "'.<pid>'" in errors[0] and "shorter saltfleet:root" in errors[0]


def test_the_longest_socket_path_that_leaves_room_for_the_pid_is_accepted():
    assert socket_errors("/" + "x" * (107 - len(".4194304") - SOCKET_TAIL - 1)) == []
    assert socket_errors("/" + "x" * (107 - len(".4194304") - SOCKET_TAIL)) != []


def test_whole_pillar_validation_collects_every_error():
    _, configs, errors = schema.validate(
        {"saltfleet": {"rooot": "/"}, "deployments": {"ok": {"repo": "/r"}, "bad": {}}}
    )
    assert "ok" in configs and "bad" not in configs
    assert any(e.startswith("saltfleet:rooot: unknown key") for e in errors)
    assert any(e.startswith("deployments:bad:repo: missing") for e in errors)


def program(**opts):
    return {"repo": "/r", "programs": {"w": {"command": "celery worker", **opts}}}


HOSTILE = {
    "command opens a section": (
        program(command="true\n[program:evil]\ncommand=/bin/sh -c id"),
        "deployments:fetcher:programs:w:command: must be one line",
    ),
    "option with a carriage return": (program(directory="/srv\r[include]"), "programs:w:directory: must be one line"),
    "environment value opens a line": (
        program(environment={"A": "1\n[include]\nfiles=/etc/x"}),
        "programs:w:environment:A: must be one line",
    ),
    "env value with a NUL": ({"repo": "/r", "env": {"A": "x\0y"}}, "deployments:fetcher:env:A: must be one line"),
    "numprocs zero": (program(numprocs=0), "programs:w:numprocs: must be between 1 and 64, got 0"),
    "numprocs huge": (program(numprocs=65), "programs:w:numprocs: must be between 1 and 64, got 65"),
    "stopwaitsecs negative": (program(stopwaitsecs=-1), "stopwaitsecs: must be between 0 and 86400"),
    "stopwaitsecs past a day": (program(stopwaitsecs=86401), "stopwaitsecs: must be between 0 and 86400"),
    "startsecs past an hour": (program(startsecs=3601), "startsecs: must be between 0 and 3600"),
    "a lone percent": (program(command="echo 100%"), "has a '%' supervisord cannot expand; write %%"),
    "stopsignal unknown": (program(stopsignal="TERM;KILL"), "stopsignal: must be one of TERM"),
    "umask not octal": (program(umask="0888"), "umask: '0888' is not an octal umask"),
    "template outside salt://": (
        {"repo": "/r", "supervisord_conf": "/etc/supervisor/x.conf"},
        "deployments:fetcher:supervisord_conf: must be a salt:// URL",
    ),
    "rev like an option": (
        {"repo": "/r", "rev": "--upload-pack=id"},
        "deployments:fetcher:rev: '--upload-pack=id' is not",
    ),
    "repo like an option": ({"repo": "--upload-pack=touch /tmp/x"}, "deployments:fetcher:repo: '--upload-pack"),
    "ext transport": ({"repo": "ext::sh -c touch% /tmp/pwned"}, "is not a git URL saltfleet fetches"),
    "fd transport": ({"repo": "fd::17"}, "is not a git URL saltfleet fetches"),
    "plain http": ({"repo": "http://git.example.com/app.git"}, "is not a git URL saltfleet fetches"),
    "ssh host like an option": (
        {"repo": "ssh://-oProxyCommand=id/app.git"},
        "repo: its host or user '-oProxyCommand=id' starts like an option",
    ),
    "ssh user like an option": (
        {"repo": "ssh://-oProxyCommand=x@host/app.git"},
        "repo: its host or user '-oProxyCommand=x' starts like an option",
    ),
    "git host like an option": ({"repo": "git://-x/app.git"}, "repo: its host or user '-x' starts like an option"),
    "program environment supervisord would mangle": (
        program(environment={"A": 'it\'s "both"'}),
        "programs:w:environment:A: supervisord's environment= would not carry it as written",
    ),
    "requirements like an option": (
        {"repo": "/r", "requirements": "-e ."},
        "requirements: '-e .' must be a path inside the repository",
    ),
    "relative python": ({"repo": "/r", "python": "../bin/python"}, "python: '../bin/python' is not a Python version"),
    "python with a space": ({"repo": "/r", "python": "python3 -c x"}, "is not a Python version"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pillar_values_are_refused_with_their_key(case):
    spec, message = HOSTILE[case]
    errors = errors_of(spec)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    "spec",
    [
        program(
            command="celery -A app worker -n w%(process_num)02d@%%h",
            numprocs=2,
            process_name="%(program_name)s_%(process_num)d",
        ),
        program(environment={"DSN": "postgres://u:p%w@db/x"}),
        {"repo": "git@github.com:example/app.git", "rev": "release/2024.05", "known_hosts": "github.com ssh-ed25519 K"},
        {"repo": "ssh://git@127.0.0.1:2222/srv/app.git"},
        {"repo": "https://github.com/example/app.git", "python": "3.11"},
        {"repo": "file:///srv/app.git", "python": "/usr/bin/python3.11", "supervisord_conf": "salt://x/conf.jinja"},
    ],
)
def test_ordinary_values_pass(spec):
    assert errors_of(spec) == []


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("uv", "bin/uv", "saltfleet:uv: 'bin/uv' must be an absolute path"),
        ("supervisord", "supervisord", "saltfleet:supervisord: 'supervisord' must be an absolute path"),
        ("python", "./python", "saltfleet:python: './python' is not a Python version"),
        ("root", "relative/root", "saltfleet:root: 'relative/root' must be an absolute path"),
    ],
)
def test_host_tools_are_absolute_or_a_version(key, value, message):
    _, errors = schema.validate_host({key: value})
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ({"pre": "python manage.py migrate", "post": ["a b", ["c", "d"]]}, None),
        ({"during": "x"}, "deployments:fetcher:hooks:during: unknown key"),
        ({"pre": 3}, "deployments:fetcher:hooks:pre: give a command"),
        ({"pre": "migrate\nrm -rf /"}, "deployments:fetcher:hooks:pre: must be one line"),
        ("migrate", "deployments:fetcher:hooks: must be a mapping"),
    ],
)
def test_rollout_hooks(hooks, message):
    errors = errors_of({"repo": "/r", "hooks": hooks})
    assert (errors == []) if message is None else any(message in e for e in errors), errors


@pytest.mark.parametrize(
    ("floors", "message"),
    [
        ({"fetch.instagram": 2, "fetch.twitter": 0}, None),
        (2, "deployments:fetcher:min_consumers: must be a mapping, got int 2"),
        ({"fetch": "2"}, "deployments:fetcher:min_consumers:fetch: must be a int, got str '2'"),
        ({"fetch": True}, "deployments:fetcher:min_consumers:fetch: must be a int, got bool True"),
        ({"fetch": -1}, "deployments:fetcher:min_consumers:fetch: must be between 0 and 10000, got -1"),
        ({"a\nb": 1}, "deployments:fetcher:min_consumers: must be one line"),
        ({3: 1}, "deployments:fetcher:min_consumers: 3 is not a queue name"),
    ],
)
def test_queue_floors(floors, message):
    errors = errors_of({"repo": "/r", "min_consumers": floors})
    assert (errors == []) if message is None else any(message in e for e in errors), errors


def test_two_deployments_of_one_user_are_refused_naming_each_other():
    """A deployment's user is its isolation: two sharing one could read each other's env."""
    _, configs, errors = schema.validate(
        {
            "saltfleet": {"user": "app"},
            "deployments": {
                "a": {"repo": "/r"},
                "b": {"repo": "/r", "user": "app"},
                "c": {"repo": "/r", "user": "c"},
                # Refused for its own error, it takes c's user from no one.
                "d": {"user": "c"},
            },
        }
    )
    assert sorted(configs) == ["c"]
    assert not any(e.startswith("deployments:c:") for e in errors), errors
    assert any(e.startswith("deployments:a:user: 'app' also runs deployment b") for e in errors), errors
    assert any(e.startswith("deployments:b:user: 'app' also runs deployment a") for e in errors), errors
    _, configs, errors = schema.validate(
        {"deployments": {"a": {"repo": "/r", "user": "root"}, "b": {"repo": "/r", "user": "root"}}}
    )
    assert sorted(configs) == ["a", "b"] and errors == []
