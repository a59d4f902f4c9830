"""
Addons (issue #16) as a user meets them: loading from --addon strings and files, the errors
and warnings of loading, the command line and config file, the body helpers (Replace,
decoded), the cache (request hooks before it, response hooks and transformers on hits and
misses, the origin's body stored), intercepted HTTPS, and the examples in examples/addons.
"""

from __future__ import annotations

import gzip
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path
from typing import Any

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aproxy.addons.api import AddonExchange, Fields, RequestView, ResponseView
from aproxy.addons.bodies import Replace, decoded
from aproxy.addons.load import AddonLoadError, load_addons, misspelled
from aproxy.client.factory import ProxyFactory
from aproxy.config import ProxyConfig
from aproxy.run.service import restart_settings
from aproxy.run.tap import Options
from tests.support import ProxyTestCase

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "addons"
URL = b"http://a.example/page"


def addon_file(text: str) -> str:
    """A Python file holding C{text}, removed after the test run."""
    folder = tempfile.mkdtemp(prefix="aproxy-addon-")
    path = Path(folder) / "my_addon.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def dechunk(response: bytes) -> bytes:
    """The body of C{response}, chunked or not."""
    head, rest = response.split(b"\r\n\r\n", 1)
    if b"Transfer-Encoding: chunked" not in head:
        return rest
    body = b""
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if not size:
            return body
        body += rest[:size]
        rest = rest[size + 2 :]


def response_exchange(*fields: tuple[str, str]) -> AddonExchange:
    """An exchange whose response has C{fields}."""
    request = RequestView("GET", "http://a/", "http", "a", 80, "HTTP/1.1", Fields(()))
    ex = AddonExchange("127.0.0.1", None, request)
    ex.response = ResponseView(200, "OK", Fields(fields))
    return ex


class LoadingTests(SynchronousTestCase):
    """--addon MODULE:NAME and path/to/file.py:NAME."""

    def test_class_function_and_object(self) -> None:
        """A class or a function is called; another object is the addon itself."""
        path = addon_file(
            """
            class Cls:
                def request(self, exchange):
                    pass

            def make():
                return Cls()

            instance = Cls()
            """
        )
        cls, made, obj = load_addons([f"{path}:Cls", f"{path}:make", f"{path}:instance"])
        self.assertEqual([a.name for a in (cls, made, obj)], ["Cls", "make", "instance"])
        self.assertEqual(type(cls.obj).__name__, "Cls")
        self.assertEqual(type(made.obj).__name__, "Cls")
        self.assertIs(obj.obj, sys.modules[type(obj.obj).__module__].instance)

    def test_module_form(self) -> None:
        """MODULE:NAME imports a module (here one of the standard library's)."""
        [addon] = load_addons(["json:JSONDecoder"])
        self.assertEqual(type(addon.obj).__name__, "JSONDecoder")

    def test_errors_are_one_line_naming_the_addon(self) -> None:
        """Bad form, missing file, import error, missing name: one line each."""
        broken = addon_file("import no_such_module_here\n")
        cases = {
            "nocolon": "expected MODULE:NAME",
            "/no/such/file.py:X": "no such file",
            f"{broken}:X": "No module named",
            "json:NoSuchName": "json has no NoSuchName",
        }
        for spec, expected in cases.items():
            with self.assertRaises(AddonLoadError) as caught:
                load_addons([spec])
            message = str(caught.exception)
            self.assertIn(expected, message)
            self.assertNotIn("\n", message)

    def test_making_it_fails(self) -> None:
        """A class whose constructor raises: one line naming it."""
        path = addon_file(
            """
            class Bad:
                def __init__(self):
                    raise RuntimeError("no config")
            """
        )
        with self.assertRaises(AddonLoadError) as caught:
            load_addons([f"{path}:Bad"])
        self.assertIn("addon Bad: making it failed: RuntimeError: no config", str(caught.exception))

    def test_misspelled_hook_is_a_warning(self) -> None:
        """An attribute close to a hook's name is pointed out."""

        class Typo:
            def requests(self, exchange: Any) -> None:
                pass

            def on_done(self, exchange: Any) -> None:
                pass

            def helper(self) -> None:
                pass

            responses = 3  # (data, not a hook)

        self.assertEqual(misspelled(Typo()), [("requests", "request")])

    def test_factory_runs_file_addon(self) -> None:
        """A factory made from a config with an addon string runs it."""
        path = addon_file(
            """
            class Deny:
                def request(self, exchange):
                    exchange.deny()
            """
        )
        factory = ProxyFactory(ProxyConfig(addon=[f"{path}:Deny"]))
        self.assertEqual([a.name for a in factory.runtime.addons.addons], ["Deny"])


