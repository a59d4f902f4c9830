"""
The shared cache's pure decisions (L{aproxy.cache.rules}), each test written from the RFC
text it cites: RFC 9111 (caching), RFC 9110 (dates, validators, conditionals, ranges) and
RFC 9211 (Cache-Status).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aproxy.cache import control, rules
from aproxy.cache.preconditions import (
    conditional_match,
    not_modified_fields,
    parse_range,
    validation_fields,
)
from aproxy.cache.rules import (
    FRESH,
    MAX_DELTA,
    STALE_OK,
    VALIDATE,
    Fields,
    cache_key,
    cache_status,
    choose,
    current_age,
    delta_seconds,
    field_values,
    freshness_lifetime,
    has_explicit_freshness,
    http_date,
    invalidation_keys,
    is_unsafe,
    parse_cache_control,
    parse_http_date,
    request_cc_flags,
    storable,
    stored_fields,
    updated_fields,
    vary_key,
    vary_names,
)

# RFC 9110 section 5.6.7's example instant, in its three formats.
SUNDAY = 784111777.0
IMF = b"Sun, 06 Nov 1994 08:49:37 GMT"
RFC850 = b"Sunday, 06-Nov-94 08:49:37 GMT"
ASCTIME = b"Sun Nov  6 08:49:37 1994"
HOUR = 3600.0


def cc(*values: bytes) -> list[tuple[bytes, bytes]]:
    """One Cache-Control field line per value."""
    return [(b"Cache-Control", value) for value in values]


def dated(offset: float, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """Response fields with a Date C{offset} seconds after L{SUNDAY}, then C{extra}."""
    return [(b"Date", http_date(SUNDAY + offset)), *extra]


class ModuleTests(SynchronousTestCase):
    """The modules' shape."""

    def test_public_names_exist_and_are_documented(self) -> None:
        """Every name in C{__all__} of both modules exists, and the functions say what
        they are for."""
        for module in (rules, control):
            for name in module.__all__:
                value = getattr(module, name)
                if callable(value) and name != "Fields":
                    self.assertTrue(value.__doc__, name)

    def test_constants(self) -> None:
        """The decisions are three distinct values, and MAX_DELTA is 2**31 (RFC 9111
        section 1.2.2)."""
        self.assertEqual(len({FRESH, STALE_OK, VALIDATE}), 3)
        self.assertEqual(MAX_DELTA, 2147483648)


class FieldValuesTests(SynchronousTestCase):
    """L{field_values}: list-valued fields (RFC 9110 section 5.6.1)."""

    def test_lines_combined_and_split(self) -> None:
        """All lines of the field, in any case, are split on commas and stripped; other
        fields are not included (section 5.6.1)."""
        fields = [(b"Vary", b"a, b"), (b"Other", b"x"), (b"VARY", b"c")]
        self.assertEqual(field_values(fields, b"vary"), [b"a", b"b", b"c"])

    def test_empty_elements_dropped(self) -> None:
        """Empty list elements are accepted and ignored (section 5.6.1.2)."""
        self.assertEqual(field_values([(b"vary", b", ,a,,\t, b ,")], b"vary"), [b"a", b"b"])

    def test_commas_in_quoted_strings(self) -> None:
        """A comma inside a quoted-string, even after an escaped quote, does not split
        (section 5.6.4)."""
        fields = cc(b'private="a, b", no-cache="x\\", y", public')
        self.assertEqual(
            field_values(fields, b"cache-control"),
            [b'private="a, b"', b'no-cache="x\\", y"', b"public"],
        )

    def test_absent(self) -> None:
        """A missing field has no values."""
        self.assertEqual(field_values([(b"Vary", b"a")], b"cache-control"), [])


class CacheControlParsingTests(SynchronousTestCase):
    """L{parse_cache_control} (RFC 9111 section 5.2)."""

    def test_names_lowercased_and_values(self) -> None:
        """Directive names are case-insensitive; an argument is a token, a directive
        without one has None (section 5.2)."""
        self.assertEqual(
            parse_cache_control(cc(b"Max-Age=60, NO-STORE")), {"max-age": "60", "no-store": None}
        )

    def test_quoted_value_unquoted(self) -> None:
        """Quoted-string arguments are accepted for any directive and unquoted, with
        backslash escapes undone (sections 5.2, RFC 9110 5.6.4)."""
        parsed = parse_cache_control(cc(b'max-age="5", private="a, \\"b\\""'))
        self.assertEqual(parsed, {"max-age": "5", "private": 'a, "b"'})

    def test_odd_spacing(self) -> None:
        """Whitespace around '=' and commas, and empty elements, are tolerated."""
        parsed = parse_cache_control(cc(b" max-age = 5 ,, \t public , s-maxage= 7"))
        self.assertEqual(parsed, {"max-age": "5", "public": None, "s-maxage": "7"})

    def test_several_lines(self) -> None:
        """Directives from every Cache-Control field line are combined (RFC 9110 section
        5.3)."""
        fields = [(b"cache-control", b"public"), (b"X", b"y"), (b"CACHE-CONTROL", b"max-age=1")]
        self.assertEqual(parse_cache_control(fields), {"public": None, "max-age": "1"})

    def test_first_duplicate_wins(self) -> None:
        """With a directive given twice, the first occurrence is used (RFC 9111 section
        4.2.1)."""
        self.assertEqual(parse_cache_control(cc(b"max-age=10", b"max-age=20"))["max-age"], "10")
        self.assertEqual(parse_cache_control(cc(b"max-age=x, max-age=20"))["max-age"], "x")

    def test_garbage_skipped(self) -> None:
        """Elements whose name is not a token are skipped; the rest still count."""
        parsed = parse_cache_control(cc(b'=5, "quoted", a b, @x, no-cache'))
        self.assertEqual(parsed, {"no-cache": None})

    def test_malformed_value_kept_raw(self) -> None:
        """A malformed argument is kept as written, so a numeric directive reads as
        invalid (stale, section 4.2.1) rather than absent."""
        parsed = parse_cache_control(cc(b"max-age=5 6", b"s-maxage="))
        self.assertEqual(parsed, {"max-age": "5 6", "s-maxage": ""})
        self.assertIsNone(delta_seconds(parsed["max-age"]))


class DeltaSecondsTests(SynchronousTestCase):
    """L{delta_seconds} (RFC 9111 section 1.2.2)."""

    def test_digits(self) -> None:
        """A non-negative integer of digits is read, leading zeros included."""
        self.assertEqual(delta_seconds("0"), 0)
        self.assertEqual(delta_seconds("0042"), 42)

    def test_capped(self) -> None:
        """A value past 2**31 is read as 2147483648, the largest value (section 1.2.2),
        however many digits it has."""
        self.assertEqual(delta_seconds("2147483649"), MAX_DELTA)
        self.assertEqual(delta_seconds("9" * 5000), MAX_DELTA)
        self.assertEqual(delta_seconds("2147483647"), 2147483647)

    def test_invalid(self) -> None:
        """Anything that is not only ASCII digits is invalid."""
        for value in (None, "", "-1", "1.5", " 5", "5 ", "+5", "1e3", "٣", "²", "0x10"):
            self.assertIsNone(delta_seconds(value), value)


