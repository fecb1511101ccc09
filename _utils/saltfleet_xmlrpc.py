"""
XML-RPC to a deployment's supervisord over its unix socket, as supervisorctl
talks to it (what is called is saltfleet_supervisor's).

Root talks there only after the kernel confirmed (SO_PEERCRED) that whoever
listens runs as the deployment's user: a socket the user swaps for a link to
someone else's is refused, never followed. What answers is the user's
process, so every answer is hostile input: each call has one deadline for the
whole exchange (not per read) and a bound on what it reads, and anything
that is not the HTTP and XML-RPC supervisord gives fails the call with an
error naming the socket, never a traceback. An error quotes an answer
through :func:`said`: the deployment's secrets hidden first
(``saltfleet_user.scrub``, under the caller's ``saltfleet_user.hiding``), then cut.
"""

import http.client
import os
import socket
import stat
import struct
import time
import xml.parsers.expat
import xmlrpc.client
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_xmlrpc"

# Every XML-RPC call returns within this, or the deployment's change fails.
RPC_TIMEOUT = 10
# The most an answer may hold (a process list of a few hundred programs is far less).
RPC_LIMIT = 1 << 20


def __virtual__():
    return __virtualname__


def said(value, most=200):
    """
    What the user's side answered, quoted for an error: the deployment's
    secrets hidden in each of its strings first (``saltfleet_user.scrub``),
    then the whole quoted and cut to ``most`` characters (a value escaped or
    cut first could no longer be found whole).
    """
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    scrub = loader.pack.get("__utils__", loader)["saltfleet_user.scrub"]

    def hidden(item):
        if isinstance(item, str):
            return scrub(item)
        if isinstance(item, xmlrpc.client.DateTime):
            return scrub(item.value)
        if isinstance(item, dict):
            return {hidden(key): hidden(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [hidden(inner) for inner in item]
        return item

    try:
        text = repr(hidden(value))
    except RecursionError:
        return f"a {type(value).__name__} nested too deep to show"
    most = max(most, 9)
    return text if len(text) <= most else f"{text[: most // 2 - 2]}...{text[-(most // 2 - 1) :]}"


# Nothing listens there, or a supervisord going away hung up.
NOBODY_THERE = (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, FileNotFoundError)


class _Overlong(OSError):
    """An answer longer than RPC_LIMIT."""


class _Unlike(ValueError):
    """An answer that is not what supervisord gives (its shape, its encoding)."""


def _open_socket(sock, uid):
    """
    The socket file ``sock`` (in the user's run/) opened without following
    anything the user made: a link there is refused, never resolved by root.
    Returns an O_PATH descriptor, connectable through /proc/self/fd.
    """
    sock = Path(sock)
    folder = os.open(sock.parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(sock.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    finally:
        os.close(folder)
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode) or (uid is not None and st.st_uid != uid):
        os.close(fd)
        raise PermissionError(f"{sock} is not the deployment's user's socket (a link, or someone else's)")
    return fd


def _exchange(sock, uid, deadline, body):
    """
    One HTTP request to supervisord on ``sock``, and its whole answer, within
    ``deadline`` (one for the exchange, not one per read) and RPC_LIMIT bytes;
    the listener must be ``uid`` (the kernel's word, SO_PEERCRED).
    """
    fd = _open_socket(sock, uid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:

            def left():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("deadline")
                conn.settimeout(remaining)

            left()
            conn.connect(f"/proc/self/fd/{fd}")
            _, listener, _ = peer(conn)
            if uid is not None and listener != uid:
                raise PermissionError(f"{sock} is served by uid {listener}, not the deployment's user")
            head = f"POST /RPC2 HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}"
            head += "\r\n\r\n"
            left()
            conn.sendall(head.encode() + body)
            answer = bytearray()
            while True:
                left()
                chunk = conn.recv(65536)
                if not chunk and not answer:
                    # Closed without a word: a supervisord going away, as when nobody listens.
                    raise ConnectionResetError(f"{sock} closed without an answer")
                if not chunk:
                    return bytes(answer)
                answer += chunk
                if len(answer) > RPC_LIMIT:
                    raise _Overlong("answer too long")
    finally:
        os.close(fd)


def _response(answer):
    """The XML-RPC body of an HTTP answer, as supervisord gives it: 200, no content encoding."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not sep or not lines[0].startswith("HTTP/1.") or lines[0].split(" ")[1:2] != ["200"]:
        # Quoted as the sender wrote it (UTF-8): a secret is looked for in what it was.
        status = head.split(b"\r\n")[0].decode(errors="replace")
        raise _Unlike(f"an HTTP status {said(status)}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("content-encoding", "identity") != "identity":
        encoding = headers["content-encoding"].encode("latin-1").decode(errors="replace")
        raise _Unlike(f"a body encoded {said(encoding, 30)}")
    return body


def call_within(sock, uid, deadline, method, *args):
    """One XML-RPC call to ``supervisor.<method>`` before ``deadline``: its answer, or an error."""
    try:
        body = xmlrpc.client.dumps(args, f"supervisor.{method}", allow_none=True).encode()
        (value,), _ = xmlrpc.client.loads(_response(_exchange(sock, uid, deadline, body)))
        return value
    except (xmlrpc.client.Fault, *NOBODY_THERE):
        raise
    except _Unlike as exc:
        raise CommandExecutionError(f"supervisord on {sock} answered {exc}, which it never gives") from None
    except (OSError, http.client.HTTPException) as exc:
        raise failed(sock, exc) from None
    except Exception as exc:  # pylint: disable=broad-except
        # Anything the parser makes of the user's bytes (broken XML, depth, types): not supervisord's. Only
        # expat's words are quoted (where the XML broke): the others quote the bytes, cut before any scrub.
        where = f": {exc}" if isinstance(exc, xml.parsers.expat.ExpatError) else ""
        raise CommandExecutionError(
            f"supervisord on {sock} answered what it never gives ({type(exc).__name__}{where})"
        ) from None


class _Server:
    """supervisord's ``supervisor`` namespace on one socket, every call within one deadline."""

    def __init__(self, sock, uid, deadline):
        self.sock, self.uid, self.deadline = sock, uid, deadline

    def __getattr__(self, method):
        return lambda *args: call_within(self.sock, self.uid, self.deadline, method, *args)


def peer(sock):
    """(pid, uid, gid) the process that listens on a connected unix socket had when it began to listen."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def rpc(sock, uid, timeout=RPC_TIMEOUT):
    """supervisord's XML-RPC ``supervisor`` namespace on ``sock``, served by ``uid``: its calls within ``timeout``."""
    return _Server(sock, uid, time.monotonic() + timeout)


def failed(sock, exc):
    """The clear error for ``exc``, raised by a call to the supervisord on ``sock``."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return CommandExecutionError(f"supervisord on {sock} did not answer within {RPC_TIMEOUT} s")
    if isinstance(exc, _Overlong):
        return CommandExecutionError(f"supervisord on {sock} answered more than {RPC_LIMIT} bytes; refused")
    if isinstance(exc, PermissionError):
        return CommandExecutionError(f"{exc}: root talks to no one else there; move it away")
    if isinstance(exc, xmlrpc.client.Fault):
        return CommandExecutionError(f"supervisord on {sock} refused: {said(exc.faultString)}")
    return CommandExecutionError(f"supervisord on {sock} did not answer: {said(str(exc))}")


def call(sock, uid, method, *args):
    """One XML-RPC call; a clear error when supervisord refuses, does not answer in time, or is not there."""
    try:
        return getattr(rpc(sock, uid), method)(*args)
    except (xmlrpc.client.Fault, *NOBODY_THERE) as exc:
        raise failed(sock, exc) from None


def ask(sock, uid, *calls):
    """
    The answers to ``calls`` (each ``(method, *args)``) within one deadline;
    None when nothing listens on ``sock`` or supervisord refuses (a fault).
    An error when something listens but does not answer in time, is not the
    user's, or answers what supervisord never gives.
    """
    server = rpc(sock, uid)
    try:
        return [getattr(server, method)(*args) for method, *args in calls]
    except (xmlrpc.client.Fault, *NOBODY_THERE):
        return None
