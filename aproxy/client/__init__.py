"""
The client side: the protocol spoken with each client connection, its admission and timers,
the tunnels it turns into, and the factory that builds it.
"""