class HTTPDateTests(SynchronousTestCase):
    """L{parse_http_date} and L{http_date} (RFC 9110 section 5.6.7)."""

    def test_imf_fixdate(self) -> None:
        """The preferred format is read as UTC."""
        self.assertEqual(parse_http_date(IMF), SUNDAY)

    def test_rfc850(self) -> None:
        """The obsolete RFC 850 format is accepted."""
        self.assertEqual(parse_http_date(RFC850), SUNDAY)

    def test_asctime(self) -> None:
        """The asctime format is accepted, with a space-padded or two-digit day."""
        self.assertEqual(parse_http_date(ASCTIME), SUNDAY)
        self.assertEqual(parse_http_date(b"Sun Nov 06 08:49:37 1994"), SUNDAY)
        self.assertEqual(parse_http_date(b"Thu Nov 16 08:49:37 1994"), SUNDAY + 10 * 86400)

    def test_rfc850_fifty_year_rule(self) -> None:
        """A two-digit year more than 50 years in the future is the most recent past year
        with those digits (section 5.6.7)."""
        now = parse_http_date(b"Mon, 01 Jun 2026 00:00:00 GMT")
        self.assertEqual(
            parse_http_date(b"Friday, 01-Jan-49 00:00:00 GMT", now),
            parse_http_date(b"Fri, 01 Jan 2049 00:00:00 GMT"),
        )
        self.assertEqual(
            parse_http_date(b"Thursday, 01-Jan-80 00:00:00 GMT", now),
            parse_http_date(b"Tue, 01 Jan 1980 00:00:00 GMT"),
        )
        self.assertEqual(parse_http_date(RFC850, now), SUNDAY)

    def test_rfc850_year_from_next_century(self) -> None:
        """Near a century's end, a small two-digit year within 50 years ahead is in the
        next century (only more than 50 years ahead moves back, section 5.6.7)."""
        now = parse_http_date(b"Sat, 01 Jun 2097 00:00:00 GMT")
        self.assertEqual(
            parse_http_date(b"Monday, 01-Jan-05 00:00:00 GMT", now),
            parse_http_date(b"Thu, 01 Jan 2105 00:00:00 GMT"),
        )

    def test_not_dates(self) -> None:
        """Numbers, garbage and near misses are not HTTP-dates."""
        for value in (
            b"0",
            b"-1",
            b"",
            b"garbage",
            b"Sun, 06 Nov 1994 08:49:37",
            b"Sun, 06 Nov 1994 08:49:37 UTC",
            b"Sun, 6 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 94 08:49:37 GMT",
            b"Sun, 31 Feb 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 24:00:00 GMT",
            b"Sun, 06 Nov 1994 08:60:00 GMT",
            b"Sun, 06 Foo 1994 08:49:37 GMT",
            b"Xyz, 06 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49:37 GMT extra",
            b"Sun, 06 Nov 1994 08:49:37 GMT\xff",
            b"1994-11-06T08:49:37Z",
        ):
            self.assertIsNone(parse_http_date(value), value)

    def test_leap_day_and_leap_second(self) -> None:
        """February 29 exists in leap years only; second 60 is allowed for leap
        seconds."""
        self.assertIsNotNone(parse_http_date(b"Tue, 29 Feb 2000 00:00:00 GMT"))
        self.assertIsNone(parse_http_date(b"Thu, 29 Feb 1900 00:00:00 GMT"))
        self.assertEqual(parse_http_date(b"Sun, 06 Nov 1994 08:49:60 GMT"), SUNDAY + 23)

    def test_write_imf_fixdate(self) -> None:
        """Dates are written as IMF-fixdate, the fraction dropped, and read back."""
        self.assertEqual(http_date(SUNDAY + 0.9), IMF)
        self.assertEqual(http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT")
        self.assertEqual(parse_http_date(http_date(1700000000.0)), 1700000000.0)


class CacheKeyTests(SynchronousTestCase):
    """L{cache_key}: the target URI as the primary key (RFC 9111 section 2)."""

    def test_default_port_omitted(self) -> None:
        """Scheme and host are lowercased; the default port is not written."""
        self.assertEqual(cache_key(b"HTTP", b"Example.COM", 80, b"/a?b"), b"http://example.com/a?b")
        self.assertEqual(cache_key(b"https", b"example.com", 443, b"/"), b"https://example.com/")

    def test_other_port_written(self) -> None:
        """A non-default port is part of the key; https on 80 is not http's default."""
        self.assertEqual(cache_key(b"http", b"h", 8080, b"/"), b"http://h:8080/")
        self.assertEqual(cache_key(b"https", b"h", 80, b"/"), b"https://h:80/")

    def test_ipv6_bracketed(self) -> None:
        """An IPv6 host is written in brackets (RFC 3986 section 3.2.2)."""
        self.assertEqual(cache_key(b"http", b"::1", 8080, b"/x"), b"http://[::1]:8080/x")

    def test_path_not_normalized(self) -> None:
        """Path and query are kept exactly as sent."""
        self.assertEqual(cache_key(b"http", b"h", 80, b"/A/./%7e?Q=1&b"), b"http://h/A/./%7e?Q=1&b")


class StorableTests(SynchronousTestCase):
    """L{storable}: RFC 9111 section 3 for a shared cache."""

    def test_plain_200_stored(self) -> None:
        """A 200 to a GET is heuristically cacheable, so it may be stored."""
        self.assertIsNone(storable(b"GET", 200, [], []))

    def test_only_get(self) -> None:
        """Only GET responses are stored: not HEAD, POST or lowercase methods."""
        for method in (b"HEAD", b"POST", b"get"):
            self.assertEqual(storable(method, 200, [], cc(b"max-age=60")), "method")

    def test_non_final_and_304(self) -> None:
        """Only final responses are stored (section 3); a 304 is not a response to store
        (it freshens one, section 4.3.4)."""
        for status in (100, 101, 304, 600):
            self.assertEqual(storable(b"GET", status, [], cc(b"max-age=60")), "status")

    def test_partial(self) -> None:
        """A 206 is not stored (this cache stores complete responses only, section
        3.3)."""
        self.assertEqual(storable(b"GET", 206, [], cc(b"max-age=60")), "partial")

    def test_no_store_response(self) -> None:
        """no-store in the response forbids storing (section 5.2.2.5)."""
        self.assertEqual(storable(b"GET", 200, [], cc(b"max-age=60, No-Store")), "no-store")

    def test_no_store_request(self) -> None:
        """no-store in the request forbids storing the response (section 5.2.1.5)."""
        self.assertEqual(storable(b"GET", 200, cc(b"no-store"), cc(b"max-age=60")), "no-store")

    def test_private(self) -> None:
        """A shared cache stores no private response, with or without field names
        (section 5.2.2.7)."""
        self.assertEqual(storable(b"GET", 200, [], cc(b"private, max-age=60")), "private")
        self.assertEqual(storable(b"GET", 200, [], cc(b'private="set-cookie"')), "private")

    def test_authorization(self) -> None:
        """A response to a request with Authorization is stored only with public,
        s-maxage or must-revalidate (section 3.5)."""
        req = [(b"authorization", b"Basic eDp5")]
        self.assertEqual(storable(b"GET", 200, req, cc(b"max-age=60")), "authorization")
        for allowing in (b"public", b"s-maxage=60", b"must-revalidate"):
            self.assertIsNone(storable(b"GET", 200, req, cc(allowing)), allowing)

    def test_vary_star(self) -> None:
        """A response with Vary: * never matches a request, so it is not stored (section
        4.1)."""
        resp = [*cc(b"max-age=60"), (b"Vary", b"accept, *")]
        self.assertEqual(storable(b"GET", 200, [], resp), "vary")

    def test_needs_freshness_information(self) -> None:
        """A status that is not heuristically cacheable needs Expires, max-age, s-maxage
        or public (section 3, RFC 9110 section 15.1)."""
        self.assertEqual(storable(b"GET", 302, [], []), "no-explicit-freshness")
        self.assertEqual(storable(b"GET", 500, [], []), "no-explicit-freshness")
        for fields in (
            [(b"Expires", IMF)],
            cc(b"max-age=5"),
            cc(b"s-maxage=5"),
            cc(b"public"),
        ):
            self.assertIsNone(storable(b"GET", 302, [], fields), fields)

    def test_heuristically_cacheable_statuses(self) -> None:
        """The statuses of RFC 9110 section 15.1 are storable without freshness
        information."""
        for status in (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501):
            self.assertIsNone(storable(b"GET", status, [], []), status)
        for status in (201, 302, 303, 307, 400, 403, 500, 502, 503):
            self.assertEqual(storable(b"GET", status, [], []), "no-explicit-freshness", status)

    def test_must_understand_known_status(self) -> None:
        """With must-understand and an understood status, no-store is ignored (section
        5.2.2.3)."""
        resp = cc(b"must-understand, no-store, max-age=60")
        self.assertIsNone(storable(b"GET", 200, [], resp))
        self.assertIsNone(storable(b"GET", 307, [], resp))

    def test_must_understand_unknown_status(self) -> None:
        """With must-understand and a status whose rules the cache does not implement, the
        response is not stored (section 5.2.2.3)."""
        resp = cc(b"must-understand, no-store, max-age=60")
        self.assertEqual(storable(b"GET", 299, [], resp), "must-understand")
        self.assertEqual(
            storable(b"GET", 418, [], cc(b"must-understand, max-age=6")), ("must-understand")
        )

    def test_must_understand_keeps_request_no_store(self) -> None:
        """must-understand overrides the response's no-store only, not the request's
        (section 5.2.1.5)."""
        resp = cc(b"must-understand, no-store, max-age=60")
        self.assertEqual(storable(b"GET", 200, cc(b"no-store"), resp), "no-store")


class FreshnessLifetimeTests(SynchronousTestCase):
    """L{freshness_lifetime} and L{has_explicit_freshness} (RFC 9111 sections 4.2.1,
    4.2.2)."""

    def test_s_maxage_first(self) -> None:
        """A shared cache uses s-maxage over max-age and Expires (section 4.2.1)."""
        resp = dated(0, *cc(b"max-age=10, s-maxage=20"), (b"Expires", http_date(SUNDAY + 30)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 20.0)

    def test_max_age_over_expires(self) -> None:
        """max-age overrides Expires (section 5.3)."""
        resp = dated(0, *cc(b"max-age=10"), (b"Expires", http_date(SUNDAY + 30)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 10.0)

    def test_invalid_delta_is_stale(self) -> None:
        """An invalid s-maxage or max-age value means stale, even with valid Expires
        (section 4.2.1)."""
        expires = (b"Expires", http_date(SUNDAY + 30))
        for value in (b"s-maxage=-1", b"max-age=1.5", b"max-age=abc", b"max-age"):
            resp = dated(0, *cc(value), expires)
            self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 0.0, value)

    def test_expires_minus_date(self) -> None:
        """Expires minus Date is the lifetime (section 4.2.1), never negative."""
        resp = dated(-50, (b"Expires", http_date(SUNDAY + 100)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 150.0)
        resp = dated(0, (b"Expires", http_date(SUNDAY - 100)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 0.0)

    def test_expires_without_date(self) -> None:
        """Without a valid Date, the response time stands in for it (section 4.2.1)."""
        resp = [(b"Date", b"bogus"), (b"Expires", http_date(SUNDAY + 100))]
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY + 40), 60.0)
        self.assertEqual(
            freshness_lifetime(200, [(b"Expires", http_date(SUNDAY + 100))], SUNDAY), 100.0
        )

    def test_invalid_expires_is_stale(self) -> None:
        """An invalid Expires, such as 0, means already expired, and suppresses the
        heuristic (section 5.3)."""
        for value in (b"0", b"-1", b"tomorrow"):
            resp = dated(0, (b"Expires", value), (b"Last-Modified", http_date(SUNDAY - 86400)))
            self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 0.0, value)

    def test_first_expires(self) -> None:
        """With several Expires lines the first is used (section 4.2.1)."""
        resp = dated(0, (b"Expires", http_date(SUNDAY + 10)), (b"Expires", http_date(SUNDAY + 99)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 10.0)

    def test_expires_in_other_formats(self) -> None:
        """Expires may use any HTTP-date format (RFC 9110 section 5.6.7)."""
        resp = dated(-10, (b"Expires", ASCTIME))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 10.0)

    def test_heuristic_fraction(self) -> None:
        """Without explicit freshness, a fraction of the time since Last-Modified is used
        (section 4.2.2)."""
        resp = dated(0, (b"Last-Modified", http_date(SUNDAY - 10 * HOUR)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY + 5), HOUR)
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY, heuristic_fraction=0.5), 5 * HOUR)

    def test_heuristic_uses_response_time_without_date(self) -> None:
        """The heuristic measures from the response time when Date is missing."""
        resp = [(b"Last-Modified", http_date(SUNDAY - 100))]
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY + 100), 20.0)

    def test_heuristic_capped(self) -> None:
        """The heuristic lifetime is capped (a day by default)."""
        resp = dated(0, (b"Last-Modified", http_date(SUNDAY - 365 * 86400)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 86400.0)
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY, heuristic_max=60.0), 60.0)

    def test_heuristic_never_negative(self) -> None:
        """A Last-Modified after Date gives no freshness."""
        resp = dated(0, (b"Last-Modified", http_date(SUNDAY + 1000)))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 0.0)

    def test_heuristic_only_for_allowed_statuses(self) -> None:
        """Heuristics apply only to heuristically cacheable statuses or public responses
        (section 4.2.2)."""
        last_modified = (b"Last-Modified", http_date(SUNDAY - 10 * HOUR))
        self.assertEqual(freshness_lifetime(302, dated(0, last_modified), SUNDAY), 0.0)
        self.assertEqual(freshness_lifetime(404, dated(0, last_modified), SUNDAY), HOUR)
        resp = dated(0, last_modified, *cc(b"public"))
        self.assertEqual(freshness_lifetime(302, resp, SUNDAY), HOUR)

    def test_no_information(self) -> None:
        """Without explicit freshness or a valid Last-Modified the lifetime is 0."""
        self.assertEqual(freshness_lifetime(200, dated(0), SUNDAY), 0.0)
        resp = dated(0, (b"Last-Modified", b"yesterday"))
        self.assertEqual(freshness_lifetime(200, resp, SUNDAY), 0.0)

    def test_has_explicit_freshness(self) -> None:
        """s-maxage, max-age or Expires (even invalid) are explicit freshness; public
        and Last-Modified are not."""
        for fields in (cc(b"s-maxage=1"), cc(b"max-age=x"), [(b"expires", b"0")]):
            self.assertTrue(has_explicit_freshness(fields), fields)
        for fields in (cc(b"public"), [(b"Last-Modified", IMF)], []):
            self.assertFalse(has_explicit_freshness(fields), fields)


