"""
The origin side: connecting to origins and parent proxies (names, TLS, CONNECT and SOCKS5
handshakes, routes), the protocol on each upstream connection and the pool that reuses them.
"""
