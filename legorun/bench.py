"""``legorun bench``: run a program natively and under legorun, and compare.

Usage::

    legorun bench [-n N] [--warmup K] [--json] [--quiet] [--timeout SEC]
                  [legorun options] -- PROGRAM [ARGS...]

One discarded warm-up pair (``--warmup K`` pairs, default 1) is run first,
then N (default 5) pairs, each a native run followed by a run under
``python -m legorun [legorun options] --stats-json TMP -- PROGRAM ARGS``.
Every run gets ``/dev/null`` as stdin; its stdout and stderr are captured.

For each run we measure the wall time (``time.perf_counter`` around the
run), user and system CPU and peak RSS of the child's process tree
(``os.wait4``: the child plus every descendant it reaped).  For the legorun
run the child is legorun itself, so that figure covers legorun, the
components it started in its own process tree, and the guest; when the stats
JSON carries ``guest_rusage`` the guest's share is shown separately and the
rest is attributed to legorun and its components.

The exit status is 1 if a legorun run's exit status is not one native
produced, or if its stdout differs from every native stdout while at least
two native runs agreed with each other (warm-up runs included); 2 for usage
errors or when PROGRAM cannot be started; 0 otherwise.

The module is split in two halves: pure functions (statistics, comparison,
formatting, parsing of the table) that take plain data, and the runner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

USAGE = (
    "usage: legorun bench [-n N] [--warmup K] [--json] [--quiet] [--timeout SEC]\n"
    "                     [legorun options] -- PROGRAM [ARGS...]"
)

HELP = USAGE + """

Run PROGRAM natively and under legorun, alternating, and compare.

options:
  -n N, --runs N     measured pairs (native + legorun), default 5
  --warmup K         discarded warm-up pairs run first, default 1
  --json             print one JSON document instead of the table
  -q, --quiet        no progress on stderr
  --timeout SEC      kill a run (and its process group) after SEC seconds
  -h, --help         show this help

Every other option before `--` is passed to legorun unchanged.
Exit status: 0 outputs agree, 1 a legorun run's exit status or stdout
differed from native, 2 usage error or PROGRAM could not be started.
"""

NATIVE = "native"
LEGORUN = "legorun"


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    """One run of the program in one mode ("native", "legorun", ...)."""

    mode: str
    pair: int                 # pair index; warm-up pairs are numbered too
    warmup: bool
    wall_s: float
    utime_s: float            # child process tree (wait4)
    stime_s: float
    maxrss_kb: int            # ru_maxrss of the child process tree, KiB
    exit_status: int          # as subprocess: negative = killed by signal
    stdout: bytes = b""
    stderr: bytes = b""
    stats: dict | None = None  # legorun's --stats-json document
    timed_out: bool = False
    rss_floor_kb: int = 0     # RSS of the helper the run was forked from

    @property
    def guest_rusage(self) -> dict | None:
        g = (self.stats or {}).get("guest_rusage")
        if isinstance(g, dict) and "utime" in g and "stime" in g:
            return g
        return None

    def to_json(self, keep_stats: bool = True) -> dict:
        d = {
            "mode": self.mode,
            "pair": self.pair,
            "warmup": self.warmup,
            "wall_s": self.wall_s,
            "utime_s": self.utime_s,
            "stime_s": self.stime_s,
            "maxrss_kb": self.maxrss_kb,
            "exit_status": self.exit_status,
            "timed_out": self.timed_out,
            "stdout_bytes": len(self.stdout),
            "stdout_sha256": hashlib.sha256(self.stdout).hexdigest(),
            "stderr_tail": _tail(self.stderr),
        }
        if self.guest_rusage is not None:
            d["guest_rusage"] = self.guest_rusage
        if keep_stats:
            d["stats"] = self.stats
        return d


def _tail(b: bytes, limit: int = 2000) -> str:
    s = b.decode("utf-8", "replace")
    return s if len(s) <= limit else "..." + s[-limit:]


# --------------------------------------------------------------------------
# Pure statistics
# --------------------------------------------------------------------------

def median(values: Iterable[float]) -> float | None:
    """Median of the values (mean of the two middle ones); None if empty."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    m = len(v) // 2
    if len(v) % 2:
        return v[m]
    return (v[m - 1] + v[m]) / 2


