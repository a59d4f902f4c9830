"""Access log formats and the buffered, rotatable log file."""

from __future__ import annotations

import calendar
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from aproxy.observe import accesslog
from aproxy.observe.accesslog import (
    FORMATS,
    AccessLog,
    AccessLogError,
    format_combined,
    format_json,
    format_squid,
)
from aproxy.observe.records import Exchange
from tests.processes import stop, twistd, wait_for_line

# 2026-11-26 17:44:19.123 UTC
T = calendar.timegm((2026, 11, 26, 17, 44, 19, 0, 0, 0)) + 0.123


def make(**kwargs: Any) -> Exchange:
    """An Exchange for a forwarded GET, with the given fields replaced."""
    fields: dict[str, Any] = {
        "time": T,
        "client": "127.0.0.1",
        "user": None,
        "method": "GET",
        "target": "http://a.example/x?y=%20",
        "status": 200,
        "bytes_to_client": 1234,
        "bytes_to_origin": 87,
        "duration": 0.25,
        "upstream": "direct",
        "error": None,
    }
    fields.update(kwargs)
    return Exchange(**fields)


GET = make()
CONNECT = make(
    method="CONNECT",
    target="example.com:443",
    bytes_to_client=45,
    bytes_to_origin=5,
    duration=12.5,
)
DENIED = make(status=407, bytes_to_client=300, bytes_to_origin=0, duration=0.001)
REFUSED = make(
    target="http://b.example:8080/",
    status=502,
    bytes_to_client=120,
    bytes_to_origin=0,
    duration=0.03,
    error="connection_refused",
)
WITH_USER = make(user="alice")
ODD_TARGET = make(target='http://a.example/"q\x01\xe9')


class CombinedTests(SynchronousTestCase):
    """The combined format is Apache's combined format followed by key=value extras."""

    def test_get(self) -> None:
        """A forwarded GET gives every combined field and the extras."""
        self.assertEqual(
            format_combined(GET),
            '127.0.0.1 - - [26/Nov/2026:17:44:19 +0000] "GET http://a.example/x?y=%20 HTTP/1.1"'
            ' 200 1234 "-" "-" bytes_to_origin=87 duration_ms=250 upstream=direct error=-\n',
        )

    def test_connect(self) -> None:
        """A tunnel is logged with its authority target and both byte counts."""
        line = format_combined(CONNECT)
        self.assertIn('"CONNECT example.com:443 HTTP/1.1" 200 45 "-" "-"', line)
        self.assertTrue(
            line.endswith(" bytes_to_origin=5 duration_ms=12500 upstream=direct error=-\n")
        )

    def test_denied_without_user(self) -> None:
        """A 407 has C{-} for the user and nothing sent to the origin."""
        line = format_combined(DENIED)
        self.assertTrue(line.startswith("127.0.0.1 - - ["))
        self.assertIn(" 407 300 ", line)
        self.assertIn(" bytes_to_origin=0 duration_ms=1 ", line)

    def test_error_type(self) -> None:
        """A 502 carries its RFC 9209 error type in the C{error} extra."""
        line = format_combined(REFUSED)
        self.assertIn('"GET http://b.example:8080/ HTTP/1.1" 502 120 ', line)
        self.assertTrue(line.endswith(" error=connection_refused\n"))

    def test_user(self) -> None:
        """An authenticated user goes in the third field."""
        self.assertTrue(format_combined(WITH_USER).startswith("127.0.0.1 - alice [26/Nov/2026:"))

    def test_user_with_space(self) -> None:
        """A user name cannot split the user field: spaces and quotes are escaped."""
        line = format_combined(make(user='a b"'))
        self.assertTrue(line.startswith("127.0.0.1 - a\\x20b\\x22 ["))

    def test_escaped_target(self) -> None:
        """Quotes, control and non-ASCII characters in the target become C{\\xHH}."""
        line = format_combined(ODD_TARGET)
        self.assertIn('"GET http://a.example/\\x22q\\x01\\xc3\\xa9 HTTP/1.1"', line)
        self.assertEqual(line.count('"'), 6)

    def test_client_left(self) -> None:
        """Status 0 (no response was sent) is logged as C{0}."""
        line = format_combined(make(status=0, bytes_to_client=0))
        self.assertIn(' HTTP/1.1" 0 0 "-" "-" ', line)

    def test_time_is_truncated_to_the_second(self) -> None:
        """The timestamp is the request's second in UTC, whatever the local zone."""
        line = format_combined(make(time=T + 0.8))
        self.assertIn("[26/Nov/2026:17:44:19 +0000]", line)


