"""
TLS interception (opt-in, per destination): the CA (L{aproxy.intercept.ca}), leaf
certificates made on first use (L{aproxy.intercept.leaves}), and the look at a
ClientHello that decides whether a tunnel is intercepted (L{aproxy.intercept.hello}).
"""
