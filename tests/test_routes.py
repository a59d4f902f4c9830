"""Parent proxy URLs, routes and their configuration (C{--upstream}, C{--route})."""

from __future__ import annotations

import base64
import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aproxy.config import ProxyConfig
from aproxy.run.tap import Options
from aproxy.upstream.routes import Parent, Router, parse_parent, parse_route


class ParseParentTests(SynchronousTestCase):
    """C{parse_parent} accepts the three schemes and refuses the rest in one line."""

    def test_http_with_credentials(self) -> None:
        """User and password are percent-decoded; the name never shows them."""
        parent = parse_parent("http://al%40ice:p%3Ass@Proxy.Example:3128")
        self.assertEqual(parent, Parent("http", "proxy.example", 3128, "al@ice", "p:ss"))
        self.assertEqual(parent.name, "http://proxy.example:3128")
        self.assertNotIn("p:ss", repr(parent))
        expected = base64.b64encode(b"al@ice:p:ss")
        self.assertEqual(parent.authorization, b"Proxy-Authorization: Basic " + expected + b"\r\n")

    def test_default_ports(self) -> None:
        """Each scheme has its usual port; socks5h is socks5 (the parent resolves names)."""
        self.assertEqual(parse_parent("http://p").port, 80)
        self.assertEqual(parse_parent("https://p").port, 443)
        self.assertEqual(parse_parent("socks5://p").port, 1080)
        self.assertEqual(parse_parent("socks5h://p:9050").scheme, "socks5")

    def test_ipv6(self) -> None:
        """An IPv6 parent is written in brackets and stored without them."""
        parent = parse_parent("http://[::1]:3128")
        self.assertEqual(parent.host, "::1")
        self.assertEqual(parent.name, "http://[::1]:3128")

    def test_no_credentials(self) -> None:
        """Without credentials there is no Proxy-Authorization."""
        self.assertIsNone(parse_parent("http://p:1").authorization)

    def test_rejected(self) -> None:
        """Other schemes, no host, a path, a bad port or control characters are refused."""
        for url in (
            "ftp://p:21",
            "http://:3128",
            "http://p:3128/path",
            "http://p:99999",
            "p:3128",
            "http://u:a%0Ab@p:1",
        ):
            with self.assertRaises(ValueError, msg=url):
                parse_parent(url)

    def test_error_hides_password(self) -> None:
        """An error message never repeats the password."""
        with self.assertRaises(ValueError) as caught:
            parse_parent("http://user:secret@p:3128/x")
        self.assertNotIn("secret", str(caught.exception))

    def test_socks_credential_lengths(self) -> None:
        """RFC 1929 limits user name and password to 255 bytes each."""
        with self.assertRaises(ValueError):
            parse_parent("socks5://" + "u" * 256 + ":p@h:1")


class RouterTests(SynchronousTestCase):
    """Routes pick a parent per destination host: first match wins, else direct."""

    def test_first_match_wins(self) -> None:
        """The issue's example: the corp subdomains through a parent, the rest direct."""
        router = Router(("*.corp.example=http://10.1.2.3:3128", "*=direct"))
        parent = router.parent_for("A.Corp.Example")
        assert parent is not None
        self.assertEqual(parent.name, "http://10.1.2.3:3128")
        self.assertIsNone(router.parent_for("corp.example"))
        self.assertIsNone(router.parent_for("other.example"))

    def test_exact_domain_and_address(self) -> None:
        """Exact names, .domain (itself and below) and address networks all match."""
        router = Router(
            (
                "one.example=socks5://s:1080",
                ".two.example=http://t:1",
                "10.0.0.0/8=http://n:1",
            )
        )
        self.assertEqual(router.parent_for("one.example"), parse_parent("socks5://s:1080"))
        self.assertIsNone(router.parent_for("x.one.example"))
        self.assertEqual(router.parent_for("two.example"), parse_parent("http://t:1"))
        self.assertEqual(router.parent_for("a.two.example"), parse_parent("http://t:1"))
        self.assertEqual(router.parent_for("10.9.8.7"), parse_parent("http://n:1"))
        self.assertIsNone(router.parent_for("11.0.0.1"))

    def test_empty_router_is_false(self) -> None:
        """No routes: the dialer skips routing altogether."""
        self.assertFalse(Router())
        self.assertTrue(Router(("*=direct",)))

    def test_parse_route(self) -> None:
        """PATTERN=TARGET, with direct meaning no parent; malformed values are refused."""
        self.assertEqual(parse_route("*=direct"), ("*", None))
        self.assertEqual(parse_route(" *.X.example = http://p:1 ")[0], "*.x.example")
        for bad in ("*.example", "=http://p:1", "*.example=", "bad pattern=direct", "*=ftp://p"):
            with self.assertRaises(ValueError, msg=bad):
                parse_route(bad)


class RouteConfigTests(SynchronousTestCase):
    """The configuration validates routes at start; C{--upstream} is the last route."""

    def test_upstream_is_last_route(self) -> None:
        """--upstream URL is the same as a last --route '*=URL'."""
        config = ProxyConfig(route=("a.example=direct",), upstream="http://p:1")
        self.assertEqual(config.all_routes, ("a.example=direct", "*=http://p:1"))

    def test_bad_values_name_the_option(self) -> None:
        """A bad route or upstream is a ValueError naming the option."""
        with self.assertRaisesRegex(ValueError, "^route: "):
            ProxyConfig(route=("nonsense",))
        with self.assertRaisesRegex(ValueError, "^upstream: "):
            ProxyConfig(upstream="gopher://p:70")
        with self.assertRaisesRegex(ValueError, "^insecure-host: "):
            ProxyConfig(insecure_host=("*",))

    def test_command_line(self) -> None:
        """--route is repeatable, in order; --upstream, --ca-file, --insecure-host parse."""
        options = Options()
        options.parseOptions(
            [
                "--route",
                "*.corp.example=http://10.1.2.3:3128",
                "--route",
                "*=direct",
                "--upstream",
                "socks5://u:p@127.0.0.1:1080",
                "--insecure-host",
                "self-signed.example",
            ]
        )
        config = options["proxy-config"]
        self.assertEqual(config.route, ("*.corp.example=http://10.1.2.3:3128", "*=direct"))
        self.assertEqual(config.upstream, "socks5://u:p@127.0.0.1:1080")
        self.assertEqual(config.insecure_host, ("self-signed.example",))

    def test_bad_upstream_is_a_usage_error(self) -> None:
        """A malformed --upstream is one usage line, not a traceback."""
        with self.assertRaisesRegex(usage.UsageError, "upstream: parent proxy"):
            Options().parseOptions(["--upstream", "http://p:3128/path"])

    def test_missing_ca_file_is_a_usage_error(self) -> None:
        """An unreadable --ca-file is reported at start in one line."""
        with self.assertRaisesRegex(usage.UsageError, "--ca-file /nonexistent/ca.pem"):
            Options().parseOptions(["--ca-file", "/nonexistent/ca.pem"])

    def test_ca_file_without_certificates(self) -> None:
        """A file that holds no certificate is refused too."""
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
            f.write("not a certificate\n")
            f.flush()
            with self.assertRaisesRegex(usage.UsageError, "--ca-file"):
                Options().parseOptions(["--ca-file", f.name])
