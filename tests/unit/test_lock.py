"""The per-deployment lock on a host: a second caller waits a bounded time, then fails naming the holder."""

import multiprocessing
import os
import time

import pytest
from salt.exceptions import CommandExecutionError

from localfleet.config import saltfleet_utils

files = saltfleet_utils().saltfleet_files
FORK = multiprocessing.get_context("fork")


def test_a_second_caller_waits_then_fails_naming_the_holder(tmp_path):
    path = tmp_path / "lock"
    with files.lock(path, "state deployment.present tiny"):
        started = time.monotonic()
        with pytest.raises(CommandExecutionError) as error, files.lock(path, "deployment.restart tiny", timeout=0.5):
            pass
        assert time.monotonic() - started >= 0.5
    message = str(error.value)
    holder = f"state deployment.present tiny (pid {os.getpid()}, since "
    assert message.startswith(f"deployment.restart tiny: waited 0.5 s for {holder}"), message
    assert message.endswith("to finish; retry when it is done")


def test_the_lock_is_free_again_once_its_holder_dies(tmp_path):
    path = tmp_path / "lock"
    held, done = FORK.Event(), FORK.Event()

    def hold():
        with files.lock(path, "state deployment.present tiny"):
            held.set()
            done.wait(30)

    child = FORK.Process(target=hold)
    child.start()
    assert held.wait(30)
    child.kill()
    child.join(30)
    with files.lock(path, "deployment.restart tiny", timeout=1):
        pass


def holding(path, holder, shared, held, done):
    with files.lock(path, holder, shared=shared):
        held.set()
        done.wait(30)


def hold_in_child(path, holder, shared=False):
    """A child process that holds the lock until the returned event is set."""
    held, done = FORK.Event(), FORK.Event()
    child = FORK.Process(target=holding, args=(path, holder, shared, held, done))
    child.start()
    assert held.wait(30)
    return child, done


def test_readers_share_the_lock_and_leave_the_holder_record_alone(tmp_path):
    path = tmp_path / "lock"
    with files.lock(path, "state deployment.present tiny"):
        pass
    child, done = hold_in_child(path, "dry run tiny", shared=True)
    try:
        # A second reader gets in at once: dry runs do not wait for each other.
        with files.lock(path, "another dry run", timeout=0.2, shared=True):
            assert path.read_text() == ""
    finally:
        done.set()
        child.join(30)


def test_a_change_waits_for_a_reader_and_a_reader_for_a_change(tmp_path):
    path = tmp_path / "lock"
    with files.lock(path, "state deployment.present tiny"):
        pass
    reader, reader_done = hold_in_child(path, "dry run tiny", shared=True)
    try:
        with pytest.raises(CommandExecutionError, match=r"^deployment.restart tiny: waited 0.2 s for another change"):
            with files.lock(path, "deployment.restart tiny", timeout=0.2):
                pass
    finally:
        reader_done.set()
        reader.join(30)
    writer, writer_done = hold_in_child(path, "state deployment.present tiny")
    try:
        with pytest.raises(CommandExecutionError, match=r"waited 0.2 s for state deployment.present tiny \(pid"):
            with files.lock(path, "dry run tiny", timeout=0.2, shared=True):
                pass
    finally:
        writer_done.set()
        writer.join(30)
    with files.lock(path, "dry run tiny", timeout=1, shared=True):
        pass


def test_a_reader_never_creates_the_lock_file(tmp_path):
    with pytest.raises(FileNotFoundError), files.lock(tmp_path / "lock", "dry run tiny", shared=True):
        pass
    assert not (tmp_path / "lock").exists()
