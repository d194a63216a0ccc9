"""The wire, sans-IO: HTTP/1.x parsing and serialization, header types. No asyncio here."""

from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader

__all__ = ["Headers", "RequestHeader", "ResponseHeader"]
