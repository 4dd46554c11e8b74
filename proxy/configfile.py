"""A configuration file read into the plain mapping `load_config` validates: YAML, a mapping at
the top, no key given twice in one mapping, every failure a ConfigError naming the file.

A blank file (nothing, or only comments) reads as no settings at all, which is likelier a file
cut short than a choice: `read_config_file` says so with `BlankConfigFile`, and the caller
decides (a start warns and runs on the defaults, a reload keeps the running configuration).
`{}` says "the defaults" on purpose and is no such file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class BlankConfigFile(ConfigError):
    """The file holds no YAML document: empty, or only comments."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is recorded
    (PyYAML keeps the last silently: a second `server:` would drop the first's keys).
    Checked as each mapping is composed, before merge keys (<<) bring in keys that a mapping
    may override by design."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []   # (line, problem)

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or \
                    key_node.tag == "tag:yaml.org,2002:merge":
                continue      # a complex key is left to PyYAML's own errors
            line, seen = key_node.start_mark.line + 1, (key_node.tag, key_node.value)
            first = first_line.get(seen)
            if first is None:
                first_line[seen] = line
            else:
                self.duplicates.append((line, f"line {line}: key '{key_node.value}' is given "
                                        f"again (first at line {first}); only one of them "
                                        "would count"))
        return node


def read_config_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc})"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([f"{path}: {d}" for _, d in sorted(loader.duplicates)])
    if data is None:
        raise BlankConfigFile([f"{path}: the file is empty (or only comments), as a file "
                               "cut short would be"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return data
