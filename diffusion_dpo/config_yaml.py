"""YAML as the config loader reads it: every unquoted scalar keeps the text the user wrote beside YAML 1.1's
reading of it (so a key's declared type can pick one), keys are names, and a value cannot contain itself."""

from __future__ import annotations

import typing
from typing import Any

import yaml


class Plain(typing.NamedTuple):
    """An unquoted YAML scalar: YAML 1.1's reading of it (``value``) and the text as written (``text``)."""

    value: Any
    text: str


class _Loader(yaml.SafeLoader):
    """A safe loader that keeps the text of every unquoted scalar, so the declared type can pick its reading."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.open_anchors: set[str] = set()  # anchors of the nodes being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        # `&a [*a]` is a list holding itself: every reader of it would recurse without end.
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent) and anchor in self.open_anchors:
            raise yaml.composer.ComposerError(None, None, f"alias *{anchor} refers to the value that holds it",
                                              event.start_mark)
        if anchor is None or isinstance(event, yaml.AliasEvent):
            return super().compose_node(parent, index)
        self.open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.open_anchors.discard(anchor)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        value = super().construct_object(node, deep=deep)
        if isinstance(node, yaml.ScalarNode) and node.style is None:
            return Plain(value, node.value)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Keys are names (config keys, scorer names): an unquoted key such as `on` is the word, not True.
        mapping = super().construct_mapping(node, deep=deep)
        return {k.text if isinstance(k, Plain) else k: v for k, v in mapping.items()}


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, with each unquoted scalar as a :class:`Plain`; a value holding itself is a
    yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: builds plain data only


def resolved(value: Any) -> Any:
    """``value`` with every :class:`Plain` replaced by YAML's reading of it (for keys with no declared type)."""
    if isinstance(value, Plain):
        return value.value
    if isinstance(value, dict):
        return {k: resolved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved(v) for v in value]
    return value
