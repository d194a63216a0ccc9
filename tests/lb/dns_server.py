"""A tiny authoritative DNS server over UDP on 127.0.0.1 for tests (dnspython, one thread).

    server = DnsServer().start()
    server.set("svc.test", "A", 30, "127.0.0.1", "127.0.0.2")
    DnsDiscovery("svc.test", 8080, resolver=server.address)
    ...
    server.stop()

Names it knows nothing about get NXDOMAIN; a known name without records of the asked type
gets an empty NOERROR answer. Every query is recorded in ``queries`` as ``(name, type)``.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def _norm(name: str) -> str:
    name = name.lower()
    return name if name.endswith(".") else name + "."


class DnsServer:
    """Answers from ``records``: ``{(name, type): (ttl, [rdata text, ...])}``."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def set(self, name: str, rdtype: str, ttl: int, *rdatas: str) -> None:
        """Replace the records of ``name``/``rdtype`` (none: the name exists, no such type)."""
        with self.lock:
            self.records[(_norm(name), rdtype.upper())] = (ttl, list(rdatas))

    def remove(self, name: str) -> None:
        """Forget ``name`` entirely (NXDOMAIN from now on)."""
        with self.lock:
            for k in [k for k in self.records if k[0] == _norm(name)]:
                del self.records[k]

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def count(self, name: str) -> int:
        """How many queries for ``name`` arrived."""
        with self.lock:
            return sum(1 for n, _ in self.queries if n == _norm(name))

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = self.answer(wire)
            except Exception:  # noqa: BLE001 - a malformed query gets no answer
                continue
            self.sock.sendto(reply, peer)

    def answer(self, wire: bytes) -> bytes:
        """The response to one query."""
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self.lock:
            self.queries.append((name, rdtype))
            known = any(n == name for n, _ in self.records)
            entry = self.records.get((name, rdtype))
        if not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif entry is not None and entry[1]:
            ttl, rdatas = entry
            response.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, *rdatas))
        return response.to_wire()
