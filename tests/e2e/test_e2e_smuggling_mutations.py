"""Generated request-smuggling mutations, end to end and differentially (issue 5, item 1).

A second corpus next to ``test_e2e_smuggling.py``, generated from the mutation families of
the public smuggling scanners (our own generator; nothing copied from them):

* defparam/smuggler ``configs/default.py``, ``doubles.py``, ``exhaustive.py``: a control
  or high byte before, inside or after ``Transfer-Encoding: chunked`` and around the line
  ends next to it; name and value obfuscations (``Transfer_Encoding``, ``cow, chunked``...);
* PortSwigger/http-request-smuggler ``src/burp/DesyncBox.java`` (its permutations:
  ``nameprefix``, ``linewrapped``, ``gareth1``, ``badsetupCR``, ``0dwrap``, ``commaCow``,
  ``revdualchunk``, ``spjunk``, ``backslash``, ``accentTE``...);
* Moopinger/smugglefuzz ``lib/constants.go`` (its default gadget list, Content-Length ones
  included) and MajidLakhnati/SMUGGLEtest ``utilities/TETE_utils.py``;
* narfindustries/http-garden ``tools/mutations.py`` (its "meaningful bytes").

Every Transfer-Encoding mutation is sent in three probes: CL.TE (``Content-Length`` covers
a body that, read as chunked, ends early and leaves a second request behind), TE.CL (the
chunked body hides a second request that a Content-Length reading would find) and TE-only.
Then Content-Length mutations, line-ending and request-line variants, chunk-size tricks
and upgrade requests with a body. Each payload goes on a fresh connection, followed there
by a well-formed follow-up request (in the same write: pipelined).

The origin parses what it receives with h11 and answers each request with its target, so
that the client can tell whose response it got. Per payload the expected outcome is given
exactly, from ferryman's policy (``RequestParser``: Transfer-Encoding and Content-Length
together, repeated Content-Length, a coding list not ending in ``chunked``, bare CR/LF,
obs-fold and control bytes are a 400 and the connection closes) and RFC 9112 framing:

* the client gets exactly the expected responses, in order, each naming its request; after
  a refusal the connection closes; otherwise a sentinel request gets its own response (no
  response is left over, none belongs to a request the client did not frame);
* the origin sees exactly the requests the client framed, each well framed (no h11 error),
  each re-serialized by the proxy (``X-Forwarded-For`` added: nothing is tunnelled raw). A
  request whose target is ``/smuggled/...`` reaches it only where RFC 9112 makes it a real
  request of the client's (a header that is not Transfer-Encoding, ``Content-Length: 0``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from e2e_util import ProxyProcess, RawConn, ferryman_in_front_of
from h11_origin import H11Origin, Seen

# --- expected outcomes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fwd:
    """A request the origin must see, whose 200 the client must get (in this order)."""

    method: bytes
    target: bytes
    body: bytes = b""

    def reply(self) -> str:
        return f"200 {self.target.decode()}"


@dataclass(frozen=True)
class Err:
    """The proxy answers ``status`` itself and closes. With ``partial``, the origin may have
    seen the start of the request (its body was being streamed) and then its end."""

    status: int
    partial: bool = False

    def reply(self) -> str:
        return f"{self.status} close"


Outcome = Fwd | Err


@dataclass(frozen=True)
class Case:
    id: str
    n: int  # the tag in every target of the case: /p/<n>, /smuggled/<n>, /followup/<n>
    raw: bytes
    expect: tuple[Outcome, ...]
    #: the connection is not reusable after the last expected response (HTTP/1.0)
    closes: bool = False
    #: the follow-up is part of the last request's body, not a request of its own
    swallows_followup: bool = False

    @property
    def ends_closed(self) -> bool:
        return self.closes or (bool(self.expect) and isinstance(self.expect[-1], Err))


def followup(n: int) -> bytes:
    return b"GET /followup/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n


def sentinel(n: int) -> bytes:
    return b"GET /sentinel/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n


# --- the generator ----------------------------------------------------------------------------

CRLF = b"\r\n"
HOST = b"Host: a\r\n"

#: how ferryman must read a Transfer-Encoding mutation
TE = "te"  # a Transfer-Encoding whose last coding is chunked: the body is chunked
OTHER = "other"  # a header that is not Transfer-Encoding (valid syntax): no effect on framing
BAD = "bad"  # invalid syntax, or a Transfer-Encoding not ending in chunked: 400
NOT_IMPLEMENTED = "ni"  # codings before chunked (RFC 9112 §6.1 SHOULD): 501 when alone

#: bytes tried before, inside and after the header (defparam/smuggler default.py, plus NUL)
SPECIAL = (0x00, 0x01, 0x04, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1F, 0x20, 0x7F, 0xA0, 0xFF)
OWS = (0x09, 0x20)
OBS_TEXT = (0xA0, 0xFF)


def _te_matrix() -> list[tuple[str, bytes, str]]:
    """(name, header lines, class) for each special byte at each of ten positions."""
    out = []
    for c in SPECIAL:
        b = bytes([c])
        ows, obs = c in OWS, c in OBS_TEXT
        cls = {True: TE, False: BAD}
        out += [
            # value prefix: only OWS is whitespace; an obs-text byte makes another coding
            (f"mid-{c:02x}", b"Transfer-Encoding:" + b + b"chunked", cls[ows]),
            # nothing may stand between a field name and its colon
            (f"post-{c:02x}", b"Transfer-Encoding" + b + b": chunked", BAD),
            (f"pre-{c:02x}", b + b"Transfer-Encoding: chunked", BAD),
            # (llhttp refuses a HTAB after the coding though it takes a SP: so does ferryman)
            (f"end-{c:02x}", b"Transfer-Encoding: chunked" + b, cls[c == 0x20]),
            # inside another header's value: harmless where the byte is valid there
            (
                f"xpre-{c:02x}",
                b"X: X" + b + b"Transfer-Encoding: chunked",
                OTHER if ows or obs else BAD,
            ),
            (f"endx-{c:02x}", b"Transfer-Encoding: chunked" + b + b"X: X", BAD),
            # around the line end: only a real CRLF makes two header lines
            (f"rxpre-{c:02x}", b"X: X\r" + b + b"Transfer-Encoding: chunked", cls[c == 0x0A]),
            (f"xnpre-{c:02x}", b"X: X" + b + b"\nTransfer-Encoding: chunked", cls[c == 0x0D]),
            (f"endrx-{c:02x}", b"Transfer-Encoding: chunked\r" + b + b"X: X", cls[c == 0x0A]),
            (f"endxn-{c:02x}", b"Transfer-Encoding: chunked" + b + b"\nX: X", cls[c == 0x0D]),
        ]
    return out


#: named Transfer-Encoding mutations: (name, header lines, class)
TE_NAMED: list[tuple[str, bytes, str]] = [
    ("vanilla", b"Transfer-Encoding: chunked", TE),
    ("lowercase", b"transfer-encoding: chunked", TE),
    ("yelling", b"TRANSFER-ENCODING: CHUNKED", TE),
    ("sarcasm", b"TrAnSFer-EnCODinG: cHuNkeD", TE),
    ("value_capital", b"Transfer-Encoding: Chunked", TE),
    ("nospace", b"Transfer-Encoding:chunked", TE),
    ("two_spaces", b"Transfer-Encoding:  chunked", TE),
    ("tab_both_sides", b"Transfer-Encoding:\tchunked\t", BAD),  # (the trailing HTAB)
    ("sp_both_sides", b"Transfer-Encoding: chunked ", TE),
    ("connection_lists_te", b"Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked", TE),
    ("then_other_header", b"Transfer-Encoding: chunked\r\nxxx: yyy", TE),
    # -- the field name
    # (a "_" look-alike of a framing header is refused: CGI-style backends read it as "-")
    ("underjoin", b"Transfer_Encoding: chunked", BAD),
    ("nojoin", b"TransferEncoding: chunked", OTHER),
    ("urlencoded_name", b"Transfer-%45ncoding: chunked", OTHER),
    ("content_encoding", b"Content-Encoding: chunked", OTHER),
    ("name_split_at_colon", b"transfer: encoding: chunked", OTHER),
    ("inside_other_value", b"XXXX: transfer-encoding: chunked", OTHER),
    ("spacejoin", b"Transfer Encoding: chunked", BAD),
    ("smashed", b"Transfer Encoding:chunked", BAD),
    ("tab_around_colon", b"Transfer-Encoding\t:\tchunked", BAD),
    ("spjunk", b"Transfer-Encoding x: chunked", BAD),
    ("backslash", b"Transfer\\Encoding: chunked", BAD),
    ("accent_te", b"Transf\x82r-Encoding: chunked", BAD),
    ("cr_in_name", b"Tra\rnsfer-Encoding: chunked", BAD),
    ("unicode_hyphen", "Transfer\u2010Encoding: chunked".encode(), BAD),
    ("long_s_name", "Tran\u017ffer-Encoding: chunked".encode(), BAD),
    ("no_colon_line", b"Transfer-Encoding\r\n: chunked", BAD),
    # -- the value
    ("comma_cow", b"Transfer-Encoding: chunked, cow", BAD),
    ("chunked_identity", b"Transfer-Encoding: chunked, identity", BAD),
    ("nested_identity", b"Transfer-Encoding: identity, chunked, identity", BAD),
    ("nested_no_commas", b"Transfer-Encoding: cow chunked bar", BAD),
    ("trailing_comma", b"Transfer-Encoding: chunked,", BAD),
    ("quoted", b'Transfer-Encoding: "chunked"', BAD),
    ("aposed", b"Transfer-Encoding: 'chunked'", BAD),
    ("lazygrep", b"Transfer-Encoding: chunk", BAD),
    ("chu", b"Transfer-Encoding: chu", BAD),
    ("xchunked", b"Transfer-Encoding: xchunked", BAD),
    ("chunkedx", b"Transfer-Encoding: chunkedx", BAD),
    ("parameter", b"Transfer-Encoding: chunked;q=1", BAD),
    ("semicolon_then_line", b"Transfer-Encoding: chunked;\r\nxxx: yyy", BAD),
    ("empty", b"Transfer-Encoding:", BAD),
    ("accent_ch", b"Transfer-Encoding: ch\x96nked", BAD),
    ("utf8_u_grave", "Transfer-Encoding: ch\u00f9nked".encode(), BAD),
    ("utf8_nbsp_prefix", "Transfer-Encoding:\u00a0chunked".encode(), BAD),
    ("utf8_nbsp_suffix", "Transfer-Encoding: chunked\u00a0".encode(), BAD),
    ("zero_width_space", "Transfer-Encoding: \u200bchunked".encode(), BAD),
    ("kelvin_k", "Transfer-Encoding: chun\u212aed".encode(), BAD),
    ("fullwidth_c", "Transfer-Encoding: \uff43hunked".encode(), BAD),
    ("cr_prefix_value", b"Transfer-Encoding: \rchunked", BAD),
    ("nul_prefix_value", b"Transfer-Encoding: \x00chunked", BAD),
    # -- a coding list (RFC 9112 §6.1: chunked must be last; a coding before it that the
    #    proxy does not implement gets 501, as from nginx; empty list elements are ignored)
    ("cow_comma", b"Transfer-Encoding: cow, chunked", NOT_IMPLEMENTED),
    ("identity_comma", b"Transfer-Encoding: identity, chunked", NOT_IMPLEMENTED),
    ("gzip_comma", b"Transfer-Encoding: gzip, chunked", NOT_IMPLEMENTED),
    ("empty_element_first", b"Transfer-Encoding: , chunked", TE),
    # -- repeated fields: one list, whose last coding counts
    ("dual_chunked_then_cow", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: cow", BAD),
    (
        "dual_chunked_then_identity",
        b"Transfer-Encoding: chunked\r\nTransfer-encoding: identity",
        BAD,
    ),
    ("dual_chunked_then_empty", b"Transfer-Encoding: chunked\r\nTransfer-Encoding:", BAD),
    (
        "revdual_cow_then_chunked",
        b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked",
        NOT_IMPLEMENTED,
    ),
    (
        "revdual_identity_then_chunked",
        b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked",
        NOT_IMPLEMENTED,
    ),
    # (RFC 9112 §6.1: chunked is applied at most once; llhttp refuses it twice)
    ("dual_chunked_twice", b"Transfer-Encoding: chunked\r\ntransfer-encoding: chunked", BAD),
    # -- line structure
    ("nameprefix_fold_sp", b"Foo: bar\r\n Transfer-Encoding: chunked", BAD),
    ("nameprefix_fold_tab", b"Foo: bar\r\n\tTransfer-Encoding: chunked", BAD),
    ("linewrapped_crlf", b"Transfer-Encoding:\r\n chunked", BAD),
    ("linewrapped_lf", b"Transfer-Encoding:\n chunked", BAD),
    ("tabwrap", b"Transfer-Encoding: \r\n\tchunked", BAD),
    ("vertwrap", b"Transfer-Encoding: \n\x0bchunked", BAD),
    ("gareth1", b"Transfer-Encoding\n : chunked", BAD),
    ("badsetup_cr", b"Foo: bar\rTransfer-Encoding: chunked", BAD),
    ("badsetup_lf", b"Foo: bar\nTransfer-Encoding: chunked", BAD),
    ("0dwrap", b"Foo: bar\r\n\rTransfer-Encoding: chunked", BAD),
    ("bodysplit", b"Foo: barn\n\nTransfer-Encoding: chunked", BAD),
    ("lf_then_header", b"Transfer-Encoding: chunked\nxxx: yyy", BAD),
]


def _tag(n: int, what: bytes) -> bytes:
    return b"/%s/%d" % (what, n)


def _te_probes(n: int, name: str, gadget: bytes, cls: str) -> list[Case]:
    """The CL.TE, TE.CL and TE-only probes of one Transfer-Encoding mutation."""
    cases = []
    p = _tag(n, b"p")
    line = b"POST %s HTTP/1.1\r\n" % p

    # CL.TE: Content-Length covers everything; read as chunked, the body ends at "0\r\n\r\n"
    # and a GET /smuggled follows
    body = b"0\r\n\r\nGET %s HTTP/1.1\r\nHost: a\r\n\r\n" % _tag(n, b"smuggled")
    raw = line + HOST + b"Content-Length: %d\r\n" % len(body) + gadget + CRLF + CRLF + body
    expect: tuple[Outcome, ...] = (Fwd(b"POST", p, body),) if cls == OTHER else (Err(400),)
    cases.append(Case(f"cl.te-{name}", n, raw, expect))

    # TE.CL: Content-Length covers the chunk-size line only; read by it, a POST /smuggled
    # (whose own Content-Length takes the rest of the chunked body) follows
    n += 1
    p = _tag(n, b"p")
    line = b"POST %s HTTP/1.1\r\n" % p
    rest = b"x=1\r\n0\r\n\r\n"
    hidden = b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\nx=1" % (
        _tag(n, b"smuggled"),
        len(rest),
    )
    size = b"%x\r\n" % len(hidden)
    body = size + hidden + rest[3:]
    raw = line + gadget + CRLF + HOST + b"Content-Length: %d\r\n\r\n" % len(size) + body
    if cls == OTHER:  # not a Transfer-Encoding: RFC 9112 frames two requests
        expect = (Fwd(b"POST", p, size), Fwd(b"POST", _tag(n, b"smuggled"), rest))
    else:
        expect = (Err(400),)
    cases.append(Case(f"te.cl-{name}", n, raw, expect))

    # TE only
    n += 1
    p = _tag(n, b"p")
    line = b"POST %s HTTP/1.1\r\n" % p
    raw = line + HOST + gadget + CRLF + CRLF + b"5\r\nhello\r\n0\r\n\r\n"
    if cls == TE:
        expect = (Fwd(b"POST", p, b"hello"),)
    elif cls == NOT_IMPLEMENTED:
        expect = (Err(501),)
    elif cls == OTHER:  # a POST without a body, then "5" is no request line
        expect = (Fwd(b"POST", p, b""), Err(400))
    else:
        expect = (Err(400),)
    cases.append(Case(f"te-only-{name}", n, raw, expect))
    return cases


ACCEPT = "accept"  # a valid Content-Length of the body's length
NO_CL = "no-cl"  # no Content-Length field: no body, the "body" is the next request
TOO_LARGE = "too-large"  # valid, and over the body limit (1 GiB by default): 413

#: the body of the Content-Length probes: read as a request, a GET /smuggled
_CL_BODY = b"GET /smuggled/%d HTTP/1.1\r\nHost: a\r\n\r\n"


def _cl_named(length: int) -> list[tuple[str, bytes, str]]:
    """(name, header lines, class) of Content-Length mutations for a body of ``length``."""
    n = b"%d" % length
    big = 1 << 64
    return [
        ("vanilla", b"Content-Length: " + n, ACCEPT),
        ("lowercase", b"content-length: " + n, ACCEPT),
        ("uppercase", b"CONTENT-LENGTH: " + n, ACCEPT),
        ("nospace", b"Content-Length:" + n, ACCEPT),
        ("leading_zeros", b"Content-Length: 000" + n, ACCEPT),
        ("ows_both_sides", b"Content-Length: \t " + n + b" \t", ACCEPT),
        ("dup_same", b"Content-Length: " + n + b"\r\nContent-Length: " + n, BAD),
        ("dup_zero_first", b"Content-Length: 0\r\nContent-Length: " + n, BAD),
        ("dup_zero_last", b"Content-Length: " + n + b"\r\nContent-Length: 0", BAD),
        ("dup_case", b"Content-Length: " + n + b"\r\ncontent-length: " + n, BAD),
        ("list_same", b"Content-Length: " + n + b", " + n, BAD),
        ("list_nospace", b"Content-Length: " + n + b"," + n, BAD),
        ("list_zero_first", b"Content-Length: 0, " + n, BAD),
        ("list_trailing_comma", b"Content-Length: " + n + b",", BAD),
        ("list_leading_comma", b"Content-Length: ," + n, BAD),
        ("plus", b"Content-Length: +" + n, BAD),
        ("minus", b"Content-Length: -" + n, BAD),
        ("hex", b"Content-Length: 0x%x" % length, BAD),
        ("decimal_point", b"Content-Length: " + n + b".0", BAD),
        ("exponent", b"Content-Length: " + n + b"e0", BAD),
        ("quoted", b'Content-Length: "' + n + b'"', BAD),
        ("aposed", b"Content-Length: '" + n + b"'", BAD),
        ("cow_prefix", b"Content-Length: cow" + n, BAD),
        ("inner_space", b"Content-Length: " + n[:1] + b" " + n[1:], BAD),
        ("semicolon", b"Content-Length: " + n + b";", BAD),
        (
            "arabic_digits",
            b"Content-Length: "
            + n.decode().translate({ord(d): 0x660 + int(d) for d in "0123456789"}).encode(),
            BAD,
        ),
        (
            "fullwidth_digits",
            b"Content-Length: "
            + n.decode().translate({ord(d): 0xFF10 + int(d) for d in "0123456789"}).encode(),
            BAD,
        ),
        ("wraps_at_2_64", b"Content-Length: %d" % (big + length), BAD),
        ("wraps_at_2_32", b"Content-Length: %d" % ((1 << 32) + length), TOO_LARGE),
        ("is_2_64", b"Content-Length: %d" % big, BAD),
        ("huge", b"Content-Length: " + b"9" * 41, BAD),
        ("space_before_colon", b"Content-Length : " + n, BAD),
        ("tab_before_colon", b"Content-Length\t: " + n, BAD),
        ("underscore", b"Content_Length: " + n, BAD),
        ("nojoin", b"ContentLength: " + n, NO_CL),
        ("fold_value", b"Content-Length:\r\n " + n, BAD),
        ("fold_after", b"Content-Length: " + n + b"\r\n 0", BAD),
        ("bare_cr_then_cl", b"X: a\rContent-Length: " + n, BAD),
        ("bare_lf_then_cl", b"X: a\nContent-Length: " + n, BAD),
        ("value_then_lf_line", b"Content-Length: " + n + b"\nX: a", BAD),
    ]


def _cl_matrix(length: int) -> list[tuple[str, bytes, str]]:
    n = b"%d" % length
    out = []
    for c in (0x00, 0x01, 0x09, 0x0B, 0x0C, 0x0D, 0x20, 0x7F, 0xA0, 0xFF):
        b = bytes([c])
        ows = c in OWS
        out += [
            (f"mid-{c:02x}", b"Content-Length:" + b + n, ACCEPT if ows else BAD),
            (f"post-{c:02x}", b"Content-Length" + b + b": " + n, BAD),
            (f"pre-{c:02x}", b + b"Content-Length: " + n, BAD),
            (f"end-{c:02x}", b"Content-Length: " + n + b, ACCEPT if ows else BAD),
        ]
    return out


def _cl_probes(n0: int) -> list[Case]:
    cases = []
    n = n0
    length = len(_CL_BODY % n0)
    # (the body length does not depend on n as long as n has the same number of digits)
    for family, items in (("cl", _cl_named), ("cl-byte", _cl_matrix)):
        for name, gadget, cls in items(length):
            body = _CL_BODY % n
            assert len(body) == length, "case numbers must keep their width"
            p = _tag(n, b"p")
            first = b"POST %s HTTP/1.1\r\n" % p
            # a gadget that must be the first header line goes first; the others after Host
            if name.startswith("pre-"):
                raw = first + gadget + CRLF + HOST + CRLF + body
            else:
                raw = first + HOST + gadget + CRLF + CRLF + body
            expect: tuple[Outcome, ...]
            if cls == ACCEPT:
                expect = (Fwd(b"POST", p, body),)
            elif cls == NO_CL:  # RFC 9112: no framing header, so the body is a request
                expect = (Fwd(b"POST", p), Fwd(b"GET", _tag(n, b"smuggled")))
            elif cls == TOO_LARGE:
                expect = (Err(413),)
            else:
                expect = (Err(400),)
            cases.append(Case(f"{family}-{name}", n, raw, expect))
            n += 1
    return cases


@dataclass(frozen=True)
class T:
    """The targets of one hand-written case."""

    n: int

    @property
    def p(self) -> bytes:
        return _tag(self.n, b"p")

    @property
    def s(self) -> bytes:
        return _tag(self.n, b"smuggled")

    @property
    def get(self) -> bytes:
        """A complete GET /smuggled request."""
        return b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % self.s


def _post(
    t: T,
    headers: bytes,
    body: bytes,
    *,
    version: bytes = b"1.1",
    eol: bytes = CRLF,
    end: bytes = CRLF,
) -> bytes:
    return b"POST %s HTTP/%s" % (t.p, version) + eol + HOST + headers + end + body


def _cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


CHUNKED = b"Transfer-Encoding: chunked\r\n"
REFUSED = (Err(400),)
REFUSED_MIDWAY = (Err(400, partial=True),)

#: hand-written cases: (name, raw, outcomes[, Case keyword arguments])
Misc = tuple[str, Callable[[T], bytes], Callable[[T], tuple[Outcome, ...]]]
MISC: list[Misc] = [
    # -- header termination and line endings
    (
        "all_bare_lf",
        lambda t: b"POST %s HTTP/1.1\nHost: a\nContent-Length: %d\n\n%s" % (t.p, len(t.get), t.get),
        lambda t: REFUSED,
    ),
    ("request_line_bare_lf", lambda t: _post(t, _cl(t.get), t.get, eol=b"\n"), lambda t: REFUSED),
    ("terminator_bare_lf", lambda t: _post(t, _cl(t.get), t.get, end=b"\n"), lambda t: REFUSED),
    (
        "terminator_cr_cr_lf",
        lambda t: _post(t, _cl(t.get), t.get, end=b"\r\r\n"),
        lambda t: REFUSED,
    ),
    (
        "fold_into_terminator_sp",
        lambda t: _post(t, _cl(t.get), t.get, end=b" \r\n\r\n"),
        lambda t: REFUSED,
    ),
    (
        "fold_into_terminator_tab",
        lambda t: _post(t, _cl(t.get), t.get, end=b"\t\r\n\r\n"),
        lambda t: REFUSED,
    ),
    (
        "header_after_bare_cr",
        lambda t: _post(t, b"X: a\rContent-Length: 0\r\n" + _cl(t.get), t.get),
        lambda t: REFUSED,
    ),
    (
        "te_after_bare_cr",
        lambda t: _post(
            t,
            _cl(b"0\r\n\r\n" + t.get) + b"X: a\rTransfer-Encoding: chunked\r\n",
            b"0\r\n\r\n" + t.get,
        ),
        lambda t: REFUSED,
    ),
    (
        "cl_line_ends_bare_cr",
        lambda t: _post(t, b"Content-Length: 0\r\r\n", t.get),
        lambda t: REFUSED,
    ),
    # (SMUGGLEtest's "\r\nTransfer-Encoding": an empty line ends the head, the rest is body)
    (
        "empty_line_before_te",
        lambda t: _post(
            t,
            _cl(b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        lambda t: (Fwd(b"POST", t.p, b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),),
    ),
    # (RFC 9112 §2.2: an empty line before a request line may be ignored)
    (
        "leading_crlf",
        lambda t: CRLF + _post(t, _cl(b"abc"), b"abc"),
        lambda t: (Fwd(b"POST", t.p, b"abc"),),
    ),
    # (and RFC 9112 §2.2 lets a recipient take a bare LF as a line end: harmless here)
    (
        "leading_bare_lf",
        lambda t: b"\n" + _post(t, _cl(b"abc"), b"abc"),
        lambda t: (Fwd(b"POST", t.p, b"abc"),),
    ),
    (
        "nul_before_request_line",
        lambda t: b"\x00" + _post(t, _cl(b"abc"), b"abc"),
        lambda t: REFUSED,
    ),
    # -- request line
    (
        "version_trailing_space",
        lambda t: _post(t, _cl(b"abc"), b"abc", version=b"1.1 "),
        lambda t: REFUSED,
    ),
    ("version_cr_cr_lf", lambda t: _post(t, _cl(b"abc"), b"abc", eol=b"\r\r\n"), lambda t: REFUSED),
    (
        "two_request_lines",
        lambda t: b"POST %s HTTP/1.1 GET %s HTTP/1.1\r\n" % (t.p, t.s) + HOST + CRLF,
        lambda t: REFUSED,
    ),
    ("nul_in_target", lambda t: b"GET %s\x00 HTTP/1.1\r\n" % t.p + HOST + CRLF, lambda t: REFUSED),
    # (llhttp knows its methods: the classic "GPOST" prefix makes no request)
    ("gpost_method", lambda t: b"GPOST %s HTTP/1.1\r\n" % t.s + HOST + CRLF, lambda t: REFUSED),
    (
        "http10_cl_keepalive",
        lambda t: _post(t, b"Connection: keep-alive\r\n" + _cl(b"abc"), b"abc", version=b"1.0"),
        lambda t: (Fwd(b"POST", t.p, b"abc"),),
    ),
    (
        "http10_te_and_cl",
        lambda t: _post(t, CHUNKED + _cl(b"0\r\n\r\n"), b"0\r\n\r\n", version=b"1.0"),
        lambda t: REFUSED,
    ),
    # -- framing that does make a second request: the client's own
    (
        "cl_zero_then_request",
        lambda t: _post(t, b"Content-Length: 0\r\n", t.get),
        lambda t: (Fwd(b"POST", t.p), Fwd(b"GET", t.s)),
    ),
    (
        "chunked_then_request",
        lambda t: _post(t, CHUNKED, b"3\r\nabc\r\n0\r\n\r\n" + t.get),
        lambda t: (Fwd(b"POST", t.p, b"abc"), Fwd(b"GET", t.s)),
    ),
    (
        "get_with_cl_body",
        lambda t: b"GET %s HTTP/1.1\r\n" % t.p + HOST + _cl(t.get) + CRLF + t.get,
        lambda t: (Fwd(b"GET", t.p, t.get),),
    ),
    # -- chunk sizes, extensions, trailers
    (
        "chunk_size_leading_zeros",
        lambda t: _post(t, CHUNKED, b"0003\r\nabc\r\n0\r\n\r\n"),
        lambda t: (Fwd(b"POST", t.p, b"abc"),),
    ),
    (
        "last_chunk_ext",
        lambda t: _post(t, CHUNKED, b"3\r\nabc\r\n0;x=1\r\n\r\n"),
        lambda t: (Fwd(b"POST", t.p, b"abc"),),
    ),
    # (RFC 9112 §7.1.1 allows BWS before ";"; llhttp refuses any space after a chunk size,
    #  as hardening against parsers that read "3 x" as 3: a safe refusal)
    (
        "chunk_ext_bws",
        lambda t: _post(t, CHUNKED, b"3 ;x=1\r\nabc\r\n0\r\n\r\n"),
        lambda t: REFUSED_MIDWAY,
    ),
    (
        "chunk_size_trailing_space",
        lambda t: _post(t, CHUNKED, b"3 \r\nabc\r\n0\r\n\r\n"),
        lambda t: REFUSED_MIDWAY,
    ),
    (
        "chunk_size_tab",
        lambda t: _post(t, CHUNKED, b"3\t\r\nabc\r\n0\r\n\r\n"),
        lambda t: REFUSED_MIDWAY,
    ),
    (
        "chunk_ext_bare_cr",
        lambda t: _post(t, CHUNKED, b"3;x\ry\r\nabc\r\n0\r\n\r\n"),
        lambda t: REFUSED_MIDWAY,
    ),
    (
        "chunk_data_lf_only",
        lambda t: _post(t, CHUNKED, b"3\r\nabc\n0\r\n\r\n" + t.get),
        lambda t: REFUSED_MIDWAY,
    ),
    # (read past its size, the chunk would end at a GET /smuggled)
    (
        "chunk_size_too_small",
        lambda t: _post(t, CHUNKED, b"1\r\na" + t.get + b"\r\n0\r\n\r\n"),
        lambda t: REFUSED_MIDWAY,
    ),
    (
        "chunk_data_is_a_request",
        lambda t: _post(t, CHUNKED, b"%x\r\n%s\r\n0\r\n\r\n" % (len(t.get), t.get)),
        lambda t: (Fwd(b"POST", t.p, t.get),),
    ),
    (
        "last_chunk_then_request_no_crlf",
        lambda t: _post(t, CHUNKED, b"0\r\n" + t.get),
        lambda t: REFUSED_MIDWAY,
    ),
    # (framing fields in a trailer section: refused, never merged into the head)
    (
        "trailer_content_length",
        lambda t: _post(t, CHUNKED, b"3\r\nabc\r\n0\r\nContent-Length: 50\r\n\r\n"),
        lambda t: REFUSED_MIDWAY,
    ),
    (
        "trailer_transfer_encoding",
        lambda t: _post(t, CHUNKED, b"3\r\nabc\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        lambda t: REFUSED_MIDWAY,
    ),
    (
        "trailer_bare_lf",
        lambda t: _post(t, CHUNKED, b"3\r\nabc\r\n0\r\nX: a\n\r\n" + t.get),
        lambda t: REFUSED_MIDWAY,
    ),
    # -- upgrades (llhttp skips an upgrade's body: ferryman counts it out itself)
    (
        "h2c_upgrade_body_is_a_request",
        lambda t: _post(
            t,
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n" + _cl(t.get),
            t.get,
        ),
        lambda t: (Fwd(b"POST", t.p, t.get),),
    ),
    # (no 101 from the origin: what follows the head is the client's next request)
    (
        "websocket_refused_then_request",
        lambda t: (
            b"GET %s HTTP/1.1\r\n" % t.p + HOST + b"Connection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + t.get
        ),
        lambda t: (Fwd(b"GET", t.p), Fwd(b"GET", t.s)),
    ),
    (
        "upgrade_chunked",
        lambda t: _post(
            t, b"Connection: Upgrade\r\nUpgrade: h2c\r\n" + CHUNKED, b"0\r\n\r\n" + t.get
        ),
        lambda t: REFUSED,
    ),
    (
        "upgrade_cl_and_te",
        lambda t: _post(
            t,
            b"Connection: Upgrade\r\nUpgrade: h2c\r\n" + CHUNKED + _cl(b"0\r\n\r\n" + t.get),
            b"0\r\n\r\n" + t.get,
        ),
        lambda t: REFUSED,
    ),
    (
        "expect_100_cl_te",
        lambda t: _post(
            t,
            b"Expect: 100-continue\r\n" + CHUNKED + _cl(b"0\r\n\r\n" + t.get),
            b"0\r\n\r\n" + t.get,
        ),
        lambda t: REFUSED,
    ),
]


def _misc_probes(n: int) -> list[Case]:
    cases = []
    for name, raw, expect in MISC:
        t = T(n)
        cases.append(Case(f"misc-{name}", n, raw(t), expect(t)))
        n += 1
    t = T(n)  # HTTP/1.0 without keep-alive: the connection closes after the response
    cases.append(
        Case(
            "misc-http10_cl_closes",
            n,
            _post(t, _cl(b"abc"), b"abc", version=b"1.0"),
            (Fwd(b"POST", t.p, b"abc"),),
            closes=True,
        )
    )
    t = T(n + 1)  # a Content-Length that takes the follow-up in as body
    swallowed = b"abc" + followup(t.n)
    cases.append(
        Case(
            "misc-cl_swallows_followup",
            t.n,
            _post(t, _cl(swallowed), b"abc"),
            (Fwd(b"POST", t.p, swallowed),),
            swallows_followup=True,
        )
    )
    return cases


def _generate() -> list[Case]:
    cases: list[Case] = []
    n = 1000  # four-digit tags keep the lengths of bodies that contain them fixed
    for name, gadget, cls in TE_NAMED + _te_matrix():
        probes = _te_probes(n, name, gadget, cls)
        cases += probes
        n += len(probes)
    probes = _cl_probes(n)
    cases += probes
    n += len(probes)
    cases += _misc_probes(n)
    return cases


CASES = _generate()
BY_TAG = {c.n: c for c in CASES}
assert len(BY_TAG) == len(CASES)

#: cases whose behaviour is a known, reported defect: id -> reason
KNOWN: dict[str, str] = {}


def _params() -> list[object]:
    out: list[object] = []
    for case in CASES:
        marks = []
        if case.id in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[case.id]))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# --- the test ---------------------------------------------------------------------------------

#: origin traffic that arrived after its case was checked (or for no case): checked last
STRAYS: list[str] = []


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, H11Origin]]:
    origin = H11Origin()
    workdir = tmp_path_factory.mktemp("ferryman-smuggling-mutations")
    with ferryman_in_front_of(origin.address, workdir) as proxy:
        yield proxy, origin
    origin.stop()


def _tag_of(target: bytes) -> int | None:
    last = target.rsplit(b"/", 1)[-1]
    return int(last) if last.isdigit() else None


def _split(seen: Seen, n: int) -> Seen:
    """This case's share of ``seen``; the rest goes to ``STRAYS``."""
    mine = Seen(errors=list(seen.errors))
    for req in seen.requests:
        if _tag_of(req[1]) == n:
            mine.requests.append(req)
        else:
            STRAYS.append(f"request {req[:3]!r} seen after its case")
    for target in seen.partial:
        tag = _tag_of(target)
        if tag == n:
            mine.partial.append(target)
        elif tag not in BY_TAG or not _partial_ok(BY_TAG[tag]):
            STRAYS.append(f"partial request {target!r} seen after its case")
    return mine


