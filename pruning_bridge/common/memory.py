"""Peak memory of a block of work: the process's resident set (CPU) and torch's CUDA peak.

    with PeakMemory() as mem:
        run_stage()
    print(mem.summary())      # "peak RSS 5.21 GiB (+2.02 GiB), CUDA peak 3.90 GiB"
    mem.seconds               # how long the block ran (also when it raised)

The resident set is sampled by a background thread (every ``interval`` seconds), so a spike
shorter than that can be missed; CUDA's peak is torch's own exact counter, reset on entry.
"""

from __future__ import annotations

import gc
import threading
import time

import psutil
import torch

GiB = 2 ** 30


class PeakMemory:
    """Peak resident set size (bytes) of this process while the block runs, the CUDA peak
    allocation (bytes, None without CUDA), and the block's duration (``seconds``)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.base = self.peak = 0
        self.cuda_peak: int | None = None
        self.seconds = 0.0
        self._stop = threading.Event()

    def _rss(self) -> int:
        return self.process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.base = self.peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._tic = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._tic
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated()

    @property
    def extra(self) -> int:
        """How far the resident set rose above its level on entry."""
        return self.peak - self.base

    def to_dict(self) -> dict[str, float | None]:
        """The peaks in GiB (rounded to 0.01), for JSON."""
        def gib(n):
            return None if n is None else round(n / GiB, 2)

        return {"peak_rss_gib": gib(self.peak), "extra_rss_gib": gib(self.extra),
                "cuda_peak_gib": gib(self.cuda_peak)}

    def summary(self) -> str:
        text = f"peak RSS {self.peak / GiB:.2f} GiB (+{self.extra / GiB:.2f} GiB)"
        if self.cuda_peak is not None:
            text += f", CUDA peak {self.cuda_peak / GiB:.2f} GiB"
        return text
