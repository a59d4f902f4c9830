"""
Running the proxy as a program: the twistd command line, the services that listen, the
configuration file and the worker processes.
"""