def _partial_ok(case: Case) -> bool:
    return any(isinstance(o, Err) and o.partial for o in case.expect)


def _read_replies(conn: RawConn, count: int) -> list[str]:
    """Up to ``count`` responses as ``"200 <target>"`` / ``"<status> close"`` / ``"<status>
    keep-alive"``; stops at an EOF or a timeout (recorded) or after an error response."""
    got: list[str] = []
    for _ in range(count):
        try:
            resp = conn.read_response(b"POST")
        except (EOFError, ConnectionResetError):
            got.append("EOF")
            break
        except TimeoutError:
            got.append(f"timeout; buffered {conn.buf[:200]!r}")
            break
        if resp.status == 200:
            target = resp.header("x-target") or b"<none>"
            got.append(f"200 {target.decode('latin-1')}")
            if resp.body != target:
                got.append(f"body {resp.body!r} is not the target")
        else:
            close = resp.header("connection") == b"close"
            got.append(f"{resp.status} {'close' if close else 'keep-alive'}")
            if resp.status >= 400:
                break
    return got


@pytest.mark.parametrize("case", _params())
def test_mutation(rig: tuple[ProxyProcess, H11Origin], case: Case) -> None:
    proxy, origin = rig
    late = _split(origin.take(), -1)  # anything left over belongs to earlier cases
    STRAYS.extend(f"h11 error after its case: {e}" for e in late.errors)
    n = case.n
    expected = [o.reply() for o in case.expect]
    answered_followup = not case.ends_closed and not case.swallows_followup
    if answered_followup:
        expected.append(f"200 /followup/{n}")
    with RawConn(proxy.port, timeout=3) as conn:
        conn.send(case.raw + followup(n))
        got = _read_replies(conn, len(expected))
        if case.ends_closed:
            expected.append("EOF")
            try:
                got.append("EOF" if conn.at_eof() else f"more: {conn.buf[:200]!r}")
            except TimeoutError:
                got.append("open")
        elif got == expected:
            conn.send(sentinel(n))
            got += _read_replies(conn, 1)
            expected.append(f"200 /sentinel/{n}")
    if case.ends_closed:
        time.sleep(0.02)  # let the origin see how the proxy's upstream requests ended
    seen = _split(origin.take(), n)

    detail = f"{case.id}: sent {case.raw!r}"
    targets = [r[1] for r in seen.requests]
    # first the invariant that matters most: a /smuggled/ target only where the client's own
    # framing (RFC 9112) makes it a request
    framed = [o.target for o in case.expect if isinstance(o, Fwd)]
    smuggled = [t for t in targets if t.startswith(b"/smuggled/")]
    assert smuggled == [t for t in framed if t.startswith(b"/smuggled/")], (
        f"DESYNC: the origin saw {targets}; {detail}"
    )
    assert seen.errors == [], f"the origin could not parse what it got: {seen}; {detail}"
    assert got == expected, f"client got {got}, expected {expected}; origin saw {targets}; {detail}"
    want = [(o.method, o.target, o.body) for o in case.expect if isinstance(o, Fwd)]
    if answered_followup:
        want.append((b"GET", b"/followup/%d" % n, b""))
    if not case.ends_closed:
        want.append((b"GET", b"/sentinel/%d" % n, b""))
    assert [r[:3] for r in seen.requests] == want, f"origin saw {seen.requests}; {detail}"
    for _method, target, _body, headers in seen.requests:
        # re-serialized by the proxy, not spliced through raw
        xff = [v for k, v in headers if k == b"x-forwarded-for"]
        assert xff == [b"127.0.0.1"], f"{target!r} reached the origin raw: {headers}; {detail}"
    assert len(seen.partial) <= (1 if _partial_ok(case) else 0), f"origin saw {seen}; {detail}"
    assert all(t == _tag(n, b"p") for t in seen.partial), f"origin saw {seen}; {detail}"


def test_no_late_origin_traffic(rig: tuple[ProxyProcess, H11Origin]) -> None:
    """Nothing reached the origin after its case was checked (a late smuggled request)."""
    _proxy, origin = rig
    time.sleep(0.2)
    seen = _split(origin.take(), -1)
    assert seen.errors == [], seen.errors
    assert STRAYS == []


def test_corpus_shape() -> None:
    """The generated corpus is as large as intended, and every family has cases."""
    families = {c.id.split("-", 1)[0] for c in CASES}
    assert families >= {"cl.te", "te.cl", "te", "cl", "misc"}
    assert len(CASES) >= 150
