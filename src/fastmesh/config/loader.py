"""Reading config files: multi-document YAML, Kubernetes-style envelopes
(apiVersion, kind, metadata, spec), each spec checked against its model. Every
problem is reported with the file, the document's index, the field path and
what was expected, all at once rather than one per run. A file is read within
fastmesh.bounded_yaml's limits (size, nesting, aliases expanded)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fastmesh import bounded_yaml
from fastmesh.config.istio_api import API_VERSIONS, KINDS, ObjectMeta


class ConfigError(ValueError):
    """One or more problems in config files; str() lists them all, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Document:
    source: str  # "FILE: document N"
    kind: str
    name: str
    namespace: str
    spec: BaseModel


_ENVELOPE = ("apiVersion", "kind", "metadata", "spec")


def _path(location: tuple[Any, ...]) -> str:
    out = ""
    for part in location:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    location = ("spec", *error["loc"])
    if error["type"] == "extra_forbidden":
        field = str(error["loc"][-1])
        known = _fields_at(model, error["loc"][:-1])
        hint = difflib.get_close_matches(field, known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; expected one of: {', '.join(sorted(known))}"
        return f"{_path(location)}: unknown field{suggestion}"
    if error["type"] == "missing":
        return f"{_path(location)}: required field is missing"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f", got {got!r}"
    return f"{_path(location)}: {error['msg'].removeprefix('Value error, ')}{shown}"


def _fields_at(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """The YAML field names of the model at `location` inside `model` (for suggestions)."""
    current: Any = model
    for part in location:
        if isinstance(part, int) or current is None:
            continue
        fields = {(f.alias or name): f for name, f in current.model_fields.items()}
        field = fields.get(str(part))
        current = _model_in(field.annotation) if field is not None else None
    if current is None:
        return []
    return [(f.alias or name) for name, f in current.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _document(raw: Any, source: str, problems: list[str]) -> Document | None:
    if not isinstance(raw, dict):
        problems.append(f"{source}: expected a mapping with apiVersion, kind, metadata and spec, "
                        f"got {type(raw).__name__}")
        return None
    for key in raw:
        if key not in _ENVELOPE and key != "status":
            hint = difflib.get_close_matches(str(key), _ENVELOPE, n=1)
            problems.append(f"{source}: {key}: unknown field"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    api_version, kind = raw.get("apiVersion"), raw.get("kind")
    if not isinstance(api_version, str) or "/" not in api_version:
        problems.append(f"{source}: apiVersion: expected GROUP/VERSION such as networking.istio.io/v1beta1, "
                        f"got {api_version!r}")
        return None
    group, _, version = api_version.partition("/")
    if group not in API_VERSIONS or version not in API_VERSIONS[group]:
        known = ", ".join(f"{g}/{v}" for g, versions in API_VERSIONS.items() for v in versions)
        problems.append(f"{source}: apiVersion: {api_version!r} is not supported; expected one of {known}")
        return None
    model = KINDS.get((group, kind))  # type: ignore[arg-type]
    if model is None:
        known = ", ".join(k for g, k in KINDS if g == group)
        problems.append(f"{source}: kind: {kind!r} is not a {group} kind fastmesh reads; expected one of {known}")
        return None
    try:
        metadata = ObjectMeta.model_validate(raw.get("metadata"))
    except ValidationError as exc:
        for error in exc.errors():
            problems.append(f"{source} ({kind}): metadata.{_path(error['loc'])}: {error['msg']}")
        return None
    where = f"{source} ({kind} {metadata.name})"
    try:
        spec = model.model_validate(raw.get("spec") or {})
    except ValidationError as exc:
        problems.extend(f"{where}: {_describe(error, model)}" for error in exc.errors())
        return None
    return Document(where, kind, metadata.name, metadata.namespace, spec)


def load_documents(paths: list[str | Path]) -> list[Document]:
    """Every document of every file, in order; ConfigError lists every problem found."""
    documents: list[Document] = []
    problems: list[str] = []
    for path in map(Path, paths):
        try:
            raws = bounded_yaml.load_all(bounded_yaml.read_text(path))
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        except bounded_yaml.LimitError as exc:
            problems.append(f"{path}: {exc}")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{path}: not valid YAML: {exc}")
            continue
        for index, raw in enumerate(raws):
            if raw is None:  # an empty document, e.g. after a trailing ---
                continue
            document = _document(raw, f"{path}: document {index}", problems)
            if document is not None:
                documents.append(document)
    if problems:
        raise ConfigError(problems)
    return documents
