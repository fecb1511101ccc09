"""Pure functions of _utils/saltfleet.py: schema, config rendering, group diffs, sysfiles."""

import pytest

from localfleet.config import saltfleet_utils

sf = saltfleet_utils()
HOST, _ = sf.validate_host({"root": "/srv/sandbox", "user": "ubuntu"})


def errors_of(spec, name="fetcher"):
    return sf.validate_deployment(name, spec, HOST)[1]


def test_defaults_filled_and_host_settings_merged():
    cfg, errors = sf.validate_deployment("fetcher", {"repo": "git@example.com:app.git"}, HOST)
    assert errors == []
    assert cfg["rev"] == "HEAD"
    assert cfg["user"] == "ubuntu"
    assert cfg["keep_releases"] == 3
    assert cfg["handover"] == "overlap"
    assert cfg["root"] == "/srv/sandbox"


def test_root_defaults_to_the_minions_root_dir():
    host, errors = sf.validate_host({}, default_root="/var/sandbox")
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


def test_socket_path_too_long_is_refused():
    host, _ = sf.validate_host({"root": "/" + "x" * 80, "user": "u"})
    _, errors = sf.validate_deployment("fetcher", {"repo": "/r"}, host)
    assert errors and "longer than unix sockets allow" in errors[0]


def test_whole_pillar_validation_collects_every_error():
    _, configs, errors = sf.validate({"saltfleet": {"rooot": "/"}, "deployments": {"ok": {"repo": "/r"}, "bad": {}}})
    assert "ok" in configs and "bad" not in configs
    assert any(e.startswith("saltfleet:rooot: unknown key") for e in errors)
    assert any(e.startswith("deployments:bad:repo: missing") for e in errors)


def test_rendered_config_owns_socket_pidfile_logs_and_merges_env():
    cfg, _ = sf.validate_deployment(
        "fetcher",
        {"repo": "/r", "env": {"DSN": "s3cret%"}, "programs": {"w": {"command": "celery worker", "stopwaitsecs": 30}}},
        HOST,
    )
    text = sf.render_supervisord_conf(cfg, sf.pillar_programs(cfg))
    p = sf.paths("/srv/sandbox", "ubuntu", "fetcher")
    # Generation 1 on a fresh host; supervisorctl goes through the link to the serving one.
    assert f"file={p['run']}/1.sock\n" in text
    assert f"pidfile={p['run']}/1.pid\n" in text
    assert f"serverurl=unix://{p['socket']}\n" in text
    assert f"file={p['run']}/2.sock\n" in sf.render_supervisord_conf(cfg, sf.pillar_programs(cfg), gen="2")
    assert f"stdout_logfile={p['logs']}/w.log" in text
    assert "stopwaitsecs=30" in text
    assert 'environment=DSN="s3cret%%"' in text
    assert "/tmp" not in text


def test_template_may_not_define_what_saltfleet_owns():
    with pytest.raises(sf.DeploymentError, match=r"section \[supervisord\] .* is not allowed"):
        sf.program_sections("[supervisord]\nlogfile=/tmp/x\n", "fetcher", "salt://x")
    with pytest.raises(sf.DeploymentError, match="defines no"):
        sf.program_sections("; nothing\n", "fetcher", "salt://x")


def test_group_diff_sees_only_the_programs_that_changed():
    old = "[program:a]\ncommand=x\n\n[program:b]\ncommand=y\n"
    new = "[program:a]\ncommand=x\n\n[program:b]\ncommand=z\n\n[program:c]\ncommand=c\n"
    assert sf.diff_groups(old, new) == {"added": ["c"], "changed": ["b"], "removed": [], "kept": ["a"]}
    assert sf.diff_groups(new, old)["removed"] == ["c"]


def test_cron_names_cron_would_ignore_are_refused(tmp_path):
    errors = sf.check_sysfiles("fetcher", {"etc/cron.d/fetch.cron": b"", "etc/cron.d/ok_name-1": b""}, tmp_path)
    assert errors == [
        "deployments:fetcher:sysfiles: etc/cron.d/fetch.cron would be ignored by cron "
        "(names may hold only letters, digits, '-' and '_'); rename it"
    ]


def test_sysfiles_install_and_remove_what_is_no_longer_shipped(tmp_path):
    sf.apply_sysfiles("fetcher", {"etc/cron.d/a": b"* * * * * u true\n", "usr/local/bin/x": b"#!/bin/sh\n"}, tmp_path)
    assert (tmp_path / "etc/cron.d/a").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "usr/local/bin/x").stat().st_mode & 0o777 == 0o755
    assert sf.diff_sysfiles("fetcher", {"etc/cron.d/a": b"* * * * * u true\n"}, tmp_path) == {
        "removed": ["usr/local/bin/x"]
    }
    sf.apply_sysfiles("fetcher", {"etc/cron.d/a": b"* * * * * u true\n"}, tmp_path)
    assert not (tmp_path / "usr/local/bin/x").exists()
    errors = sf.check_sysfiles("other", {"etc/cron.d/a": b""}, tmp_path)
    assert errors == ["deployments:other:sysfiles: etc/cron.d/a is already installed by 'fetcher'; rename one of them"]


def test_requirements_digest_follows_included_files():
    files = {"requirements.txt": "-r base.txt\ncelery\n", "base.txt": "kombu==5\n"}
    cfg = {"name": "f", "python": "python3", "requirements": "requirements.txt"}
    before = sf.requirements_digest(files.get, cfg)
    files["base.txt"] = "kombu==6\n"
    assert sf.requirements_digest(files.get, cfg) != before
    with pytest.raises(sf.DeploymentError, match=r"requirements: 'nope\.txt' is not in the repository"):
        sf.requirements_digest(files.get, dict(cfg, requirements="nope.txt"))
