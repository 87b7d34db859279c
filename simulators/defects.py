"""Seeded defect plan: which unit seq gets which defect (or harmless variation).

The choice is a pure function of (seed, seq), not of call order, so a rerun
with the same seed damages the same units even when printers are driven in a
different order, and a failing run can be replayed exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

from linectl.simulators.model import UNIT_DEFECTS, VARIATIONS

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class DefectPlan:
    """`defect_for(seq)` -> a name from UNIT_DEFECTS (must be rejected), from VARIATIONS (must pass), or None."""

    def __init__(
        self,
        rate: float = 0.0,
        mix: Mapping[str, float] | None = None,
        seed: int = 1,
        variation_rate: float = 0.0,
    ) -> None:
        self.seed = seed
        self.rate = rate
        self.variation_rate = variation_rate
        self.set_mix(mix)

    def set_mix(self, mix: Mapping[str, float] | None) -> None:
        mix = dict(mix or {})
        bad = [k for k in mix if k not in UNIT_DEFECTS]
        if bad:
            raise ValueError(f"unknown defect(s) {bad}; known: {', '.join(UNIT_DEFECTS)}")
        weights = [(k, float(w)) for k, w in (mix.items() if mix else ((d, 1.0) for d in UNIT_DEFECTS)) if w > 0]
        if not weights:
            raise ValueError("defect mix has no positive weight")
        total = sum(w for _, w in weights)
        acc = 0.0
        self._cum: list[tuple[float, str]] = []
        for k, w in weights:
            acc += w / total
            self._cum.append((acc, k))
        self.mix = {k: w for k, w in weights}

    def _u(self, seq: int, stream: int) -> float:
        return _mix64((self.seed * 0x100000001B3 + seq * 4 + stream) & _M64) / 2.0**64

    def defect_for(self, seq: int) -> str | None:
        if self.rate > 0 and self._u(seq, 0) < self.rate:
            u = self._u(seq, 1)
            for edge, name in self._cum:
                if u < edge:
                    return name
            return self._cum[-1][1]
        if self.variation_rate > 0 and self._u(seq, 2) < self.variation_rate:
            return VARIATIONS[0]
        return None

    __call__ = defect_for

    def as_dict(self) -> dict[str, object]:
        return {"rate": self.rate, "variation_rate": self.variation_rate, "mix": self.mix, "seed": self.seed}
