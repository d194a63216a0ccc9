"""Server-side TLS contexts: certificates per listener, SNI selection, ALPN and mTLS."""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from ferryman.server.listener import ListenerTls, SniCertificate

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


def tls_files(settings: ListenerTls) -> list[str]:
    """Every file a listener's TLS settings name (certificates, keys, the client CA)."""
    files = [settings.cert, settings.key]
    if settings.client_ca:
        files.append(settings.client_ca)
    for entry in settings.sni:
        files += [entry.cert, entry.key]
    return files


def read_tls_files(settings: ListenerTls) -> dict[str, bytes]:
    """The contents of :func:`tls_files` (read by the main process, which keeps the
    rights to read keys, for workers that may have lost them)."""
    out = {}
    for path in tls_files(settings):
        with open(path, "rb") as src:
            out[path] = src.read()
    return out


@contextmanager
def _in_memory(contents: dict[str, bytes]) -> Iterator[dict[str, str]]:
    """Each file's bytes in an anonymous memory file; yields path -> /proc/self/fd path."""
    fds: list[int] = []
    try:
        paths = {}
        for path, data in contents.items():
            fd = os.memfd_create("ferryman-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
            paths[path] = f"/proc/self/fd/{fd}"
        yield paths
    finally:
        for fd in fds:
            os.close(fd)


def server_ssl_context_from(
    settings: ListenerTls, contents: dict[str, bytes]
) -> ssl.SSLContext:
    """:func:`server_ssl_context` with the files' bytes given (``contents``: path ->
    bytes, as read by :func:`read_tls_files`), not read from disk: a worker that switched
    to ``server.user`` loads certificates the main process read for it on a reload."""
    with _in_memory(contents) as paths:
        swapped = dataclasses.replace(
            settings,
            cert=paths[settings.cert],
            key=paths[settings.key],
            client_ca=paths[settings.client_ca] if settings.client_ca else None,
            sni=tuple(
                SniCertificate(e.server_names, paths[e.cert], paths[e.key]) for e in settings.sni
            ),
        )
        return server_ssl_context(swapped)