class CurrentAgeTests(SynchronousTestCase):
    """L{current_age} (RFC 9111 section 4.2.3)."""

    def test_resident_time(self) -> None:
        """A response with Date equal to its receipt ages with the time it is kept."""
        self.assertEqual(current_age(dated(0), SUNDAY, SUNDAY, SUNDAY + 30), 30.0)

    def test_apparent_age(self) -> None:
        """An old Date gives an apparent age (response_time - date_value)."""
        self.assertEqual(current_age(dated(-20), SUNDAY - 1, SUNDAY, SUNDAY + 5), 25.0)

    def test_apparent_age_never_negative(self) -> None:
        """A Date in the future (clock skew) does not make the age negative; the
        response delay still counts."""
        self.assertEqual(current_age(dated(500), SUNDAY - 2, SUNDAY, SUNDAY), 2.0)
        # Even when the response delay is itself negative (request time after response
        # time), apparent_age stays at 0 and wins, as section 4.2.3 computes it.
        self.assertEqual(current_age(dated(500), SUNDAY + 1, SUNDAY, SUNDAY), 0.0)

    def test_age_plus_response_delay(self) -> None:
        """An Age field is corrected by the response delay (request to response)."""
        resp = dated(0, (b"Age", b"100"))
        self.assertEqual(current_age(resp, SUNDAY - 3, SUNDAY, SUNDAY + 10), 113.0)

    def test_larger_of_apparent_and_corrected(self) -> None:
        """The larger of apparent age and corrected Age is the initial age."""
        resp = dated(-200, (b"Age", b"100"))
        self.assertEqual(current_age(resp, SUNDAY - 3, SUNDAY, SUNDAY), 200.0)

    def test_missing_date(self) -> None:
        """Without a Date, date_value is the response time (apparent age 0)."""
        resp = [(b"Age", b"7")]
        self.assertEqual(current_age(resp, SUNDAY - 1, SUNDAY, SUNDAY + 2), 10.0)

    def test_invalid_age(self) -> None:
        """An invalid Age counts as 0."""
        for value in (b"-5", b"abc", b"1.5"):
            resp = dated(0, (b"Age", value))
            self.assertEqual(current_age(resp, SUNDAY, SUNDAY, SUNDAY + 1), 1.0, value)

    def test_first_age(self) -> None:
        """With several Age values the first is used."""
        resp = dated(0, (b"Age", b"10, 50"), (b"Age", b"90"))
        self.assertEqual(current_age(resp, SUNDAY, SUNDAY, SUNDAY), 10.0)


