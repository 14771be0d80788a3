"""p2u_onnx: Progressive Precision Update for ONNX models.

Encode a model into a low-bit base plus updates, restore any stage, or serve it live::

    import p2u_onnx
    p2u_onnx.encode("model.onnx", "model.p2u", "4,8,lossless")
    p2u_onnx.inspect("model.p2u")
    p2u_onnx.restore("model.p2u", "model_s1.onnx", stage=1)

The encoder needs onnx; the device side (:mod:`p2u_onnx.runtime`) needs only numpy,
onnxruntime and zstandard, so names here are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import BitBudget, Plan, QuantConfig
from .errors import (FormatError, IntegrityError, P2UError, PatchError, PlanError,
                     TransportError, TrustError, UnsupportedModelError)

__version__ = "0.1.0"

__all__ = [
    "encode", "restore", "inspect", "verify", "ProgressiveSession", "Plan", "QuantConfig",
    "BitBudget",
    "P2UError", "PlanError", "UnsupportedModelError", "FormatError", "IntegrityError",
    "PatchError", "TransportError", "TrustError", "sign_package", "generate_key",
    "evaluate", "encode_update", "restore_update", "verify_update", "apply_update",
    "held_state",
]

_LAZY = {"encode": "encoder", "restore": "api", "inspect": "api", "verify": "api",
         "ProgressiveSession": "runtime", "sign_package": "trust", "generate_key": "trust",
         "evaluate": "evaluation", "encode_update": "updates", "restore_update": "updates",
         "verify_update": "updates", "apply_update": "updates", "held_state": "updates"}

if TYPE_CHECKING:  # pragma: no cover
    from .api import inspect, restore, verify
    from .encoder import encode
    from .evaluation import evaluate
    from .runtime import ProgressiveSession
    from .trust import generate_key, sign_package
    from .updates import apply_update, encode_update, held_state, restore_update, verify_update


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'p2u_onnx' has no attribute {name!r}")