class CombinedRequestFieldsTests(SynchronousTestCase):
    """
    The combined format writes the client's HTTP version, Referer and User-Agent
    (issue 12 item 18), which GoAccess and AWStats read, escaped as Apache does.
    """

    def test_fields_written(self) -> None:
        """Version, referer and user agent appear where Apache's combined format has them."""
        line = format_combined(
            make(
                version="HTTP/1.0",
                fields=b"Referer: http://r.example/p?q=1\r\nUser-Agent: Mozilla/5.0 (X11)\r\n",
            )
        )
        self.assertEqual(
            line,
            '127.0.0.1 - - [26/Nov/2026:17:44:19 +0000] "GET http://a.example/x?y=%20 HTTP/1.0"'
            ' 200 1234 "http://r.example/p?q=1" "Mozilla/5.0 (X11)"'
            " bytes_to_origin=87 duration_ms=250 upstream=direct error=-\n",
        )

    def test_missing_and_empty(self) -> None:
        """A missing field is C{"-"}, an empty one C{""} (as Apache writes them)."""
        line = format_combined(make(fields=b"User-Agent:\r\n"))
        self.assertIn(' 1234 "-" "" ', line)

    def test_escaped(self) -> None:
        """Quotes, backslashes, control and non-ASCII bytes are \\xHH, the line stays one line."""
        line = format_combined(
            make(fields=b'User-Agent: a"b\\c\td caf\xc3\xa9 \xff\r\nReferer: "-" x\r\n')
        )
        self.assertIn(r' "\x22-\x22 x" "a\x22b\x5cc\x09d caf\xc3\xa9 \xff" ', line)
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(line.count('"'), 6)

    def test_given_values(self) -> None:
        """Records built with explicit values (embedders, tests) are written the same way."""
        line = format_combined(make(referer="https://r/", user_agent="ua 1"))
        self.assertIn(' "https://r/" "ua 1" ', line)


class SquidTests(SynchronousTestCase):
    """The squid format follows Squid's native access.log layout field by field."""

    def fields(self, record: Exchange) -> list[str]:
        """Format a record and split it on whitespace, checking it is one line."""
        line = format_squid(record)
        self.assertTrue(line.endswith("\n"))
        self.assertNotIn("\n", line[:-1])
        fields = line.split()
        self.assertEqual(len(fields), 10)
        return fields

    def test_get(self) -> None:
        """A forwarded GET: end time, elapsed ms, client, TCP_MISS, bytes, URL, peer."""
        self.assertEqual(
            format_squid(GET),
            "1795715059.373    250 127.0.0.1 TCP_MISS/200 1234 GET http://a.example/x?y=%20"
            " - HIER_DIRECT/a.example -\n",
        )

    def test_connect(self) -> None:
        """A tunnel is TCP_TUNNEL, with the host of its authority as the peer."""
        self.assertEqual(
            self.fields(CONNECT),
            [
                "1795715071.623",
                "12500",
                "127.0.0.1",
                "TCP_TUNNEL/200",
                "45",
                "CONNECT",
                "example.com:443",
                "-",
                "HIER_DIRECT/example.com",
                "-",
            ],
        )

    def test_connect_ipv6(self) -> None:
        """An IPv6 literal authority gives the address without brackets as the peer."""
        self.assertEqual(
            self.fields(make(method="CONNECT", target="[::1]:443"))[8], "HIER_DIRECT/::1"
        )

    def test_denied_without_user(self) -> None:
        """A 407 is TCP_DENIED from no peer, with C{-} for the user."""
        fields = self.fields(DENIED)
        self.assertEqual(fields[3], "TCP_DENIED/407")
        self.assertEqual(fields[7:], ["-", "HIER_NONE/-", "-"])

    def test_forbidden_connect(self) -> None:
        """A CONNECT refused by policy is TCP_DENIED, not TCP_TUNNEL."""
        record = make(
            method="CONNECT",
            target="example.com:25",
            status=403,
            bytes_to_origin=0,
            error="http_request_denied",
        )
        fields = self.fields(record)
        self.assertEqual((fields[3], fields[8]), ("TCP_DENIED/403", "HIER_NONE/-"))

    def test_error(self) -> None:
        """A 502 the proxy produced itself has no peer."""
        fields = self.fields(REFUSED)
        self.assertEqual(fields[1:5], ["30", "127.0.0.1", "TCP_MISS/502", "120"])
        self.assertEqual(fields[8], "HIER_NONE/-")

    def test_origin_error_status(self) -> None:
        """An error status from the origin itself still names the origin as the peer."""
        fields = self.fields(make(status=503, bytes_to_origin=80))
        self.assertEqual((fields[3], fields[8]), ("TCP_MISS/503", "HIER_DIRECT/a.example"))

    def test_client_left(self) -> None:
        """A client that left before any response is NONE_NONE/000."""
        fields = self.fields(make(status=0, bytes_to_client=0, bytes_to_origin=0))
        self.assertEqual((fields[3], fields[4], fields[8]), ("NONE_NONE/000", "0", "HIER_NONE/-"))

    def test_user(self) -> None:
        """An authenticated user is logged URL-encoded."""
        self.assertEqual(self.fields(WITH_USER)[7], "alice")
        self.assertEqual(self.fields(make(user="a b%"))[7], "a%20b%25")

    def test_escaped_target(self) -> None:
        """Control and non-ASCII characters in the URL are percent-encoded."""
        self.assertEqual(self.fields(ODD_TARGET)[6], 'http://a.example/"q%01%C3%A9')

    def test_target_with_space(self) -> None:
        """A space in the target cannot split the URL field."""
        self.assertEqual(
            self.fields(make(target="http://a.example/a b"))[6], "http://a.example/a%20b"
        )


