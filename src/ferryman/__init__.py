"""ferryman: a Python framework and server for fast, programmable HTTP proxies.

Subclass :class:`ProxyHttp`, implement ``upstream_peer`` (and any other hook), then run it::

    import ferryman

    class MyProxy(ferryman.ProxyHttp):
        async def upstream_peer(self, session, ctx):
            return ferryman.HttpPeer("127.0.0.1:9000")

    server = ferryman.Server(workers=1)
    server.add_service(ferryman.HttpProxyService(MyProxy(), [ferryman.Listener("127.0.0.1:8080")]))
    server.run_forever()
"""

from ferryman.errors import ErrorKind, ErrorSource, ProxyError, status_for
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader
from ferryman.proxy import HttpProxyService, ProxyHttp, ProxyOptions, Session
from ferryman.server import Listener, ListenerTls, Server, SniCertificate
from ferryman.upstream import Connector, HttpPeer

__version__ = "0.1.0"

__all__ = [
    "Connector",
    "ErrorKind",
    "ErrorSource",
    "Headers",
    "HttpPeer",
    "HttpProxyService",
    "Listener",
    "ListenerTls",
    "ProxyError",
    "ProxyHttp",
    "ProxyOptions",
    "RequestHeader",
    "ResponseHeader",
    "Server",
    "Session",
    "SniCertificate",
    "status_for",
]
