"""
`make bench`: saltfleet against Salt's built-in states and the raw shell floor.

Every scenario runs in this one process, on this machine, with the sample app
(examples/sample-app) in a bare git repository of its own and the repository's
warm uv cache (.cache/uv). Sandboxes, configs and daemons live under a short
temporary directory in /tmp (supervisord's unix sockets must stay under 108
bytes); results go to .bench/ (git-ignored).
"""
