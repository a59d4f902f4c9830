"""
Block responses by type or size: executables are refused, and so is anything that says it
is larger than 50 MiB. The check runs on the response head, before any of the body is
read, on cache hits as on origin responses.

    twistd -n aproxy --addon examples/addons/block_types.py:BlockTypes
"""

BLOCKED_TYPES = ("application/x-msdownload", "application/x-dosexec")
TEXT = [("Content-Type", "text/plain; charset=utf-8")]
MAX_SIZE = 50 * 1024 * 1024


class BlockTypes:
    """Replace unwanted responses with a 403 of the proxy's."""

    def response(self, exchange):
        fields = exchange.response.fields
        kind = (fields.get("Content-Type") or "").split(";")[0].strip().lower()
        length = fields.get("Content-Length") or ""
        if kind in BLOCKED_TYPES:
            exchange.answer(403, f"Downloads of {kind} are blocked here.\n", TEXT)
        elif length.isdigit() and int(length) > MAX_SIZE:
            exchange.answer(403, "That download is too large for this proxy.\n", TEXT)
