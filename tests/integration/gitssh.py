"""
A real SSH git server for tests: asyncssh on 127.0.0.1 in its own thread and
event loop, one generated host key, one authorized key (a deploy key) for one
user, and nothing but ``git-upload-pack '<repo>'`` of one bare repository,
served by the real git-upload-pack. Every other command, user, key, shell,
subsystem or forwarding is refused.

While it serves a fetch it snapshots every process's argv and environment
(/proc), so a test can see what the client side's processes carried while
the deploy key was in use.
"""

import asyncio
import contextlib
import os
import re
import threading
from pathlib import Path

import asyncssh

UPLOAD_PACK_RE = re.compile(r"^git-upload-pack '([^']+)'$")


def generate_key():
    return asyncssh.generate_private_key("ssh-ed25519")


def private_text(key):
    """The OpenSSH private key text, as an operator pastes it into pillar."""
    return key.export_private_key("openssh").decode()


def public_line(key):
    return key.export_public_key("openssh").decode().strip()


def secret_fragments(key_text, other_text):
    """
    The base64 lines of a private key that another key of the same type does
    not share: the lines that carry this key's secret, none of the fixed
    header that every OpenSSH key file starts with.
    """

    def body(text):
        return [line for line in text.strip().splitlines() if line and not line.startswith("-----")]

    common = set(body(other_text))
    fragments = [line for line in body(key_text) if line not in common]
    assert fragments, "no line distinguishes the key"
    return fragments


def process_table():
    """Every process's pid, argv and environment, as /proc shows them now."""
    table = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile, or a kernel thread
        except PermissionError:
            # Only the machine's init may hide from root here; a test checks that nothing else did.
            table.append({"pid": int(entry.name), "argv": None, "environ": None})
            continue
        table.append(
            {
                "pid": int(entry.name),
                "argv": [a.decode(errors="replace") for a in argv.split(b"\0") if a],
                "environ": [e.decode(errors="replace") for e in environ.split(b"\0") if e],
            }
        )
    return table


class _Server(asyncssh.SSHServer):
    def __init__(self, owner):
        self._owner = owner
        self._user = None

    def begin_auth(self, username):
        self._user = username
        return True

    def password_auth_supported(self):
        return False

    def kbdint_auth_supported(self):
        return False

    def host_based_auth_supported(self):
        return False

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        ok = username == self._owner.user and key.public_data == self._owner.authorized.public_data
        self._owner.auth_attempts.append({"user": username, "key": key.get_fingerprint(), "accepted": ok})
        return ok


class GitSSHServer:
    """Serve `repo` over SSH to `user` holding `authorized` (a public key)."""

    def __init__(self, repo, authorized, user="git"):
        self.repo = Path(repo).resolve()
        self.authorized = authorized
        self.user = user
        self.host_key = generate_key()
        self.port = None
        self.served = []  # upload-pack commands served, with the process table at that moment
        self.refused = []  # commands refused
        self.auth_attempts = []
        self._loop = None
        self._server = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None

    @property
    def url(self):
        return f"ssh://{self.user}@127.0.0.1:{self.port}{self.repo}"

    @property
    def known_hosts(self):
        """The pinned line an operator would check in: this server's real host key."""
        return f"[127.0.0.1]:{self.port} {public_line(self.host_key)}"

    def start(self):
        self._thread = threading.Thread(target=self._run, name="git-ssh-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the SSH git server did not start")
        if self._error:
            raise self._error
        return self

    def stop(self):
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _run(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncssh.create_server(
                    lambda: _Server(self),
                    "127.0.0.1",
                    0,
                    server_host_keys=[self.host_key],
                    process_factory=self._handle,
                    encoding=None,
                    allow_pty=False,
                    agent_forwarding=False,
                    x11_forwarding=False,
                    allow_scp=False,
                    sftp_factory=None,
                    password_auth=False,
                    kbdint_auth=False,
                )
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except Exception as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _handle(self, process):
        command = process.command
        match = UPLOAD_PACK_RE.match(command or "")
        if not match or Path(match.group(1)).resolve() != self.repo:
            self.refused.append(command)
            process.stderr.write(b"this server serves only git-upload-pack of one repository\n")
            process.exit(1)
            return
        self.served.append({"command": command, "processes": process_table()})
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
        protocol = (process.env or {}).get("GIT_PROTOCOL")
        if protocol:
            env["GIT_PROTOCOL"] = protocol.decode() if isinstance(protocol, bytes) else protocol
        proc = await asyncio.create_subprocess_exec(
            "git-upload-pack",
            str(self.repo),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )

        async def feed():
            try:
                while True:
                    data = await process.stdin.read(65536)
                    if not data:
                        break
                    proc.stdin.write(data)
                    await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError, asyncssh.Error):
                pass
            finally:
                with contextlib.suppress(Exception):
                    proc.stdin.close()

        async def drain(reader, writer):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                writer.write(data)
                with contextlib.suppress(Exception):
                    await writer.drain()

        feeder = asyncio.ensure_future(feed())
        try:
            await asyncio.gather(drain(proc.stdout, process.stdout), drain(proc.stderr, process.stderr))
            code = await proc.wait()
        finally:
            feeder.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        process.exit(code)