class VaryTests(SynchronousTestCase):
    """L{vary_names} and L{vary_key} (RFC 9111 section 4.1)."""

    def test_names(self) -> None:
        """Names are lowercased, deduplicated and sorted, across lines."""
        resp = [(b"Vary", b"Accept-Encoding, accept"), (b"vary", b"ACCEPT-ENCODING")]
        self.assertEqual(vary_names(resp), (b"accept", b"accept-encoding"))

    def test_no_vary(self) -> None:
        """Without Vary, no secondary key."""
        self.assertEqual(vary_names([(b"Content-Type", b"text/plain")]), ())

    def test_star(self) -> None:
        """Vary: * (alone or among names) never matches (section 4.1)."""
        self.assertIsNone(vary_names([(b"Vary", b"*")]))
        self.assertIsNone(vary_names([(b"Vary", b"accept"), (b"Vary", b"*")]))

    def test_empty_names_empty_key(self) -> None:
        """No names give the empty key, whatever the request."""
        self.assertEqual(vary_key((), [(b"Accept", b"x")]), b"")

    def test_equal_values_match(self) -> None:
        """Requests with the same values (names in any case) have the same key; others
        differ."""
        names = (b"accept", b"accept-encoding")
        one = vary_key(names, [(b"Accept", b"text/html"), (b"Accept-Encoding", b"gzip")])
        two = vary_key(names, [(b"accept-encoding", b"gzip"), (b"ACCEPT", b"text/html")])
        three = vary_key(names, [(b"Accept", b"text/html"), (b"Accept-Encoding", b"br")])
        self.assertEqual(one, two)
        self.assertNotEqual(one, three)

    def test_whitespace_and_lines_normalized(self) -> None:
        """Combining lines and whitespace around commas do not change the key (section
        4.1 allows both normalizations)."""
        names = (b"accept-encoding",)
        one = vary_key(names, [(b"Accept-Encoding", b"gzip,br")])
        two = vary_key(names, [(b"Accept-Encoding", b"gzip , br")])
        three = vary_key(names, [(b"Accept-Encoding", b"gzip"), (b"Accept-Encoding", b"br")])
        self.assertEqual(one, two)
        self.assertEqual(one, three)
        self.assertNotEqual(one, vary_key(names, [(b"Accept-Encoding", b"br,gzip")]))

    def test_missing_differs_from_empty(self) -> None:
        """A request without the field does not match one with it empty (section
        4.1)."""
        names = (b"cookie",)
        self.assertNotEqual(vary_key(names, []), vary_key(names, [(b"Cookie", b"")]))

    def test_values_cannot_imitate_other_fields(self) -> None:
        """One field's value cannot spell another field's entry."""
        names = (b"a", b"b")
        self.assertNotEqual(
            vary_key(names, [(b"a", b"x")]),
            vary_key(names, [(b"a", b"x\nb!")]),
        )


