"""
Rewrite text in HTML pages as they stream: the body is never held whole, a word that a
chunk boundary cuts in two is still replaced, and gzip or deflate bodies are decoded and
encoded again on the fly. The response goes back chunked (its length changed).

    twistd -n aproxy --addon examples/addons/rewrite_html.py:RewriteHtml
"""

from aproxy.addons import Replace, decoded

WORDS = {"the cloud": "other people's computers", "The cloud": "Other people's computers"}


class RewriteHtml:
    """Replace WORDS in every text/html response."""

    def response_body(self, exchange):
        kind = exchange.response.fields.get("Content-Type") or ""
        if not kind.lower().startswith("text/html"):
            return None
        return decoded(exchange, Replace(WORDS))
