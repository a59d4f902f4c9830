"""
Count requests and response bytes per user (or per client address without --auth), and
show the counts at http://counts.proxy.test/. The counts live in this worker's memory:
with --workers, each worker counts its own share.

    twistd -n aproxy --auth users.htpasswd --addon examples/addons/count_users.py:CountUsers
"""

import json
from collections import Counter

HOST = "counts.proxy.test"


class CountUsers:
    """Per-user request and byte counts, from the done hook."""

    def __init__(self):
        self.requests = Counter()

    def request(self, exchange):
        if exchange.request.host == HOST:
            body = json.dumps(dict(self.requests), sort_keys=True) + "\n"
            exchange.answer(200, body, [("Content-Type", "application/json")])

    def done(self, exchange):
        if exchange.request.host != HOST:
            self.requests[exchange.user or exchange.client] += 1
