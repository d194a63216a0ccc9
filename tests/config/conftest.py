"""Shared helpers for the config tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import pytest

from ferryman.config import ConfigError, parse_config


def dedent(text: str) -> str:
    """Dedent a YAML snippet written inline in a test."""
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
def config_error() -> Callable[[str], ConfigError]:
    """Parse a snippet (dedented) as ``ferryman.yaml`` and return the ConfigError it raises."""

    def run(text: str) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            parse_config(dedent(text), "ferryman.yaml")
        return info.value

    return run


@pytest.fixture
def error_text(config_error: Callable[[str], ConfigError]) -> Callable[[str], str]:
    """Parse a snippet as ``ferryman.yaml`` and return ``str()`` of the ConfigError."""

    def run(text: str) -> str:
        return str(config_error(text))

    return run
