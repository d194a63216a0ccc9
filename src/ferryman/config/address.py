"""Socket addresses as written in configs: "127.0.0.1:8080", "[::1]:8080", ":8080"."""

from __future__ import annotations

import ipaddress
import re

__all__ = ["parse_address", "address_key", "format_address", "is_hostname"]

# A DNS name (labels of letters, digits, "-" and "_", which some internal names use).
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_PORT = re.compile(r"[0-9]{1,5}")
WILDCARD_HOST = "0.0.0.0"


def is_hostname(text: str) -> bool:
    """Whether ``text`` is a syntactically valid DNS host name or IPv4 address."""
    return _HOSTNAME.fullmatch(text) is not None


def parse_address(text: str, *, require_host: bool) -> tuple[str, int]:
    """Parse ``host:port`` into ``(host, port)``.

    The host is an IPv4 address, a DNS name, or an IPv6 address in brackets (returned without
    them: ``"[::1]:80"`` gives ``("::1", 80)``). Unless ``require_host`` is set, the host may
    be left out (``":8080"``), which means every IPv4 interface, ``"0.0.0.0"``. The port must
    be 1..65535. Raises ``ValueError`` with a short reason.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError('missing "]" after the IPv6 address')
        host = text[1:end]
        rest = text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError("missing :port after the IPv6 address")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'"{host}" is not an IPv6 address') from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("missing :port")
        if ":" in host:
            raise ValueError('write IPv6 addresses in brackets, as in "[::1]:8080"')
        if not host:
            if require_host:
                raise ValueError("missing host")
            host = WILDCARD_HOST
        elif not is_hostname(host):
            raise ValueError(f'"{host}" is not a valid host name or address')
    if not _PORT.fullmatch(port_text):
        raise ValueError(f'port "{port_text}" is not a number')
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535")
    return host, port


def address_key(address: tuple[str, int]) -> tuple[str, int]:
    """A normalised form of an address for duplicate detection (IP addresses canonicalised,
    names lowercased)."""
    host, port = address
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        host = host.lower().rstrip(".")
    return host, port


def format_address(address: tuple[str, int]) -> str:
    """Format ``(host, port)`` back as ``host:port`` (IPv6 hosts in brackets)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
