"""
saltfleet's pure pieces, each through Salt's utils loader and nothing else:
the manifest's intents and settled predicate, the sources read from the
master's file server, sysfiles' checks, Celery's command lines and node
names, git's refs and errors.
"""

import pytest
from salt.exceptions import CommandExecutionError

from tests.support.loaded import utils

manifest = utils.saltfleet_manifest
A, B = "a" * 40, "b" * 40
CFG = {
    "name": "app",
    "user": "nobody",
    "repo": "/srv/app.git",
    "rev": "main",
    "requirements": "requirements.txt",
    "python": "python3",
}


def p_of(tmp_path):
    p = utils.saltfleet_paths.paths(str(tmp_path), "nobody", "app")
    p["state"].mkdir(parents=True)
    return p


# ---------------------------------------------------------------- manifest


def test_a_pinned_rev_wins_until_pillar_names_it_and_then_is_released(tmp_path):
    p = p_of(tmp_path)
    manifest.record(p, CFG, "main", release=A, venv="1" * 16)
    assert manifest.pin(p, "v2", "deployment.update_code") is None
    m = manifest.read(p)
    rev, note = manifest.wanted_rev(m, "main")
    assert rev == "v2" and note.startswith("rev 'v2' set by deployment.update_code at ")
    assert note.endswith("is kept, though pillar says 'main' (`deployment.unpin app` follows pillar again)")
    assert manifest.wanted_rev(m, "main", asked=True) == ("main", None)
    # Pillar says v2 too: the deployment records it, and the pin goes.
    manifest.record(p, {**CFG, "rev": "v2"}, "v2")
    assert manifest.intent(manifest.read(p)).pin is None


def test_a_failed_pin_is_put_back_as_it_was(tmp_path):
    p = p_of(tmp_path)
    manifest.record(p, CFG, "main")
    manifest.pin(p, "v1", "deployment.update_code")
    previous = manifest.pin(p, "v2", "deployment.update_code")
    manifest.restore_pin(p, previous)
    assert manifest.intent(manifest.read(p)).pin["value"] == "v1"


def test_holds_name_a_program_or_all_of_them(tmp_path):
    p = p_of(tmp_path)
    manifest.record(p, CFG, "main")
    manifest.hold(p, "w", "db maintenance", "deployment.hold")
    m = manifest.read(p)
    assert manifest.held(m, "w")["reason"] == "db maintenance" and manifest.held(m, "x") is None
    manifest.hold(p, None, "freeze", "deployment.hold")
    assert manifest.held(manifest.read(p), "x")["reason"] == "freeze"
    manifest.unhold(p)
    assert manifest.intent(manifest.read(p)).holds == {}


@pytest.mark.parametrize(
    ("served", "fleet", "expected"),
    [
        ({"release": A}, A, True),  # the commit the master resolved rev to
        ({"release": A}, B, False),  # the branch moved on
        ({"release": A}, None, False),  # nobody said what the branch is now: git decides
        ({"release": A, "rev": A}, None, True),  # a pinned commit
        ({"release": A, "repo": "/srv/other.git"}, A, False),
        ({"release": A, "requirements": "req/prod.txt"}, A, False),
        ({"release": A, "rebuild": 1}, A, False),  # a fresh venv was asked for since
        ({"release": None}, None, False),
    ],
)
def test_settled_means_nothing_to_resolve_and_nothing_to_build(served, fleet, expected):
    m = {**CFG, "venv": "1" * 16, **served}
    cfg = {**CFG, "rev": served.get("rev", "main")}
    assert manifest.settled(m, cfg, fleet) is expected


def test_the_grain_shows_only_public_facts():
    m = {**CFG, "release": A, "subject": "Fix", "user": "u", "updated": "t", "operator": {"rev": {"value": "x"}}}
    m["draining"] = {}
    public = {"rev": "main", "release": A, "subject": "Fix", "repo": "/srv/app.git", "user": "u", "updated": "t"}
    assert manifest.public(m) == public


# ----------------------------------------------------------------- sources


class Files:
    """A master's file server of a few files."""

    def __init__(self, files):
        self.files = files

    def listing(self, prefix):
        return [path for path in self.files if path.startswith(prefix)]

    def get(self, url):
        return self.files.get(url.removeprefix("salt://"), False)

    @staticmethod
    def render(text, context):
        return text.replace("{{ name }}", context["name"])


def sources(tmp_path, files, **spec):
    served = Files(files)
    master = utils.saltfleet_sources.master(served.listing, served.get, served.render)
    cfg = {**CFG, "user": "nobody", "context": {}, "env": {}, "programs": {}, "supervisord_conf": None, **spec}
    p = utils.saltfleet_paths.paths(str(tmp_path), "nobody", "app")
    return utils.saltfleet_sources.deployment(master, cfg, p, A, "1" * 16)


def test_a_deployment_takes_its_template_and_its_sysfiles_rendered(tmp_path):
    sections, files = sources(
        tmp_path,
        {
            "deployments/app/files/supervisord.conf.jinja": "[program:w]\ncommand=run {{ name }}\n",
            "deployments/app/sysfiles/etc/cron.d/app.jinja": "# {{ name }}\n",
        },
    )
    assert sections == {"program:w": {"command": "run app"}}
    assert files == {"etc/cron.d/app": b"# app\n"}


