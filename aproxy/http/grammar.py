"""
The pieces of HTTP/1.1 syntax that heads and bodies share (RFC 9110 section 5.6, RFC 9112
section 5), written once as regular expressions: a token, a quoted string and a field line.
A head's fields and a chunked body's trailer fields follow the same rules, so both parsers
check them with the same patterns.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["FIELD_LINE", "QUOTED_STRING", "TOKEN", "TOKEN_RE"]

#: token = 1*tchar (RFC 9110 section 5.6.2), as a pattern to build others from.
TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: quoted-string (RFC 9110 section 5.6.4): qdtext and quoted-pair between DQUOTEs.
QUOTED_STRING: Final = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
#: A whole token (use C{fullmatch}).
TOKEN_RE: Final = re.compile(TOKEN)
#: field-line = field-name ":" OWS field-value OWS (RFC 9112 section 5); the value holds
#: visible characters, obs-text and inner SP/HTAB only: no CR, LF, NUL or other controls.
#: Group 1 is the name, group 2 the value without the surrounding whitespace.
FIELD_LINE: Final = re.compile(
    rb"(" + TOKEN + rb"):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*"
)
