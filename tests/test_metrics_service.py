"""--metrics wired into the service: scrapes work, and the endpoint is off the proxy path."""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from aproxy import ProxyConfig, makeService


def fetch(port: int, request: bytes) -> bytes:
    """Send C{request} to 127.0.0.1:C{port} and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


class MetricsServiceTests(TestCase):
    """makeService with metrics listens on a second endpoint for /metrics and /status."""

    timeout = 30

    @inlineCallbacks
    def test_metrics_endpoint(self) -> Generator[Any, Any, None]:
        """/metrics counts proxied requests; asking the proxy for it is refused as a loop."""
        service = makeService(
            ProxyConfig(port=("tcp:0:interface=127.0.0.1",), metrics="tcp:0:interface=127.0.0.1"),
            reactor,
        )
        service.startService()
        self.addCleanup(service.stopService)
        proxy_port, metrics_port = (child.port.getHost().port for child in service)  # type: ignore[attr-defined]
        # A request to the metrics port through the proxy: the proxy's own address.
        looped = yield deferToThread(
            fetch,
            proxy_port,
            b"GET http://127.0.0.1:%d/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            % metrics_port,
        )
        self.assertTrue(looped.startswith(b"HTTP/1.1 403 "), looped)
        self.assertIn(b"proxy_loop_detected", looped)
        scraped = yield deferToThread(
            fetch, metrics_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        head, _, body = scraped.partition(b"\r\n\r\n")
        self.assertIn(b"200", head.split(b"\r\n")[0])
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        [sample] = [
            s for s in families["aproxy_requests"].samples if s.name == "aproxy_requests_total"
        ]
        self.assertEqual((sample.labels["status_class"], sample.value), ("4xx", 1.0))
        status = yield deferToThread(
            fetch, metrics_port, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"<svg", status)
