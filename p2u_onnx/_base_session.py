"""The stage-0 session of a :class:`~p2u_onnx.runtime.ProgressiveSession`: ``base.onnx``
loaded by path, with the heap given back after onnxruntime's constant folding.

The base graph computes the weights of ops without a low-bit kernel (Conv, Gemm with
``transB``, LSTM/GRU...) with plain ops onnxruntime constant-folds at load
(:func:`~p2u_onnx.base_speed.dequantize_at_load`): the session then holds them in float and
runs at the original model's speed. Folding makes weight-sized temporaries; glibc keeps
their pages in the heap, where they would stay beside the session for its life (a 12 MB
Gemm MLP: 67 MB resident after load, 22 MB after ``malloc_trim``, as the original model's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnxruntime as ort

from ._memory import trim_heap

__all__ = ["open_base_session"]


def open_base_session(base_onnx: str | os.PathLike, options: ort.SessionOptions | None,
                      providers: Sequence[Any] | None,
                      disabled_optimizers: Sequence[str] | None = None
                      ) -> ort.InferenceSession:
    """``InferenceSession(base_onnx, ...)``, then the heap trimmed (glibc; a no-op
    elsewhere)."""
    session = ort.InferenceSession(str(base_onnx), options, providers=providers,
                                   disabled_optimizers=list(disabled_optimizers)
                                   if disabled_optimizers else None)
    trim_heap()
    return session
