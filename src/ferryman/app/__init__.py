"""The config-driven proxy behind ``ferryman run``, built only on the public API."""

from ferryman.app.build import (
    AppLoadError,
    build_proxy,
    build_server,
    check_tls_material,
    load_app_class,
)
from ferryman.app.config_proxy import ConfigProxy, UpstreamGroup

__all__ = [
    "AppLoadError",
    "ConfigProxy",
    "UpstreamGroup",
    "build_proxy",
    "build_server",
    "check_tls_material",
    "load_app_class",
]
