"""CPU share and resident memory of one process, from /proc (Linux) with a portable fallback.

Gives CPU machines something real to plot, and lets ``onecard monitor run``
watch the wrapped command rather than itself.
"""

from __future__ import annotations

import os
import resource
import time


class ProcessStats:
    """Call ``read()`` repeatedly; CPU % is over the time since the previous call (100 % = one core)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self._last: tuple[float, float] | None = None
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _cpu_rss(self) -> tuple[float, float | None] | None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / self._tick      # utime + stime
            rss = int(fields[21]) * self._page / 2**20                   # resident pages
            return cpu, rss
        except (OSError, IndexError, ValueError):
            if self.pid != os.getpid():
                return None  # process gone, or no /proc for another process
            ru = resource.getrusage(resource.RUSAGE_SELF)
            return ru.ru_utime + ru.ru_stime, None

    def read(self) -> dict | None:
        now = time.monotonic()
        got = self._cpu_rss()
        if got is None:
            return None
        cpu, rss = got
        pct = None
        if self._last is not None and now > self._last[0]:
            pct = 100.0 * (cpu - self._last[1]) / (now - self._last[0])
        self._last = (now, cpu)
        return {"pid": self.pid, "cpu_pct": pct, "rss_mib": rss}
