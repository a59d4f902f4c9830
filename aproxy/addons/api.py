"""
What an addon sees and implements: L{IAddon}, the hooks (every one optional), and
L{AddonExchange}, the one object each hook of one exchange is given, with the request (and
later the response) whose header fields it may edit, the client, and a place for notes.

Nothing here does I/O: the client side (L{aproxy.client.hooks}) makes the exchange object,
runs the hooks (L{aproxy.addons.run}) and applies what they changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface

__all__ = [
    "HOOKS",
    "REQUEST_LOCKED",
    "RESPONSE_LOCKED",
    "AddonExchange",
    "Fields",
    "IAddon",
    "ITransformer",
    "Reply",
    "RequestView",
    "ResponseView",
    "as_body",
]


class ITransformer(Interface):
    """
    Changes a body as it streams: what a C{request_body} or C{response_body} hook returns.
    Only C{feed} and C{end} are needed.
    """

    length = Attribute(
        """Optional, request bodies only: the exact length of the transformed body,
        known up front. The request then goes with that C{Content-Length} instead of
        chunked (some origins refuse chunked requests with 411); a transformer that
        gives a different number of bytes fails the exchange."""
    )

    def feed(chunk: bytes) -> bytes:  # noqa: N805 (zope interfaces omit self)
        """
        The next piece of the body (of any size; never empty).

        @return: The bytes to send on in its place: C{chunk} itself, something else,
            or C{b""} to hold bytes back for later (e.g. a word cut at the chunk's end).
        """

    def end() -> bytes:
        """The body is complete. @return: The bytes still held back, if any."""


class IAddon(Interface):
    """
    The hooks an addon may implement, each optional, each called with the one
    L{AddonExchange} of a request (hooks of several addons run in the order the addons
    were given). A hook may return a L{twisted.internet.defer.Deferred} or be an
    C{async def}: the exchange waits for it (the client paused) for at most
    C{--addon-timeout} seconds; then the client gets a 504 and the hook is cancelled, as
    it is when the client leaves first. An exception in a hook is logged with the addon's
    name and answered 500 (a response already started is cut short instead).

    The notification hooks (C{tunnel_open}, C{tunnel_close}, C{error}, C{done}) are not
    waited for: a L{Deferred} they return is only watched for errors, which are logged.
    """

    def request(exchange: AddonExchange) -> Any:  # noqa: N805
        """
        A request passed the proxy's own checks (login, policy) and has not been looked
        up in the cache or sent anywhere: edit C{exchange.request.fields}, pick its exit
        (C{exchange.parent}), refuse it (L{AddonExchange.deny}) or answer it
        (L{AddonExchange.answer}). A CONNECT comes here too (then refusing it is all
        that makes sense). Once an addon refused or answered, later addons' C{request}
        hooks are not called.
        """

    def request_body(exchange: AddonExchange) -> ITransformer | None:  # noqa: N805
        """
        After C{request}, for a request with a body: a transformer of that body on its
        way to the origin, or L{None} to let it pass untouched.
        """

    def response(exchange: AddonExchange) -> Any:  # noqa: N805
        """
        The response head is known (C{exchange.response}), from the origin or the cache,
        and nothing of it was sent: edit its fields, or replace the whole response with
        L{AddonExchange.answer}. Not called for the proxy's own error answers.
        """

    def response_body(exchange: AddonExchange) -> ITransformer | None:  # noqa: N805
        """
        After C{response}, for a response with a body (not to a C{HEAD}, not a 204 or a
        304): a transformer of the body on its way to the client, or L{None}. The cache
        stores the origin's body, never a transformed one.
        """

    def tunnel_open(exchange: AddonExchange) -> None:  # noqa: N805
        """A CONNECT (or an Upgrade such as WebSocket) became a tunnel."""

    def tunnel_close(exchange: AddonExchange, bytes_up: int, bytes_down: int) -> None:  # noqa: N805
        """The tunnel closed, after C{bytes_up} to the origin and C{bytes_down} back."""

    def error(exchange: AddonExchange, error: str) -> None:  # noqa: N805
        """The exchange failed: C{error} is the reason the proxy gives (its log line)."""

    def done(exchange: AddonExchange) -> None:  # noqa: N805
        """The exchange is over, however it ended: the last hook it sees."""


def as_body(data: object) -> bytes:
    """
    What a transformer gave, as bytes: bytes, a bytearray or a memoryview; anything else
    is the addon's error (C{bytes(5)} would be five zero bytes, not a refusal).

    @raise TypeError: For anything else.
    """
    if type(data) is bytes:
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"a transformer must return bytes, not {type(data).__name__}")


# Every hook name, in the order an exchange may meet them.
HOOKS = (
    "request",
    "request_body",
    "response",
    "response_body",
    "tunnel_open",
    "tunnel_close",
    "error",
    "done",
)

# The fields the proxy itself decides: framing, hop-by-hop fields and the Host of a
# request (which must agree with its target). An addon that tries to change one is told so.
_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")
REQUEST_LOCKED = frozenset(("content-length", "transfer-encoding", "host", *_HOP))
RESPONSE_LOCKED = frozenset(("content-length", "transfer-encoding", "proxy-authenticate", *_HOP))

_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Field names checked already: (lowercase, as bytes, lowercase bytes) by name.
_CHECKED: dict[str, tuple[str, bytes, bytes]] = {}
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Fields:
    """
    The header fields of a request or response, in order, as text; names compare
    without case. Each change is checked (a name must be a token, a value one line of
    Latin-1), so an addon can't write a malformed or smuggling head.

    The lines are kept as the bytes they are on the wire, decoded only when read; over a
    parsed head they are not even split until a hook reads them: setting or adding a
    field the head does not have only notes the new line (the commonest edit costs a
    search of the head, no parse).

    @ivar touched: The lowercase names (bytes) of the fields changed, added or removed.
    """

    __slots__ = ("_extra", "_items", "_locked", "_lowered", "_source", "touched")

    def __init__(
        self, items: Iterable[tuple[str, str]] = (), locked: frozenset[str] = frozenset()
    ) -> None:
        self._items: list[tuple[bytes, bytes]] | None = [
            (n.encode("latin-1"), v.encode("latin-1")) for n, v in items
        ]
        self._source: Any = None
        self._lowered: bytes | None = None
        self._extra: list[tuple[bytes, bytes]] = []
        self._locked = locked
        self.touched: set[bytes] = set()

    @classmethod
    def of_head(cls, head: Any, locked: frozenset[str] = frozenset()) -> Fields:
        """
        L{Fields} over the field lines of a parsed head (its C{fields}, read only when
        a hook first looks: a hook that never does costs no parsing).
        """
        fields = cls.__new__(cls)
        fields._items = None
        fields._source = head
        fields._lowered = None
        fields._extra = []
        fields._locked = locked
        fields.touched = set()
        return fields

    def _list(self) -> list[tuple[bytes, bytes]]:
        items = self._items
        if items is None:
            items = self._items = [*self._source.fields, *self._extra]
            self._extra = []
        return items

    def _absent(self, lname: bytes) -> bool:
        """Whether the head not read yet has no line of C{lname} (nor one added)."""
        if self._items is not None:
            return False
        lowered = self._lowered
        if lowered is None:
            # (A valid head has no space before a field's colon: RFC 9112 section 5.1.)
            lowered = self._lowered = b"\n" + self._source.block.lower()
        if b"\n" + lname + b":" in lowered:
            return False
        extra = self._extra
        return not extra or all(n.lower() != lname for n, _ in extra)

    def edit(self) -> tuple[tuple[bytes, ...], bytes]:
        """
        The changes as the names to leave out of the head as received and the lines to
        add (each ending in CRLF): only the added lines while the head was not read,
        else every line of each name touched.
        """
        if self._items is None:
            return (), b"".join(n + b": " + v + b"\r\n" for n, v in self._extra)
        touched = self.touched
        lines = b"".join(n + b": " + v + b"\r\n" for n, v in self._items if n.lower() in touched)
        return tuple(touched), lines

    @property
    def changed(self) -> bool:
        """Whether any field was changed, added or removed."""
        return bool(self.touched)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter([(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._list()])

    def __len__(self) -> int:
        return len(self._list())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        lname = name.lower().encode("latin-1", "replace")
        return any(n.lower() == lname for n, _ in self._list())

    def __repr__(self) -> str:
        return f"Fields({list(self)!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of C{name}, or C{default}."""
        lname = name.lower().encode("latin-1", "replace")
        for n, v in self._list():
            if n.lower() == lname:
                return v.decode("latin-1")
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of C{name}, in order."""
        lname = name.lower().encode("latin-1", "replace")
        return [v.decode("latin-1") for n, v in self._list() if n.lower() == lname]

    def set(self, name: str, value: str) -> None:
        """Make C{value} the one value of C{name} (in place of the first, if any)."""
        lname, line = self._check(name, value)
        self.touched.add(lname)
        if self._absent(lname):
            self._extra.append(line)
            return
        items = []
        placed = False
        for pair in self._list():
            if pair[0].lower() != lname:
                items.append(pair)
            elif not placed:
                items.append(line)
                placed = True
        if not placed:
            items.append(line)
        self._items = items

    def add(self, name: str, value: str) -> None:
        """Add a field line C{name: value} at the end."""
        lname, line = self._check(name, value)
        self.touched.add(lname)
        if self._items is None:
            self._extra.append(line)
        else:
            self._items = [*self._items, line]

    def remove(self, name: str) -> int:
        """Remove every line of C{name}. @return: How many there were."""
        lname, _ = self._check(name, "")
        if self._absent(lname):
            return 0
        before = len(self._list())
        self._items = [pair for pair in self._list() if pair[0].lower() != lname]
        removed = before - len(self._list())
        if removed:
            self.touched.add(lname)
        return removed

    def _check(self, name: str, value: str) -> tuple[bytes, tuple[bytes, bytes]]:
        names = _CHECKED.get(name)
        if names is None:
            if not isinstance(name, str) or _NAME.fullmatch(name) is None:
                raise ValueError(f"not a field name: {name!r}")
            if len(_CHECKED) >= 256:
                _CHECKED.clear()
            encoded = name.encode("ascii")
            names = _CHECKED[name] = (name.lower(), encoded, encoded.lower())
        if names[0] in self._locked:
            raise ValueError(f"the proxy sets {name} itself: an addon can't change it")
        if not isinstance(value, str) or _BAD_VALUE.search(value) or value != value.strip():
            raise ValueError(f"not a field value for {name}: {value!r}")
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"a field value must be Latin-1: {value!r}") from None
        return names[2], (names[1], raw)

    def to_bytes(self) -> list[tuple[bytes, bytes]]:
        """The fields as (name, value) byte pairs."""
        return list(self._list())


def text_fields(pairs: list[tuple[bytes, bytes]], locked: frozenset[str]) -> Fields:
    """L{Fields} over (name, value) byte pairs as parsed (kept, not copied)."""
    fields = Fields((), locked)
    fields._items = pairs
    return fields


@dataclass(slots=True)
class RequestView:
    """
    The request as an addon sees it.

    @ivar method: The method, e.g. C{"GET"}.
    @ivar target: The request target as sent (an absolute URL, or C{host:port} for a
        CONNECT; inside an intercepted tunnel, C{https://...}).
    @ivar scheme: C{"http"} or C{"https"}; C{""} for a CONNECT.
    @ivar host: The destination host.
    @ivar port: The destination port.
    @ivar version: C{"HTTP/1.1"} or C{"HTTP/1.0"}.
    @ivar fields: Its header fields; editable, but for framing, hop-by-hop and C{Host}.
    """

    method: str
    target: str
    scheme: str
    host: str
    port: int
    version: str
    fields: Fields


@dataclass(slots=True)
class ResponseView:
    """
    The response as an addon sees it.

    @ivar status: The status code.
    @ivar reason: The reason phrase.
    @ivar fields: Its header fields; editable, but for framing and hop-by-hop fields.
    @ivar from_cache: Whether the proxy's cache gives it (rather than the origin, now).
    """

    status: int
    reason: str
    fields: Fields
    from_cache: bool = False


@dataclass(slots=True)
class Reply:
    """
    A response an addon asked for: a refusal or a whole answer of its own.

    @ivar addon: The name of the addon that asked.
    @ivar denied: Whether it is a refusal (logged as C{http_request_denied}).
    """

    status: int
    reason: bytes
    fields: list[tuple[bytes, bytes]]
    body: bytes
    addon: str
    denied: bool = False


_REASONS = {200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found"}
_REASONS.update({400: "Bad Request", 403: "Forbidden", 404: "Not Found", 451: "Unavailable"})


class AddonExchange:
    """
    One exchange as its hooks see it: the same object for every hook of one request.

    @ivar client: The client's IP address (C{"unix"} on a unix socket).
    @ivar user: The user it logged in as, or L{None}.
    @ivar response: The response, once known (see L{ResponseView}); L{None} before.
    @ivar notes: The addons' own notes on this exchange, kept from hook to hook.
    @ivar parent: Set by a C{request} hook: the exit for this request, a parent proxy URL
        (as for C{--upstream}), a pool as a route names it (C{"rr:URL,URL"}: the same
        string is the same pool, health and all) or C{"direct"}; L{None} leaves it to
        the routes.
    @ivar intercepted: Whether the request came inside an intercepted HTTPS tunnel.
    """

    __slots__ = (
        "_notes",
        "_request",
        "_view",
        "addon",
        "client",
        "intercepted",
        "parent",
        "reply",
        "response",
        "user",
    )

    def __init__(
        self,
        client: str,
        user: str | None,
        request: RequestView | Callable[[], RequestView],
        intercepted: bool = False,
    ) -> None:
        self.client = client
        self.user = user
        self.intercepted = intercepted
        if isinstance(request, RequestView):
            self._request: RequestView | None = request
            self._view: Callable[[], RequestView] | None = None
        else:
            self._request, self._view = None, request
        self.response: ResponseView | None = None
        self._notes: dict[str, Any] | None = None
        self.parent: str | None = None
        self.reply: Reply | None = None
        self.addon = ""

    @property
    def request(self) -> RequestView:
        """The request (see L{RequestView}); made when a hook first looks."""
        request = self._request
        if request is None:
            assert self._view is not None
            request = self._request = self._view()
        return request

    @property
    def notes(self) -> dict[str, Any]:
        """The addons' own notes on this exchange, kept from hook to hook."""
        notes = self._notes
        if notes is None:
            notes = self._notes = {}
        return notes

    @property
    def request_seen(self) -> bool:
        """Whether a hook looked at the request (so its edits may need applying)."""
        return self._request is not None

    def deny(self, status: int = 403, body: str | bytes = b"", reason: str | None = None) -> None:
        """
        Refuse the request (from a C{request} hook): C{status} (403 by default) with a
        short text body, and C{Proxy-Status} naming this addon.
        """
        if not 400 <= status <= 599:
            raise ValueError(f"a refusal's status is 4xx or 5xx, not {status}")
        if not body:
            body = f"Request refused by the proxy (addon {self.addon}).\n"
        text = [("Content-Type", "text/plain; charset=utf-8")]
        reply = self._make(status, reason, text, body)
        reply.denied = True
        details = self.addon.encode("latin-1", "replace").replace(b'"', b"'")
        reply.fields.append(
            (b"Proxy-Status", b'aproxy; error=http_request_denied; details="addon %s"' % details)
        )
        self.reply = reply

    def answer(
        self,
        status: int = 200,
        body: str | bytes = b"",
        fields: Iterable[tuple[str, str]] = (),
        reason: str | None = None,
    ) -> None:
        """
        Answer with a whole response of this addon's: from a C{request} hook, in place of
        any origin (and of the cache); from a C{response} hook, in place of the response.
        The proxy writes the framing (C{Content-Length}) itself.
        """
        if not 200 <= status <= 599:
            raise ValueError(f"an answer's status is 2xx to 5xx, not {status}")
        if status in (204, 304) and body:
            raise ValueError(f"a {status} answer has no body")
        self.reply = self._make(status, reason, fields, body)

    def _make(
        self, status: int, reason: str | None, fields: Iterable[tuple[str, str]], body: str | bytes
    ) -> Reply:
        checked = Fields((), RESPONSE_LOCKED)
        for name, value in fields:
            checked.add(name, value)
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        phrase = reason if reason is not None else _REASONS.get(status, "Answer")
        if _BAD_VALUE.search(phrase) or "\t" in phrase:
            raise ValueError(f"not a reason phrase: {phrase!r}")
        return Reply(status, phrase.encode("latin-1"), checked.to_bytes(), data, self.addon)
