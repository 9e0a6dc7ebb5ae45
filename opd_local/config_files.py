"""Config files: YAML read strictly (UTF-8, each key once, aliases bounded) and a run's config.yaml written atomically.

A YAML file must be UTF-8 text, and its aliases may expand to at most MAX_YAML_VALUES values (an alias bomb
of a few hundred bytes would otherwise expand to gigabytes).
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

import yaml

from opd_local.config import Config, ConfigError


def short_value(value: Any, limit: int = 60) -> str:
    """`repr(value)`, or its start and its length where longer than `limit`: no error line can be huge."""
    return clip_text(repr(value), limit)


def clip_text(text: str, limit: int = 60) -> str:
    """`text`, or its start and its length where longer than `limit`: no error line can be huge."""
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden, not duplicates
            loader.construct_object(value_node, deep=True)  # but the merged mappings' own keys are checked
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = first_line.get(key)
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if seen is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {short_value(key)} is given twice (first on line {seen})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


# A config holds a few dozen values; YAML aliases may repeat a node, but not into an alias bomb
# (`a: &a [x, x]`, `b: &b [*a, *a]`, ... is 2**n values from a few hundred bytes).
MAX_YAML_VALUES = 10_000

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _decode_utf8(raw: bytes, path: str | Path) -> str:
    """`raw` as UTF-8 text, or a ConfigError naming the file (and UTF-16 or UTF-32, where a byte-order mark says so)."""
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), None)
    if encoding is not None:
        raise ConfigError(f"{path}: not UTF-8 text ({encoding}, by its byte-order mark; save it as UTF-8)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}: {err.reason})") from None
    if "\0" in text:  # valid UTF-8, but no YAML holds NUL: ASCII saved as UTF-16 or UTF-32 without a byte-order mark
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(f"{path}: not UTF-8 text (a NUL byte on line {line}, as in UTF-16 or UTF-32 text)")
    return text


def expanded_size(root: yaml.Node, bound: int) -> int:
    """How many values the node graph under `root` holds with its aliases expanded (a node counts 1, a
    collection 1 plus its children), up to `bound + 1`: composing shares an aliased node, constructing
    the Python objects copies it everywhere it is used. An alias cycle (`&a [*a]`) counts as past `bound`.

    Each node's size is computed once (iteratively: no recursion limit), so this costs the size of the
    document as written, not as expanded.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(bound + 1, 1 + sum(sizes[id(child)] for child in children))
            continue
        if key in open_nodes:  # reached again while its own children are counted: a cycle
            return bound + 1
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                return bound + 1
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from err
    text = _decode_utf8(raw, path)
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # its reader refuses a character YAML does not allow
        node = loader.get_single_node()  # the node graph: an alias is the anchored node itself, not a copy
        if node is not None and expanded_size(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise ConfigError(
                f"{path}: its aliases expand to more than {MAX_YAML_VALUES} values; a config needs far fewer (an alias bomb?)"
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({clip_text(str(getattr(err, 'problem', None) or err), 200)})") from err
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def load_saved_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """A run's saved config.yaml, which holds every section: an empty one is refused, never read as the defaults."""
    data = load_yaml(path)
    if not data:
        raise ConfigError(f"{path}: the run's saved config is empty (a crash while it was written?); it must hold every section")
    return data


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write `cfg` under a temporary name and rename it into place, so `path` is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
