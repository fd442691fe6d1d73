"""Counters legorun keeps about a run (stops, forwarded syscalls, RPCs)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


class Latencies:
    """A bounded uniform sample of durations (reservoir sampling), for quantiles."""

    __slots__ = ("samples", "seen")
    LIMIT = 8192

    def __init__(self) -> None:
        self.samples: list = []
        self.seen = 0

    def add(self, seconds: float) -> None:
        self.seen += 1
        if len(self.samples) < self.LIMIT:
            self.samples.append(seconds)
        else:
            i = random.randrange(self.seen)
            if i < self.LIMIT:
                self.samples[i] = seconds

    def quantile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SyscallStat:
    count: int = 0
    errors: int = 0
    time_s: float = 0.0


@dataclass
class RunStats:
    ptrace_stops: int = 0      # every stop the tracer woke up for
    trapped: int = 0           # seccomp stops for syscalls in the table
    peak_rss_kb: int = 0       # the largest VmHWM of any guest process, read as it exits
    syscalls: dict = field(default_factory=dict)  # name -> SyscallStat, forwarded or refused only

    def record(self, name: str, result: int, seconds: float) -> None:
        st = self.syscalls.get(name)
        if st is None:
            st = self.syscalls[name] = SyscallStat()
        st.count += 1
        st.time_s += seconds
        if result < 0:
            st.errors += 1

    def as_dict(self) -> dict:
        return {
            "ptrace_stops": self.ptrace_stops,
            "trapped": self.trapped,
            "peak_rss_kb": self.peak_rss_kb,
            "syscalls": {k: {"count": v.count, "errors": v.errors, "time_s": v.time_s}
                         for k, v in sorted(self.syscalls.items())},
        }
