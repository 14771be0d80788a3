"""Bit allocation: how many base bits each coded tensor gets (encoder side, pure numpy).

Each tensor has candidate bit widths, each with an estimated size on the wire and an estimated
contribution to the model's output error (:class:`TensorCost`). :func:`allocate` starts every
tensor at its cheapest candidate and buys, one step at a time, the upgrade that removes the most
error per byte (walking each tensor's lower convex hull), until the byte budget is spent or the
estimated error meets the target. Errors of different tensors are taken to add up, which holds
for small, independent perturbations.
"""

from __future__ import annotations

import dataclasses
import heapq

__all__ = ["TensorCost", "allocate", "Allocation"]


@dataclasses.dataclass
class TensorCost:
    key: str
    bits: list[int]  # candidates, rising
    nbytes: list[float]  # estimated bytes on the wire per candidate
    error: list[float]  # estimated output error per candidate


@dataclasses.dataclass
class Allocation:
    bits: dict[str, int]
    nbytes: float
    error: float
    errors: dict[str, float]


def _hull(c: TensorCost) -> list[int]:
    """Indices of the candidates on the lower convex hull of (bytes, error)."""
    pts = sorted(range(len(c.bits)), key=lambda i: (c.nbytes[i], c.error[i]))
    hull: list[int] = []
    for i in pts:
        if hull and c.error[i] >= c.error[hull[-1]]:
            continue  # costs more, removes nothing
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies above the segment a -> i
            lhs = (c.error[b] - c.error[a]) * (c.nbytes[i] - c.nbytes[a])
            rhs = (c.error[i] - c.error[a]) * (c.nbytes[b] - c.nbytes[a])
            if lhs >= rhs:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(costs: list[TensorCost], *, budget: float | None = None,
             max_error: float | None = None, cap: float | None = None) -> Allocation:
    """Choose one candidate per tensor.

    First spend up to ``budget`` bytes (if given) on the best upgrades; then, while the estimated
    total error is above ``max_error`` (if given), keep buying upgrades up to ``cap`` bytes.
    With neither, every tensor gets its cheapest candidate.
    """
    hulls = {c.key: _hull(c) for c in costs}
    pos = {c.key: 0 for c in costs}
    by_key = {c.key: c for c in costs}
    total = sum(c.nbytes[hulls[c.key][0]] for c in costs)
    err = sum(c.error[hulls[c.key][0]] for c in costs)

    def step_of(key: str) -> tuple[float, float] | None:
        h, p = hulls[key], pos[key]
        if p + 1 >= len(h):
            return None
        c = by_key[key]
        return c.nbytes[h[p + 1]] - c.nbytes[h[p]], c.error[h[p]] - c.error[h[p + 1]]

    def spend(limit: float | None, until_error: float | None) -> None:
        nonlocal total, err
        heap: list[tuple[float, str]] = []
        for key in hulls:
            st = step_of(key)
            if st:
                heapq.heappush(heap, (-(st[1] / max(st[0], 1e-9)), key))
        while heap:
            if until_error is not None and err <= until_error:
                return
            _, key = heapq.heappop(heap)
            db, de = step_of(key)  # type: ignore[misc]
            if limit is not None and total + db > limit:
                continue  # this step does not fit; a cheaper one elsewhere may
            total += db
            err -= de
            pos[key] += 1
            st = step_of(key)
            if st:
                heapq.heappush(heap, (-(st[1] / max(st[0], 1e-9)), key))

    if budget is not None:
        spend(budget, None)
    if max_error is not None and err > max_error:
        spend(max(cap or 0.0, budget or 0.0) if cap is not None else None, max_error)
    chosen = {k: by_key[k].bits[hulls[k][pos[k]]] for k in hulls}
    errors = {k: by_key[k].error[hulls[k][pos[k]]] for k in hulls}
    return Allocation(chosen, total, max(err, 0.0), errors)
