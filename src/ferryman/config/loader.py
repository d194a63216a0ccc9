"""Entry points: read a YAML file or string, validate it, return a ``Config`` or raise."""

from __future__ import annotations

import os

from .document import compose
from .errors import ConfigError
from .model import Config
from .reader import Reader
from .schema import build_config

__all__ = ["load_config", "parse_config"]


def parse_config(text: str, source: str = "<string>", *, base_dir: str | None = None) -> Config:
    """Validate configuration ``text`` and return it as a ``Config``.

    ``source`` names the text in error messages. Relative file paths in the text (TLS
    certificates and keys) are resolved against ``base_dir``, which defaults to the directory
    of ``source`` when it looks like a path, else the current directory.

    Raises ``ConfigError`` listing every problem found; never returns a partly valid config.
    """
    if base_dir is None:
        if source.startswith("<"):
            base_dir = os.getcwd()
        else:
            base_dir = os.path.dirname(os.path.abspath(source))
    root = compose(text, source)
    reader = Reader(source, base_dir)
    config = build_config(root, reader)
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and return the configuration file at ``path`` (UTF-8 YAML).

    Relative file paths inside it are resolved against the file's directory and stored
    absolute. Raises ``ConfigError`` if the file cannot be read or has any problem.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError.single(
            source, None, "", f"cannot read the config file: {reason}", "a readable YAML file"
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError.single(
            source, line, "", f"expected UTF-8 text, got byte 0x{data[exc.start]:02x}",
            "UTF-8 text",
        ) from None
    return parse_config(text, source, base_dir=os.path.dirname(os.path.abspath(source)))
