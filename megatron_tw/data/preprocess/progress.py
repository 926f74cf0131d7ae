"""Progress reporting for preprocessing: documents/s and MB/s.

On a terminal: a tqdm bar over the input bytes (MB/s) with documents/s as its postfix.
Otherwise (logs, CI): one line every ``log_interval`` records, like Megatron-LM's tool.
Both go to stderr, so stdout carries only the closing summary.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_bytes: int, log_interval: int, bar: bool | None = None):
        self.total_bytes = total_bytes
        self.log_interval = max(1, log_interval)
        self.start = time.perf_counter()
        self.bytes = 0
        self._next_report = self.log_interval  # records may jump (--partitions reports sums)
        self.bar = None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                            desc="preprocess", file=sys.stderr, mininterval=0.5)

    def update(self, records: int, nbytes: int) -> None:
        self.bytes += nbytes
        report = records >= self._next_report
        if report:
            self._next_report = (records // self.log_interval + 1) * self.log_interval
        if self.bar is not None:
            self.bar.update(nbytes)
            if report:
                self.bar.set_postfix_str(f"{records} docs, {self._docs_per_s(records):.0f} docs/s",
                                         refresh=False)
        elif report:
            elapsed = time.perf_counter() - self.start
            print(f"processed {records} documents ({self._docs_per_s(records):.0f} docs/s, "
                  f"{self.bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s, "
                  f"{100.0 * self.bytes / max(self.total_bytes, 1):.0f}% of input)",
                  file=sys.stderr, flush=True)

    def _docs_per_s(self, records: int) -> float:
        return records / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None