class ChooseTests(SynchronousTestCase):
    """L{choose}: may a stored response answer this request (RFC 9111 sections 4.2,
    5.2.1, 5.2.2)."""

    def test_fresh(self) -> None:
        """A response younger than its lifetime is fresh (section 4.2)."""
        self.assertEqual(choose([], [], 60.0, 59.0), FRESH)

    def test_stale(self) -> None:
        """A response as old as its lifetime or older is stale and is validated."""
        self.assertEqual(choose([], [], 60.0, 60.0), VALIDATE)
        self.assertEqual(choose([], [], 0.0, 0.0), VALIDATE)

    def test_response_no_cache(self) -> None:
        """Response no-cache, qualified or not, requires validation (section
        5.2.2.4)."""
        self.assertEqual(choose([], cc(b"no-cache"), 60.0, 1.0), VALIDATE)
        self.assertEqual(choose([], cc(b'no-cache="set-cookie"'), 60.0, 1.0), VALIDATE)

    def test_request_no_cache(self) -> None:
        """Request no-cache requires validation (section 5.2.1.4)."""
        self.assertEqual(choose(cc(b"no-cache"), [], 60.0, 1.0), VALIDATE)

    def test_pragma_no_cache(self) -> None:
        """Pragma: no-cache counts only without a Cache-Control field (section 5.4)."""
        self.assertEqual(choose([(b"Pragma", b"No-Cache")], [], 60.0, 1.0), VALIDATE)
        req = [(b"Pragma", b"no-cache"), *cc(b"max-stale")]
        self.assertEqual(choose(req, [], 60.0, 1.0), FRESH)
        self.assertEqual(choose([(b"Pragma", b"x-other")], [], 60.0, 1.0), FRESH)

    def test_request_max_age(self) -> None:
        """Request max-age=N refuses a response older than N (section 5.2.1.1)."""
        self.assertEqual(choose(cc(b"max-age=10"), [], 60.0, 10.0), FRESH)
        self.assertEqual(choose(cc(b"max-age=10"), [], 60.0, 10.5), VALIDATE)

    def test_request_max_age_invalid(self) -> None:
        """An invalid request max-age is read as max-age=0."""
        self.assertEqual(choose(cc(b"max-age=-1"), [], 60.0, 0.5), VALIDATE)
        self.assertEqual(choose(cc(b"max-age"), [], 60.0, 0.0), FRESH)

    def test_request_min_fresh(self) -> None:
        """Request min-fresh=N wants at least N more seconds of freshness (section
        5.2.1.3)."""
        self.assertEqual(choose(cc(b"min-fresh=20"), [], 60.0, 40.0), FRESH)
        self.assertEqual(choose(cc(b"min-fresh=20"), [], 60.0, 41.0), VALIDATE)

    def test_request_min_fresh_invalid_ignored(self) -> None:
        """An invalid min-fresh is ignored."""
        self.assertEqual(choose(cc(b"min-fresh=soon"), [], 60.0, 59.0), FRESH)

    def test_max_stale_any(self) -> None:
        """max-stale without a value accepts any staleness (section 5.2.1.2)."""
        self.assertEqual(choose(cc(b"max-stale"), [], 60.0, 1e9), STALE_OK)

    def test_max_stale_bounded(self) -> None:
        """max-stale=N accepts a response stale by N seconds at most."""
        self.assertEqual(choose(cc(b"max-stale=30"), [], 60.0, 90.0), STALE_OK)
        self.assertEqual(choose(cc(b"max-stale=30"), [], 60.0, 90.5), VALIDATE)

    def test_max_stale_invalid(self) -> None:
        """An invalid max-stale value accepts no staleness."""
        self.assertEqual(choose(cc(b"max-stale=-3"), [], 60.0, 61.0), VALIDATE)

    def test_max_stale_fresh_response(self) -> None:
        """max-stale does not turn a fresh response into a stale one."""
        self.assertEqual(choose(cc(b"max-stale"), [], 60.0, 1.0), FRESH)

    def test_stale_forbidden_by_response(self) -> None:
        """must-revalidate, proxy-revalidate, s-maxage (which implies proxy-revalidate in
        a shared cache) and no-cache forbid serving stale (sections 5.2.2.2, 5.2.2.8,
        5.2.2.10, 5.2.2.4), while fresh responses are still served."""
        for directive in (b"must-revalidate", b"proxy-revalidate", b"s-maxage=60"):
            self.assertEqual(choose(cc(b"max-stale"), cc(directive), 60.0, 61.0), VALIDATE)
            self.assertEqual(choose(cc(b"max-stale"), cc(directive), 60.0, 1.0), FRESH)
        self.assertEqual(choose(cc(b"max-stale"), cc(b"no-cache"), 60.0, 61.0), VALIDATE)

    def test_min_fresh_beats_max_stale(self) -> None:
        """A request with both min-fresh and max-stale gets no stale response."""
        self.assertEqual(choose(cc(b"max-stale, min-fresh=0"), [], 60.0, 61.0), VALIDATE)

    def test_request_flags(self) -> None:
        """no-store and only-if-cached are read from the request (sections 5.2.1.5,
        5.2.1.7)."""
        self.assertEqual(request_cc_flags(cc(b"No-Store, only-if-cached")), (True, True))
        self.assertEqual(request_cc_flags(cc(b"only-if-cached")), (False, True))
        self.assertEqual(request_cc_flags([(b"Pragma", b"no-store")]), (False, False))


