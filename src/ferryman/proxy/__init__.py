"""The proxy engine: hooks, sessions, the per-request pipeline and the HTTP service."""

from ferryman.proxy.hooks import HOOKS, ProxyHttp
from ferryman.proxy.options import ProxyOptions
from ferryman.proxy.service import HttpProxyService
from ferryman.proxy.session import Session

__all__ = ["HOOKS", "HttpProxyService", "ProxyHttp", "ProxyOptions", "Session"]
