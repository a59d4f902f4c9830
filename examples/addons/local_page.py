"""
Answer one host locally with a generated page, without any origin: a browser pointed at
the proxy that asks for http://proxy.test/ gets the proxy's own page.

    twistd -n aproxy --addon examples/addons/local_page.py:LocalPage
"""

import html
import time

HOST = "proxy.test"


class LocalPage:
    """Serve http://proxy.test/ from the proxy itself."""

    def __init__(self):
        self.started = time.time()

    def request(self, exchange):
        if exchange.request.host != HOST:
            return
        uptime = int(time.time() - self.started)
        page = (
            "<!doctype html><title>aproxy</title>"
            f"<p>Hello {html.escape(exchange.client)}: this page comes from the proxy, "
            f"up for {uptime} s.</p>"
        )
        exchange.answer(200, page, [("Content-Type", "text/html; charset=utf-8")])
