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
