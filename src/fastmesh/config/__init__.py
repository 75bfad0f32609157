"""Configuration from Kubernetes-style YAML: Istio's networking.istio.io kinds and
fastmesh's own Sidecar kind (loader: reading and checking documents; mesh: what a
sidecar runs from them)."""

from fastmesh.config.loader import ConfigError, Document, load_documents
from fastmesh.config.mesh import Plan, plan

__all__ = ["ConfigError", "Document", "Plan", "load_documents", "plan"]
