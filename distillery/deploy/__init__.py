"""Export (ONNX / TorchScript + manifest) and the torch-free deploy runtime.

``from distillery.deploy import Runtime`` needs only numpy and onnxruntime; ``export_policy`` needs torch. Both are
imported lazily so that importing this package pulls in neither: the robot side never loads torch, and the
export side works without onnxruntime for TorchScript.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Runtime", "export_policy", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from distillery.deploy.runtime import Runtime

        return Runtime
    if name == "export_policy":
        from distillery.deploy.export import export_policy

        return export_policy
    if name == "read_manifest":
        from distillery.deploy.manifest import read_manifest

        return read_manifest
    raise AttributeError(f"module 'distillery.deploy' has no attribute {name!r}")
