"""Reading YAML files (config files, node metadata) in bounded memory and time.

Three limits, each checked before pyyaml builds anything: the file's size; how deep its
collections nest (pyyaml composes nodes recursively: a few hundred thousand `[` crash the
C loader, a thousand exhaust Python's stack); and how many nodes the documents hold once
their aliases are expanded. A "billion laughs" of a few hundred bytes loads quickly (an alias
is a shared reference), but whatever walks the result afterwards (a model's validation, the
JSON of /config_dump, the exchange frame) expands it to billions of values. The limits are
checked on pyyaml's event stream, which is flat: one pass, linear in the file's size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 4 << 20  # four times what a Kubernetes ConfigMap can hold (1 MiB)
MAX_DEPTH = 100  # Istio's documents nest about 10 deep
MAX_NODES = 1_000_000  # scalars and collections, each alias counted as what it stands for

# libyaml's loader when pyyaml was built with it: ten times faster than the pure-Python one.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LimitError(ValueError):
    """Input past one of the limits; the message says which (the caller adds the file)."""


def read_text(path: Path, limit: int = MAX_BYTES) -> str:
    """The file's text, reading at most `limit` + 1 bytes of it. OSError as the file
    system raises it (a missing file, a directory); LimitError when it is larger or not UTF-8."""
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise LimitError(f"larger than {limit >> 20} MiB, the most fastmesh reads")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise LimitError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def check_events(text: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """LimitError when `text` nests deeper than `max_depth` or expands to more than
    `max_nodes` nodes; yaml.YAMLError when it is not YAML."""
    total = 0  # nodes so far, each alias counted as the size of the node it names
    sizes: dict[str, int] = {}  # anchor -> the expanded size of its node (anchors are per document)
    open_collections: list[tuple[str | None, int]] = []  # (anchor, total when it began)
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)  # an unknown anchor: the loader reports it
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            open_collections.append((event.anchor, total - 1))
            if len(open_collections) > max_depth:
                raise LimitError(f"nested more than {max_depth} deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, began = open_collections.pop()
            if anchor is not None:
                sizes[anchor] = total - began
        elif isinstance(event, yaml.DocumentEndEvent):
            sizes.clear()
        if total > max_nodes:
            raise LimitError(f"more than {max_nodes:,} nodes once its aliases are expanded")


def load_all(text: str) -> list[Any]:
    """Every document of `text`, once check_events() has passed it."""
    check_events(text)
    return list(yaml.load_all(text, Loader=_LOADER))


def load(text: str) -> Any:
    """The one document of `text` (yaml.YAMLError if there are several), once check_events() has passed it."""
    check_events(text)
    return yaml.load(text, Loader=_LOADER)
