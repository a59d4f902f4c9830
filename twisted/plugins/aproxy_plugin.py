"""The twistd plugin: makes C{twistd aproxy} run the proxy from L{aproxy.tap}."""

from twisted.application.service import ServiceMaker

aproxy = ServiceMaker(
    "aproxy",
    "aproxy.tap",
    "An HTTP/1.1 forward proxy (loopback only unless told otherwise).",
    "aproxy",
)