def test_a_program_in_pillar_and_the_template_is_refused_and_nothing_is_an_error(tmp_path):
    with pytest.raises(CommandExecutionError, match=r"^deployments:app:programs:w: also defined in salt://"):
        sources(
            tmp_path,
            {"deployments/app/files/supervisord.conf": "[program:w]\ncommand=x\n"},
            programs={"w": {"command": "y"}},
        )
    with pytest.raises(CommandExecutionError, match=r"^deployments:app:programs: the deployment runs nothing"):
        sources(tmp_path, {})
    with pytest.raises(CommandExecutionError, match=r"^deployments:app:supervisord_conf: salt://x.conf not found"):
        sources(tmp_path, {}, supervisord_conf="salt://x.conf")


# ---------------------------------------------------------------- sysfiles


def test_sysfiles_cron_would_ignore_or_that_leave_the_root_are_refused(tmp_path):
    check = utils.saltfleet_sysfiles.check
    files = {"etc/cron.d/app.daily": b"x", "../etc/passwd": b"x", "etc/cron.d/app-ok": b"x"}
    errors = check("app", files, str(tmp_path))
    assert errors == [
        "deployments:app:sysfiles: ../etc/passwd is not a path under the host's root; rename it",
        "deployments:app:sysfiles: etc/cron.d/app.daily would be ignored by cron (names may hold only letters, "
        "digits, '-' and '_'); rename it",
    ]
    utils.saltfleet_sysfiles.apply("other", {"etc/cron.d/app-ok": b"y"}, str(tmp_path))
    assert check("app", {"etc/cron.d/app-ok": b"x"}, str(tmp_path)) == [
        "deployments:app:sysfiles: etc/cron.d/app-ok is already installed by 'other'; rename one of them"
    ]


# ------------------------------------------------------------------ celery

celery = utils.saltfleet_celery


@pytest.mark.parametrize(
    ("command", "found"),
    [
        ("celery -A app worker -Q a,b -c 2", {"app": "app", "queues": ["a", "b"], "hostname": "celery@%%h"}),
        ("venv/bin/celery --app=app worker --queues=a -n w@%%h", {"app": "app", "queues": ["a"], "hostname": "w@%%h"}),
        ("celery -Aproj worker", {"app": "proj", "queues": ["celery"], "hostname": "celery@%%h"}),
        ("celery -A app beat", None),
        ("python worker.py", None),
        ("celery worker -Q a", None),
        ('celery -A app worker "unterminated', None),
    ],
)
def test_celery_workers_are_known_by_their_command_line(command, found):
    workers = celery.workers_in({"program:w": {"command": command}})
    if found is None:
        assert workers == {}
    else:
        assert {k: workers["w"][k] for k in found} == found


def test_each_generation_gives_its_workers_node_names_of_its_own():
    sections = {"program:w": {"command": "celery -A app worker -Q a -n fetch@%%h"}, "program:x": {"command": "sleep 1"}}
    workers = celery.per_generation(sections, "3")
    assert sections["program:w"]["command"] == "celery -A app worker -Q a -n fetch.g3@%%h"
    assert sections["program:x"]["command"] == "sleep 1"
    nodes = celery.nodes("w", workers["w"])
    assert len(nodes) == 1 and nodes[0].startswith("fetch.g3@") and "%" not in nodes[0]
    default = celery.per_generation({"program:y": {"command": "celery -A app worker", "numprocs": 2}}, "1")
    assert [n.split("@")[0] for n in celery.nodes("y", default["y"])] == ["y.g1", "y.g1"]


# --------------------------------------------------------------------- git

git = utils.saltfleet_git


def test_a_rev_is_a_branch_a_tag_peeled_or_not_or_a_full_ref():
    refs = {
        "refs/heads/main": A,
        "refs/tags/v1": B,
        "refs/tags/v2": "c" * 40,
        "refs/tags/v2^{}": "d" * 40,
        "HEAD": "e" * 40,
    }
    assert git.resolve_remote("main", refs) == A
    assert git.resolve_remote("v1", refs) == B
    assert git.resolve_remote("v2", refs) == "d" * 40, "an annotated tag is the commit it names"
    assert git.resolve_remote("HEAD", refs) == "e" * 40
    assert git.resolve_remote("nope", refs) is None


def test_git_errors_name_the_key_to_fix():
    cfg = {"name": "app", "repo": "git@example.com:app.git"}
    stderr = (
        "@@@@@@@@@@@\nWARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!\n@@@@@@@@@@@\n"
        "The fingerprint for the ED25519 key sent by the remote host is\nSHA256:abc.\nHost key verification failed.\n"
    )
    assert git.explain(stderr, "fetch", cfg).startswith(
        "deployments:app:known_hosts: the SSH host key of git@example.com:app.git does not match"
    )
    assert git.explain("fatal: repository not found\n", "ls-remote", cfg) == (
        "deployments:app:repo: git ls-remote of git@example.com:app.git failed: fatal: repository not found"
    )
