"""Typed access to a YAML node tree that records every problem instead of stopping at the first.

``Reader`` turns nodes into Python values (integers, booleans, durations, sizes, addresses,
file paths, ...). A value that is wrong is reported as a ``ConfigProblem`` naming its line
and key path, and the caller gets ``None`` (or the default it asked for) so that it can go on
and find the other problems. ``Section`` is a validated mapping with a fixed set of keys.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .address import parse_address
from .document import node_line
from .errors import ConfigProblem
from .units import UnitError, parse_duration, parse_size

__all__ = ["Reader", "Section", "child_path", "index_path"]

T = TypeVar("T")

NULL_TAG = "tag:yaml.org,2002:null"
MERGE_TAG = "tag:yaml.org,2002:merge"
DURATION = 'a duration such as "2s" or "500ms"'
POSITIVE_DURATION = 'a positive duration such as "2s" or "500ms"'
SIZE = 'a size such as "8KiB", "512k" or "1m"'
POSITIVE_SIZE = 'a positive size such as "8KiB", "512k" or "1m"'
BIND_ADDRESS = 'an address such as "127.0.0.1:8080", "[::1]:8080" or ":8080"'
SERVER_ADDRESS = 'a "host:port" address such as "127.0.0.1:9001" or "[::1]:9001"'
READABLE_FILE = "a path to a readable file"
READABLE_DIRECTORY = "a path to a readable directory"

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def child_path(path: str, key: str) -> str:
    """The key path of ``key`` inside ``path``: ``a.b``, or ``a["x y"]`` for unusual keys."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f'{path}["{key}"]'


def index_path(path: str, index: int) -> str:
    """The key path of list item ``index`` inside ``path``: ``listeners[0]``."""
    return f"{path}[{index}]"


