"""Shared test-PKI helpers: writing trustme certificates and keys to PEM files."""

from __future__ import annotations

from pathlib import Path

import trustme


def write_leaf(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[str, str]:
    """Write ``cert``'s own certificate and its key to ``directory``/``name``.pem / .key;
    return the two paths."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)
