"""Reading a config file and its overrides into plain data, before JAX is imported.

Everything here is pure Python and YAML, so a refused file costs a tenth of a second rather than
the seconds JAX and Flax take to import. Refused, each with one line naming the problem:
- a missing, non-UTF-8, oversized, empty (or comments-only) or malformed file;
- a YAML alias bomb: anchors and aliases expanding to more than MAX_VALUES values (PyYAML builds
  the shared structure quickly; copying it, as overrides and the schema decoder do, would not end);
- a key given twice in one mapping (YAML keeps the last silently);
- a top-level section that is not one of SECTIONS, in the file or in an override;
- a NaN or infinite number anywhere (`.inf` in YAML, `nan` or `1e999` in an override): no setting
  takes one, and it would only show up later as a diverged run. The schema decoder checks every
  float field again, for configs that do not come through here (config.json, from_dict).
"""

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, SequenceNode

# The sections of fwpzoo.config.Config, in order (that module checks the two agree).
SECTIONS = ("model", "data", "train", "checkpoint", "eval", "mesh")
MAX_BYTES = 1 << 20  # a config is a few hundred bytes; the committed ones are under 2 KiB
MAX_VALUES = 10_000  # values after alias expansion; a config holds a few dozen
YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigError(ValueError):
    """A bad config: the message is one line that names the culprit."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key given twice in one mapping ("<<" merges may override)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if key_node.tag == YAML_MERGE_TAG or not isinstance(key_node.value, str):
                continue  # merges override by design; non-scalar keys are refused by the schema
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(
                    f"duplicate key {key!r} at line {line} (first given at line {first_line[key]})"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(node, sizes: dict | None = None, open_nodes: set | None = None) -> int:
    """How many values `node` holds once every alias is copied out (shared nodes counted once
    per use). ConfigError on an alias that refers to a node containing itself."""
    sizes = {} if sizes is None else sizes
    open_nodes = set() if open_nodes is None else open_nodes
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"recursive alias at line {node.start_mark.line + 1}")
    if isinstance(node, SequenceNode):
        children = node.value
    elif isinstance(node, MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    open_nodes.add(id(node))
    sizes[id(node)] = 1 + sum(expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    return sizes[id(node)]


def parse_yaml(text: str, path: Path) -> object:
    """The data of YAML `text` (None for no document); ConfigError naming `path` if refused."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = expanded_size(node)
        if size > MAX_VALUES:
            raise ConfigError(
                f"expands to {size:,} values through YAML aliases; the limit is {MAX_VALUES:,}"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from None
    finally:
        loader.dispose()


def check_sections(data: dict) -> None:
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(
                f"unknown key {key!s}; valid keys in the config: {', '.join(SECTIONS)}"
            )


def check_finite(value, key: str = "") -> None:
    """Refuses a NaN or infinite number, or a string that reads as one, anywhere in `value`."""
    if isinstance(value, dict):
        for name, item in value.items():
            check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_finite(item, f"{key}[{i}]")
    elif isinstance(value, str) and "," in value:  # a list override: "model.x=[1, nan]"
        items = value.strip().removeprefix("[").removesuffix("]").split(",")
        check_finite([item.strip() for item in items], key)
    elif isinstance(value, float | str) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            return
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value}")


def read_config_file(path: str | Path) -> dict:
    """The nested mapping in YAML file `path`, its top-level keys checked against SECTIONS."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"config file {path} is {size:,} bytes; the limit is {MAX_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    data = parse_yaml(text, path)
    if data is None:
        raise ConfigError(f"config file {path} is empty; it must hold sections such as train:")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {data!r}")
    check_sections(data)
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of the nested mapping `data` with each `a.b.c=value` set (the value a string)."""
    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key=value")
        *parents, leaf = key.strip().split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {override!r}: {'.'.join(parents[: i + 1])} is not a section"
                )
            node = child
        node[leaf] = value
    check_sections(data)
    check_finite(data)
    return data