def spread(values: Iterable[float]) -> dict:
    """{"median", "min", "max", "n"} of the values (None fields if empty)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": median(v), "min": min(v), "max": max(v), "n": len(v)}


def pair_ratios(runs: Sequence[RunResult], mode: str,
                base: str = NATIVE) -> list[float]:
    """Per-pair wall-time ratios mode/base over the measured (non warm-up)
    pairs where both runs exist and the base took a positive time."""
    by_pair: dict[int, dict[str, RunResult]] = {}
    for r in runs:
        if not r.warmup:
            by_pair.setdefault(r.pair, {})[r.mode] = r
    out = []
    for p in sorted(by_pair):
        d = by_pair[p]
        if mode in d and base in d and d[base].wall_s > 0:
            out.append(d[mode].wall_s / d[base].wall_s)
    return out


def ratio_spread(ratios: Sequence[float]) -> dict:
    """Slowdown: median of per-pair ratios with its min..max."""
    s = spread(ratios)
    s["per_pair"] = list(ratios)
    return s


def _flat(v):
    """{component: {op: {...}}} (legorun's "rpcs") as {"component/op": {...}}."""
    if not isinstance(v, dict):
        return v
    out = {}
    for name, item in v.items():
        if isinstance(item, dict) and "count" not in item and all(
                isinstance(x, dict) for x in item.values()):
            for sub, x in item.items():
                out[f"{name}/{sub}"] = x
        else:
            out[name] = item
    return out


def _count_total(stats: dict, key: str) -> int | None:
    """Sum of the "count" fields of a {name: {"count": n}} dict, or an int."""
    v = _flat(stats.get(key))
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, dict):
        total = 0
        for item in v.values():
            if isinstance(item, dict) and isinstance(item.get("count"), (int, float)):
                total += int(item["count"])
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                total += int(item)
        return total
    return None


def _count_by_name(stats: dict, key: str) -> dict[str, int]:
    v = _flat(stats.get(key))
    out: dict[str, int] = {}
    if isinstance(v, dict):
        for name, item in v.items():
            if isinstance(item, dict) and isinstance(item.get("count"), (int, float)):
                out[name] = int(item["count"])
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                out[name] = int(item)
    return out


def _syscall_errors(stats: dict) -> int | None:
    v = stats.get("syscalls")
    if not isinstance(v, dict):
        return None
    return sum(int(i.get("errors", 0)) for i in v.values()
               if isinstance(i, dict) and isinstance(i.get("errors", 0), (int, float)))


def summarize_counts(stats_list: Sequence[dict | None]) -> dict:
    """Counts that explain the slowdown, from legorun's stats JSON documents.

    Every key is optional in the input.  Each output field is
    {"median", "min", "max", "n"} over the runs that reported it, or absent.
    """
    docs = [s for s in stats_list if isinstance(s, dict)]
    out: dict[str, Any] = {"runs_with_stats": len(docs)}
    extract: dict[str, Callable[[dict], Any]] = {
        "ptrace_stops": lambda s: (int(s["ptrace_stops"])
                                   if isinstance(s.get("ptrace_stops"), (int, float))
                                   and not isinstance(s.get("ptrace_stops"), bool)
                                   else None),
        "faults": lambda s: (int(s["faults"])
                             if isinstance(s.get("faults"), (int, float))
                             and not isinstance(s.get("faults"), bool) else None),
        "rpcs": lambda s: _count_total(s, "rpcs"),
        "syscalls": lambda s: _count_total(s, "syscalls"),
        "syscall_errors": _syscall_errors,
    }
    for key, fn in extract.items():
        vals = [fn(d) for d in docs]
        vals = [v for v in vals if v is not None]
        if vals:
            out[key] = spread(vals)
    for key in ("rpcs", "syscalls"):
        names: dict[str, list[int]] = {}
        for d in docs:
            for name, c in _count_by_name(d, key).items():
                names.setdefault(name, []).append(c)
        if names:
            out[key + "_by_name"] = {n: median(v) for n, v in sorted(names.items())}
    return out


