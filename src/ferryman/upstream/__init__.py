"""Upstream side: peers, connections and the pooled connector."""

from ferryman.upstream.connection import UpstreamConnection
from ferryman.upstream.connector import Connector
from ferryman.upstream.peer import HttpPeer, parse_address

__all__ = ["Connector", "HttpPeer", "UpstreamConnection", "parse_address"]