class JSONTests(SynchronousTestCase):
    """The json format is one compact ASCII JSON object per line."""

    def parse(self, record: Exchange) -> dict[str, Any]:
        """Format a record, check it is one compact ASCII line and decode it."""
        line = format_json(record)
        self.assertTrue(line.endswith("\n"))
        self.assertNotIn("\n", line[:-1])
        self.assertNotIn(" ", line)
        self.assertTrue(line.isascii())
        result: dict[str, Any] = json.loads(line)
        return result

    def test_get(self) -> None:
        """A forwarded GET gives exactly the documented keys, in order, with their values."""
        self.assertEqual(
            list(self.parse(GET).items()),
            [
                ("time", "2026-11-26T17:44:19.123Z"),
                ("client", "127.0.0.1"),
                ("user", None),
                ("method", "GET"),
                ("target", "http://a.example/x?y=%20"),
                ("status", 200),
                ("bytes_to_client", 1234),
                ("bytes_to_origin", 87),
                ("duration_ms", 250.0),
                ("upstream", "direct"),
                ("error", None),
            ],
        )

    def test_types(self) -> None:
        """Counts and status are integers, the duration a number, the rest strings."""
        obj = self.parse(REFUSED)
        for key in ("status", "bytes_to_client", "bytes_to_origin"):
            self.assertIs(type(obj[key]), int)
        self.assertIsInstance(obj["duration_ms"], float)
        for key in ("time", "client", "method", "target", "upstream", "error"):
            self.assertIs(type(obj[key]), str)

    def test_connect(self) -> None:
        """A tunnel keeps its authority target and both byte counts."""
        obj = self.parse(CONNECT)
        self.assertEqual(
            (obj["method"], obj["target"], obj["bytes_to_client"], obj["bytes_to_origin"]),
            ("CONNECT", "example.com:443", 45, 5),
        )
        self.assertEqual(obj["duration_ms"], 12500.0)

    def test_denied_without_user(self) -> None:
        """A 407 without credentials has a null user and a null error."""
        obj = self.parse(DENIED)
        self.assertEqual((obj["status"], obj["user"], obj["error"]), (407, None, None))
        self.assertEqual(obj["duration_ms"], 1.0)

    def test_error(self) -> None:
        """A 502 carries its error type as a string."""
        obj = self.parse(REFUSED)
        self.assertEqual((obj["status"], obj["error"]), (502, "connection_refused"))
        self.assertEqual(obj["duration_ms"], 30.0)

    def test_user(self) -> None:
        """An authenticated user is a string."""
        self.assertEqual(self.parse(WITH_USER)["user"], "alice")

    def test_escaped_target(self) -> None:
        """Quotes, control and non-ASCII characters survive the round trip as escapes."""
        line = format_json(ODD_TARGET)
        self.assertIn('"target":"http://a.example/\\"q\\u0001\\u00e9"', line)
        self.assertEqual(json.loads(line)["target"], ODD_TARGET.target)

    def test_millisecond_rounding(self) -> None:
        """The time keeps milliseconds even when the float is just below them."""
        self.assertEqual(self.parse(make(time=T - 0.0000001))["time"], "2026-11-26T17:44:19.123Z")


