"""supervisord.conf as saltfleet writes it (_utils/saltfleet_supervisor_conf.py), through Salt's utils loader."""

import pytest
from salt.exceptions import CommandExecutionError

from localfleet.config import saltfleet_utils

utils = saltfleet_utils()
sup = utils.saltfleet_supervisor_conf
HOST, _ = utils.saltfleet_schema.validate_host({"root": "/srv/sandbox", "user": "ubuntu"})
P = utils.saltfleet_paths.paths("/srv/sandbox", "ubuntu", "fetcher")
RELEASE = P["releases"] / ("a" * 40)
VENV = P["venvs"] / ("b" * 16)


def config(**spec):
    cfg, errors = utils.saltfleet_schema.validate_deployment("fetcher", {"repo": "/r", **spec}, HOST)
    assert errors == []
    return cfg


def test_each_generation_owns_its_socket_pidfile_and_runs_programs_in_its_release():
    cfg = config(env={"DSN": "s3cret%"}, programs={"w": {"command": "celery worker", "stopwaitsecs": 30}})
    text = sup.render(cfg, sup.pillar_sections(cfg), P, "2", RELEASE, VENV)
    assert "file=/srv/sandbox/var/lib/saltfleet/deployments/fetcher/run/2.sock\n" in text
    assert "pidfile=/srv/sandbox/var/lib/saltfleet/deployments/fetcher/run/2.pid\n" in text
    assert "serverurl=unix:///srv/sandbox/var/lib/saltfleet/deployments/fetcher/run/2.sock\n" in text
    assert f"directory={RELEASE}\n" in text
    assert f'PATH="{VENV}/bin:/usr/local/bin:/usr/bin:/bin"' in text
    assert "stdout_logfile=/srv/sandbox/home/ubuntu/log/fetcher/w.g2.log\n" in text, "each generation its own log"
    assert "stopwaitsecs=30\n" in text
    # The env is not the config's: supervisord gets it from its boot script.
    assert "s3cret" not in text and "DSN" not in text
    assert "/tmp" not in text


def test_template_may_not_define_what_saltfleet_owns():
    with pytest.raises(CommandExecutionError, match=r"section \[supervisord\] .* is not allowed"):
        sup.template_sections("[supervisord]\nlogfile=/tmp/x\n", "fetcher", "salt://x")
    with pytest.raises(CommandExecutionError, match=r"section \[include\] .* is not allowed"):
        sup.template_sections("[program:a]\ncommand=x\n[include]\nfiles=/etc/*.conf\n", "fetcher", "salt://x")
    with pytest.raises(CommandExecutionError, match="defines no"):
        sup.template_sections("; nothing\n", "fetcher", "salt://x")


def test_group_diff_sees_only_the_programs_that_changed():
    old = "[program:a]\ncommand=x\n\n[program:b]\ncommand=y\n"
    new = "[program:a]\ncommand=x\n\n[program:b]\ncommand=z\n\n[program:c]\ncommand=c\n"
    assert sup.diff_groups(old, new) == {"added": ["c"], "changed": ["b"], "removed": [], "kept": ["a"]}
    assert sup.diff_groups(new, old)["removed"] == ["c"]


def test_programs_that_differ_only_by_release_compare_equal():
    cfg = config(programs={"w": {"command": "celery worker"}})
    sections = sup.pillar_sections(cfg)
    old = sup.render(cfg, sections, P, "1", RELEASE, VENV)
    new = sup.render(cfg, sections, P, "2", P["releases"] / ("c" * 40), VENV)
    assert sup.diff_groups(old, new)["changed"] == ["w"]
    same = [
        (str(RELEASE), "@r@"),
        (str(P["releases"] / ("c" * 40)), "@r@"),
        (".g1.log", ".g.log"),
        (".g2.log", ".g.log"),
    ]
    assert sup.diff_groups(old, new, same)["kept"] == ["w"]


def test_the_boot_line_runs_the_serving_generations_boot_script_as_root():
    cfg = config(programs={"w": {"command": "x"}})
    path, text = sup.boot_entry(cfg, P)
    assert path == "etc/cron.d/saltfleet-fetcher"
    line = [x for x in text.decode().splitlines() if x.startswith("@reboot")]
    assert line == ["@reboot root /srv/sandbox/var/lib/saltfleet/deployments/fetcher/supervisord.boot"]


def test_a_boot_script_drops_to_the_user_before_anything_runs_and_holds_no_secret():
    cfg = config(env={"DSN": "postgres://u:p@db/x", "QUOTED": 'it\'s "so" ; # %(x)s'})
    tools = {"setpriv": "/usr/bin/setpriv", "supervisord": "/usr/bin/supervisord"}
    script = sup.boot_script(cfg, tools, P, "3", 1001, 1002)
    assert script.startswith("#!/bin/sh\n")
    assert "postgres" not in script and "DSN" not in script
    exec_line = script.rstrip("\n").splitlines()[-1].split()
    # setpriv first: the user's uid, gid and groups, a clean environment, no capabilities; then the user's shell.
    assert exec_line[:7] == [
        "exec",
        "/usr/bin/setpriv",
        "--reuid=1001",
        "--regid=1002",
        "--init-groups",
        "--reset-env",
        "--inh-caps=-all",
    ]
    state = "/srv/sandbox/var/lib/saltfleet/deployments/fetcher"
    assert exec_line[-3:] == [f"{state}/supervisord.3.env", "/usr/bin/supervisord", f"{state}/supervisord.3.conf"]
    env = sup.env_script(cfg)
    assert sup.boot_env(env) == {"LANG": "C.UTF-8", **cfg["env"]}
