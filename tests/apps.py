"""
The apps deployments run in tests, in real git repositories: the sample
Celery app (integration tests) and a tiny app whose programs only report
which release runs them (functional tests), and a client that sends the
Celery app tasks.
"""

import re
import shutil
import uuid
from pathlib import Path

import git

from localfleet.sampleapp import SAMPLE_APP, celery_app

TINY_APP = Path(__file__).resolve().parent / "fixtures" / "tiny-app"


def commit(work, message, tag=None):
    repo = git.Repo(work)
    repo.git.add(A=True)
    repo.index.commit(message, author=git.Actor("saltfleet tests", "tests@saltfleet.invalid"))
    if tag:
        repo.create_tag(tag)
    return repo.head.commit.hexsha


def sample_repo(base):
    """
    A bare repo of the sample app with these revisions:
    v1 (tag), v2 (tag, master: VERSION 2), branch broken-reqs (a requirement
    that cannot install), branch crashing (the app fails at import).
    Returns (bare repo path, {name: sha}).
    """
    work = Path(base) / "sample-app"
    shutil.copytree(SAMPLE_APP, work)
    repo = git.Repo.init(work, initial_branch="master")
    shas = {"v1": commit(work, "sample app v1", tag="v1")}
    app = work / "sampleapp.py"
    app.write_text(app.read_text().replace('VERSION = "1"', 'VERSION = "2"'))
    shas["v2"] = commit(work, "sample app v2", tag="v2")
    repo.git.checkout("-b", "broken-reqs")
    (work / "requirements.txt").write_text("celery==5.7.0\nsaltfleet-no-such-package==0.0.1\n")
    shas["broken-reqs"] = commit(work, "a requirement that does not exist")
    repo.git.checkout("master")
    repo.git.checkout("-b", "crashing")
    app.write_text(app.read_text() + '\nraise RuntimeError("this release cannot start")\n')
    shas["crashing"] = commit(work, "a release whose workers die at start")
    repo.git.checkout("master")
    bare = Path(base) / "sample-app.git"
    repo.clone(bare, bare=True)
    return bare, shas


def tiny_repo(base):
    """
    A bare repo of the tiny app with: v1, v2, v3 (tags; master is v3, each a
    new VERSION), and branches include-reqs (requirements.txt includes
    base.txt), broken-reqs (a requirement that cannot install), crashing (the
    app exits at start), link-reqs (requirements.txt is a symlink to a file
    outside the repository), escaping-reqs (it includes /etc/shadow).
    Returns (bare repo path, {name: sha}).
    """
    work = Path(base) / "tiny-app"
    shutil.copytree(TINY_APP, work)
    repo = git.Repo.init(work, initial_branch="master")
    app = work / "app.py"
    shas = {}
    for version in ("1", "2", "3"):
        app.write_text(re.sub(r'VERSION = "\d+"', f'VERSION = "{version}"', app.read_text()))
        shas[f"v{version}"] = commit(work, f"tiny app v{version}", tag=f"v{version}")
    branches = {
        "include-reqs": {"requirements.txt": "-r base.txt\n", "base.txt": "# nothing to install\n"},
        "broken-reqs": {"requirements.txt": "saltfleet-no-such-package==0.0.1\n"},
        "crashing": {"app.py": app.read_text().replace("def main():", "def main():\n    sys.exit(3)")},
        "escaping-reqs": {"requirements.txt": "-r /etc/shadow\n"},
    }
    for branch, files in branches.items():
        repo.git.checkout("-b", branch, "master")
        for name, text in files.items():
            (work / name).write_text(text)
        shas[branch] = commit(work, branch)
    repo.git.checkout("-b", "link-reqs", "master")
    (work / "requirements.txt").unlink()
    (work / "requirements.txt").symlink_to("/etc/shadow")
    shas["link-reqs"] = commit(work, "link-reqs")
    repo.git.checkout("master")
    bare = Path(base) / "tiny-app.git"
    repo.clone(bare, bare=True)
    return bare, shas


def celery_client(data_dir, broker=None):
    """The sample app, loaded afresh, its data in ``data_dir`` and its broker there too unless ``broker`` says."""
    return celery_app(data_dir, broker)


def run_task(app, queue, seconds=0, timeout=60):
    """Send sampleapp.fetch to queue and wait for its result."""
    return app.send_task("sampleapp.fetch", args=(queue, seconds), queue=queue).get(timeout=timeout)


def advance(bare, branch="master"):
    """A new commit on ``branch`` of a bare repository (someone pushing): its VERSION bumped; returns the SHA."""
    work = Path(bare).parent / f"push-{uuid.uuid4().hex[:8]}"
    repo = git.Repo.clone_from(str(bare), work, branch=branch)
    app = next(p for p in (work / "app.py", work / "sampleapp.py") if p.exists())
    app.write_text(re.sub(r'VERSION = "(\d+)"', lambda m: f'VERSION = "{int(m.group(1)) + 100}"', app.read_text()))
    sha = commit(work, "a push in the middle of a rollout")
    repo.remote().push(branch)
    shutil.rmtree(work, ignore_errors=True)
    return sha