class Reader:
    """Converts nodes to values and collects problems (``problems``) as it goes.

    ``source`` names the file in messages; relative file paths in the document are resolved
    against ``base_dir``.
    """

    def __init__(self, source: str, base_dir: str) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[ConfigProblem] = []
        self._constructor = SafeConstructor()
        # Mappings already read, by id (with the node, to keep the id valid): aliases
        # (``*anchor``) make one node appear in several places.
        self._mappings: dict[int, tuple[Node, list[tuple[str, Node, Node]]]] = {}

    # -- reporting ---------------------------------------------------------------------------

    def problem(
        self,
        node: Node | None,
        path: str,
        message: str,
        expected: str,
        *,
        line: int | None = None,
    ) -> None:
        """Record a problem at ``node``'s line (or at ``line`` when there is no node)."""
        if node is not None:
            line = node_line(node)
        self.problems.append(ConfigProblem(self.source, line, path, message, expected))

    def expected(self, node: Node, path: str, expected: str, detail: str | None = None) -> None:
        """Record ``expected <expected>, got <what node holds>[ (<detail>)]``."""
        message = f"expected {expected}, got {self.describe(node)}"
        if detail:
            message = f"{message} ({detail})"
        self.problem(node, path, message, expected)

    def describe(self, node: Node) -> str:
        """What a node holds, for the "got ..." half of a message."""
        if isinstance(node, MappingNode):
            return "a mapping" if node.value else "an empty mapping"
        if isinstance(node, SequenceNode):
            return "a list" if node.value else "an empty list"
        ok, value = self._construct(node)
        raw = str(node.value)
        if not ok:
            return repr(raw)
        if isinstance(value, bool):
            text = "true" if value else "false"
            return text if raw.lower() == text else f"{raw} (a boolean)"
        if value is None:
            return "null"
        if isinstance(value, str | int | float):
            return repr(value)
        return f"{raw} (a {type(value).__name__})"

    # -- scalars -----------------------------------------------------------------------------

    def _construct(self, node: Node) -> tuple[bool, object]:
        try:
            return True, self._constructor.construct_object(node, deep=True)
        except (ConstructorError, ValueError, TypeError):
            return False, None

    def scalar(self, node: Node, path: str, expected: str) -> tuple[bool, object]:
        """The Python value of a scalar node, as ``(True, value)``; ``(False, None)`` (with a
        problem recorded) for a mapping, a list, or a value YAML cannot construct."""
        if not isinstance(node, ScalarNode):
            self.expected(node, path, expected)
            return False, None
        ok, value = self._construct(node)
        if not ok:
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            self.problem(
                node, path, f"expected {expected}, got {node.value!r} with tag {tag}", expected
            )
        return ok, value

    def is_null(self, node: Node) -> bool:
        """Whether the node is an empty value (``key:`` with nothing after it, ``~``, ``null``)."""
        return isinstance(node, ScalarNode) and node.tag == NULL_TAG

    def integer(self, node: Node, path: str, *, minimum: int | None = None) -> int | None:
        """An integer (booleans are not integers), at least ``minimum``."""
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        ok, value = self.scalar(node, path, expected)
        if not ok:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.expected(node, path, expected)
            return None
        if minimum is not None and value < minimum:
            self.expected(node, path, expected)
            return None
        return value

    def boolean(self, node: Node, path: str) -> bool | None:
        """``true`` or ``false``."""
        ok, value = self.scalar(node, path, "true or false")
        if not ok:
            return None
        if not isinstance(value, bool):
            self.expected(node, path, "true or false")
            return None
        return value

    def string(
        self,
        node: Node,
        path: str,
        expected: str = "a string",
        check: Callable[[str], bool] | None = None,
    ) -> str | None:
        """A non-empty string that passes ``check`` if given."""
        ok, value = self.scalar(node, path, expected)
        if not ok:
            return None
        if not isinstance(value, str) or not value or (check is not None and not check(value)):
            self.expected(node, path, expected)
            return None
        return value

    def duration(self, node: Node, path: str, *, positive: bool = False) -> float | None:
        """A duration in seconds (see ``parse_duration``); above zero if ``positive``."""
        ok, value = self.scalar(node, path, DURATION)
        if not ok:
            return None
        try:
            seconds = parse_duration(value)
        except UnitError as exc:
            self.expected(node, path, DURATION, exc.reason)
            return None
        if positive and seconds <= 0:
            self.expected(node, path, POSITIVE_DURATION)
            return None
        return seconds

    def size(self, node: Node, path: str, *, positive: bool = False) -> int | None:
        """A size in bytes (see ``parse_size``); above zero if ``positive``."""
        ok, value = self.scalar(node, path, SIZE)
        if not ok:
            return None
        try:
            size = parse_size(value)
        except UnitError as exc:
            self.expected(node, path, SIZE, exc.reason)
            return None
        if positive and size <= 0:
            self.expected(node, path, POSITIVE_SIZE)
            return None
        return size

    def address(self, node: Node, path: str, *, require_host: bool) -> tuple[str, int] | None:
        """A ``host:port`` address (see ``parse_address``)."""
        expected = SERVER_ADDRESS if require_host else BIND_ADDRESS
        ok, value = self.scalar(node, path, expected)
        if not ok:
            return None
        if not isinstance(value, str):
            self.expected(node, path, expected)
            return None
        try:
            return parse_address(value, require_host=require_host)
        except ValueError as exc:
            self.expected(node, path, expected, str(exc))
            return None

    def file(self, node: Node, path: str) -> str | None:
        """A path to an existing, readable file, returned absolute (relative paths are taken
        from ``base_dir``; ``~`` is expanded)."""
        text = self.string(node, path, READABLE_FILE)
        if text is None:
            return None
        full = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(text)))
        if not os.path.exists(full):
            self.expected(node, path, READABLE_FILE, f"{full} does not exist")
        elif os.path.isdir(full):
            self.expected(node, path, READABLE_FILE, f"{full} is a directory")
        elif not os.access(full, os.R_OK):
            self.expected(node, path, READABLE_FILE, f"{full} is not readable")
        else:
            return full
        return None

    def directory(self, node: Node, path: str) -> str | None:
        """A path to an existing directory whose files can be read, returned absolute
        (relative paths are taken from ``base_dir``; ``~`` is expanded)."""
        text = self.string(node, path, READABLE_DIRECTORY)
        if text is None:
            return None
        full = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(text)))
        if not os.path.exists(full):
            self.expected(node, path, READABLE_DIRECTORY, f"{full} does not exist")
        elif not os.path.isdir(full):
            self.expected(node, path, READABLE_DIRECTORY, f"{full} is not a directory")
        elif not os.access(full, os.R_OK | os.X_OK):
            self.expected(node, path, READABLE_DIRECTORY, f"{full} is not readable")
        else:
            return full
        return None

    # -- collections -------------------------------------------------------------------------

    def sequence(
        self, node: Node, path: str, expected: str, *, non_empty: bool = False
    ) -> list[tuple[str, Node]] | None:
        """The items of a list as ``(key path, node)`` pairs."""
        if not isinstance(node, SequenceNode):
            self.expected(node, path, expected)
            return None
        if non_empty and not node.value:
            self.expected(node, path, expected)
            return None
        return [(index_path(path, i), item) for i, item in enumerate(node.value)]

    def items(self, node: Node, path: str, expected: str) -> list[tuple[str, Node, Node]] | None:
        """The entries of a mapping as ``(key, key node, value node)``; an empty value counts
        as an empty mapping. Merge keys (``<<: *anchor``) are applied, keys written in the
        mapping itself overriding merged ones; duplicate and non-scalar keys are reported and
        skipped."""
        if self.is_null(node):
            return []
        if not isinstance(node, MappingNode):
            self.expected(node, path, expected)
            return None
        cached = self._mappings.get(id(node))
        if cached is not None:  # an alias of a mapping already read: problems already reported
            return cached[1]
        own_keys = {id(key) for key, _ in node.value if key.tag != MERGE_TAG}
        try:
            self._constructor.flatten_mapping(node)
        except ConstructorError as exc:
            mark = exc.problem_mark
            line = None if mark is None else int(mark.line) + 1
            self.problem(
                None, path, f"invalid merge key: {exc.problem}",
                "a mapping or a list of mappings after <<", line=line,
            )
            return None
        entries: dict[str, tuple[Node, Node]] = {}
        own: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or self.is_null(key_node):
                self.expected(key_node, path, "a key name")
                continue
            key = str(key_node.value)
            if id(key_node) not in own_keys:  # merged in: later merges win, own keys win
                if key not in own:
                    entries[key] = (key_node, value_node)
                continue
            if key in own:
                first = node_line(entries[key][0])
                self.problem(
                    key_node, child_path(path, key),
                    f'duplicate key "{key}" (first defined on line {first})', "each key once",
                )
                continue
            own.add(key)
            entries[key] = (key_node, value_node)
        result = [(key, k, v) for key, (k, v) in entries.items()]
        self._mappings[id(node)] = (node, result)
        return result

    def section(
        self, node: Node, path: str, keys: Sequence[str], expected: str = "a mapping"
    ) -> Section | None:
        """A mapping whose keys must all be among ``keys``; unknown keys are reported with the
        list of allowed ones. Returns None (problem recorded) if ``node`` is not a mapping."""
        entries = self.items(node, path, expected)
        if entries is None:
            return None
        known: dict[str, tuple[Node, Node]] = {}
        for key, key_node, value_node in entries:
            if key in keys:
                known[key] = (key_node, value_node)
                continue
            allowed = ", ".join(keys)
            hint = ""
            close = difflib.get_close_matches(key, keys, n=1)
            if close:
                hint = f' (did you mean "{close[0]}"?)'
            self.problem(
                key_node, child_path(path, key),
                f'unknown key "{key}"{hint}; expected one of: {allowed}', f"one of: {allowed}",
            )
        return Section(self, node, path, known)


