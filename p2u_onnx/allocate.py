"""Bit allocation: how many base bits each coded tensor gets (encoder side, pure numpy).

Each tensor has candidate bit widths, each with an estimated size on the wire and an estimated
contribution to the model's output error (:class:`TensorCost`). :func:`allocate` starts every
tensor at its cheapest candidate and buys, one step at a time, the upgrade that removes the most
error per byte (walking each tensor's lower convex hull), until the byte budget is spent or the
estimated error meets the target. Errors of different tensors are taken to add up, which holds
for small, independent perturbations.

:func:`allocate_from_default` is the policy the encoder uses: the plain base (every tensor at the
plan's base bits) is the safe default, and a tensor goes below it only when the resulting base
still meets the error target by measurement. When the target cannot be met within the cap, the
result is never estimated worse than the plain base, even if that base is larger than the cap.
"""

from __future__ import annotations

import dataclasses
import heapq

__all__ = ["TensorCost", "allocate", "Allocation", "allocate_from_default"]


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
    # filled by allocate_from_default: the plain base's estimate, whether the error target was
    # met, whether no tensor went below its default (floor), and the best error reachable at all
    plain_error: float | None = None
    plain_nbytes: float | None = None
    target_met: bool = True
    floored: bool = False
    best_error: float | None = None
    best_nbytes: float | None = None


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


def _at(costs: list[TensorCost], pick) -> tuple[dict[str, int], float, float, dict[str, float]]:
    bits, nbytes, err, errors = {}, 0.0, 0.0, {}
    for c in costs:
        i = pick(c)
        bits[c.key], errors[c.key] = c.bits[i], c.error[i]
        nbytes += c.nbytes[i]
        err += c.error[i]
    return bits, nbytes, err, errors


def allocate_from_default(costs: list[TensorCost], default: dict[str, int], *,
                          budget: float | None, max_error: float, cap: float,
                          no_worse: bool = False, margin: float = 0.0) -> Allocation:
    """Bits per tensor, never estimated worse than ``default`` (the plain base).

    Two walks (:func:`allocate`: ``budget``, then up to ``cap`` while the error is above
    ``max_error``): the free one, whose tensors may go below their default where the
    measurements say the target is still met, and one from ``default`` upwards (no tensor below
    its default). Of those that meet ``max_error`` the default's wins unless the free one is
    clearly smaller (sizes within the budget count as equal; ``margin``: the size estimates'
    relative error) or, about as large, has at most half the estimated error; when neither
    meets it, the floored walk wins unless the free one has at most half its estimated error;
    either is never worse than ``default`` and may be larger than ``cap`` when the default alone is
    (``floored`` and ``nbytes > cap`` then say so). With ``no_worse``, the target is also the
    default's estimated error; ``margin`` is the relative error of the size estimates.
    """
    _, p_bytes, p_err, _ = _at(costs, lambda c: c.bits.index(default[c.key]))
    if no_worse:
        max_error = min(max_error, p_err)
    _, b_bytes, b_err, _ = _at(costs, lambda c: min(range(len(c.bits)),
                                                   key=lambda i: (c.error[i], c.nbytes[i])))
    extra = dict(plain_error=p_err, plain_nbytes=p_bytes, best_error=b_err, best_nbytes=b_bytes)
    free = allocate(costs, budget=budget, max_error=max_error, cap=cap)
    floor_costs = []
    for c in costs:
        keep = [i for i, b in enumerate(c.bits) if b >= default[c.key]]
        floor_costs.append(TensorCost(c.key, [c.bits[i] for i in keep],
                                      [c.nbytes[i] for i in keep], [c.error[i] for i in keep]))
    floored = allocate(floor_costs, budget=budget, max_error=max_error, cap=cap)
    met = [a for a in (free, floored) if a.error <= max_error]
    if len(met) == 2:
        # bytes up to the budget are there to be spent. The free walk replaces the default
        # when it is clearly smaller (by more than the size estimate's error, ``margin``) or,
        # at about the same size, clearly better (at most half the estimated error); it can
        # skip a default that is off its hull and pass the default's size to reach its error.
        spend = budget or 0.0
        s_free, s_floor = max(free.nbytes, spend), max(floored.nbytes, spend)
        if s_free < s_floor * (1 - margin):
            best = free
        elif s_floor < s_free * (1 - margin):
            best = floored
        else:
            best = free if free.error <= 0.5 * floored.error else floored
    elif met:
        best = met[0]
    else:
        # neither meets the target: the estimate is least sure here, so a tensor goes below
        # its default only when that buys a clearly better base (at most half the error)
        best = free if free.error <= 0.5 * floored.error else floored
    return dataclasses.replace(best, **extra, target_met=best.error <= max_error,
                               floored=best is floored)
