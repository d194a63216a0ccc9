"""Server side: listeners, TLS contexts, worker processes and signals."""

from ferryman.server.listener import Listener, ListenerTls, SniCertificate
from ferryman.server.server import Server, Service
from ferryman.server.tls import server_ssl_context

__all__ = ["Listener", "ListenerTls", "Server", "Service", "SniCertificate", "server_ssl_context"]
