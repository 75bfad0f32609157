"""Durations written as Istio and Envoy write them: `500ms`, `1s`, `1.5s`, `2m`, `1h`."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in `text`; a bare number is rejected so units are never guessed."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: write e.g. 500ms, 1s, 2m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]
