"""Service discovery: where an upstream group's member list comes from.

A :class:`ServiceDiscovery` answers ``await discover()`` with the current members as
``(address, weight)`` pairs, and says via :meth:`~ServiceDiscovery.next_refresh` when to
ask again. ferryman ships three: :class:`StaticDiscovery` (a fixed list),
:class:`DnsDiscovery` (A/AAAA/SRV records, re-resolved as their TTL runs out) and
:class:`FileDiscovery` (a JSON or YAML list in a file, re-read when it changes). For
anything else (Consul, Kubernetes endpoints, an internal API), subclass
:class:`ServiceDiscovery` and name the class in the config (``discovery: mod:Class``) or
pass it to a :class:`~ferryman.lb.monitor.GroupMonitor`.

A discovery that raises keeps the previous members: a flaky registry never empties a group.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Sequence
from typing import Any

import yaml

__all__ = [
    "DnsDiscovery",
    "FileDiscovery",
    "Member",
    "ServiceDiscovery",
    "StaticDiscovery",
    "parse_member",
]

Member = tuple[tuple[str, int], int]
"""One group member: ``((host, port), weight)``."""


def parse_member(item: Any) -> Member:
    """One member from a file or API: ``"host:port"``, ``"host:port weight=3"``, or a
    mapping ``{"address": "host:port", "weight": 3}``. Raises ``ValueError``."""
    weight = 1
    if isinstance(item, dict):
        text = item.get("address")
        if not isinstance(text, str):
            raise ValueError(f'expected "address": "host:port" in {item!r}')
        w = item.get("weight", 1)
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 1000:
            raise ValueError(f"expected a weight 1..1000 in {item!r}")
        weight = w
    elif isinstance(item, str):
        if not item.split():
            raise ValueError(f'expected "host:port", got {item!r}')
        text, *options = item.split()
        for option in options:
            name, _, value = option.partition("=")
            if name != "weight" or not value.isdigit() or not 1 <= int(value) <= 1000:
                raise ValueError(f"expected weight=1..1000 after the address in {item!r}")
            weight = int(value)
    else:
        raise ValueError(f'expected "host:port" or a mapping, got {item!r}')
    return _split_address(text), weight


def _split_address(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'expected "[v6]:port", got {text!r}')
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f'expected "host:port", got {text!r}')
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a port 1..65535 in {text!r}")
    return host, int(port)


class ServiceDiscovery:
    """Base class of membership sources.

    Subclasses implement :meth:`discover`; they may override :meth:`next_refresh`
    (default: every ``refresh`` seconds).
    """

    #: Seconds between two calls of :meth:`discover` unless :meth:`next_refresh` says else.
    refresh: float = 5.0

    async def discover(self) -> Sequence[Member]:
        """The current members. Raise to keep the previous ones (the error is logged).
        Subclasses must provide it; the base class knows no registry to ask."""
        raise NotImplementedError(f"{type(self).__name__} does not implement discover()")

    def next_refresh(self) -> float:
        """Seconds to wait before calling :meth:`discover` again."""
        return self.refresh

    def describe(self) -> str:
        """A short description for logs."""
        return type(self).__name__


class StaticDiscovery(ServiceDiscovery):
    """A fixed member list (the config's ``servers``); asked once."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)
        self.refresh = 3600.0

    async def discover(self) -> Sequence[Member]:
        """The fixed list."""
        return self.members

    def describe(self) -> str:
        """``static``."""
        return "static"


class DnsDiscovery(ServiceDiscovery):
    """Members from DNS: every A or AAAA address of ``name`` on ``port``, or the targets of
    its SRV records (resolved to addresses, weight from the record, lowest priority only).

    Re-resolved when the records' TTL runs out (at least every ``min_refresh`` seconds,
    at most every ``max_refresh``), or every ``refresh`` seconds if given.

    Args:
        name: the DNS name.
        port: the port for A/AAAA members.
        type: ``"A"``, ``"AAAA"`` or ``"SRV"``.
        refresh: a fixed re-resolution interval, or None to follow TTLs.
        resolver: ``(host, port)`` of the DNS server to ask, or None for the system's.
    """

    def __init__(
        self,
        name: str,
        port: int = 80,
        type: str = "A",
        *,
        refresh: float | None = None,
        resolver: tuple[str, int] | None = None,
        timeout: float = 3.0,
        min_refresh: float = 1.0,
        max_refresh: float = 300.0,
    ) -> None:
        import dns.asyncresolver

        if type not in ("A", "AAAA", "SRV"):
            raise ValueError(f"type must be A, AAAA or SRV, got {type!r}")
        self.name = name
        self.port = port
        self.type = type
        self.fixed_refresh = refresh
        self.min_refresh = min_refresh
        self.max_refresh = max_refresh
        self._ttl: float = refresh if refresh is not None else min_refresh
        res = dns.asyncresolver.Resolver(configure=resolver is None)
        if resolver is not None:
            res.nameservers = [resolver[0]]
            res.port = resolver[1]
        res.lifetime = timeout
        res.cache = None  # TTLs are honoured here; a cache would hide changes
        self.resolver = res

    def next_refresh(self) -> float:
        """The fixed interval, else the smallest TTL seen (bounded)."""
        if self.fixed_refresh is not None:
            return self.fixed_refresh
        return min(max(self._ttl, self.min_refresh), self.max_refresh)

    async def _addresses(self, name: str, rdtype: str) -> tuple[list[str], float]:
        answer = await self.resolver.resolve(name, rdtype)
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else self.min_refresh
        return [r.address for r in answer], ttl

    async def discover(self) -> Sequence[Member]:
        """Resolve now."""
        if self.type != "SRV":
            addresses, ttl = await self._addresses(self.name, self.type)
            self._ttl = ttl
            return [((a, self.port), 1) for a in sorted(addresses)]
        answer = await self.resolver.resolve(self.name, "SRV")
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else self.min_refresh
        records = list(answer)
        if not records:
            return []
        best = min(r.priority for r in records)
        members: list[Member] = []
        for r in records:
            if r.priority != best:
                continue  # higher priority values are backups, used only if all best fail
            target = r.target.to_text(omit_final_dot=True)
            weight = max(1, min(int(r.weight), 1000))
            try:
                ipaddress.ip_address(target)
                hosts = [target]
            except ValueError:
                hosts, host_ttl = await self._addresses(target, "A")
                ttl = min(ttl, host_ttl)
            members.extend(((h, int(r.port)), weight) for h in hosts)
        self._ttl = ttl
        return sorted(members)

    def describe(self) -> str:
        """``dns NAME TYPE``."""
        return f"dns {self.name} {self.type}"


class FileDiscovery(ServiceDiscovery):
    """Members listed in a JSON or YAML file (a list of :func:`parse_member` items, or a
    mapping with a ``servers`` list), re-read whenever its modification time, size or inode
    changes (checked every ``poll`` seconds). A file that is missing or invalid keeps the
    previous members."""

    def __init__(self, path: str, *, poll: float = 1.0) -> None:
        self.path = path
        self.refresh = poll
        self._stamp: tuple[int, int, int] | None = None
        self._members: list[Member] | None = None

    async def discover(self) -> Sequence[Member]:
        """The file's members (re-parsed only when it changed)."""
        st = await asyncio.to_thread(os.stat, self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and self._members is not None:
            return self._members
        with open(self.path, "rb") as f:
            data = f.read()
        members = self.parse(data)
        self._stamp = stamp
        self._members = members
        return members

    def parse(self, data: bytes) -> list[Member]:
        """Parse the file's content (JSON if it parses as JSON, else YAML)."""
        try:
            doc: Any = json.loads(data)
        except ValueError:
            doc = yaml.safe_load(data)
        if isinstance(doc, dict) and "servers" in doc:
            doc = doc["servers"]
        if not isinstance(doc, list):
            raise ValueError(f"{self.path}: expected a list of servers")
        return [parse_member(item) for item in doc]

    def describe(self) -> str:
        """``file PATH``."""
        return f"file {self.path}"