class ValidationTests(SynchronousTestCase):
    """Revalidation requests and conditional requests answered from the cache (RFC 9111
    sections 4.3.1, 4.3.2; RFC 9110 sections 13.1.2, 13.1.3, 13.2.2, 15.4.5)."""

    def test_validation_fields_both(self) -> None:
        """An entity tag goes in If-None-Match, Last-Modified in If-Modified-Since
        (section 4.3.1)."""
        resp = [(b"ETag", b'W/"v1"'), (b"Last-Modified", IMF)]
        self.assertEqual(
            validation_fields(resp),
            b'If-None-Match: W/"v1"\r\nIf-Modified-Since: ' + IMF + b"\r\n",
        )

    def test_validation_fields_none(self) -> None:
        """Without a (valid) validator there is nothing to send."""
        self.assertEqual(validation_fields([(b"ETag", b"unquoted"), (b"Last-Modified", b"0")]), b"")
        self.assertEqual(validation_fields([(b"etag", b'"x"')]), b'If-None-Match: "x"\r\n')

    def test_if_none_match_weak_comparison(self) -> None:
        """If-None-Match uses weak comparison: W/"a" matches "a" (RFC 9110 section
        13.1.2)."""
        resp = [(b"ETag", b'"a"')]
        self.assertTrue(conditional_match(b"GET", [(b"If-None-Match", b'W/"a"')], resp))
        self.assertTrue(conditional_match(b"HEAD", [(b"If-None-Match", b'"x", "a"')], resp))
        self.assertFalse(conditional_match(b"GET", [(b"If-None-Match", b'"b"')], resp))

    def test_if_none_match_star(self) -> None:
        """If-None-Match: * matches any stored representation."""
        self.assertTrue(conditional_match(b"GET", [(b"If-None-Match", b"*")], []))

    def test_if_none_match_without_stored_etag(self) -> None:
        """Entity tags cannot match a response without one."""
        self.assertFalse(conditional_match(b"GET", [(b"If-None-Match", b'"a"')], []))

    def test_if_none_match_beats_if_modified_since(self) -> None:
        """If-Modified-Since is ignored when If-None-Match is present (RFC 9110 sections
        13.1.3, 13.2.2)."""
        req = [(b"If-None-Match", b'"b"'), (b"If-Modified-Since", IMF)]
        resp = [(b"ETag", b'"a"'), (b"Last-Modified", http_date(SUNDAY - 100))]
        self.assertFalse(conditional_match(b"GET", req, resp))

    def test_if_modified_since(self) -> None:
        """Not modified when Last-Modified is no later than the date (section
        13.1.3)."""
        req = [(b"If-Modified-Since", IMF)]
        self.assertTrue(conditional_match(b"GET", req, [(b"Last-Modified", IMF)]))
        resp = [(b"Last-Modified", http_date(SUNDAY + 1))]
        self.assertFalse(conditional_match(b"GET", req, resp))

    def test_if_modified_since_uses_date(self) -> None:
        """Without Last-Modified, Date is used, then the receipt time (RFC 9111 section
        4.3.2)."""
        req = [(b"If-Modified-Since", IMF)]
        self.assertTrue(conditional_match(b"GET", req, dated(-5)))
        self.assertFalse(conditional_match(b"GET", req, dated(5)))
        self.assertTrue(conditional_match(b"GET", req, [], response_time=SUNDAY))
        self.assertFalse(conditional_match(b"GET", req, []))

    def test_if_modified_since_in_obsolete_format(self) -> None:
        """The date may be in any HTTP-date format."""
        req = [(b"If-Modified-Since", RFC850)]
        self.assertTrue(conditional_match(b"GET", req, [(b"Last-Modified", IMF)]))

    def test_no_conditional(self) -> None:
        """No preconditions, invalid ones, or other methods give None (RFC 9110 sections
        13.1.2, 13.1.3)."""
        resp = [(b"ETag", b'"a"'), (b"Last-Modified", IMF)]
        self.assertIsNone(conditional_match(b"GET", [], resp))
        self.assertIsNone(conditional_match(b"GET", [(b"If-Modified-Since", b"0")], resp))
        self.assertIsNone(conditional_match(b"GET", [(b"If-None-Match", b"a")], resp))
        self.assertIsNone(conditional_match(b"POST", [(b"If-None-Match", b'"a"')], resp))
        twice = [(b"If-Modified-Since", IMF), (b"If-Modified-Since", IMF)]
        self.assertIsNone(conditional_match(b"GET", twice, resp))

    def test_invalid_if_none_match_falls_to_if_modified_since(self) -> None:
        """An If-None-Match with no valid member is ignored, so If-Modified-Since
        applies."""
        req = [(b"If-None-Match", b"garbage"), (b"If-Modified-Since", IMF)]
        self.assertTrue(conditional_match(b"GET", req, [(b"Last-Modified", IMF)]))

    def test_not_modified_fields(self) -> None:
        """A 304 repeats Content-Location, Date, ETag, Vary, Cache-Control and Expires,
        and nothing else (RFC 9110 section 15.4.5)."""
        resp = [
            (b"Content-Type", b"text/html"),
            (b"ETag", b'"a"'),
            (b"date", IMF),
            (b"Content-Length", b"10"),
            (b"Vary", b"accept"),
            (b"Cache-Control", b"max-age=60"),
            (b"Expires", IMF),
            (b"Content-Location", b"/x"),
            (b"Set-Cookie", b"a=b"),
        ]
        self.assertEqual(
            not_modified_fields(resp),
            [resp[1], resp[2], resp[4], resp[5], resp[6], resp[7]],
        )


class StoredFieldsTests(SynchronousTestCase):
    """L{stored_fields} and L{updated_fields} (RFC 9111 sections 3.1, 3.2)."""

    def test_hop_by_hop_and_proxy_fields_dropped(self) -> None:
        """Connection and the fields it names, hop-by-hop fields, Proxy-Authenticate,
        Proxy-Authentication-Info, Proxy-Authorization and Content-Length are not stored;
        the rest are, in order (section 3.1), Age included (the age computation starts
        from it; answers replace it)."""
        resp = [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"X-Hop, close"),
            (b"x-hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Proxy-Authentication-Info", b"x"),
            (b"Proxy-Authorization", b"x"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Upgrade", b"h2c"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-T"),
            (b"Age", b"5"),
            (b"Content-Length", b"3"),
            (b"X-Unknown", b"kept"),
            (b"Content-Encoding", b"gzip"),
        ]
        self.assertEqual(
            stored_fields(resp),
            [
                (b"Content-Type", b"text/plain"),
                (b"Age", b"5"),
                (b"X-Unknown", b"kept"),
                (b"Content-Encoding", b"gzip"),
            ],
        )

    def test_update_without_age_drops_the_stored_age(self) -> None:
        """A 304 without Age leaves no Age of the first response behind (its age is
        computed afresh from the 304's exchange)."""
        stored = [(b"Age", b"30"), (b"ETag", b'"a"')]
        self.assertEqual(updated_fields(stored, [(b"ETag", b'"a"')]), [(b"ETag", b'"a"')])
        self.assertEqual(rules.without_age(stored), [(b"ETag", b'"a"')])

    def test_qualified_directives_drop_fields(self) -> None:
        """Fields named by qualified no-cache or private are not stored (sections
        5.2.2.4, 5.2.2.7)."""
        resp = [
            *cc(b'no-cache="Set-Cookie, X-A", private=x-b'),
            (b"set-cookie", b"a=b"),
            (b"X-A", b"1"),
            (b"X-B", b"2"),
            (b"X-C", b"3"),
        ]
        self.assertEqual(stored_fields(resp), [resp[0], (b"X-C", b"3")])

    def test_update_replaces_and_appends(self) -> None:
        """A 304's fields replace the stored lines of the same name (in place of the
        first) and new ones are appended (section 3.2)."""
        stored = [
            (b"Date", IMF),
            (b"Content-Type", b"text/plain"),
            (b"Set-Cookie", b"a=1"),
            (b"Cache-Control", b"max-age=60"),
            (b"Set-Cookie", b"b=2"),
        ]
        fresh = [
            (b"date", http_date(SUNDAY + 10)),
            (b"set-cookie", b"c=3"),
            (b"set-cookie", b"d=4"),
            (b"X-New", b"yes"),
        ]
        self.assertEqual(
            updated_fields(stored, fresh),
            [
                (b"date", http_date(SUNDAY + 10)),
                (b"Content-Type", b"text/plain"),
                (b"set-cookie", b"c=3"),
                (b"set-cookie", b"d=4"),
                (b"Cache-Control", b"max-age=60"),
                (b"X-New", b"yes"),
            ],
        )

    def test_update_exclusions(self) -> None:
        """Content-Length, hop-by-hop fields (and those Connection names) and
        Proxy-Authenticate in the 304 do not update the stored response (sections 3.1,
        3.2); its Age does, and a stored Age goes when the 304 has none."""
        stored = [(b"Content-Type", b"text/plain"), (b"X-Hop", b"stored")]
        fresh = [
            (b"Content-Length", b"0"),
            (b"Age", b"30"),
            (b"Connection", b"x-hop"),
            (b"X-Hop", b"from-304"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"ETag", b'"new"'),
        ]
        self.assertEqual(
            updated_fields(stored, fresh),
            [
                (b"Content-Type", b"text/plain"),
                (b"X-Hop", b"stored"),
                (b"Age", b"30"),
            ],
        )

    def test_update_keeps_what_describes_the_stored_content(self) -> None:
        """Content-Encoding, Content-MD5, Content-Range and ETag describe the stored
        bytes: a 304 carrying other values updates none of them (section 3.2, the fields
        "the cache's stored response depends upon"), while other fields still update."""
        stored = [
            (b"Content-Encoding", b"gzip"),
            (b"Content-MD5", b"rL0Y20zC+Fzt72VPzMSk2A=="),
            (b"Content-Range", b"bytes 0-1/2"),
            (b"ETag", b'"abc"'),
            (b"X-A", b"1"),
        ]
        fresh = [
            (b"content-encoding", b"br"),
            (b"Content-MD5", b"N7UdGUp1E+RbVvZSTy1R8g=="),
            (b"Content-Range", b"bytes 0-0/2"),
            (b"ETag", b'"def"'),
            (b"X-A", b"2"),
        ]
        self.assertEqual(updated_fields(stored, fresh), [*stored[:4], (b"X-A", b"2")])

    def test_update_with_new_qualified_no_cache(self) -> None:
        """Fields the updated Cache-Control names in a qualified no-cache are dropped
        (section 3.1)."""
        stored = [(b"Cache-Control", b"max-age=60"), (b"Set-Cookie", b"a=1")]
        fresh = [(b"Cache-Control", b'max-age=60, no-cache="set-cookie"')]
        self.assertEqual(updated_fields(stored, fresh), fresh)