class CommandLineTests(SynchronousTestCase):
    """twistd aproxy --addon ..., the config file, reload."""

    def test_bad_addon_is_a_usage_error(self) -> None:
        """A missing module is one usage line, before anything starts."""
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--addon", "no_such_module_xyz:Thing"])
        self.assertIn("--addon no_such_module_xyz:Thing: can't import", str(caught.exception))

    def test_bad_form_is_a_usage_error(self) -> None:
        """A value without :NAME is refused by the option itself."""
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--addon", "just_a_module"])

    def test_options_give_config(self) -> None:
        """--addon (repeatable) and --addon-timeout reach the configuration."""
        options = Options()
        options.parseOptions(["--addon", "json:JSONDecoder", "--addon-timeout", "3"])
        config = options["proxy-config"]
        self.assertEqual((config.addon, config.addon_timeout), (("json:JSONDecoder",), 3.0))

    def test_reload_keeps_the_addon_objects(self) -> None:
        """A reload keeps the loaded addon objects (their state) and takes a new timeout."""
        addon = Recorder()
        factory = ProxyFactory(ProxyConfig(), addons=[addon])
        factory.reconfigure(ProxyConfig(addon_timeout=3))
        addons = factory.runtime.addons
        self.assertIs(addons.addons[0].obj, addon)
        self.assertEqual(addons.timeout, 3.0)

    def test_changed_addons_need_a_restart(self) -> None:
        """A reload keeps the loaded addons and names the setting."""
        running = ProxyConfig(addon=["json:JSONDecoder"])
        self.assertEqual(restart_settings(running, ProxyConfig()), ["addon"])


class BodyHelperTests(SynchronousTestCase):
    """Replace and decoded."""

    def feed_all(self, transformer: Any, pieces: list[bytes]) -> bytes:
        """Everything C{transformer} gives for C{pieces}."""
        out: bytes = b"".join(transformer.feed(p) for p in pieces) + transformer.end()
        return out

    def test_replace_every_split(self) -> None:
        """Whatever the chunk boundaries, the output is the same."""
        text = b"a cloud, the cloud and clouds; cloudcloud."
        expected = text.replace(b"cloud", b"SKY")
        for cut in range(1, len(text)):
            out = self.feed_all(Replace({"cloud": "SKY"}), [text[:cut], text[cut:]])
            self.assertEqual(out, expected, cut)
        bytewise = self.feed_all(Replace({"cloud": "SKY"}), [bytes([b]) for b in text])
        self.assertEqual(bytewise, expected)

    def test_replace_self_overlapping_and_several(self) -> None:
        """Patterns that can overlap themselves, and several at once, at every split."""
        for mapping, text in (
            ({"aba": "X"}, b"abababa xaba abab"),
            ({"aa": "b"}, b"aaaaa aaa"),
            ({"aab": "X"}, b"aaab aab aaaab ab aa"),
            ({"fox": "wolf"}, b"fox fo fofox ffox f"),
            ({"cloud": "sky", "sky": "cloud"}, b"cloud sky clouds skyline"),
        ):
            whole = self.feed_all(Replace(mapping), [text])
            if len(mapping) == 1:
                [(pattern, replacement)] = mapping.items()
                self.assertEqual(whole, text.replace(pattern.encode(), replacement.encode()))
            for cut in range(1, len(text)):
                out = self.feed_all(Replace(mapping), [text[:cut], text[cut:]])
                self.assertEqual(out, whole, (mapping, cut))
            bytewise = self.feed_all(Replace(mapping), [bytes([b]) for b in text])
            self.assertEqual(bytewise, whole, mapping)
            for a in range(1, len(text)):
                for b in range(a + 1, len(text)):
                    pieces = [text[:a], text[a:b], text[b:]]
                    self.assertEqual(self.feed_all(Replace(mapping), pieces), whole, (a, b))
        self.assertEqual(self.feed_all(Replace({"aba": "X"}), [b"ababa"]), b"Xba")
        self.assertEqual(
            self.feed_all(Replace({"aab": "X"}), [b"aaab aab"]), b"aaab aab".replace(b"aab", b"X")
        )

    def test_replace_longest_first(self) -> None:
        """Of two patterns starting at one place, the longer wins."""
        out = self.feed_all(Replace({"ab": "1", "abc": "2"}), [b"xabcx", b"ab"])
        self.assertEqual(out, b"x2x1")

    def test_replace_holds_little(self) -> None:
        """At most the longest pattern less one byte is held back."""
        replace = Replace({"cloud": "x"})
        self.assertEqual(replace.feed(b"a" * 100 + b"clou"), b"a" * 100)
        self.assertEqual(replace.end(), b"clou")

    def test_decoded_gzip(self) -> None:
        """A gzip body: the transformer sees plain text; the output is gzip again."""
        plain = b"<p>the cloud</p>" * 1000
        body = gzip.compress(plain)
        ex = response_exchange(("Content-Encoding", "gzip"))
        transformer = decoded(ex, Replace({"cloud": "sky"}))
        pieces = [body[i : i + 100] for i in range(0, len(body), 100)]
        out = self.feed_all(transformer, pieces)
        self.assertEqual(gzip.decompress(out), plain.replace(b"cloud", b"sky"))

    def test_decoded_deflate_raw_and_wrapped(self) -> None:
        """deflate, with or without its zlib wrapper."""
        plain = b"the cloud " * 50
        raw = zlib.compressobj(6, zlib.DEFLATED, -15)
        for wbits, body in (
            (15, zlib.compress(plain)),
            (-15, raw.compress(plain) + raw.flush()),
        ):
            ex = response_exchange(("Content-Encoding", "deflate"))
            out = self.feed_all(decoded(ex, Replace({"cloud": "sky"})), [body])
            self.assertEqual(zlib.decompress(out, wbits), plain.replace(b"cloud", b"sky"))

    def test_decoded_gzip_members_and_raw_deflate_in_bytes(self) -> None:
        """Several gzip members are all read; raw deflate fed a byte at a time works."""
        ex = response_exchange(("Content-Encoding", "gzip"))
        body = gzip.compress(b"hello ") + gzip.compress(b"world")
        out = self.feed_all(decoded(ex, Replace({"o": "0"})), [body])
        self.assertEqual(gzip.decompress(out), b"hell0 w0rld")
        raw = zlib.compressobj(6, zlib.DEFLATED, -15)
        plain = b"the cloud " * 20
        body = raw.compress(plain) + raw.flush()
        ex = response_exchange(("Content-Encoding", "deflate"))
        out = self.feed_all(decoded(ex, Replace({"cloud": "sky"})), [bytes([b]) for b in body])
        self.assertEqual(zlib.decompress(out, -15), plain.replace(b"cloud", b"sky"))

    def test_decoded_bomb_in_steps(self) -> None:
        """A small chunk that inflates hugely goes through in bounded steps."""
        seen: list[int] = []

        class Sizes:
            def feed(self, chunk: bytes) -> bytes:
                seen.append(len(chunk))
                return b""

            def end(self) -> bytes:
                return b""

        body = gzip.compress(b"\0" * (8 * 1024 * 1024))
        ex = response_exchange(("Content-Encoding", "gzip"))
        self.feed_all(decoded(ex, Sizes()), [body])
        self.assertEqual(sum(seen), 8 * 1024 * 1024)
        self.assertLessEqual(max(seen), 256 * 1024)

    def test_decoded_unknown_coding(self) -> None:
        """br (or several codings): left alone (None); identity: the transformer."""
        replace = Replace({"a": "b"})
        self.assertIsNone(decoded(response_exchange(("Content-Encoding", "br")), replace))
        self.assertIs(decoded(response_exchange(), replace), replace)


