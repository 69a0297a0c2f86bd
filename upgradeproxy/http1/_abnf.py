"""The grammar of RFC 9110 and RFC 9112 that the parser needs, as compiled regexes.

Each expression sits next to the ABNF it implements. Everything here works on
``bytes``; nothing here knows about sockets or buffers.
"""

from __future__ import annotations

import re

# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#         "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA        (RFC 9110 §5.6.2)
# token = 1*tchar
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"

# field-vchar = VCHAR / obs-text                               (RFC 9110 §5.5)
_FIELD_VCHAR = rb"[\x21-\x7e\x80-\xff]"
# field-value = *field-content
# field-content = field-vchar [ 1*( SP / HTAB / field-vchar ) field-vchar ]
_FIELD_VALUE = rb"(?:" + _FIELD_VCHAR + rb"(?:[\t\x20-\x7e\x80-\xff]*" + _FIELD_VCHAR + rb")?)?"

# field-line = field-name ":" OWS field-value OWS              (RFC 9112 §5)
# No whitespace is allowed between the name and the colon (§5.1), and a line
# that starts with whitespace is obs-fold (§5.2): both fail this expression.
# The leading OWS is possessive: when a line of whitespace ends in a bad byte,
# backtracking would otherwise try every way of splitting that whitespace
# between the two OWS, which is quadratic -- seconds of CPU for one 32 KiB head.
_FIELD_LINE = rb"(" + _TOKEN + rb"):[ \t]*+(" + _FIELD_VALUE + rb")[ \t]*"
FIELD_LINE = re.compile(_FIELD_LINE)

# The field lines of a head, each with its CRLF: one match checks them all,
# and findall() with FIELD_LINE_CRLF then yields the (name, value) pairs in
# one call. Neither can reach across a line: no field byte is a CR or LF.
FIELD_LINES = re.compile(rb"(?:" + _FIELD_LINE + rb"\r\n)*")
FIELD_LINE_CRLF = re.compile(_FIELD_LINE + rb"\r\n")

# request-line = method SP request-target SP HTTP-version      (RFC 9112 §3)
# HTTP-version = HTTP-name "/" DIGIT "." DIGIT                 (RFC 9112 §2.3)
# The target is checked only for visible characters here; its form
# (origin-form, absolute-form, ...) is the proxy's business.
REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")

# status-line = HTTP-version SP status-code SP [ reason-phrase ]  (RFC 9112 §4)
# reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )
# Many servers omit the space before an empty reason, which RFC 9112 §4 asks
# recipients to tolerate; the space is optional here. A status code's first
# digit is its class (RFC 9110 §15), and there is no class 0: "000" to "099"
# are malformed, not codes.
STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([1-9][0-9]{2})(?: ([\t\x20-\x7e\x80-\xff]*))?")

# A line terminator that is not CRLF: a bare LF, or a CR not followed by LF.
# A CR at the very end of the buffer may still be followed by its LF, so it
# does not match.
BARE_LINE_END = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")

# chunk-size = 1*HEXDIG                                         (RFC 9112 §7.1)
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
# Extensions are accepted as any visible text after ";" and dropped: the proxy
# re-encodes chunks and never forwards extensions. Sixteen hex digits is the
# most that fits 64 bits. The BWS belongs to the extension: whitespace after
# the size with no ";" to follow is not chunk syntax (llhttp refuses it too).
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?")

# Content-Length = 1*DIGIT                                      (RFC 9110 §8.6)
# Nineteen digits keeps the value within 63 bits.
CONTENT_LENGTH = re.compile(rb"[0-9]{1,19}")

TOKEN = re.compile(_TOKEN)
