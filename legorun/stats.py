"""Counters legorun keeps about a run (stops, forwarded syscalls, RPCs)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SyscallStat:
    count: int = 0
    errors: int = 0
    time_s: float = 0.0


@dataclass
class RunStats:
    ptrace_stops: int = 0      # every stop the tracer woke up for
    trapped: int = 0           # seccomp stops for syscalls in the table
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
            "syscalls": {k: {"count": v.count, "errors": v.errors, "time_s": v.time_s}
                         for k, v in sorted(self.syscalls.items())},
        }