def summarize_mode(runs: Sequence[RunResult], mode: str) -> dict:
    """Wall / CPU / RSS figures of the measured runs of one mode."""
    rs = [r for r in runs if r.mode == mode and not r.warmup]
    s: dict[str, Any] = {
        "runs": len(rs),
        "wall_s": spread(r.wall_s for r in rs),
        "utime_s": median(r.utime_s for r in rs),
        "stime_s": median(r.stime_s for r in rs),
        "maxrss_kb": max((r.maxrss_kb for r in rs), default=None),
    }
    guests = [r.guest_rusage for r in rs if r.guest_rusage is not None]
    if guests and len(guests) == len(rs):
        s["guest"] = {
            "utime_s": median(float(g["utime"]) for g in guests),
            "stime_s": median(float(g["stime"]) for g in guests),
            "maxrss_kb": max((int(g["maxrss_kb"]) for g in guests
                              if "maxrss_kb" in g), default=None),
        }
        # legorun and its components = the whole child tree minus the guest
        s["overhead"] = {
            "utime_s": median(max(0.0, r.utime_s - float(r.guest_rusage["utime"]))
                              for r in rs),
            "stime_s": median(max(0.0, r.stime_s - float(r.guest_rusage["stime"]))
                              for r in rs),
        }
    return s


def detect_differences(runs: Sequence[RunResult], mode: str = LEGORUN,
                       base: str = NATIVE) -> tuple[list[dict], list[str]]:
    """Compare every `mode` run (warm-ups included) with the `base` runs.

    - exit status: a run whose status no base run produced is a difference;
    - stdout: a run whose stdout equals no base run's stdout is a difference,
      but only if at least two base runs agreed with each other (otherwise
      the program's output is not deterministic and is not compared).

    Returns (differences, notes).
    """
    base_runs = [r for r in runs if r.mode == base]
    other = [r for r in runs if r.mode == mode]
    diffs: list[dict] = []
    notes: list[str] = []
    if not base_runs:
        return diffs, notes
    statuses = {r.exit_status for r in base_runs}
    if len(statuses) > 1:
        notes.append(f"{base} exit status varies between runs: "
                     + ", ".join(str(s) for s in sorted(statuses)))
    outs: dict[bytes, int] = {}
    for r in base_runs:
        outs[r.stdout] = outs.get(r.stdout, 0) + 1
    deterministic = any(c >= 2 for c in outs.values())
    if not deterministic:
        if len(base_runs) < 2:
            notes.append(f"only one {base} run: stdout not compared")
        else:
            notes.append(f"{base} stdout differs between {base} runs: "
                         "stdout not compared")
    # the reference output: the most common base output
    ref_out = max(outs.items(), key=lambda kv: kv[1])[0]
    ref_status = max(statuses, key=lambda s: sum(r.exit_status == s
                                                  for r in base_runs))
    for r in other:
        label = f"{'warm-up' if r.warmup else 'run'} {r.pair + 1}"
        if r.exit_status not in statuses:
            diffs.append({
                "kind": "exit_status", "mode": mode, "pair": r.pair,
                "warmup": r.warmup, "label": label,
                base: ref_status, mode + "_value": r.exit_status,
                "detail": (f"{mode} {label}: exit status {describe_status(r.exit_status)}"
                           f", {base} {describe_status(ref_status)}"
                           + (" (timed out)" if r.timed_out else "")),
            })
        if deterministic and r.stdout not in outs:
            diffs.append({
                "kind": "stdout", "mode": mode, "pair": r.pair,
                "warmup": r.warmup, "label": label,
                "detail": f"{mode} {label}: stdout differs from {base}: "
                          + first_difference(ref_out, r.stdout),
            })
    return diffs, notes


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"{status} ({signal.Signals(-status).name})"
        except ValueError:
            return f"{status} (signal {-status})"
    return str(status)


