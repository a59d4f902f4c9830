"""
Add and remove header fields: every request leaves with ``X-Request-Id``, and responses
lose the fields that tell the world which server software answered.

    twistd -n aproxy --addon examples/addons/headers.py:Headers
"""

from itertools import count


class Headers:
    """Stamp requests with an id; strip server fingerprints from responses."""

    def __init__(self):
        self._ids = count(1)

    def request(self, exchange):
        exchange.notes["id"] = str(next(self._ids))
        exchange.request.fields.set("X-Request-Id", exchange.notes["id"])

    def response(self, exchange):
        fields = exchange.response.fields
        fields.remove("Server")
        fields.remove("X-Powered-By")
        fields.set("X-Content-Type-Options", "nosniff")
