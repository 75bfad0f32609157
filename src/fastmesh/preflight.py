"""Everything `serve` refuses before it binds anything, in one place: `serve`
runs it at start, `check` runs the very same, so a config `check` passes is one
`serve` starts from (only what the machine says at bind time, a port taken by
another process, can still differ). Loads no engine and no HTTP server."""

from __future__ import annotations

from typing import Sequence

from fastmesh.bindings import conflicts
from fastmesh.certs import CertificateError, load_identity
from fastmesh.config import ConfigError, Plan, load_documents, plan
from fastmesh.config.istio_api import Sidecar
from fastmesh.settings import SidecarConfig


def from_files(paths: Sequence[str]) -> Plan:
    """What `serve -c PATHS` would run; ConfigError lists every problem that stops it:
    the documents', the plan's (exactly one Sidecar, routes, addresses that overlap,
    names that do not resolve) and the certificates'."""
    documents = load_documents(list(paths))
    built = plan(documents)
    sidecar_document = next(d for d in documents if isinstance(d.spec, Sidecar))  # plan made sure of one
    problems = identity_problems(built.sidecar, f"{sidecar_document.source}: spec.certs")
    if problems:
        raise ConfigError(problems)
    return built


def reloaded(paths: Sequence[str]) -> Plan:
    """What a live reload of `serve -c PATHS` applies: the plan, without the
    certificates (a reload keeps the identity `serve` started with; its own watcher
    follows the files)."""
    return plan(load_documents(list(paths)))


def check_flags(config: SidecarConfig) -> None:
    """`serve --listen …`'s config, as from_files checks a file's: ConfigError if not usable."""
    named = [("--listen", listener.listen) for listener in config.listeners]
    named += [("--metrics", config.metrics), ("--admin", config.admin), ("--health", config.health)]
    problems = conflicts(named) + identity_problems(config, "--certs")
    if problems:
        raise ConfigError(problems)


def identity_problems(config: SidecarConfig, where: str) -> list[str]:
    """The certificate directory checked as `serve` loads it (CertificateError's message
    names the file and the reason)."""
    if config.certs is None:
        return []
    try:
        load_identity(config.certs)
    except CertificateError as exc:
        return [f"{where}: {exc}"]
    return []