def first_difference(a: bytes, b: bytes, width: int = 60) -> str:
    """One line saying where b first differs from a."""
    if a == b:
        return "identical"
    la, lb = a.splitlines(keepends=True), b.splitlines(keepends=True)
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return (f"line {i + 1}: expected {_short(x, width)}, "
                    f"got {_short(y, width)}")
    if len(la) > len(lb):
        return (f"output ends after {len(b)} bytes, expected {len(a)} "
                f"(missing line {len(lb) + 1}: {_short(la[len(lb)], width)})")
    return (f"{len(b) - len(a)} extra bytes after the expected output "
            f"(line {len(la) + 1}: {_short(lb[len(la)], width)})")


def _short(b: bytes, width: int) -> str:
    s = b.decode("utf-8", "replace").rstrip("\n")
    if len(s) > width:
        s = s[:width] + "..."
    return repr(s)


def build_report(runs: Sequence[RunResult], command: Sequence[str],
                 legorun_options: Sequence[str] = (), n: int | None = None,
                 warmup: int | None = None,
                 modes: Sequence[str] = (NATIVE, LEGORUN)) -> dict:
    """The whole result as one JSON-serialisable document."""
    summary = {m: summarize_mode(runs, m) for m in modes}
    slowdown = {m: ratio_spread(pair_ratios(runs, m)) for m in modes
                if m != NATIVE}
    diffs: list[dict] = []
    notes: list[str] = []
    for m in modes:
        if m == NATIVE:
            continue
        d, nt = detect_differences(runs, m)
        diffs += d
        for x in nt:
            if x not in notes:
                notes.append(x)
    stats = [r.stats for r in runs if r.mode == LEGORUN and not r.warmup]
    floor = max((r.rss_floor_kb for r in runs), default=0)
    if floor:
        notes.append(f"peak RSS cannot read below {floor / 1024:.1f} MiB, the RSS of "
                     "the helper the runs are forked from")
    if any(r.mode == LEGORUN for r in runs) and not any(stats):
        notes.append("legorun wrote no stats JSON: counts unavailable")
    return {
        "command": list(command),
        "legorun_options": list(legorun_options),
        "n": n if n is not None else len({r.pair for r in runs if not r.warmup}),
        "warmup": warmup if warmup is not None else len({r.pair for r in runs
                                                          if r.warmup}),
        "modes": list(modes),
        "summary": summary,
        "slowdown": slowdown,
        "counts": summarize_counts(stats),
        "differences": diffs,
        "notes": notes,
        "ok": not diffs,
        "rss_floor_kb": floor,
        "runs": [r.to_json() for r in runs],
    }


# --------------------------------------------------------------------------
# Pure formatting / parsing of the table
# --------------------------------------------------------------------------

TABLE_COLUMNS = ["wall med (s)", "wall min (s)", "wall max (s)",
                 "user (s)", "sys (s)", "peak RSS (MiB)"]
_LABEL_W = 22
_COL_W = 15


