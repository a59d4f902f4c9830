"""The twistd plugin: makes C{twistd aproxy} run the proxy from L{aproxy.run.tap}."""

from twisted.application.service import ServiceMaker

aproxy = ServiceMaker(
    "aproxy",
    "aproxy.run.tap",
    "An HTTP/1.1 forward proxy (loopback only unless told otherwise).",
    "aproxy",
)
