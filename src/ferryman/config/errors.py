"""Configuration errors: one problem per mistake, all of them collected in one exception."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigProblem"]


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake found in a configuration file.

    Fields:
        source: the file the problem is in (the path as given to ``load_config``, or the
            ``source`` name passed to ``parse_config``).
        line: 1-based line number of the offending key or value, or ``None`` when no line
            applies (for example when the file cannot be read).
        key_path: where in the document the problem is, such as
            ``upstreams.app.timeouts.connect`` or ``listeners[0].bind``; ``""`` for the
            document itself (syntax errors, an empty file).
        message: the user-facing description, for example
            ``expected a duration such as "2s" or "500ms", got 'fast'``.
        expected: what would have been accepted, for example
            ``a duration such as "2s" or "500ms"``.
    """

    source: str
    line: int | None
    key_path: str
    message: str
    expected: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.key_path:
            return f"{where}: {self.key_path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration file could not be loaded.

    Carries every problem found in the file (``errors``), sorted by line; ``str()`` shows one
    problem per line, each formatted as ``file:line: key.path: message``. The attributes
    ``source``, ``line``, ``key_path`` and ``expected`` describe the first problem, for callers
    that only report one.
    """

    errors: list[ConfigProblem]
    source: str
    line: int | None
    key_path: str
    expected: str

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        ordered = sorted(problems, key=lambda p: p.line if p.line is not None else 0)
        if not ordered:
            raise ValueError("ConfigError needs at least one problem")
        self.errors = ordered
        first = ordered[0]
        self.source = first.source
        self.line = first.line
        self.key_path = first.key_path
        self.expected = first.expected
        super().__init__("\n".join(str(p) for p in ordered))

    @classmethod
    def single(
        cls, source: str, line: int | None, key_path: str, message: str, expected: str
    ) -> ConfigError:
        """Build an error carrying a single problem."""
        return cls([ConfigProblem(source, line, key_path, message, expected)])

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.errors)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[ConfigProblem]]]:
        return (type(self), (self.errors,))