def fmt_num(x: float | None, digits: int = 4) -> str:
    """Compact number: 4 significant digits, '-' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    mag = math.floor(math.log10(abs(x)))
    if mag >= digits - 1:
        return f"{x:.0f}"
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def _row(label: str, cells: Sequence[str]) -> str:
    return label.ljust(_LABEL_W) + "".join(c.rjust(_COL_W) for c in cells)


def format_table(report: dict) -> str:
    """The human table for a report made by build_report()."""
    lines = []
    cmd = " ".join(shlex.quote(a) for a in report["command"])
    lines.append(f"legorun bench: {cmd}")
    opts = " ".join(shlex.quote(a) for a in report["legorun_options"]) or "(none)"
    lines.append(f"{report['n']} measured pairs after {report['warmup']} warm-up "
                 f"pair(s), alternating; legorun options: {opts}")
    lines.append("")
    lines.append(_row("", TABLE_COLUMNS))
    for mode in report["modes"]:
        s = report["summary"][mode]
        w = s["wall_s"]
        label = mode if mode == NATIVE else f"{mode} (total)"
        if "guest" not in s:
            label = mode
        lines.append(_row(label, [fmt_num(w["median"]), fmt_num(w["min"]),
                                  fmt_num(w["max"]), fmt_num(s["utime_s"]),
                                  fmt_num(s["stime_s"]), _mib(s["maxrss_kb"])]))
        if "guest" in s:
            g, o = s["guest"], s["overhead"]
            lines.append(_row("  guest", ["-", "-", "-", fmt_num(g["utime_s"]),
                                          fmt_num(g["stime_s"]),
                                          _mib(g["maxrss_kb"])]))
            lines.append(_row("  legorun+components",
                              ["-", "-", "-", fmt_num(o["utime_s"]),
                               fmt_num(o["stime_s"]), "-"]))
    lines.append("")
    for mode, sl in report["slowdown"].items():
        if sl["median"] is None:
            lines.append(f"slowdown ({mode}/native): -")
        else:
            lines.append(f"slowdown ({mode}/native): {fmt_num(sl['median'], 3)}x median"
                         f" (per-pair {fmt_num(sl['min'], 3)}x..{fmt_num(sl['max'], 3)}x)")
    c = report["counts"]
    parts = []
    for key, name in (("ptrace_stops", "ptrace stops"), ("rpcs", "RPCs"),
                      ("faults", "faults"), ("syscalls", "forwarded syscalls")):
        if key in c:
            v = c[key]
            txt = f"{name} {fmt_num(v['median'], 6)}"
            if v["min"] != v["max"]:
                txt += f" ({fmt_num(v['min'], 6)}..{fmt_num(v['max'], 6)})"
            parts.append(txt)
        else:
            parts.append(f"{name} -")
    lines.append("counts (median per legorun run): " + ", ".join(parts))
    if c.get("rpcs_by_name"):
        lines.append("  RPCs: " + ", ".join(f"{k} {fmt_num(v, 6)}"
                                            for k, v in c["rpcs_by_name"].items()))
    lines.append("")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if report["differences"]:
        for d in report["differences"]:
            lines.append(f"DIFFERENCE: {d['detail']}")
        lines.append("result: DIFFERENT")
    else:
        lines.append("result: OK (exit status and output match native)")
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> dict:
    """Parse format_table() output back: {"rows": {label: {column: value}},
    "slowdown": {mode: {"median","min","max"}}, "counts": {...}, "result": ...}.
    Missing values ('-') parse as None."""
    rows: dict[str, dict[str, float | None]] = {}
    slowdown: dict[str, dict[str, float]] = {}
    counts: dict[str, float | None] = {}
    result = None
    in_table = False
    for line in text.splitlines():
        if line.strip() and line.strip().startswith(TABLE_COLUMNS[0]):
            in_table = True
            continue
        if in_table:
            if not line.strip():
                in_table = False
                continue
            label = line[:_LABEL_W].strip()
            cells = line[_LABEL_W:].split()
            if len(cells) != len(TABLE_COLUMNS):
                raise ValueError(f"bad table row: {line!r}")
            rows[label] = {col: (None if v == "-" else float(v))
                           for col, v in zip(TABLE_COLUMNS, cells)}
        elif line.startswith("slowdown ("):
            mode = line[len("slowdown ("):line.index("/")]
            rest = line.split("):", 1)[1].strip()
            if rest == "-":
                slowdown[mode] = {"median": None, "min": None, "max": None}
            else:
                med = float(rest.split("x", 1)[0])
                lo, hi = rest.split("per-pair ", 1)[1].rstrip(")").split("..")
                slowdown[mode] = {"median": med, "min": float(lo.rstrip("x")),
                                  "max": float(hi.rstrip("x"))}
        elif line.startswith("counts (median per legorun run): "):
            for part in line.split(": ", 1)[1].split(", "):
                name, _, val = part.rpartition(" ")
                if val.endswith(")"):   # "name 12 (10..14)"
                    name, _, val = name.rpartition(" ")
                counts[name] = None if val == "-" else float(val)
        elif line.startswith("result: "):
            result = line.split(": ", 1)[1].split()[0]
    if not rows:
        raise ValueError("no table found")
    return {"rows": rows, "slowdown": slowdown, "counts": counts,
            "result": result}


def exit_code(report: dict) -> int:
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------
# Argument parsing (pure)
# --------------------------------------------------------------------------

class UsageError(Exception):
    pass


@dataclasses.dataclass
class BenchArgs:
    n: int = 5
    warmup: int = 1
    json: bool = False
    quiet: bool = False
    timeout: float | None = None
    legorun_options: list[str] = dataclasses.field(default_factory=list)
    command: list[str] = dataclasses.field(default_factory=list)
    help: bool = False


def parse_args(argv: Sequence[str]) -> BenchArgs:
    """Parse `[-n N] [--warmup K] [--json] [--quiet] [--timeout SEC]
    [legorun options] -- PROGRAM [ARGS...]`.  Options bench does not know
    are kept, in order, as legorun options."""
    a = BenchArgs()
    argv = list(argv)
    if "--" not in argv:
        if any(x in ("-h", "--help") for x in argv):
            a.help = True
            return a
        raise UsageError("missing `-- PROGRAM [ARGS...]`")
    i = argv.index("--")
    opts, a.command = argv[:i], argv[i + 1:]
    j = 0

    def value(opt: str, inline: str | None) -> str:
        nonlocal j
        if inline is not None:
            return inline
        if j + 1 >= len(opts):
            raise UsageError(f"{opt} needs a value")
        j += 1
        return opts[j]

    def number(opt: str, s: str, kind: type, minimum: float) -> Any:
        try:
            v = kind(s)
        except ValueError:
            raise UsageError(f"{opt}: not a number: {s!r}") from None
        if v < minimum:
            raise UsageError(f"{opt} must be at least {minimum}")
        return v

    while j < len(opts):
        o = opts[j]
        name, eq, inline = o.partition("=")
        inline = inline if eq else None
        if o in ("-h", "--help"):
            a.help = True
        elif name in ("-n", "--runs"):
            a.n = number(name, value(name, inline), int, 1)
        elif o.startswith("-n") and len(o) > 2 and o[2:].isdigit():
            a.n = number("-n", o[2:], int, 1)
        elif name == "--warmup":
            a.warmup = number(name, value(name, inline), int, 0)
        elif o == "--json":
            a.json = True
        elif o in ("-q", "--quiet"):
            a.quiet = True
        elif name == "--timeout":
            a.timeout = number(name, value(name, inline), float, 0.001)
        else:
            a.legorun_options.append(o)
        j += 1
    if not a.command and not a.help:
        raise UsageError("no PROGRAM after `--`")
    return a


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

def legorun_prefix(legorun_options: Sequence[str], stats_path: str) -> list[str]:
    return [sys.executable, "-m", "legorun", *legorun_options,
            "--stats-json", stats_path, "--"]


# The runs are started by a small helper process (`python -S -I`, ~5 MiB)
# rather than by this one: ru_maxrss of a child includes the memory of the
# process it was forked from (the kernel keeps the old mm's high-water mark
# across execve), so forking from a 20+ MiB Python would put a 20 MiB floor
# under every peak-RSS figure.  The helper forks, execs, waits with wait4
# and times the run with perf_counter around fork..wait4.
_SPAWNER = r"""
import json, os, select, signal, sys, time
def rss_floor():
    # what a child forked from here reports as ru_maxrss if it does nothing
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.wait4(pid, 0)[2].ru_maxrss
inp, out = sys.stdin.buffer, sys.stdout
for line in inp:
    req = json.loads(line)
    floor = rss_floor()
    fds = [os.open(os.devnull, os.O_RDONLY),
           os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
           os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
    er, ew = os.pipe2(os.O_CLOEXEC)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
            if req.get("cwd"):
                os.chdir(req["cwd"])
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.execvpe(req["argv"][0], req["argv"], req["env"])
        except OSError as e:
            os.write(ew, str(e.errno or 0).encode())
        os._exit(127)
    for fd in fds + [ew]:
        os.close(fd)
    err = os.read(er, 64)
    os.close(er)
    if err:
        os.wait4(pid, 0)
        out.write(json.dumps({"error": int(err)}) + "\n"); out.flush()
        continue
    out.write(json.dumps({"pid": pid}) + "\n"); out.flush()
    deadline = None if req.get("timeout") is None else t0 + req["timeout"]
    timed_out = False
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        w = 0.05
        if deadline is not None:
            w = max(0.0, min(w, deadline - time.perf_counter()))
        if pidfd is not None:
            select.select([pidfd], [], [], w)
        else:
            time.sleep(0.0005)
        wpid, status, ru = os.wait4(pid, os.WNOHANG)
        if wpid:
            break
        if deadline is not None and time.perf_counter() > deadline and not timed_out:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    wall = time.perf_counter() - t0
    if pidfd is not None:
        os.close(pidfd)
    out.write(json.dumps({"wall": wall, "utime": ru.ru_utime,
                          "stime": ru.ru_stime, "maxrss": ru.ru_maxrss,
                          "status": os.waitstatus_to_exitcode(status),
                          "timed_out": timed_out,
                          "floor": floor})
              + "\n")
    out.flush()
"""


class Spawner:
    """Runs programs through the small helper process; see _SPAWNER."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", _SPAWNER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            close_fds=True, bufsize=0)
        self._buf = b""
        self.dir = tempfile.mkdtemp(prefix="legorun-bench-")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def __enter__(self) -> "Spawner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _readline(self, on_tick: Callable[[], None] | None) -> dict:
        # own line buffering on the raw pipe: a buffered reader could hold
        # the next line already read while select() waits for more
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError("legorun bench: spawner helper died")
                self._buf += chunk
            elif on_tick:
                on_tick()
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def run(self, argv: Sequence[str], timeout: float | None = None,
            env: dict | None = None, cwd: str | None = None,
            on_tick: Callable[[float], None] | None = None
            ) -> tuple[dict, bytes, bytes]:
        out_path = os.path.join(self.dir, "stdout")
        err_path = os.path.join(self.dir, "stderr")
        req = {"argv": list(argv), "env": dict(os.environ if env is None else env),
               "cwd": cwd, "timeout": timeout,
               "stdout": out_path, "stderr": err_path}
        t0 = time.perf_counter()
        tick = (lambda: on_tick(time.perf_counter() - t0)) if on_tick else None
        data = (json.dumps(req) + "\n").encode()
        while data:
            data = data[os.write(self.proc.stdin.fileno(), data):]
        first = self._readline(None)
        if "error" in first:
            e = first["error"]
            raise OSError(e, os.strerror(e), argv[0])
        pid = first["pid"]
        try:
            res = self._readline(tick)
        except BaseException:
            _kill_group(pid)
            self.proc.kill()
            raise
        with open(out_path, "rb") as f:
            stdout = f.read()
        with open(err_path, "rb") as f:
            stderr = f.read()
        return res, stdout, stderr