class Section:
    """A validated mapping: typed getters that fall back to a default when the key is absent
    or its value is wrong (the problem having been recorded by the ``Reader``)."""

    def __init__(
        self, reader: Reader, node: Node, path: str, entries: dict[str, tuple[Node, Node]]
    ) -> None:
        self.reader = reader
        self.node = node
        self.path = path
        self.entries = entries

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def path_of(self, key: str) -> str:
        """The key path of ``key`` in this section."""
        return child_path(self.path, key)

    def get(self, key: str) -> Node | None:
        """The value node of ``key``, or None if absent."""
        entry = self.entries.get(key)
        return None if entry is None else entry[1]

    def key_node(self, key: str) -> Node | None:
        """The key node of ``key`` (for errors about the key itself), or None if absent."""
        entry = self.entries.get(key)
        return None if entry is None else entry[0]

    def require(self, key: str, expected: str) -> Node | None:
        """The value node of a required key; reports it missing otherwise."""
        node = self.get(key)
        if node is None:
            self.reader.problem(
                self.node, self.path, f'missing required key "{key}" (expected {expected})',
                expected,
            )
        return node

    def read(self, key: str, convert: Callable[[Node, str], T | None], default: T) -> T:
        """``convert(value node, key path)``, or ``default`` when absent or invalid."""
        node = self.get(key)
        if node is None:
            return default
        value = convert(node, self.path_of(key))
        return default if value is None else value

    def integer(self, key: str, default: int, *, minimum: int | None = None) -> int:
        """An integer field (see ``Reader.integer``)."""
        return self.read(key, lambda n, p: self.reader.integer(n, p, minimum=minimum), default)

    def boolean(self, key: str, default: bool) -> bool:
        """A boolean field."""
        return self.read(key, self.reader.boolean, default)

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        """A duration field in seconds."""
        return self.read(key, lambda n, p: self.reader.duration(n, p, positive=positive), default)

    def size(self, key: str, default: int, *, positive: bool = False) -> int:
        """A size field in bytes."""
        return self.read(key, lambda n, p: self.reader.size(n, p, positive=positive), default)

    def file(self, key: str) -> str | None:
        """An optional readable-file field, absolute."""
        node = self.get(key)
        return None if node is None else self.reader.file(node, self.path_of(key))

    def directory(self, key: str) -> str | None:
        """An optional readable-directory field, absolute."""
        node = self.get(key)
        return None if node is None else self.reader.directory(node, self.path_of(key))
