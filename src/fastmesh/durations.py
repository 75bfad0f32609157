"""Durations written as Istio and Envoy write them: `500ms`, `1s`, `1.5s`, `2m`, `1h`.
Parsed once, where they are read (a flag, a YAML field), into seconds."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in `text`; a bare number is rejected so units are never guessed."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: write e.g. 500ms, 1s, 2m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest of `500ms`, `5s`, `2m`, `1h` that says `seconds` exactly."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds * 1000:g}ms"


def _from_text(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 500ms, 5s or 2m, got {value!r}")
    return parse_duration(value)


# A YAML field holding a duration: text in the document, seconds (more than 0, less
# than about 31 years) in the model.
Duration = Annotated[float, BeforeValidator(_from_text), Field(gt=0, lt=1e9)]
# One where `0s` means off (Istio's idleTimeout).
DurationOrOff = Annotated[float, BeforeValidator(_from_text), Field(ge=0, lt=1e9)]
