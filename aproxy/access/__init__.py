"""
Who may use the proxy and where they may go: the destination and client policy, proxy
authentication (htpasswd files) and the failed-login throttle.
"""
