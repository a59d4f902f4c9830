"""
Shared harness for the protocol-level tests (no test cases of its own): the request and
response constants, L{ProxyTestCase} (a L{ProxyFactory} on a fake clock and a recording
connector, with one client connection on a L{StringTransport}), C{Proxy-Authorization}
helpers, an L{Exchange} record builder and a reactor that records spawned workers. Test
modules import shared code from here, from L{aproxy.testing} (the recording connector and
its transports) and from the other support modules (L{tests.fakes}, L{tests.hashes},
L{tests.loopback}, L{tests.tunnels}, L{tests.tlsharness}), never from each other
(L{tests.test_public_api} checks).
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from aproxy.client.factory import ProxyFactory
from aproxy.client.protocol import ProxyProtocol
from aproxy.config import ProxyConfig
from aproxy.observe.records import Exchange
from aproxy.testing import Attempt, HalfCloseTransport, RecordingConnector

GET_A = b"GET http://a.example/x?y=%20 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t\r\n\r\n"
GET_B = b"GET http://b.example:8080/ HTTP/1.1\r\nHost: b.example\r\n\r\n"
OK_5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class ProxyTestCase(SynchronousTestCase):
    """Builds a factory with a fake clock and connector, and one client connection."""

    config = ProxyConfig()

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.connector = RecordingConnector()
        self.factory = ProxyFactory(self.config, self.clock, self.connector)
        # Exact Via values in assertions: drop the random loop marker (tested on its own).
        self.factory.via = b"aproxy" if self.config.via else None
        self.client, self.proto = self.connect_client()

    def connect_client(self) -> tuple[HalfCloseTransport, ProxyProtocol]:
        """A new client connection to the proxy."""
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        proto.makeConnection(client)
        return client, proto

    def forward(self, request: bytes = GET_A) -> tuple[Attempt, HalfCloseTransport]:
        """Send C{request}, complete the dial it causes and return the attempt and transport."""
        self.proto.dataReceived(request)
        attempt = self.connector.attempts[-1]
        return attempt, attempt.succeed()

    def capture_log(self) -> EventLoggingObserver:
        """Collect the log events of this test (registered by hand: createWithCleanup is
        annotated for the asynchronous TestCase only)."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        return events

    def take(self, transport: StringTransport) -> bytes:
        """Everything written to C{transport} since the last call."""
        value: bytes = transport.value()
        transport.clear()
        return value


def basic(user: str | bytes, password: str | bytes, scheme: bytes = b"Basic") -> bytes:
    """A C{Proxy-Authorization} value for C{user} and C{password} (str as UTF-8)."""
    raw_user = user.encode("utf-8") if isinstance(user, str) else user
    raw_password = password.encode("utf-8") if isinstance(password, str) else password
    return scheme + b" " + base64.b64encode(raw_user + b":" + raw_password)


def with_auth(request: bytes, credentials: bytes) -> bytes:
    """Insert a Proxy-Authorization field into C{request}."""
    line, rest = request.split(b"\r\n", 1)
    return line + b"\r\nProxy-Authorization: " + credentials + b"\r\n" + rest


def exchange(**fields: Any) -> Exchange:
    """An L{Exchange} with plausible defaults for the fields not given."""
    values: dict[str, Any] = {
        "time": 0.0,
        "client": "127.0.0.1",
        "user": None,
        "method": "GET",
        "target": "http://a.example/",
        "status": 200,
        "bytes_to_client": 100,
        "bytes_to_origin": 50,
        "duration": 0.02,
        "upstream": "direct",
        "error": None,
    }
    values.update(fields)
    return Exchange(**values)


class FakeProcess:
    """The transport of a worker that was not really started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:  # noqa: N802
        """Remember the signal."""
        self.signals.append(signum)


class SpawningReactor(MemoryReactorClock):
    """A memory reactor that records the processes it is asked to start."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str]]] = []
        self.child_fds: list[dict[int, Any]] = []

    def spawnProcess(  # noqa: N802
        self, protocol: Any, executable: str, args: list[str], *a: Any, **kw: Any
    ) -> FakeProcess:
        """Record the worker and its arguments; give it a fake transport."""
        transport = FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args))
        self.child_fds.append(kw.get("childFDs", {}))
        return transport
