"""
Access logs: one line per finished request or tunnel, from L{Exchange} records.

L{AccessLog} is an L{Exchange} observer (add it to C{ProxyFactory.observers}) that writes
each record in one of three formats, see L{FORMATS}:

  - C{combined}: Apache/NCSA combined, which log tools parse, followed by aproxy's
    extras as C{key=value} fields (L{format_combined}).
  - C{squid}: Squid's native C{access.log} layout (L{format_squid}).
  - C{json}: one JSON object per line (L{format_json}).

Writing never waits for the disk on every request: the file is opened in append mode
with a 64 KiB buffer, so a write is a memory copy, and a L{LoopingCall} on the reactor
flushes the buffer once a second (and L{AccessLog.close} and L{AccessLog.reopen} flush
too). A crash can therefore lose up to a second of lines; a full buffer is written out
at once, which on a local file system is quick. A failing write (disk full, I/O error)
is logged once and later lines are dropped until L{AccessLog.reopen} succeeds: the log
never raises into the proxy.

L{AccessLog.reopen} is meant for log rotation (C{SIGUSR1} after C{logrotate} renamed the
file): it closes the file and opens the path again, creating a new file.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any
from urllib.parse import urlsplit

from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from aproxy.observe.records import Exchange

__all__ = [
    "FORMATS",
    "AccessLog",
    "AccessLogError",
    "format_combined",
    "format_json",
    "format_squid",
]

_FLUSH_INTERVAL = 1.0
_BUFFER_SIZE = 65536
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Apache escapes these in the request line as \xhh (RFC 9112 forbids them in a target
# anyway, but a log line must stay one parsable line whatever the record holds):
# quote and backslash, control characters, and every byte of a non-ASCII character.
_UNSAFE_QUOTED = re.compile(r'[^\x20-\x7e]|["\\]')
# Fields outside quotes (user, client, method, extras) must not contain spaces either.
_UNSAFE_BARE = re.compile(r'[^\x21-\x7e]|["\\]')
# Squid's fields are separated by spaces and never quoted: URLs get spaces, control and
# non-ASCII characters percent-encoded (existing %XX escapes are kept as they are) ...
_UNSAFE_URL = re.compile(r"[^\x21-\x7e]")
# ... and user names are URL-encoded as Squid's QuoteUrlEncodeUsername does, % included.
_UNSAFE_USER = re.compile(r'[^\x21-\x7e]|[%"\\]')


class AccessLogError(ValueError):
    """The access log cannot be opened; C{str()} is one line naming the path."""


def _hex_escape(match: re.Match[str]) -> str:
    """
    Escape a matched character as C{\\xHH} for each of its UTF-8 bytes (Apache's way); a
    byte that was not UTF-8 (kept as a lone surrogate, see L{Exchange.referer}) is
    escaped as itself.
    """
    return "".join(f"\\x{b:02x}" for b in match.group().encode("utf-8", "surrogateescape"))


def _quoted(text: str | None) -> str:
    """A request field for a quoted place: C{-} if missing, else escaped as Apache does."""
    if text is None:
        return "-"
    return _UNSAFE_QUOTED.sub(_hex_escape, text)


def _percent_escape(match: re.Match[str]) -> str:
    """Percent-encode a matched character, one C{%HH} per UTF-8 byte (RFC 3986)."""
    return "".join(f"%{b:02X}" for b in match.group().encode("utf-8"))


def _bare(text: str | None) -> str:
    """A field for a space-separated line: C{-} if missing or empty, else escaped."""
    if not text:
        return "-"
    return _UNSAFE_BARE.sub(_hex_escape, text)


def _milliseconds(seconds: float) -> int:
    """Seconds as whole milliseconds, to the nearest (floats rarely hold exact ones)."""
    return round(seconds * 1000)


def format_combined(record: Exchange) -> str:
    """
    Format a record in Apache's combined log format, then aproxy's extra fields.

    The line starts exactly like Apache's C{combined} format::

        CLIENT - USER [DD/Mon/YYYY:HH:MM:SS +0000] "METHOD TARGET VERSION" STATUS BYTES \\
            "REFERER" "USER-AGENT"

    (on one line), so combined-format parsers read it, and ends with C{key=value} fields
    that such parsers ignore or capture as trailing text::

        bytes_to_origin=N duration_ms=N upstream=UPSTREAM error=ERROR [cache=RESULT] \
            [datagrams=N]

    The time is when the request head was complete, in UTC, to the second (as Apache's
    C{%t}). C{BYTES} counts everything written to the client, heads included (Apache's
    C{%O}), and is C{0} rather than C{-} when nothing was sent. A status of C{0} means
    the client left before a response. C{VERSION} is the client's (C{HTTP/1.0} or
    C{HTTP/1.1}); C{REFERER} and C{USER-AGENT} are the request's fields as sent (C{-}
    without one, several joined with C{", "}, at most
    L{aproxy.observe.records.MAX_LOGGED_FIELD} bytes each), which log analysers such as GoAccess
    and AWStats read. C{duration_ms} is rounded to whole milliseconds and C{error} is the
    RFC 9209 error type or C{-}. Quotes, backslashes, control and non-ASCII characters
    in the target, referer and user agent are escaped as C{\\xHH} (of their bytes), as
    Apache does; the user and the extras get spaces escaped too.

    @param record: The finished exchange.
    @return: One line, ending in C{"\\n"}.
    """
    seconds = _milliseconds(record.time) // 1000
    t = time.gmtime(seconds)
    stamp = (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}"
        f":{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )
    target = _UNSAFE_QUOTED.sub(_hex_escape, record.target)
    return (
        f"{_bare(record.client)} - {_bare(record.user)} [{stamp}]"
        f' "{_bare(record.method)} {target} {_bare(record.version)}" {record.status}'
        f' {record.bytes_to_client} "{_quoted(record.referer)}" "{_quoted(record.user_agent)}"'
        f" bytes_to_origin={record.bytes_to_origin}"
        f" duration_ms={_milliseconds(record.duration)}"
        f" upstream={_bare(record.upstream)} error={_bare(record.error)}"
        + (f" cache={record.cache}" if record.cache is not None else "")
        + (f" datagrams={record.datagrams}\n" if record.datagrams is not None else "\n")
    )


def _squid_code(record: Exchange) -> str:
    """The Squid result code (C{%Ss}) for a record."""
    if record.cache is not None:
        return record.cache
    if record.status in (403, 407):
        return "TCP_DENIED"
    if record.status == 0:
        return "NONE_NONE"
    if record.method == "CONNECT":
        return "TCP_TUNNEL"
    return "TCP_MISS"


def _target_host(target: str) -> str:
    """The host of an absolute URL or of C{host:port} (IPv6 without brackets)."""
    if "://" in target:
        try:
            host = urlsplit(target).hostname
        except ValueError:
            host = None
        return host or "-"
    if target.startswith("/") or not target:
        return "-"
    host = target.rpartition(":")[0] if ":" in target else target
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.lower() or "-"


def _squid_hierarchy(record: Exchange) -> str:
    """The Squid hierarchy code and peer (C{%Sh/%<a}) for a record."""
    # The origin was reached if the request was sent to it (the head is written first)
    # or, for CONNECT, if the tunnel was set up (200) even though the client sent nothing.
    # Otherwise the proxy answered by itself (policy, authentication, connect failure,
    # a malformed request) or the client left first.
    reached = record.bytes_to_origin > 0 or (
        record.method == "CONNECT" and 200 <= record.status < 300
    )
    if not reached:
        return "HIER_NONE/-"
    if record.upstream != "direct":
        # Through a parent proxy (its URL without credentials): Squid's code for a
        # request forwarded to its only parent.
        parent = record.upstream.partition("://")[2].rpartition(":")[0].strip("[]")
        return f"DEFAULT_PARENT/{_UNSAFE_URL.sub(_percent_escape, parent) or '-'}"
    host = _UNSAFE_URL.sub(_percent_escape, _target_host(record.target))
    return f"HIER_DIRECT/{host}"


def format_squid(record: Exchange) -> str:
    """
    Format a record in Squid's native C{access.log} layout.

    Squid's built-in C{squid} log format is
    C{%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt}, i.e.::

        TIME.MS ELAPSED CLIENT CODE/STATUS BYTES METHOD URL USER HIERARCHY/PEER TYPE

    with these choices:

      - C{TIME.MS}: when the exchange ended (the record's time plus its duration), as
        Squid logs the time of completion; C{ELAPSED} is the duration in milliseconds.
      - C{CODE}: C{TCP_DENIED} for a 403 or 407, C{NONE_NONE} with status C{000} when
        the client left before a response, C{TCP_TUNNEL} for another CONNECT and
        C{TCP_MISS} otherwise; with the cache on, the cache's own result (C{TCP_HIT},
        C{TCP_MEM_HIT}, C{TCP_REFRESH_UNMODIFIED}, ...).
      - C{BYTES}: everything written to the client, heads included (as Squid counts).
      - C{URL}: the target as received (C{host:port} for CONNECT), with spaces,
        control and non-ASCII characters percent-encoded.
      - C{USER}: the authenticated user URL-encoded, or C{-}.
      - C{HIERARCHY/PEER}: C{HIER_DIRECT/<host>} when the origin was reached, with the
        host name from the target (Squid logs the origin's IP address, which records
        do not carry); C{DEFAULT_PARENT/<parent host>} when it went through a parent
        proxy; C{HIER_NONE/-} when the proxy answered by itself or the client
        left before anything was sent to the origin.
      - C{TYPE}: the response content type is not recorded, so always C{-}.

    @param record: The finished exchange.
    @return: One line, ending in C{"\\n"}.
    """
    end = _milliseconds(record.time + record.duration)
    user = _UNSAFE_USER.sub(_percent_escape, record.user) if record.user else "-"
    # The same printf layout as Squid's Log::Format::SquidNative, so the two compare.
    return "%9d.%03d %6d %s %s/%03d %d %s %s %s %s %s\n" % (  # noqa: UP031
        end // 1000,
        end % 1000,
        _milliseconds(record.duration),
        _bare(record.client),
        _squid_code(record),
        record.status,
        record.bytes_to_client,
        _bare(record.method),
        _UNSAFE_URL.sub(_percent_escape, record.target) or "-",
        user,
        _squid_hierarchy(record),
        "-",
    )


def format_json(record: Exchange) -> str:
    """
    Format a record as one JSON object on one line.

    The keys, in this order: C{time} (when the request head was complete, ISO 8601 in
    UTC with milliseconds, e.g. C{"2026-11-26T17:44:19.123Z"}), C{client}, C{user}
    (string or C{null}), C{method}, C{target}, C{status} (C{0}: the client left before
    a response), C{bytes_to_client}, C{bytes_to_origin} (heads included), C{duration_ms}
    (a number, to the microsecond), C{upstream} and C{error} (the RFC 9209 error type or
    C{null}), with the cache on C{cache} (its result, as in Squid's log), and for a
    SOCKS5 UDP association C{datagrams} (relayed, both ways). The
    output is ASCII (other characters are C{\\u} escaped), without spaces.

    @param record: The finished exchange.
    @return: One line, ending in C{"\\n"}.
    """
    ms = _milliseconds(record.time)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
    fields = {
        "time": f"{stamp}.{ms % 1000:03d}Z",
        "client": record.client,
        "user": record.user,
        "method": record.method,
        "target": record.target,
        "status": record.status,
        "bytes_to_client": record.bytes_to_client,
        "bytes_to_origin": record.bytes_to_origin,
        "duration_ms": round(record.duration * 1000, 3),
        "upstream": record.upstream,
        "error": record.error,
    }
    if record.cache is not None:
        fields["cache"] = record.cache
    if record.datagrams is not None:
        fields["datagrams"] = record.datagrams
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")) + "\n"


FORMATS: dict[str, Callable[[Exchange], str]] = {
    "combined": format_combined,
    "squid": format_squid,
    "json": format_json,
}
"""The access log formats by name, for L{AccessLog}'s C{fmt}."""


class _StandardOutput:
    """Writes text lines to standard output's binary buffer, which it never closes."""

    def __init__(self) -> None:
        stdout = sys.stdout
        self._buffer: IO[bytes] | None = getattr(stdout, "buffer", None)
        self._text = stdout

    def write(self, line: str) -> None:
        if self._buffer is not None:
            self._buffer.write(line.encode("utf-8", "replace"))
        else:
            self._text.write(line)

    def flush(self) -> None:
        if self._buffer is not None:
            self._buffer.flush()
        else:
            self._text.flush()

    def close(self) -> None:
        self.flush()


def _open_file(path: str) -> IO[str]:
    """Open an access log file for appending, buffered (a hook for the tests)."""
    return open(path, "a", buffering=_BUFFER_SIZE, encoding="utf-8", errors="replace")


class AccessLog:
    """
    An L{Exchange} observer writing one line per request or tunnel to a file.

    @ivar path: The file written, or C{"-"} for standard output.
    @ivar fmt: The format's name, a key of L{FORMATS}.
    """

    log = Logger()

    def __init__(self, path: str, fmt: str = "combined", reactor: Any = None) -> None:
        """
        Open the log (creating the file if needed) and pick the format.

        @param path: The file to append to, or C{"-"} for standard output.
        @param fmt: C{"combined"}, C{"squid"} or C{"json"}, see L{FORMATS}.
        @param reactor: The L{IReactorTime} that schedules the flushes (the global
            reactor by default).
        @raise AccessLogError: If the format is unknown or the file cannot be opened.
        """
        if fmt not in FORMATS:
            raise AccessLogError(f"unknown access log format {fmt!r} (use combined, squid or json)")
        if reactor is None:
            from twisted.internet import reactor as _global_reactor

            reactor = _global_reactor
        self.path = path
        self.fmt = fmt
        self._format = FORMATS[fmt]
        self._reactor = reactor
        self._flusher: LoopingCall | None = None
        self._closed = False
        # Set after a write error was logged: lines are dropped until reopen() works.
        self._failed = False
        self._file: IO[str] | _StandardOutput = self._open()

    def _open(self) -> IO[str] | _StandardOutput:
        """Open the path, or raise L{AccessLogError} in one line."""
        if self.path == "-":
            return _StandardOutput()
        try:
            return _open_file(self.path)
        except OSError as e:
            reason = e.strerror or str(e)
            raise AccessLogError(f"cannot open access log {self.path}: {reason}") from None

    def __call__(self, record: Exchange) -> None:
        """
        Write one line for a finished exchange (the L{ExchangeObserver} interface).

        Lines are dropped after L{close}, and after a write error until L{reopen}.

        @param record: The finished request or tunnel.
        """
        if self._closed or self._failed:
            return
        line = self._format(record)
        try:
            self._file.write(line)
        except (OSError, ValueError):
            self._write_failed()
            return
        if self._flusher is None:
            self._flusher = LoopingCall(self._flush)
            self._flusher.clock = self._reactor
            self._flusher.start(_FLUSH_INTERVAL, now=False)

    def _flush(self) -> None:
        """Write out the buffered lines (called every second by the looping call)."""
        if self._failed:
            return
        try:
            self._file.flush()
        except (OSError, ValueError):
            self._write_failed()

    def _write_failed(self) -> None:
        """Log the current write error (once) and drop lines until reopen() succeeds."""
        if not self._failed:
            self._failed = True
            self.log.failure(
                "writing the access log {path} failed; dropping lines until it is reopened",
                level=LogLevel.error,
                path=self.path,
            )

    def _close_file(self) -> None:
        """Flush and close the current file, logging a failure that was not yet logged."""
        try:
            self._file.close()
        except (OSError, ValueError):
            self._write_failed()

    def reopen(self) -> None:
        """
        Close the file and open the path again, for log rotation (C{SIGUSR1}).

        Buffered lines go to the old file first. After the file was renamed, this
        creates a new one at the path. If opening fails, the error is logged and lines
        are dropped until a later reopen succeeds; this method never raises. For
        standard output (C{"-"}) it only flushes; after L{close} it does nothing.
        """
        if self._closed:
            return
        if self.path == "-":
            self._flush()
            return
        self._close_file()
        try:
            self._file = self._open()
        except AccessLogError as e:
            self._failed = True
            self.log.error("{error}; dropping lines until it is reopened", error=str(e))
            return
        self._failed = False

    def close(self) -> None:
        """
        Flush and close the file (never standard output) and stop the periodic flushes.

        Later records are dropped: connections closing during shutdown may still report.
        """
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        self._close_file()
