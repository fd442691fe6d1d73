"""The `legorun` command line: run a guest, or one of the tool subcommands."""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys

from . import __version__

USAGE = ("legorun [OPTIONS] -- PROGRAM [ARGS...]\n"
         "       legorun bench [-n N] [--json] [OPTIONS] -- PROGRAM [ARGS...]\n"
         "       legorun status ADDR [--token T] [--json]\n"
         "       legorun report FILE.json [-o report.html|report.png]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legorun", usage=USAGE,
        description="Run PROGRAM with its files under each mount path served by a storage "
                    "component (sComponent) over gRPC, as LegoOS's pComponent would.",
        epilog="Without --storage, a local sComponent is started when the guest first touches "
               "a mount, rooted at $XDG_DATA_HOME/legorun/storage (~/.local/share/legorun/storage).")
    p.add_argument("--storage", metavar="ADDR",
                   help="sComponent address: unix:/path or HOST:PORT (TCP needs --token)")
    p.add_argument("--mount", metavar="GUEST_PATH", action="append",
                   help="a guest path served by the sComponent (repeatable; default /lego)")
    p.add_argument("--excache", metavar="SIZE",
                   help="serve the guest's anonymous memory from an mComponent, keeping at most "
                        "SIZE (K/M/G) of it resident per process (LegoOS's ExCache)")
    p.add_argument("--evict", choices=("fifo", "clock", "2q"), default="2q",
                   help="ExCache eviction policy: 2q (default: FIFO that keeps pages which "
                        "fault again soon after their eviction), fifo (LegoOS's best) or clock "
                        "(a page written since the hand last passed gets a second chance)")
    p.add_argument("--mem", metavar="ADDR",
                   help="the mComponent: unix:/path or HOST:PORT; without it, --excache starts a "
                        "local one when first needed")
    p.add_argument("--token", default=os.environ.get("LEGORUN_TOKEN"),
                   help="shared token for components on TCP (default: $LEGORUN_TOKEN)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate to reach components over TLS")
    p.add_argument("--cpus", choices=("one", "all"), default="one",
                   help="one (default): legorun and the guest share one CPU, which makes each "
                        "ptrace stop several times cheaper; all: the guest may use every CPU")
    p.add_argument("-c", "--summary", action="store_true",
                   help="print a summary of forwarded syscalls and RPCs at exit (like strace -c)")
    p.add_argument("--stats-json", metavar="FILE", help="write the run's statistics as JSON")
    p.add_argument("--trace", action="store_true",
                   help="print each forwarded syscall as strace does, with who served it and "
                        "how long it took (to stderr, or -o FILE)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the --trace lines to FILE")
    p.add_argument("-e", metavar="EXPR", dest="trace_expr",
                   help="which calls to trace, as strace's -e trace=: names and %%file, %%desc, "
                        "%%memory, %%process, plus excache for memory events (implies --trace)")
    p.add_argument("-s", metavar="STRSIZE", dest="strsize", type=int, default=32,
                   help="the longest buffer shown in a trace line, as strace's -s (default 32)")
    p.add_argument("-f", dest="follow_forks", action="store_true",
                   help="accepted for strace's sake: legorun always follows every thread and child")
    p.add_argument("--trace-json", metavar="FILE",
                   help="write the traced events as JSON lines (one object per event)")
    p.add_argument("-V", "--version", action="version", version=f"legorun {__version__}")
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from . import bench
        return bench.main(argv[1:])
    if argv and argv[0] == "status":
        from . import status
        return status.main(argv[1:])
    if argv and argv[0] == "report":
        from . import report as report_cmd
        return report_cmd.main(argv[1:])
    args = build_parser().parse_args(argv)
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    return run_guest(args, command)


def run_guest(args, command: list) -> int:
    from .grpc_transport import keep_frame_memory
    from .session import FatalError, Session
    from .tracer import LaunchError, Tracer

    keep_frame_memory()  # page batches and file data in frames of up to 16 MiB

    try:
        session = Session(args.mount or ["/lego"], storage=args.storage, token=args.token,
                          tls_ca=args.tls_ca)
    except ValueError as e:
        print(f"legorun: {e}", file=sys.stderr)
        return 2
    if args.excache or args.mem:
        from .memwire import parse_size
        try:
            size = parse_size(args.excache or "256M")
        except ValueError:
            print(f"legorun: --excache {args.excache}: not a size (like 64M)", file=sys.stderr)
            return 2
        session.enable_memory(size, args.mem, args.evict)
    try:
        session.trace = open_trace(args)
    except (OSError, ValueError) as e:
        print(f"legorun: {e}", file=sys.stderr)
        return 2
    if session.memory is not None:
        session.memory.trace = session.trace
    if args.cpus == "one":
        session.pin()
    tracer = Tracer(session)
    try:
        tracer.spawn(command)
        status = tracer.run()
    except LaunchError as e:
        print(f"legorun: {e}", file=sys.stderr)
        return 2
    except FatalError as e:
        from .errors import MemoryLost
        print(f"legorun: {e}", file=sys.stderr)
        session.close()
        return 137 if isinstance(e, MemoryLost) else 2
    finally:
        pass
    report(session, args)
    session.close()
    if os.WIFSIGNALED(status):
        die_of_signal(os.WTERMSIG(status))
    return os.WEXITSTATUS(status)


def open_trace(args):
    """The TraceWriter the options ask for, or None (tracing off costs one test per call)."""
    if not (args.trace or args.output or args.trace_expr or args.trace_json):
        return None
    from .trace import TraceWriter
    out = None
    if args.trace or args.output or args.trace_expr:
        out = open(args.output, "w", buffering=1) if args.output else sys.stderr
    json_out = open(args.trace_json, "w", buffering=1) if args.trace_json else None
    return TraceWriter(out, json_out, args.trace_expr, strsize=args.strsize)