class InvalidationTests(SynchronousTestCase):
    """L{is_unsafe} and L{invalidation_keys} (RFC 9110 section 9.2.1, RFC 9111 section
    4.4)."""

    KEY = b"http://example.com/a/b"

    def test_unsafe_methods(self) -> None:
        """GET, HEAD, OPTIONS and TRACE are safe; others, including unknown ones, are
        not."""
        for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE"):
            self.assertFalse(is_unsafe(method), method)
        for method in (b"POST", b"PUT", b"DELETE", b"PATCH", b"PURGE", b"get"):
            self.assertTrue(is_unsafe(method), method)

    def test_target_invalidated(self) -> None:
        """A 2xx or 3xx to an unsafe method invalidates the target URI."""
        for status in (200, 204, 301, 399):
            self.assertEqual(invalidation_keys(b"POST", status, self.KEY, []), [self.KEY])

    def test_errors_and_safe_methods_invalidate_nothing(self) -> None:
        """Error responses and safe methods invalidate nothing (section 4.4)."""
        location = [(b"Location", b"/c")]
        self.assertEqual(invalidation_keys(b"POST", 404, self.KEY, location), [])
        self.assertEqual(invalidation_keys(b"PUT", 500, self.KEY, location), [])
        self.assertEqual(invalidation_keys(b"POST", 100, self.KEY, location), [])
        self.assertEqual(invalidation_keys(b"GET", 200, self.KEY, location), [])

    def test_same_origin_locations(self) -> None:
        """Location and Content-Location URIs with the target's origin are invalidated
        too, absolute ones normalized like cache keys (section 4.4)."""
        resp = [
            (b"Location", b"HTTP://Example.COM:80/new?x#frag"),
            (b"Content-Location", b"/a/b/c"),
        ]
        self.assertEqual(
            invalidation_keys(b"POST", 201, self.KEY, resp),
            [self.KEY, b"http://example.com/new?x", b"http://example.com/a/b/c"],
        )

    def test_relative_references(self) -> None:
        """Relative references resolve against the target URI."""
        resp = [(b"Location", b"c?d"), (b"Content-Location", b"//example.com/e")]
        self.assertEqual(
            invalidation_keys(b"PUT", 200, self.KEY, resp),
            [self.KEY, b"http://example.com/a/c?d", b"http://example.com/e"],
        )

    def test_other_origins_ignored(self) -> None:
        """URIs with another host, port or scheme are not invalidated (section 4.4:
        this would allow denial-of-service attacks)."""
        resp = [
            (b"Location", b"http://other.example/a/b"),
            (b"Location", b"https://example.com/a/b"),
            (b"Location", b"http://example.com:8080/x"),
            (b"Content-Location", b"//evil.example/x"),
            (b"Content-Location", b"mailto:a@example.com"),
            (b"Content-Location", b"http://user@example.com/x"),
        ]
        self.assertEqual(invalidation_keys(b"POST", 200, self.KEY, resp), [self.KEY])

    def test_no_duplicates(self) -> None:
        """A Location equal to the target is listed once."""
        resp = [(b"Location", self.KEY), (b"Content-Location", b"/a/b")]
        self.assertEqual(invalidation_keys(b"DELETE", 200, self.KEY, resp), [self.KEY])

    def test_ipv6_and_port_origin(self) -> None:
        """Origins with IPv6 literals and explicit ports compare as cache keys do."""
        key = cache_key(b"https", b"::1", 8443, b"/x")
        resp = [(b"Location", b"https://[0:0::1]:8443/y"), (b"Location", b"https://[::1]/z")]
        self.assertEqual(invalidation_keys(b"POST", 200, key, resp), [key, b"https://[::1]:8443/y"])


