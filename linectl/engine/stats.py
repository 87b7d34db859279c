"""Counters and a fixed-memory latency histogram.

A line runs for months; percentiles must not be computed from an ever-growing
list. Buckets of 0.05 ms up to 2 s keep p99 exact to 0.05 ms in 320 kB.
"""

from __future__ import annotations

from array import array


class LatencyHistogram:
    def __init__(self, bucket_ms: float = 0.05, max_ms: float = 2000.0) -> None:
        self.bucket_ms = bucket_ms
        self.n_buckets = int(max_ms / bucket_ms) + 1
        self.counts = array("Q", [0]) * self.n_buckets
        self.count = 0
        self.max_ms = 0.0
        self.sum_ms = 0.0

    def add(self, ms: float) -> None:
        i = int(ms / self.bucket_ms)
        if i >= self.n_buckets:
            i = self.n_buckets - 1
        self.counts[i] += 1
        self.count += 1
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    def percentile(self, p: float) -> float | None:
        if self.count == 0:
            return None
        target = max(1, int(round(p / 100.0 * self.count + 0.4999)))
        acc = 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= target:
                return round((i + 1) * self.bucket_ms, 3)
        return round(self.max_ms, 3)

    def summary(self) -> dict[str, float | None]:
        return {
            "count": self.count,
            "p50": self.percentile(50),
            "p99": self.percentile(99),
            "max": round(self.max_ms, 3) if self.count else None,
            "mean": round(self.sum_ms / self.count, 3) if self.count else None,
        }
