"""Server-side TLS contexts: certificates per listener, SNI selection, ALPN and mTLS."""

from __future__ import annotations

import ssl

from ferryman.server.listener import ListenerTls

_VERIFY = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _context(settings: ListenerTls, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(list(settings.alpn))
    ctx.verify_mode = _VERIFY[settings.client_verify]
    if settings.client_ca:
        ctx.load_verify_locations(settings.client_ca)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def server_ssl_context(settings: ListenerTls) -> ssl.SSLContext:
    """The SSLContext for a listener; picks a certificate per SNI name when ``sni`` is set.

    The SNI name a client sent is recorded on the connection's SSL object as
    ``ferryman_sni`` so hooks can see it (``session.tls.sni``).
    """
    default = _context(settings, settings.cert, settings.key)
    choices = [(entry, _context(settings, entry.cert, entry.key)) for entry in settings.sni]

    def pick(ssl_obj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if server_name is None:
            return
        ssl_obj.ferryman_sni = server_name  # type: ignore[attr-defined]
        lowered = server_name.lower()
        for entry, ctx in choices:
            if any(_match(p.lower(), lowered) for p in entry.server_names):
                ssl_obj.context = ctx
                return

    default.sni_callback = pick
    return default