class RangeTests(SynchronousTestCase):
    """L{parse_range} (RFC 9110 sections 14.1.1, 14.2, 13.1.5)."""

    def rng(self, value: bytes, length: int = 1000, extra: Fields = ()) -> object:
        """Parse one Range line against a stored response with strong ETag "v"."""
        resp = [(b"ETag", b'"v"'), (b"Last-Modified", IMF), *dated(100)]
        return parse_range([(b"Range", value), *extra], resp, length)

    def test_int_range(self) -> None:
        """first-last is inclusive; last past the end is clipped (section 14.1.1)."""
        self.assertEqual(self.rng(b"bytes=0-499"), (0, 499))
        self.assertEqual(self.rng(b"bytes=500-5000"), (500, 999))
        self.assertEqual(self.rng(b"bytes=999-999"), (999, 999))

    def test_open_range(self) -> None:
        """first- runs to the end."""
        self.assertEqual(self.rng(b"bytes=900-"), (900, 999))

    def test_suffix_range(self) -> None:
        """-n is the last n bytes, the whole content if shorter (section 14.1.1)."""
        self.assertEqual(self.rng(b"bytes=-100"), (900, 999))
        self.assertEqual(self.rng(b"bytes=-5000"), (0, 999))

    def test_spacing_and_case(self) -> None:
        """The unit is case-insensitive; optional whitespace is allowed."""
        self.assertEqual(self.rng(b"Bytes = 1 - 2"), (1, 2))

    def test_unsatisfiable(self) -> None:
        """A first position at or past the end, or a zero suffix, gets 416 (sections
        14.1.1, 15.5.17)."""
        self.assertEqual(self.rng(b"bytes=1000-"), 416)
        self.assertEqual(self.rng(b"bytes=1000-2000"), 416)
        self.assertEqual(self.rng(b"bytes=-0"), 416)
        self.assertEqual(self.rng(b"bytes=0-", length=0), 416)

    def test_full_response(self) -> None:
        """No Range, several ranges or lines, other units, malformed or invalid specs
        are answered in full (section 14.2)."""
        resp = [(b"ETag", b'"v"')]
        self.assertIsNone(parse_range([], resp, 1000))
        two = [(b"Range", b"bytes=0-1"), (b"Range", b"bytes=5-6")]
        self.assertIsNone(parse_range(two, resp, 1000))
        for value in (
            b"bytes=0-1,5-6",
            b"items=0-1",
            b"bytes=5-2",
            b"bytes=-",
            b"bytes=a-b",
            b"bytes 0-1",
            b"bytes=0-1-2",
            b"bytes=-1-",
        ):
            self.assertIsNone(self.rng(value), value)

    def test_huge_numbers(self) -> None:
        """Positions too long for int() are handled as very large numbers."""
        self.assertEqual(self.rng(b"bytes=0-" + b"9" * 5000), (0, 999))
        self.assertEqual(self.rng(b"bytes=" + b"9" * 5000 + b"-"), 416)

    def test_suffix_of_empty_content(self) -> None:
        """A suffix range of empty content is served as the full (empty) response."""
        self.assertIsNone(self.rng(b"bytes=-5", length=0))

    def test_if_range_strong_etag(self) -> None:
        """If-Range with the stored strong entity tag keeps the range; another tag or a
        weak one sends the full response (section 13.1.5)."""
        self.assertEqual(self.rng(b"bytes=0-1", extra=[(b"If-Range", b'"v"')]), (0, 1))
        self.assertIsNone(self.rng(b"bytes=0-1", extra=[(b"If-Range", b'"w"')]))
        self.assertIsNone(self.rng(b"bytes=0-1", extra=[(b"If-Range", b'W/"v"')]))

    def test_if_range_weak_stored_etag(self) -> None:
        """A weak stored entity tag never satisfies If-Range (strong comparison)."""
        resp = [(b"ETag", b'W/"v"')]
        req = [(b"Range", b"bytes=0-1"), (b"If-Range", b'"v"')]
        self.assertIsNone(parse_range(req, resp, 10))

    def test_if_range_date(self) -> None:
        """If-Range with a date keeps the range only when it equals the stored
        Last-Modified, a strong validator (RFC 9110 section 8.8.2.2: 60 seconds before
        Date for an intermediate cache)."""
        self.assertEqual(self.rng(b"bytes=0-1", extra=[(b"If-Range", IMF)]), (0, 1))
        self.assertEqual(self.rng(b"bytes=0-1", extra=[(b"If-Range", ASCTIME)]), (0, 1))
        later = http_date(SUNDAY + 1)
        self.assertIsNone(self.rng(b"bytes=0-1", extra=[(b"If-Range", later)]))
        weak = [(b"Last-Modified", IMF), *dated(30)]
        req = [(b"Range", b"bytes=0-1"), (b"If-Range", IMF)]
        self.assertIsNone(parse_range(req, weak, 10))

    def test_if_range_garbage(self) -> None:
        """An If-Range that is neither an entity tag nor a date sends the full
        response, even when the range is unsatisfiable."""
        self.assertIsNone(self.rng(b"bytes=0-1", extra=[(b"If-Range", b"yesterday")]))
        self.assertIsNone(self.rng(b"bytes=5000-", extra=[(b"If-Range", b'"w"')]))


class CacheStatusTests(SynchronousTestCase):
    """L{cache_status}: the Cache-Status field value (RFC 9211 section 2)."""

    def test_hit(self) -> None:
        """A hit with its remaining freshness (sections 2.1, 2.4)."""
        self.assertEqual(cache_status(hit=True, ttl=12.9), b"aproxy; hit; ttl=12")

    def test_stored_miss(self) -> None:
        """A miss forwarded and stored (sections 2.2, 2.5)."""
        self.assertEqual(cache_status(fwd="miss", stored=True), b"aproxy; fwd=miss; stored")

    def test_revalidated(self) -> None:
        """Parameters come in a fixed order: fwd, fwd-status, stored, ttl (section
        2.3)."""
        self.assertEqual(
            cache_status(ttl=60, fwd_status=304, fwd="stale"),
            b"aproxy; fwd=stale; fwd-status=304; ttl=60",
        )

    def test_collapsed(self) -> None:
        """A request collapsed into another's (section 2.6)."""
        self.assertEqual(
            cache_status(fwd="uri-miss", collapsed=True), b"aproxy; fwd=uri-miss; collapsed"
        )

    def test_negative_ttl(self) -> None:
        """A stale response has a negative ttl, floored (section 2.4)."""
        self.assertEqual(cache_status(hit=True, ttl=-0.5), b"aproxy; hit; ttl=-1")

    def test_detail_token_or_string(self) -> None:
        """detail is a token when it can be one, else an escaped string (section
        2.8, RFC 8941 sections 3.3.3, 3.3.4)."""
        self.assertEqual(
            cache_status(fwd="bypass", detail="no-store"), b"aproxy; fwd=bypass; detail=no-store"
        )
        self.assertEqual(
            cache_status(fwd="bypass", detail='no "store"\\'),
            b'aproxy; fwd=bypass; detail="no \\"store\\"\\\\"',
        )
        self.assertEqual(cache_status(detail="1x"), b'aproxy; detail="1x"')
        self.assertEqual(cache_status(detail="caf\xe9"), b'aproxy; detail="caf?"')

    def test_name(self) -> None:
        """The cache is named by its own identifier, with no parameters by default."""
        self.assertEqual(cache_status(name=b"edge-1"), b"edge-1")
        self.assertEqual(cache_status(name=b"my cache", hit=True), b'"my cache"; hit')