def run_once(argv: Sequence[str], mode: str, pair: int, warmup: bool,
             spawner: Spawner, stats_path: str | None = None,
             timeout: float | None = None, env: dict | None = None,
             cwd: str | None = None,
             on_tick: Callable[[float], None] | None = None) -> RunResult:
    """Run argv once (stdin /dev/null, stdout and stderr captured, own
    process group, killed on timeout) and measure it.  Raises OSError if
    argv cannot be started."""
    if stats_path:
        try:
            os.unlink(stats_path)
        except FileNotFoundError:
            pass
    res, stdout, stderr = spawner.run(argv, timeout=timeout, env=env, cwd=cwd,
                                      on_tick=on_tick)
    stats = None
    if stats_path:
        try:
            with open(stats_path) as f:
                stats = json.load(f)
            if not isinstance(stats, dict):
                stats = None
        except (OSError, ValueError):
            stats = None
    return RunResult(mode=mode, pair=pair, warmup=warmup, wall_s=res["wall"],
                     utime_s=res["utime"], stime_s=res["stime"],
                     maxrss_kb=int(res["maxrss"]), exit_status=res["status"],
                     stdout=stdout, stderr=stderr, stats=stats,
                     timed_out=res["timed_out"],
                     rss_floor_kb=int(res.get("floor", 0)))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass
