"""Encode settings: the stage plan and the quantizer configuration (frozen, validated)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from .errors import PlanError

__all__ = ["Plan", "QuantConfig", "BitBudget", "LOSSLESS"]

LOSSLESS = "lossless"
DEFAULT_QUALITY = 0.985  # estimated quality a default base reaches (when it can; see output_metrics)
Granularity = Literal["block", "channel", "tensor"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Precision of each stage: total bits per weight, rising; ``"lossless"`` may end it.

    >>> Plan.parse("4,8,lossless").stages
    (4, 8, 'lossless')
    """

    stages: tuple[int | str, ...] = (4, 8, LOSSLESS)

    def __post_init__(self) -> None:
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        bits = [s for s in self.stages if s != LOSSLESS]
        if LOSSLESS in self.stages[:-1] or self.stages.count(LOSSLESS) > 1:
            raise PlanError("'lossless' can only be the last stage")
        if not bits:
            raise PlanError("a plan needs a low-bit base before 'lossless'")
        for b in bits:
            if not isinstance(b, int) or isinstance(b, bool):
                raise PlanError(f"stage bits must be integers, got {b!r}")
        if not 2 <= bits[0] <= 8:
            raise PlanError(f"the base needs 2..8 bits, got {bits[0]}")
        for a, b in zip(bits, bits[1:]):
            if b <= a:
                raise PlanError(f"stage bits must rise: {a} then {b}")
        if bits[-1] > 24:
            raise PlanError(f"at most 24 bits per stage, got {bits[-1]}")

    @classmethod
    def parse(cls, text: str) -> Plan:
        """Parse ``"4,8,lossless"``; raises :class:`PlanError` with the offending part."""
        stages: list[int | str] = []
        for part in text.replace(" ", "").split(","):
            if part.lower() in (LOSSLESS, "l", "exact"):
                stages.append(LOSSLESS)
            elif part.isdigit():
                stages.append(int(part))
            else:
                raise PlanError(f"bad stage {part!r} in {text!r}: use bits such as 4,8 or 'lossless'")
        return cls(tuple(stages))

    @property
    def base_bits(self) -> int:
        return int(self.stages[0])

    @property
    def lossless(self) -> bool:
        return self.stages[-1] == LOSSLESS

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.stages)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How the base is quantized.

    ``granularity``: ``"block"`` (runs of ``block_size`` weights inside one output channel),
    ``"channel"`` (one scale per output channel) or ``"tensor"``. ``min_elements``: smaller
    float tensors (and every 1-D tensor: biases, norms) stay exact in the base.
    """

    granularity: Granularity = "block"
    block_size: int = 32
    symmetric: bool = True
    clip_search: bool = True
    min_elements: int = 1024
    quantize_vectors: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in ("block", "channel", "tensor"):
            raise PlanError(f"granularity must be block, channel or tensor, not {self.granularity!r}")
        if self.granularity == "block" and not (
            self.block_size >= 8 and self.block_size & (self.block_size - 1) == 0
        ):
            raise PlanError(f"block_size must be a power of two >= 8, got {self.block_size}")
        if self.min_elements < 1:
            raise PlanError("min_elements must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitBudget:
    """How base bits are spread over the coded tensors (see :mod:`p2u_onnx.allocate`).

    ``budget``: size of the base, as a share of the source's weight bytes (below 1, e.g. 0.15;
    tensors sent as they are count against it) or in bits per coded weight (1 or more), spent
    where it lowers the output error most.
    Shares (``budget`` below 1 and ``cap``) are shares of the source's fp32-equivalent weight
    bytes (every float weight counted at 4 bytes), so an fp16, bf16 or fp64 model gets the bits
    per weight its fp32 twin gets.

    ``quality``: estimated quality every output of the base must reach, as its task reads it
    (:mod:`p2u_onnx.output_metrics`: top-1 agreement of class scores, decision agreement of
    probabilities and masks, share of a regression's values within 0.2 of its spread, cosine
    of embeddings and other outputs; left at None: 0.985, and 0.995 for cosines);
    when the budget does not get there, more is spent, up to ``cap``. With ``budget=None`` the
    base is the smallest that reaches ``quality``. Left at None, the target is
    :data:`DEFAULT_QUALITY` and no worse than the plain base (every tensor at the plan's base
    bits). A base is never estimated worse than the plain one: when the cap is too small for
    that, the cap gives way and the encoder says so. A missed target is a warning (a manifest
    note), or with ``strict`` a :class:`PlanError`. ``calibrate``: measure each tensor's
    effect on the outputs by running the model (synthetic inputs unless ``calib`` names an .npz
    of real ones). ``shapes``: sizes for inputs the graph does not fix, as (name, shape) pairs.
    ``adaptive=False`` gives every tensor the plan's base bits.

    The defaults (13.5% of the weight bytes, at least 0.985 estimated, at most 20%) were chosen on MiniLM and
    the third-party models in docs/quality.md.
    """

    budget: float | None = 0.135
    quality: float | None = None
    cap: float = 0.20
    calibrate: bool = True
    calib: str | None = None
    adaptive: bool = True
    strict: bool = False
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.budget is not None and not (0 < self.budget < 1 or 1 <= self.budget <= 8):
            raise PlanError(f"--budget must be a share (0..1) or bits per weight (1..8), "
                            f"not {self.budget}")
        if self.quality is not None and not 0 < self.quality < 1:
            raise PlanError(f"--quality must be between 0 and 1, not {self.quality}")
        if not 0 < self.cap <= 1:
            raise PlanError(f"--cap must be a share in (0, 1], not {self.cap}")
        if isinstance(self.shapes, dict):
            object.__setattr__(self, "shapes", tuple(self.shapes.items()))
        shapes = []
        for item in self.shapes:
            try:
                name, dims = item
                dims = tuple(int(d) for d in dims)
            except (TypeError, ValueError):
                raise PlanError(f"--shape: expected NAME=D1,D2,..., not {item!r}") from None
            if any(d < 1 for d in dims):
                raise PlanError(f"--shape {name}: every size must be at least 1, not {dims}")
            shapes.append((str(name), dims))
        object.__setattr__(self, "shapes", tuple(shapes))

    @property
    def target_quality(self) -> float:
        """The estimated quality aimed at: ``quality``, or :data:`DEFAULT_QUALITY` (on this
        scale every output just reaches its own target; see :mod:`p2u_onnx.calibrate`)."""
        return DEFAULT_QUALITY if self.quality is None else self.quality

    @property
    def max_error(self) -> float:
        """The allocation's error unit matching the target (quality ~ 1 - error / 2): each
        output's error is weighed so that this is where it reaches its own target."""
        return 2 * (1 - self.target_quality)
