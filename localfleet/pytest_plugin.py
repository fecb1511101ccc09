"""
A pytest plugin for test runs that import Salt (pyproject.toml's addopts load it).

Importing Salt, when nothing has configured logging yet, gives the root logger
a temporary handler (salt._logging's DeferredStreamHandler) that queues every
WARNING record and writes the queue to the sys.stderr of that moment when the
process exits. In a pytest run that stream is pytest's capture file, closed by
the time the process exits, so each queued record then prints a "--- Logging
error --- ... ValueError: I/O operation on closed file" block after pytest's
summary. The records are plenty: salt-factories' log server hands this process
every record of the daemons it starts.

pytest already captures log records and reports them with each test (its
``log_level``), as for any other library: the temporary handler is removed once
pytest is configured, and Salt's records go only there.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    import salt._logging

    salt._logging.shutdown_temp_handler()