def report(session, args) -> None:
    if session.trace is not None:
        session.trace.close()
    stats = session.stats.as_dict()
    stats["rpcs"] = session.rpc_stats()
    if session.memory is not None:
        from .memory import pagecore
        stats["excache"] = dict(session.memory.stats.as_dict(),
                                capacity_pages=session.memory.capacity)
        stats["excache_loops"] = pagecore.IMPLEMENTATION  # "C", or "Python" (the reference)
        if session.memory.page_stream() is not None:  # "legorun" (pagestream) or "grpcio"
            stats["page_stream"] = session.memory.page_stream()
        stats["faults"] = session.memory.stats.faults
        stats["timeline"] = session.memory.timeline
        stats["fault_latency_us"] = [round(x * 1e6, 1) for x in session.memory.latencies.samples]
    # legorun has reaped only the guest's tree so far (embedded components are
    # stopped after this report), so its children's usage is the guest's.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats["guest_rusage"] = {"utime": ru.ru_utime, "stime": ru.ru_stime,
                             "maxrss_kb": stats["peak_rss_kb"] or ru.ru_maxrss}
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    if args.summary:
        print_summary(stats, sys.stderr)


def print_summary(stats: dict, out) -> None:
    total_time = sum(v["time_s"] for v in stats["syscalls"].values()) or 1e-12
    out.write(f"{'% time':>6} {'seconds':>11} {'usecs/call':>11} {'calls':>9} {'errors':>9} syscall\n")
    out.write(f"{'-'*6} {'-'*11} {'-'*11} {'-'*9} {'-'*9} {'-'*16}\n")
    rows = sorted(stats["syscalls"].items(), key=lambda kv: -kv[1]["time_s"])
    for name, v in rows:
        out.write(f"{100 * v['time_s'] / total_time:6.2f} {v['time_s']:11.6f} "
                  f"{1e6 * v['time_s'] / v['count']:11.0f} {v['count']:9d} "
                  f"{v['errors'] or '':>9} {name}\n")
    calls = sum(v["count"] for v in stats["syscalls"].values())
    errors = sum(v["errors"] for v in stats["syscalls"].values())
    out.write(f"{'-'*6} {'-'*11} {'-'*11} {'-'*9} {'-'*9} {'-'*16}\n")
    out.write(f"100.00 {total_time:11.6f} {'':>11} {calls:9d} {errors or '':>9} total\n")
    out.write(f"\nptrace stops: {stats['ptrace_stops']} ({stats['trapped']} for syscalls "
              f"legorun handles)\n")
    rusage = stats.get("guest_rusage")
    if rusage:
        out.write(f"guest: user {rusage['utime']:.3f} s, sys {rusage['stime']:.3f} s, "
                  f"peak RSS {rusage['maxrss_kb'] / 1024:.1f} MiB\n")
    ex = stats.get("excache")
    if ex:
        mib = 4096 / 2**20
        out.write(f"\nExCache: {ex['capacity_pages'] * mib:.1f} MiB per process "
                  f"({ex['capacity_pages']} pages), peak {ex['peak_resident'] * mib:.1f} MiB "
                  "resident\n")
        rows = [
            ("misses (faults)", ex["faults"],
             f"{ex['zero_fills']} pages zero-filled here, {ex['fetches']} fetched"),
            ("prefetched", ex["prefetched"],
             f"{ex.get('prefetch_used', 0)} used (written before eviction), "
             f"{ex.get('prefetch_unused', 0)} evicted unwritten (wasted, or only read)"),
            ("evictions", ex["evictions"],
             f"{ex['writebacks']} written back, {ex.get('clean_drops', 0)} dropped clean"
             + (f", {ex['unchanged']} written but unchanged (not written back)"
                if ex.get("unchanged") else "")
             + (f", {ex['second_chances']} second chances" if ex.get("second_chances") else "")
             + (f", {ex['refaults']} refaults kept hot" if ex.get("refaults") else "")
             + (f", {ex['deferred']} deferred" if ex["deferred"] else "")),
        ]
        for name, n, detail in rows:
            out.write(f"  {name:<16} {n:>9}   {detail}\n")
        if ex["made_local"]:
            out.write(f"  {ex['made_local']} process(es) made local\n")
        stream = stats.get("page_stream")
        if stream:
            out.write("  pages moved on " + ("legorun's HTTP/2 stream (h2stream)" if stream == "legorun"
                                             else "grpcio's stream") + "\n")
    rpcs = stats.get("rpcs", {})
    if rpcs:
        out.write(f"\n{'component':<11} {'rpc':<16} {'calls':>8} {'errors':>7} {'p50 ms':>8} "
                  f"{'p99 ms':>8} {'sent':>10} {'received':>10}\n")
        for comp, ops in rpcs.items():
            for op, v in sorted(ops.items(), key=lambda kv: -kv[1]["count"]):
                out.write(f"{comp:<11} {op:<16} {v['count']:>8} {v['errors'] or '':>7} "
                          f"{_ms(v.get('p50_ms')):>8} {_ms(v.get('p99_ms')):>8} "
                          f"{_size(v['bytes_sent']):>10} {_size(v['bytes_received']):>10}\n")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def die_of_signal(sig: int) -> None:
    """Die of the guest's signal, as strace does, so a shell sees a real signal death."""
    sys.stdout.flush()
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
