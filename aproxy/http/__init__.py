"""
The HTTP layer, sans-IO: message heads, bodies, request targets, the PROXY protocol header
and the proxy's own answers. Bytes in, parsed values or a L{aproxy.errors.ProxyError} out;
nothing here imports Twisted, so all of it is tested without a reactor.
"""
