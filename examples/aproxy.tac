"""
Run aproxy from a .tac file: twistd -ny examples/aproxy.tac

The same ProxyConfig fields as the command-line options; here the proxy listens on
127.0.0.1:3128, lets one private network in and keeps clients off internal addresses.
"""

from twisted.application.service import Application

from aproxy import ProxyConfig, makeService

config = ProxyConfig(
    port=("tcp:3128:interface=127.0.0.1",),
    allow=("127.0.0.0/8", "10.0.0.0/8"),
    block_private=True,
    connect_ports=((443, 443), (8443, 8443)),
)

application = Application("aproxy")
makeService(config).setServiceParent(application)
