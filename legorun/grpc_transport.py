"""Which of gRPC's socket layers a component server uses, chosen before gRPC loads.

grpcio 1.6x+ serves accepted connections through its EventEngine endpoints by
default (experiment event_engine_listener): every read from the socket is
handed to one of a pool of threads, and each hop costs a context switch. A
guest's 1 MiB write(2) on a mount is one frame that the sComponent must
receive and acknowledge before the write returns, so those hops are on its
critical path. With the server on gRPC's older endpoints (iomgr: the
polling thread reads the socket itself), a bare Python client and server
moving acknowledged 1 MiB frames over a Unix socket took ~0.37 ms instead of
~0.57 ms from the client's hand-off to the server's handler (with the
pwrite, ~0.83 ms instead of ~1.04 ms a round trip). Under legorun, where the
embedded server has one CPU to itself, the gain is smaller: seqio's writes,
median of 6 alternating runs, 999 -> 1,068 MB/s; reads unchanged within the
noise. The client is better off on the default: the older endpoints on
legorun's side halved seqio's reads (~2,400 -> ~1,000 MB/s), so only servers
call this.

gRPC reads GRPC_EXPERIMENTS once, while it is imported, so import_grpc()
sets the variable around that import and then puts it back (nothing the
server starts later inherits it). A user's own GRPC_EXPERIMENTS comes last
and so wins (``GRPC_EXPERIMENTS=event_engine_listener`` restores gRPC's
default). If gRPC was already imported (a test importing the module), nothing
changes.
"""
from __future__ import annotations

import ctypes
import os
import sys

EXPERIMENTS_ENV = "GRPC_EXPERIMENTS"
SERVER_EXPERIMENTS = ("-event_engine_listener",)


def import_grpc():
    """The grpc module, loaded with SERVER_EXPERIMENTS if this call loads it."""
    if "grpc" in sys.modules:
        return sys.modules["grpc"]
    before = os.environ.get(EXPERIMENTS_ENV)
    os.environ[EXPERIMENTS_ENV] = ",".join([*SERVER_EXPERIMENTS, *([before] if before else [])])
    try:
        import grpc
    finally:
        if before is None:
            del os.environ[EXPERIMENTS_ENV]
        else:
            os.environ[EXPERIMENTS_ENV] = before
    return grpc


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3), glibc's malloc.h


def keep_frame_memory() -> None:
    """Let glibc keep large frames' memory for the next frame (the launcher
    and both components call it).

    Each data frame (a 1 MiB write, a batch of pages) is a fresh buffer of up
    to 16 MiB, in gRPC and then in Python. By default every one is mmapped,
    faulted in page by page and unmapped after use; served from the heap
    (below 32 MiB) and kept there (up to 64 MiB free), the next frame reuses
    warm pages. sComponent: a 1 MiB write's round trip ~0.85 ms instead of
    ~1.0 ms (both settings are needed: either alone was no faster). Launcher:
    joining an eviction's 256 pages into one frame took ~0.85 ms on fresh
    mmapped memory and ~0.025 ms on warm heap pages."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)