class Variant:
    """A way to run the program: argv = prefix + program (+ stats file)."""

    mode: str
    prefix: list[str] = dataclasses.field(default_factory=list)
    legorun_options: list[str] | None = None  # set: a legorun run with stats

    def argv(self, command: Sequence[str], stats_path: str | None) -> list[str]:
        if self.legorun_options is not None:
            return [*legorun_prefix(self.legorun_options, stats_path), *command]
        return [*self.prefix, *command]


class Progress:
    """One updating line on a tty, plain lines otherwise, nothing if quiet."""

    def __init__(self, stream=None, quiet: bool = False, prefix: str = "bench"):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.prefix = prefix
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._last = 0.0
        self._dirty = False

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def tick(self, label: str, elapsed: float) -> None:
        if self.quiet or not self.tty:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self._write(f"\r\x1b[K{self.prefix}: {label} {elapsed:.2f} s")
        self._dirty = True

    def done(self, label: str, r: RunResult) -> None:
        if self.quiet:
            return
        extra = "" if r.exit_status == 0 else f" (exit {describe_status(r.exit_status)})"
        line = f"{self.prefix}: {label} {r.wall_s:.2f} s{extra}"
        if self.tty:
            self._write(f"\r\x1b[K{line}")
            self._dirty = True
        else:
            self._write(line + "\n")

    def finish(self) -> None:
        if self.tty and self._dirty and not self.quiet:
            self._write("\r\x1b[K")
            self._dirty = False