class FakeStdout:
    """A stand-in for C{sys.stdout} with a binary C{buffer}, as a real one has."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, text: str) -> int:
        """Text writes would bypass the buffer; the access log must not use them."""
        raise AssertionError("wrote text to stdout")

    def flush(self) -> None:
        """Nothing is buffered at the text level."""


class FailingFile:
    """A log file whose every write fails, like a full disk."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, text: str) -> int:
        """Fail as a full disk does."""
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        """Nothing was written, so there is nothing to flush."""

    def close(self) -> None:
        """Remember the file was closed."""
        self.closed = True


class AccessLogTests(SynchronousTestCase):
    """AccessLog buffers lines, flushes them on the clock, and survives rotation and errors."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "access.log")
        self.clock = Clock()
        # EventLoggingObserver.createWithCleanup is annotated for the asynchronous
        # TestCase only, so register the observer by hand.
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def open(self, fmt: str = "combined", path: str | None = None) -> AccessLog:
        """Open an access log on the test clock, closed at cleanup."""
        log = AccessLog(self.path if path is None else path, fmt, reactor=self.clock)
        self.addCleanup(log.close)
        return log

    def read(self, path: str | None = None) -> str:
        """The text of a log file."""
        with open(self.path if path is None else path, encoding="utf-8") as f:
            return f.read()

    def test_formats(self) -> None:
        """Each format name writes its formatter's lines."""
        for fmt, formatter in FORMATS.items():
            path = os.path.join(self.dir, fmt + ".log")
            log = self.open(fmt, path)
            log(GET)
            log(CONNECT)
            log.close()
            self.assertEqual(self.read(path), formatter(GET) + formatter(CONNECT))

    def test_buffered_until_clock(self) -> None:
        """Lines are buffered and written out once a second by the clock."""
        log = self.open()
        log(GET)
        self.assertEqual(self.read(), "")
        self.clock.advance(1)
        self.assertEqual(self.read(), format_combined(GET))
        log(REFUSED)
        self.clock.advance(1)
        self.assertEqual(self.read(), format_combined(GET) + format_combined(REFUSED))

    def test_flush_loop_lazy_and_stopped(self) -> None:
        """Nothing is scheduled before the first line, and close() cancels the flushes."""
        log = self.open()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        log(GET)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        log(GET)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        log.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_flushes(self) -> None:
        """close() writes out the buffered lines; later records are dropped."""
        log = self.open()
        log(GET)
        log.close()
        self.assertEqual(self.read(), format_combined(GET))
        log(REFUSED)
        log.close()
        self.assertEqual(self.read(), format_combined(GET))

    def test_appends(self) -> None:
        """An existing log is appended to, not truncated."""
        with open(self.path, "w", encoding="utf-8") as f:
            f.write("old\n")
        log = self.open()
        log(GET)
        log.close()
        self.assertEqual(self.read(), "old\n" + format_combined(GET))

    def test_reopen_after_rotation(self) -> None:
        """After the file is renamed, reopen() writes new lines to a new file at the path."""
        log = self.open()
        log(GET)
        rotated = self.path + ".1"
        os.rename(self.path, rotated)
        log.reopen()
        log(REFUSED)
        self.clock.advance(1)
        self.assertEqual(self.read(rotated), format_combined(GET))
        self.assertEqual(self.read(), format_combined(REFUSED))

    def test_stdout(self) -> None:
        """The path C{-} writes UTF-8 to standard output's buffer and never closes it."""
        stdout = FakeStdout()
        self.patch(sys, "stdout", stdout)
        log = self.open("json", "-")
        log(GET)
        log.reopen()
        self.assertEqual(stdout.buffer.getvalue(), format_json(GET).encode("ascii"))
        log.close()
        self.assertFalse(stdout.buffer.closed)

    def test_unwritable_path(self) -> None:
        """A path that cannot be opened raises AccessLogError, one line naming the path."""
        path = os.path.join(self.dir, "missing", "access.log")
        e = self.assertRaises(AccessLogError, AccessLog, path, reactor=self.clock)
        self.assertIsInstance(e, ValueError)
        self.assertIn(path, str(e))
        self.assertNotIn("\n", str(e))

    def test_unknown_format(self) -> None:
        """An unknown format name raises AccessLogError before anything is opened."""
        e = self.assertRaises(AccessLogError, AccessLog, self.path, "apache", self.clock)
        self.assertIn("'apache'", str(e))
        self.assertFalse(os.path.exists(self.path))

    def test_write_error_logged_once(self) -> None:
        """A write error is logged once with the path and never raised; lines are dropped."""
        self.patch(accesslog, "_open_file", lambda path: FailingFile())
        log = self.open()
        log(GET)
        log(REFUSED)
        self.clock.advance(1)
        log.close()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(event["path"], self.path)
        self.assertIsInstance(event["log_failure"].value, OSError)

    def test_reopen_recovers(self) -> None:
        """After a write error, lines are written again once reopen() succeeds."""
        opened: list[IO[str] | FailingFile] = []

        def open_file(path: str) -> IO[str] | FailingFile:
            f = FailingFile() if not opened else open(path, "a", encoding="utf-8")
            opened.append(f)
            return f

        self.patch(accesslog, "_open_file", open_file)
        log = self.open()
        log(GET)
        log.reopen()
        log(REFUSED)
        log.close()
        self.assertEqual(self.read(), format_combined(REFUSED))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(len(self.events), 1)

    def test_flush_error(self) -> None:
        """A full disk found when the buffer is flushed is logged, not raised."""
        if not os.path.exists("/dev/full"):
            raise self.skipTest("needs /dev/full")
        log = self.open(path="/dev/full")
        log(GET)
        self.clock.advance(1)
        log(GET)
        self.clock.advance(1)
        log.close()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        [event] = self.events
        self.assertEqual(event["path"], "/dev/full")

    def test_reopen_failure_logged(self) -> None:
        """A reopen that cannot open the path logs one line, drops lines, and never raises."""
        sub = os.path.join(self.dir, "logs")
        os.mkdir(sub)
        path = os.path.join(sub, "access.log")
        log = self.open(path=path)
        os.rename(path, self.path)
        os.rmdir(sub)
        log.reopen()
        log(GET)
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn(path, event["error"])
        os.mkdir(sub)
        log.reopen()
        log(REFUSED)
        log.close()
        self.assertEqual(self.read(path), format_combined(REFUSED))


