"""
A C{unix:} listener over a real unix socket in a temporary directory.

Its clients have no address, so C{--allow}, the per-address limits and the login throttle
can't apply there (the socket file's permissions decide who may connect); what must still
hold is C{--auth} and the global limit, C{--max-connections}.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import tempfile
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from aproxy import ProxyConfig, makeService
from tests.hashes import SHA1
from tests.origin import Origin
from tests.tracking import ConnectionTracking

TIMEOUT = 20.0


def _read_response(sock: socket.socket) -> bytes:
    """Read one response with a Content-Length body (or until close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class UnixListenerTests(ConnectionTracking, TestCase):
    """--auth and --max-connections on a unix: listener, through a real unix socket."""

    timeout = 30

    @inlineCallbacks
    def start(self, **settings: Any) -> Generator[Any, Any, tuple[str, int]]:
        """
        Start an origin and a proxy on a unix socket; return the socket path and the
        origin's port. C{self.clients} lists the client connections the proxy accepted.
        """
        origin = Origin()
        self.track(origin)
        oport = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(origin)
        self.addCleanup(oport.stopListening)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "aproxy.sock")
        service = makeService(ProxyConfig(port=(f"unix:{path}:mode=600",), **settings), reactor)
        self.clients = self.track(service.factory)  # type: ignore[attr-defined]
        self.track(service.factory.upstream_factory)  # type: ignore[attr-defined]
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return path, oport.getHost().port

    @staticmethod
    def request(path: str, oport: int, extra: bytes = b"") -> bytes:
        """One request on a new connection to the unix socket; the response."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            sock.sendall(
                b"GET http://127.0.0.1:%d/u HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s"
                b"Connection: close\r\n\r\n" % (oport, oport, extra)
            )
            return _read_response(sock)

    @inlineCallbacks
    def test_auth_applies(self) -> Generator[Any, Any, None]:
        """Without credentials a unix-socket client gets 407; with valid ones, served."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        htpasswd = os.path.join(tmp, "htpasswd")
        with open(htpasswd, "w") as f:
            f.write(f"erin:{SHA1}\n")
        path, oport = yield self.start(auth=htpasswd)
        denied = yield deferToThread(self.request, path, oport)
        self.assertTrue(denied.startswith(b"HTTP/1.1 407 "), denied)
        self.assertIn(b"Proxy-Authenticate: Basic", denied)
        wrong = b"Basic " + base64.b64encode(b"erin:wrong")
        denied = yield deferToThread(
            self.request, path, oport, b"Proxy-Authorization: " + wrong + b"\r\n"
        )
        self.assertTrue(denied.startswith(b"HTTP/1.1 407 "), denied)
        good = b"Basic " + base64.b64encode(b"erin:erin-secret")
        served = yield deferToThread(
            self.request, path, oport, b"Proxy-Authorization: " + good + b"\r\n"
        )
        self.assertTrue(served.startswith(b"HTTP/1.1 200 "), served)

    @inlineCallbacks
    def test_max_connections_applies(self) -> Generator[Any, Any, None]:
        """Past --max-connections a unix-socket client gets 503; after one leaves, served."""
        path, oport = yield self.start(max_connections=1)
        first = socket.socket(socket.AF_UNIX)
        self.addCleanup(first.close)
        first.settimeout(TIMEOUT)
        yield deferToThread(first.connect, path)
        # The proxy has taken the first connection once it answers a request on it.
        first.sendall(b"GET http://127.0.0.1:%d/a HTTP/1.1\r\nHost: x\r\n\r\n" % oport)
        answer = yield deferToThread(_read_response, first)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        refused = yield deferToThread(self.request, path, oport)
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "), refused)
        # The proxy frees the slot once it sees the first client's close.
        gone: Deferred[None] = Deferred()
        proto = self.clients[0]
        lost = proto.connectionLost

        def connection_lost(reason: Failure) -> None:
            lost(reason)
            gone.callback(None)

        proto.connectionLost = connection_lost  # type: ignore[method-assign, assignment]
        first.close()
        yield gone
        served = yield deferToThread(self.request, path, oport)
        self.assertTrue(served.startswith(b"HTTP/1.1 200 "), served)