def run_bench(command: Sequence[str], variants: Sequence[Variant],
              n: int = 5, warmup: int = 1, timeout: float | None = None,
              progress: Progress | None = None, env: dict | None = None,
              cwd: str | None = None) -> list[RunResult]:
    """Warm-up pairs, then n rounds; each round runs every variant once, in
    order (native first).  Returns every run, warm-ups flagged."""
    progress = progress or Progress(quiet=True)
    total = (warmup + n) * len(variants)
    runs: list[RunResult] = []
    fd, stats_path = tempfile.mkstemp(prefix="legorun-bench-", suffix=".json")
    os.close(fd)
    k = 0
    spawner = Spawner()
    try:
        for p in range(warmup + n):
            is_warm = p < warmup
            pair = p if is_warm else p - warmup
            for v in variants:
                k += 1
                label = (f"run {k}/{total} ({v.mode}"
                         + (", warm-up)" if is_warm else ")"))
                sp = stats_path if v.legorun_options is not None else None
                r = run_once(v.argv(command, sp), v.mode, pair, is_warm,
                             spawner, stats_path=sp, timeout=timeout, env=env, cwd=cwd,
                             on_tick=lambda e, lb=label: progress.tick(lb, e))
                progress.done(label, r)
                runs.append(r)
    finally:
        progress.finish()
        spawner.close()
        try:
            os.unlink(stats_path)
        except FileNotFoundError:
            pass
    return runs


def bench(command: Sequence[str], legorun_options: Sequence[str] = (),
          n: int = 5, warmup: int = 1, timeout: float | None = None,
          quiet: bool = True, extra_variants: Sequence[Variant] = (),
          env: dict | None = None, cwd: str | None = None) -> dict:
    """Run the native/legorun comparison and return build_report()'s dict
    (with the RunResult objects under the private key "_runs")."""
    variants = [Variant(NATIVE), Variant(LEGORUN, legorun_options=list(legorun_options)),
                *extra_variants]
    runs = run_bench(command, variants, n=n, warmup=warmup, timeout=timeout,
                     progress=Progress(quiet=quiet), env=env, cwd=cwd)
    report = build_report(runs, command, legorun_options, n=n, warmup=warmup,
                          modes=[v.mode for v in variants])
    report["_runs"] = runs
    return report


def main(argv: list[str]) -> int:
    """Entry point for `legorun bench ARGS` (argv excludes "bench")."""
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"legorun bench: {e}\n{USAGE}", file=sys.stderr)
        return 2
    if args.help:
        print(HELP, end="")
        return 0
    try:
        report = bench(args.command, args.legorun_options, n=args.n,
                       warmup=args.warmup, timeout=args.timeout,
                       quiet=args.quiet)
    except OSError as e:
        print(f"legorun bench: cannot run {args.command[0]}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("legorun bench: interrupted", file=sys.stderr)
        return 130
    report.pop("_runs", None)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(report))
    if report["differences"] and args.json:
        for d in report["differences"]:
            print(f"legorun bench: DIFFERENCE: {d['detail']}", file=sys.stderr)
    return exit_code(report)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