class CombinedProcessTests(SynchronousTestCase):
    """The combined log of a real twistd process carries what an HTTP/1.0 client sent."""

    def test_http10_client_fields_logged(self) -> None:
        """Version, Referer and User-Agent go from the socket to the file as sent."""
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "access.log"
            # Port 0: the kernel picks a free one, which the start-up line names.
            args = ["--port", "0", "--deny-host", "blocked.invalid"]
            args += ["--access-log", str(log)]
            with twistd(args, tmp) as proc:
                started = wait_for_line(proc, b"starting on")
                found = re.search(rb"ProxyFactory starting on (\d+)", started)
                assert found is not None, started
                port = int(found.group(1))
                with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
                    conn.sendall(
                        b"GET http://blocked.invalid/a HTTP/1.0\r\nHost: blocked.invalid\r\n"
                        b"Referer: http://ref.example/p\r\nUser-Agent: Wget/1.21.4\r\n\r\n"
                    )
                    answer = b""
                    while chunk := conn.recv(65536):
                        answer += chunk
                self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
                self.assertEqual(stop(proc), 0)
            [line] = log.read_text().splitlines()
        self.assertIn(
            f'"GET http://blocked.invalid/a HTTP/1.0" 403 {len(answer)}'
            ' "http://ref.example/p" "Wget/1.21.4" ',
            line,
        )


class CacheFieldTests(SynchronousTestCase):
    """With the cache on, every format says what it did (issue #14)."""

    def record(self, cache: str | None) -> Exchange:
        """A finished GET with the cache result C{cache}."""
        return Exchange(
            0.0,
            "127.0.0.1",
            None,
            "GET",
            "http://a.example/",
            200,
            10,
            0,
            0.0,
            "direct",
            None,
            cache=cache,
        )

    def test_squid_code_is_the_cache_result(self) -> None:
        """The squid format's code is the cache's result (TCP_MEM_HIT), not TCP_MISS."""
        line = accesslog.format_squid(self.record("TCP_MEM_HIT"))
        self.assertIn(" TCP_MEM_HIT/200 ", line)
        self.assertIn(" TCP_MISS/200 ", accesslog.format_squid(self.record(None)))

    def test_combined_and_json_carry_cache(self) -> None:
        """combined ends with cache=RESULT and json has a cache key, only with a cache."""
        self.assertTrue(
            accesslog.format_combined(self.record("TCP_HIT")).endswith(" cache=TCP_HIT\n")
        )
        self.assertNotIn("cache=", accesslog.format_combined(self.record(None)))
        self.assertEqual(
            json.loads(accesslog.format_json(self.record("TCP_MISS")))["cache"], "TCP_MISS"
        )
        self.assertNotIn("cache", json.loads(accesslog.format_json(self.record(None))))
