"""YAML text to a node tree (``yaml.compose``), keeping line marks for error messages."""

from __future__ import annotations

import yaml
from yaml.nodes import Node

from .errors import ConfigError

__all__ = ["compose", "node_line"]


def node_line(node: Node) -> int:
    """The 1-based line where ``node`` starts."""
    return int(node.start_mark.line) + 1


def compose(text: str, source: str) -> Node | None:
    """Compose ``text`` into a YAML node tree, or None for an empty document.

    Scalars are not converted yet (the validator does that per value, so that it knows the
    line of each one). Raises ``ConfigError`` for YAML syntax errors, naming the line.
    """
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node: Node | None = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else int(mark.line) + 1
        raise ConfigError.single(
            source, line, "", f"invalid YAML: {_describe(exc)}", "valid YAML"
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        raise ConfigError.single(
            source, line, "", f"invalid YAML: {exc.reason} (character {shown})", "valid YAML"
        ) from None
    except yaml.YAMLError as exc:  # pragma: no cover - PyYAML raises marked errors in practice
        raise ConfigError.single(source, None, "", f"invalid YAML: {exc}", "valid YAML") from None
    finally:
        if loader is not None:
            loader.dispose()
    return node


def _describe(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem and context as one phrase."""
    problem = exc.problem or ""
    context = exc.context or ""
    if not problem:
        return context or "syntax error"
    if not context:
        return problem
    if problem.startswith("but "):
        return f"{context}, {problem}"
    return f"{problem} ({context})"
