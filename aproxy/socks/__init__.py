"""
The SOCKS5 front end (RFC 1928, RFC 1929): the handshake on the wire, sans-IO
(L{aproxy.socks.wire}), the protocol that serves it on C{--socks-port} through the same
admission, login, rules, routes and tunnels as HTTP (L{aproxy.socks.protocol}), and the
UDP relay of C{UDP ASSOCIATE} (L{aproxy.socks.udp}).
"""