class Recorder:
    """Records what each hook saw; transforms bodies to upper case when told to."""

    def __init__(self, upper: bool = False, deny_path: str | None = None) -> None:
        self.upper = upper
        self.deny_path = deny_path
        self.seen: list[tuple[str, int, bool]] = []

    def request(self, ex: AddonExchange) -> None:
        if self.deny_path and ex.request.target.endswith(self.deny_path):
            ex.deny()

    def response(self, ex: AddonExchange) -> None:
        assert ex.response is not None
        self.seen.append((ex.request.target, ex.response.status, ex.response.from_cache))
        ex.response.fields.set("X-Addon", "seen")

    def response_body(self, ex: AddonExchange) -> Any:
        return Replace({"hello": "[hello]"}) if self.upper else None


class CacheInterplayTests(ProxyTestCase):
    """Addons with the cache on."""

    def install(self, addon: Recorder) -> None:
        """A caching factory with C{addon}, and a client connection to it."""
        config = ProxyConfig(cache_memory="4MiB", pool_size=0)
        self.factory = ProxyFactory(config, self.clock, self.connector, addons=[addon])
        self.factory.via = b"aproxy"
        self.client, self.proto = self.connect_client()

    def get(self, respond: bytes | None) -> bytes:
        """GET URL; answer with C{respond} if the proxy goes upstream; the response."""
        before = len(self.connector.attempts)
        self.proto.dataReceived(b"GET " + URL + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
        if len(self.connector.attempts) > before:
            assert respond is not None
            attempt = self.connector.attempts[-1]
            attempt.succeed()
            attempt.respond(respond)
        return self.take(self.client)

    def test_hooks_on_miss_and_hit_cache_stores_origin_body(self) -> None:
        """Response hooks and transformers run on the miss and the hit; the cache keeps
        the origin's bytes (the hit is transformed anew)."""
        addon = Recorder(upper=True)
        self.install(addon)
        origin = (
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 11\r\n\r\nhello world"
        )
        miss = self.get(origin)
        hit = self.get(None)
        self.assertEqual(len(self.connector.attempts), 1)
        for response in (miss, hit):
            self.assertIn(b"X-Addon: seen\r\n", response)
            # (Were the transformed body stored, the hit would be "[[hello]] world".)
            self.assertEqual(dechunk(response), b"[hello] world")
        self.assertEqual([s[2] for s in addon.seen], [False, True])

    def test_request_hook_before_cache(self) -> None:
        """A refusal comes before the cache lookup: a stored page is not served."""
        addon = Recorder()
        self.install(addon)
        origin = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nhello"
        self.get(origin)
        addon.deny_path = "/page"
        self.assertTrue(self.get(None).startswith(b"HTTP/1.1 403 "))


class ExampleAddonTests(ProxyTestCase):
    """Each example of examples/addons on the in-memory proxy (the real-client runs are
    in test_addon_clients)."""

    def install(self, name: str, cls: str) -> Any:
        """A factory with the example C{name}.py's C{cls}; the addon object."""
        factory = ProxyFactory(
            ProxyConfig(addon=[f"{EXAMPLES / name}.py:{cls}"], pool_size=0),
            self.clock,
            self.connector,
        )
        factory.via = b"aproxy"
        self.factory = factory
        self.client, self.proto = self.connect_client()
        return factory.runtime.addons.addons[0].obj

    def fetch(self, response: bytes, target: bytes = URL) -> tuple[bytes, bytes]:
        """GET C{target}, answered by C{response}: (what the origin got, the response)."""
        self.proto.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
        attempt = self.connector.attempts[-1]
        upstream = attempt.succeed()
        attempt.respond(response)
        return upstream.value(), self.take(self.client)

    def test_headers(self) -> None:
        """A request id upstream; Server and X-Powered-By gone, nosniff added."""
        self.install("headers", "Headers")
        sent, got = self.fetch(
            b"HTTP/1.1 200 OK\r\nServer: x\r\nX-Powered-By: y\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertIn(b"X-Request-Id: 1\r\n", sent)
        self.assertNotIn(b"Server", got)
        self.assertNotIn(b"X-Powered-By", got)
        self.assertIn(b"X-Content-Type-Options: nosniff\r\n", got)

    def test_block_types_by_type_and_size(self) -> None:
        """An executable and an announced 60 MiB body are refused; a page is not."""
        self.install("block_types", "BlockTypes")
        _, exe = self.fetch(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-msdownload\r\n"
            b"Content-Length: 2\r\n\r\nMZ"
        )
        self.assertTrue(exe.startswith(b"HTTP/1.1 403 "), exe)
        _, big = self.fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 62914560\r\n\r\n")
        self.assertTrue(big.startswith(b"HTTP/1.1 403 "), big)
        _, page = self.fetch(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi"
        )
        self.assertTrue(page.startswith(b"HTTP/1.1 200 "), page)

    def test_rewrite_html_only_html(self) -> None:
        """text/html is rewritten across a chunk cut; other types pass untouched."""
        self.install("rewrite_html", "RewriteHtml")
        self.proto.dataReceived(b"GET " + URL + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
        attempt = self.connector.attempts[-1]
        attempt.succeed()
        attempt.respond(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 14\r\n\r\nin the c"
        )
        attempt.respond(b"loud.\n")
        self.assertEqual(dechunk(self.take(self.client)), b"in other people's computers.\n")
        _, text = self.fetch(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nthe cloud"
        )
        self.assertTrue(
            text.endswith(b"Content-Length: 9\r\nVia: 1.1 aproxy\r\n\r\nthe cloud"), text
        )

    def test_local_page_and_counts(self) -> None:
        """proxy.test is answered by the proxy; counts.proxy.test shows the counts."""
        self.install("local_page", "LocalPage")
        self.proto.dataReceived(b"GET http://proxy.test/ HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        self.assertIn(b"this page comes from the proxy", self.take(self.client))
        self.assertEqual(self.connector.attempts, [])
        counter = self.install("count_users", "CountUsers")
        self.fetch(OK_TWO)
        self.fetch(OK_TWO)
        self.proto.dataReceived(b"GET http://counts.proxy.test/ HTTP/1.1\r\nHost: c\r\n\r\n")
        self.assertTrue(self.take(self.client).endswith(b'{"127.0.0.1": 2}\n'))
        self.assertEqual(counter.requests["127.0.0.1"], 2)


OK_TWO = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
