"""Remote memory: a real mComponent, real guests, an ExCache far smaller than their memory."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import compile_c, legorun, native
from legorun.memory_client import MemoryClient

PY = sys.executable

PATTERN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20;
    int passes = atoi(argv[2]);
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t bad = 0;
    for (int pass = 0; pass < passes; pass++) {
        for (size_t i = 0; i < n; i += 64) p[i] = (unsigned char)((i >> 6) * 7 + pass);
        for (size_t i = 0; i < n; i += 64) bad += p[i] != (unsigned char)((i >> 6) * 7 + pass);
    }
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def start_mcomponent(address: str, *options) -> subprocess.Popen:
    """A `legorun-mcomponent` process listening on `address`."""
    proc = subprocess.Popen([PY, "-m", "legorun_components.mcomponent", "--listen", address,
                             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().decode().startswith("listening on")
    return proc


@pytest.fixture
def mcomponent(tmp_path):
    address = f"unix:{tmp_path}/m.sock"
    proc = start_mcomponent(address, "--lease", "1s")
    yield address
    proc.terminate()
    proc.wait(10)


def _held(address):
    with MemoryClient(address) as c:
        st = c.status()
    return st.spaces, st.pages


def _run_sampling_rss_anon(cmd, exe, env=None):
    """Run cmd (legorun with the guest `exe`); sample the guest's RssAnon
    (KiB) while it runs. Returns (process, stdout, stderr, peak)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=None if env is None else {**os.environ, **env})
    peak = 0
    launcher = psutil.Process(p.pid)
    while p.poll() is None:
        for child in launcher.children():
            try:
                if os.readlink(f"/proc/{child.pid}/exe") != exe:
                    continue  # not exec'd yet: still a copy of legorun's Python
                with open(f"/proc/{child.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
        time.sleep(0.005)
    out, err = p.communicate()
    return p, out, err, peak


def _bad_0_within_1m(mcomponent, tmp_path, exe, *args, timeout=120) -> dict:
    """Run the C guest `exe` (it prints "bad 0" when every byte read back)
    under a 1 MiB ExCache; returns the run's stats (--stats-json)."""
    r = legorun([exe, *args], stats_file=tmp_path / "s.json", timeout=timeout,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "bad 0\n"
    return r.stats


def _run_within_1m(mcomponent, tmp_path, exe, *args, env=None):
    """Run the C guest `exe` (it prints "bad 0" when every byte read back)
    under a 1 MiB ExCache; its RssAnon, sampled, stays within the ExCache plus
    the documented slack (libc's own data, pages touched before the first
    mmap). Returns the run's ExCache stats."""
    import json
    cmd = [PY, "-m", "legorun", "--mem", mcomponent, "--excache", "1M",
           "--stats-json", str(tmp_path / "s.json"), "--", exe, *args]
    p, out, err, peak = _run_sampling_rss_anon(cmd, exe, env)
    assert p.returncode == 0, err
    assert out == "bad 0\n"
    assert 0 < peak <= 1024 + 1024, peak
    stats = json.loads((tmp_path / "s.json").read_text())
    return dict(stats["excache"], loops=stats["excache_loops"], stream=stats.get("page_stream"))


@pytest.mark.parametrize("loops,stream", [("C", "legorun"), ("C", "grpcio"), ("Python", "grpcio")])
def test_guest_writing_8x_the_excache_reads_back_every_byte_within_the_bound(
        mcomponent, tmp_path, loops, stream):
    # the ExCache's per-page loops in C (legorun/_ext/pagecore.c) and in
    # their pure-Python reference (LEGORUN_NO_FASTPATH=1, which also takes
    # grpcio's page stream); legorun's page stream (legorun/_ext/h2stream.c)
    # and grpcio's (LEGORUN_PAGE_STREAM=grpc)
    env = {"LEGORUN_NO_FASTPATH": "1"} if loops == "Python" else None
    if loops == "C":
        pytest.importorskip("legorun._ext.pagecore")  # (built where a compiler was found)
        if stream == "legorun":
            pytest.importorskip("legorun._ext.h2stream")
        else:
            env = {"LEGORUN_PAGE_STREAM": "grpc"}
    ex = _run_within_1m(mcomponent, tmp_path, compile_c(tmp_path, "pattern", PATTERN_C), "8", "3",
                        env=env)
    # (the implementations asked for are the ones that ran)
    assert (ex["loops"], ex["stream"]) == (loops, stream)
    assert ex["evictions"] > 0 and ex["fetches"] > 0 and ex["zero_fills"] >= 2048
    # (the README's slack: pages served while an eviction waits for the thread
    # to stop, at most one batch: 32 pages at this size)
    assert ex["peak_resident"] <= ex["capacity_pages"] + 32, ex
    assert _held(mcomponent) == (0, 0)  # the space was freed with the guest


STACK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
/* A pattern over N MiB of the main stack (64 KiB frames, one per call),
   checked R times on the way back up. */
static long bad = 0;
static int rounds;
static void dive(int depth, int left) {
    volatile unsigned char frame[65536];
    for (int i = 0; i < 65536; i += 512) frame[i] = (unsigned char)(depth * 7 + i / 512);
    if (left > 0) dive(depth + 1, left - 1);
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < 65536; i += 512)
            bad += frame[i] != (unsigned char)(depth * 7 + i / 512);
}
int main(int argc, char **argv) {
    int mb = atoi(argv[1]);
    rounds = atoi(argv[2]);
    char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    p[0] = 1;
    dive(0, mb * 16 - 1);
    printf("bad %ld\n", bad);
    return bad != 0;
}
"""


def test_the_main_stack_lives_on_the_mcomponent_and_keeps_every_byte(mcomponent, tmp_path):
    # 6 MiB of stack written natively stays resident (RssAnon > 6 MiB)
    ex = _run_within_1m(mcomponent, tmp_path, compile_c(tmp_path, "stack", STACK_C), "6", "2")
    assert ex["writebacks"] >= 1024 and ex["fetches"] >= 1024, ex


READ_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20;
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i += 64) p[i] = (unsigned char)((i >> 6) * 7 + 1);
    size_t bad = 0;
    for (int pass = 0; pass < atoi(argv[2]); pass++)   /* read only from here on */
        for (size_t i = 0; i < n; i += 64) bad += p[i] != (unsigned char)((i >> 6) * 7 + 1);
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def test_pages_read_but_not_written_since_their_fetch_are_dropped_without_a_write_back(
        mcomponent, tmp_path):
    exe = compile_c(tmp_path, "readonly", READ_C)
    ex = _bad_0_within_1m(mcomponent, tmp_path, exe, "8", "3")["excache"]
    pages = 8 * 256
    # written once (about 2048 pages stored), then fetched and dropped clean three times
    assert pages * 0.9 <= ex["writebacks"] <= pages * 1.1, ex
    assert ex["clean_drops"] >= 2 * pages, ex
    assert ex["fetches"] >= 3 * pages * 0.9, ex
    assert ex["prefetch_used"] == 0 and ex["prefetch_unused"] > pages, ex
    assert _held(mcomponent) == (0, 0)


UNCHANGED_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#define AT(i) ((unsigned char)((i) * 131 + ((i) >> 12)))
/* Each pass writes every page of the buffer back to what it held (an
   increment, then a decrement: what CPython's reference counts do to the
   pages a pass over objects touches). Then the last 256 KiB, fetched by the
   last pass and still resident, are discarded (MADV_DONTNEED: they read
   zeros) and written again with the very bytes they held; so is the first
   MiB, evicted long ago. The whole buffer is checked twice after. */
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20, passes = atoi(argv[2]), bad = 0, tail = 256 << 10;
    volatile unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i++) p[i] = AT(i);
    for (size_t pass = 0; pass < passes; pass++)
        for (size_t i = 0; i < n; i += 4096) { p[i + 8]++; p[i + 8]--; }
    madvise((void *)(p + n - tail), tail, MADV_DONTNEED);
    madvise((void *)p, 1 << 20, MADV_DONTNEED);
    for (size_t i = 0; i < (1 << 20); i++) bad += p[i] != 0;
    for (size_t i = n - tail; i < n; i++) bad += p[i] != 0;
    for (size_t i = n - tail; i < n; i++) p[i] = AT(i);
    for (size_t i = 0; i < (1 << 20); i++) p[i] = AT(i);
    for (int check = 0; check < 2; check++)
        for (size_t i = 0; i < n; i++) bad += p[i] != AT(i);
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def test_written_pages_back_to_what_was_fetched_are_not_written_back_and_keep_every_byte(
        mcomponent, tmp_path):
    """A page fetched, written and written back to the bytes fetched (its
    fingerprint agrees) is dropped without a write-back; a discarded range
    written again with its old bytes is written back all the same (the
    mComponent no longer holds them)."""
    exe = compile_c(tmp_path, "unchanged", UNCHANGED_C)
    ex = _bad_0_within_1m(mcomponent, tmp_path, exe, "8", "3")["excache"]
    pages = 8 * 256
    # stored once when first written, then unchanged at every pass; the
    # discarded ranges are stored again
    assert ex["unchanged"] >= 3 * pages * 0.9, ex
    assert pages + 256 + 64 <= ex["writebacks"] <= pages * 1.3, ex
    # the guest writes every page it had fetched: after the first evictions
    # told so, fetched pages are mapped writable (no write fault each), their
    # fingerprints alone telling the unchanged ones (ExCache._protecting)
    protected = ex["prefetch_used"] + ex["prefetch_unused"]
    assert protected < 0.6 * ex["prefetched"], ex
    assert _held(mcomponent) == (0, 0)


SCAN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20, bad = 0;
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i += 512) p[i] = (unsigned char)((i >> 9) * 13 + 1);
    for (size_t i = 0; i < n; i += 512) bad += p[i] != (unsigned char)((i >> 9) * 13 + 1);
    for (size_t i = n; i > 0; i -= 512) bad += p[i - 512] != (unsigned char)(((i - 512) >> 9) * 13 + 1);
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def test_sequential_scans_up_and_down_are_fetched_in_large_windows(mcomponent, tmp_path):
    stats = _bad_0_within_1m(mcomponent, tmp_path, compile_c(tmp_path, "scan", SCAN_C), "8")
    ex, ops = stats["excache"], stats["rpcs"]["mComponent"]
    frames = sum(ops[k]["count"] for k in ("fetch", "readahead") if k in ops)
    # two scans of ~7 MiB evicted (~3,600 pages), the downward one included:
    # one page per RPC would be ~3,600 frames, fault-around alone ~230
    assert ex["fetches"] >= 2 * 7 * 256 * 0.9, ex
    assert frames * 24 <= ex["fetches"], (frames, ex)
    assert _held(mcomponent) == (0, 0)


ARENAS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
/* 1 MiB arenas laid out top-down and each filled bottom-up, as CPython's
   allocator does; then passes over them in the order they were filled:
   each arena upwards, the next one 1 MiB below it. */
int main(int argc, char **argv) {
    size_t arenas = (size_t)atoi(argv[1]), passes = (size_t)atoi(argv[2]), mib = 1 << 20;
    unsigned char *base = mmap(NULL, arenas * mib, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t a = 0; a < arenas; a++) {
        unsigned char *arena = base + (arenas - 1 - a) * mib;
        for (size_t i = 0; i < mib; i += 64) arena[i] = (unsigned char)(a * 31 + i / 64);
    }
    size_t bad = 0;
    for (size_t p = 0; p < passes; p++)
        for (size_t a = 0; a < arenas; a++) {
            unsigned char *arena = base + (arenas - 1 - a) * mib;
            for (size_t i = 0; i < mib; i += 64) bad += arena[i] != (unsigned char)(a * 31 + i / 64);
        }
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def test_a_walk_that_leaps_arena_to_arena_is_fetched_ahead_across_the_leaps(mcomponent, tmp_path):
    """Each arena is a sequential stream; the walk then leaps 2 MiB down to the
    next one. Followed as new streams, every arena of every pass cost some
    three fetches the guest waited for (404 for these 128 arena passes);
    with the leap learned, the window it leads to is asked for ahead."""
    exe = compile_c(tmp_path, "arenas", ARENAS_C)
    arenas, passes = 64, 2
    r = legorun([exe, str(arenas), str(passes)], stats_file=tmp_path / "s.json",
                options=("--mem", mcomponent, "--excache", "16M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "bad 0\n"
    ops = r.stats["rpcs"]["mComponent"]
    assert r.stats["excache"]["fetches"] >= passes * (arenas - 16) * 256  # it was remote
    assert ops["fetch"]["count"] <= arenas * passes // 2, ops


EVICTED_ARGS_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
static void evict_everything(void) {   /* 8 MiB of other pages through a 1 MiB ExCache */
    size_t n = 8 << 20;
    unsigned char *q = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i += 4096) q[i] = 1;
    munmap(q, n);
}
int main(int argc, char **argv) {
    /* paths and buffers in remote memory, evicted before the syscalls that
       legorun itself reads or writes them for */
    char *m = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *local = m, *remote = m + 8192, *buf = m + 65536, *back = m + 3 * 65536;
    snprintf(local, 4096, "/tmp/legorun-no-such-file-%d", getpid());
    snprintf(remote, 4096, "%s/evicted.dat", argv[1]);
    for (int i = 0; i < 65536; i++) buf[i] = (char)(i * 7 + 3);
    struct stat st;
    evict_everything();
    int r1 = stat(local, &st);                       /* a local path: the C fast path */
    evict_everything();
    int fd = open(remote, O_CREAT | O_TRUNC | O_RDWR, 0600);   /* a path on the mount */
    evict_everything();
    ssize_t w = write(fd, buf, 65536);               /* legorun reads the evicted buffer */
    evict_everything();
    ssize_t r = pread(fd, back, 65536, 0);           /* and writes into an evicted one */
    printf("stat %d open %d write %zd read %zd same %d\n", r1, fd >= 0, w, r,
           memcmp(buf, back, 65536) == 0);
    return 0;
}
"""


def test_syscalls_whose_arguments_were_evicted_are_served_without_waiting_on_legorun(
        mcomponent, scomponent, tmp_path):
    exe = compile_c(tmp_path, "evicted_args", EVICTED_ARGS_C)
    r = legorun([exe, "/lego"], storage=scomponent.address, timeout=60,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "stat -1 open 1 write 65536 read 65536 same 1\n"
    assert (pathlib.Path(scomponent.root) / "evicted.dat").read_bytes() == bytes(
        (i * 7 + 3) & 0xFF for i in range(65536))


PROTECT_C = r"""
#include <stdio.h>
#include <sys/mman.h>
int main(void) {
    size_t n = 4 << 20, bad = 0;
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i += 512) p[i] = (unsigned char)(i * 3 + 1);  /* evicted: held remotely */
    if (mprotect(p, n / 2, PROT_READ) != 0) return 2;
    for (size_t i = 0; i < n; i += 512) bad += p[i] != (unsigned char)(i * 3 + 1);
    printf("bad %zu\n", bad);
    return 0;
}
"""


def test_mprotect_of_a_region_the_mcomponent_holds_is_recorded_there(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "protect", PROTECT_C)
    with MemoryClient(mcomponent) as c:
        before = c.status().requests_by_op.get("protect", 0)
    r = legorun([exe], options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "bad 0\n"
    with MemoryClient(mcomponent) as c:
        assert c.status().requests_by_op.get("protect", 0) >= before + 1
    assert _held(mcomponent) == (0, 0)


GROW_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(void) {
    /* a 64 GiB PROT_NONE reservation, made usable piece by piece as glibc's
       thread arenas are (mprotect splits the mapping under fault-around) */
    size_t max = (size_t)64 << 30, n = 8 << 20, step = 132 << 10, rw = 0, bad = 0;
    unsigned char *p = mmap(NULL, max, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return 2;
    for (size_t i = 0; i < n; i += 64) {
        if (i >= rw) { mprotect(p + rw, step, PROT_READ | PROT_WRITE); rw += step; }
        p[i] = (unsigned char)(i * 7 + 1);
    }
    for (int pass = 0; pass < 3; pass++)
        for (size_t i = 0; i < n; i += 64) bad += p[i] != (unsigned char)(i * 7 + 1);
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def test_a_huge_reservation_made_usable_by_mprotect_piece_by_piece_keeps_every_byte(
        mcomponent, tmp_path):
    ex = _bad_0_within_1m(mcomponent, tmp_path, compile_c(tmp_path, "grow", GROW_C))["excache"]
    assert ex["evictions"] > 3 * 2048 and ex["peak_resident"] <= ex["capacity_pages"], ex
    assert _held(mcomponent) == (0, 0)


THREADS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
/* threads MB PASSES [ROUNDS=1]: each round, 4 threads write and check their
   quarter of the buffer PASSES times, then exit and are joined. */
#define T 4
static unsigned char *p;
static size_t per;
static int passes;
static unsigned char val(size_t i, int pass) { return (unsigned char)((i >> 6) * 7 + pass); }
static void *work(void *arg) {
    size_t lo = ((size_t)arg % T) * per, bad = 0;
    int first = (int)((size_t)arg / T) * passes;
    for (int pass = first; pass < first + passes; pass++) {
        for (size_t i = lo; i < lo + per; i += 64) p[i] = val(i, pass);
        for (size_t i = lo; i < lo + per; i += 64) bad += p[i] != val(i, pass);
    }
    return (void *)bad;
}
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20, rounds = argc > 3 ? atoi(argv[3]) : 1, bad = 0;
    passes = atoi(argv[2]);
    per = n / T;
    p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t r = 0; r < rounds; r++) {
        pthread_t th[T];
        for (size_t i = 0; i < T; i++) pthread_create(&th[i], NULL, work, (void *)(r * T + i));
        for (int i = 0; i < T; i++) { void *v; pthread_join(th[i], &v); bad += (size_t)v; }
    }
    int last = (int)(rounds * passes) - 1;
    for (size_t i = 0; i < n; i += 64) bad += p[i] != val(i, last);  /* after the joins */
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def test_threads_faulting_at_once_keep_every_byte_and_stay_remote(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "threads", THREADS_C, flags=("-pthread",))
    r = legorun([exe, "8", "3"], stats_file=tmp_path / "s.json", timeout=300,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "bad 0\n"
    assert "local from now on" not in r.stderr
    ex = r.stats["excache"]
    assert ex["made_local"] == 0 and ex["evictions"] > 3 * 2048 and ex["fetches"] > 0, ex
    assert ex["peak_resident"] <= ex["capacity_pages"] + 64, ex
    assert _held(mcomponent) == (0, 0)


def test_threads_that_exit_while_others_fault_and_are_evicted_are_joined(mcomponent, tmp_path):
    """Rounds of threads that exit while the others fault and are evicted:
    each exit has the kernel clear the thread's tid word (pthread_join waits
    for it; no fault can be served by then) while glibc discards the stacks
    of the threads before it (MADV_DONTNEED). Before the fix 3 runs in 4 hung
    in pthread_join: that page could not be mapped for an event not read."""
    exe = compile_c(tmp_path, "threads", THREADS_C, flags=("-pthread",))
    ex = _bad_0_within_1m(mcomponent, tmp_path, exe, "4", "1", "40")["excache"]
    assert ex["made_local"] == 0 and ex["evictions"] > 20 * 1024, ex
    assert _held(mcomponent) == (0, 0)


PY_THREADS = textwrap.dedent("""
    from concurrent.futures import ThreadPoolExecutor
    import random
    keep = []
    def work(k):
        rnd = random.Random(k)
        d = {i: [rnd.random() for _ in range(20)] for i in range(3000)}
        keep.append(d)   # all of it stays alive: about 24 MiB, however the threads interleave
        return k, round(sum(sum(v) for v in d.values()), 6), sorted(d.items(), key=lambda kv: kv[1][0])[0][0]
    with ThreadPoolExecutor(8) as ex:   # glibc gives each thread an arena of its own
        for r in ex.map(work, range(12)):
            print(*r)
    print(round(sum(sum(v) for d in keep for v in d.values()), 3))
""")


def test_python_threads_with_their_own_malloc_arenas_print_what_they_print_natively(
        mcomponent, tmp_path):
    want = native([PY, "-c", PY_THREADS])
    r = legorun([PY, "-c", PY_THREADS], stats_file=tmp_path / "s.json", timeout=300,
                options=("--mem", mcomponent, "--excache", "16M"))  # about half its peak RSS
    assert want.returncode == 0 and r.returncode == 0, r.stderr
    assert r.stdout == want.stdout
    ex = r.stats["excache"]
    assert ex["made_local"] == 0 and ex["evictions"] > 0 and ex["fetches"] > 0, ex
    assert _held(mcomponent) == (0, 0)


FORK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
static unsigned char val(size_t i, int seed) { return (unsigned char)((i >> 6) * 7 + seed); }
static size_t fill(unsigned char *p, size_t n, int seed) { for (size_t i = 0; i < n; i += 64) p[i] = val(i, seed); return 0; }
static size_t check(unsigned char *p, size_t n, int seed) { size_t bad = 0; for (size_t i = 0; i < n; i += 64) bad += p[i] != val(i, seed); return bad; }
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20;
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(p, n, 1);                      /* most of it evicted to the mComponent by now */
    pid_t pid = fork();
    if (pid == 0) {
        size_t bad = check(p, n, 1);    /* the parent's memory as of the fork */
        fill(p, n, 2);                  /* then its own */
        bad += check(p, n, 2);
        printf("child bad %zu\n", bad);
        fflush(stdout);
        _exit(bad != 0);
    }
    int st;
    waitpid(pid, &st, 0);
    size_t bad = check(p, n, 1);        /* untouched by the child's writes */
    fill(p, n, 3);
    bad += check(p, n, 3);
    printf("parent bad %zu, child status %d\n", bad, WEXITSTATUS(st));
    return bad != 0;
}
"""


def test_a_forked_child_reads_its_parents_evicted_pages_then_both_diverge(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "fork", FORK_C)
    r = legorun([exe, "8"], stats_file=tmp_path / "s.json", timeout=300,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "child bad 0\nparent bad 0, child status 0\n"
    assert "local" not in r.stderr
    ex = r.stats["excache"]
    assert ex["processes"] == 2 and ex["made_local"] == 0, ex
    assert ex["fetches"] > 2 * 2048, ex  # the child fetched the parent's pages, both fetched their own
    assert _held(mcomponent) == (0, 0)


FORK_ADVICE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#define MB (1 << 20)
static size_t nonzero(unsigned char *p, size_t n) { size_t k = 0; for (size_t i = 0; i < n; i++) k += p[i] != 0; return k; }
int main(void) {
    unsigned char *wipe = mmap(NULL, 2 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *nofork = mmap(NULL, 2 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *big = mmap(NULL, 4 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(wipe, 2 * MB, MADV_WIPEONFORK);
    madvise(nofork, 2 * MB, MADV_DONTFORK);
    memset(wipe, 1, 2 * MB);
    memset(nofork, 2, 2 * MB);
    memset(big, 3, 4 * MB);                 /* wipe and nofork are evicted by now */
    pid_t pid = fork();
    if (pid == 0) {
        /* a fresh mapping where the parent's DONTFORK range was: zeros, not its pages */
        unsigned char *again = mmap(nofork, 2 * MB, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        printf("child: wiped nonzero %zu, remapped nonzero %zu\n", nonzero(wipe, 2 * MB),
               again == nofork ? nonzero(again, 2 * MB) : (size_t)-1);
        fflush(stdout);
        _exit(0);
    }
    waitpid(pid, NULL, 0);
    printf("parent: wipe nonzero %zu, nofork nonzero %zu\n", nonzero(wipe, 2 * MB), nonzero(nofork, 2 * MB));
    return 0;
}
"""


UNMAP_REUSE_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#define MB (1 << 20)
static size_t count(unsigned char *p, size_t n, int v) { size_t k = 0; for (size_t i = 0; i < n; i += 512) k += p[i] == v; return k; }
int main(void) {
    unsigned char *other = mmap(NULL, 4 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *a = mmap(NULL, 4 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(a, 7, 4 * MB);
    memset(other, 1, 4 * MB);                 /* a is evicted: its pages are remote */
    munmap(a, 4 * MB);
    unsigned char *b = mmap(a, 4 * MB, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    size_t fresh = count(b, 4 * MB, 0);
    memset(b, 9, 2 * MB);
    memset(other, 2, 4 * MB);                 /* b's written half is evicted, then read */
    printf("fresh zeros %zu, nines %zu, zeros %zu, sevens %zu\n", fresh,
           count(b, 2 * MB, 9), count(b + 2 * MB, 2 * MB, 0), count(b, 4 * MB, 7));
    fflush(stdout);
    munmap(b, 4 * MB);                        /* on the way out: no Unmap is sent for these */
    munmap(other, 4 * MB);
    return 0;
}
"""


def test_a_mapping_made_where_an_unmapped_one_was_never_sees_its_pages(mcomponent, tmp_path):
    """legorun puts the mComponent's unmap off until the space's next request
    but a fetch: the region mapped in its place is recorded, and stored to,
    after it; the two munmaps on the way out are never sent (the space is
    freed first)."""
    exe = compile_c(tmp_path, "reuse", UNMAP_REUSE_C)
    want = native([exe])
    assert want.stdout == "fresh zeros 8192, nines 4096, zeros 4096, sevens 0\n"
    r = legorun([exe], stats_file=tmp_path / "s.json",
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout
    ops = r.stats["rpcs"]["mComponent"]
    assert ops["unmap"]["count"] == 1 and ops["store"]["pages"] >= 2 * 512, ops
    assert _held(mcomponent) == (0, 0)


def test_wipeonfork_and_dontfork_ranges_behave_in_the_child_as_natively(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "advice", FORK_ADVICE_C)
    want = native([exe])
    r = legorun([exe], stats_file=tmp_path / "s.json", timeout=300,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout == ("child: wiped nonzero 0, remapped nonzero 0\n"
                                       "parent: wipe nonzero 2097152, nofork nonzero 2097152\n")
    assert r.stats["excache"]["processes"] == 2 and r.stats["excache"]["evictions"] > 1024
    assert _held(mcomponent) == (0, 0)


BRK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>
int main(void) {
    void *first = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);  /* remote memory starts here */
    size_t n = 8 << 20, bad = 0;
    unsigned char *h = sbrk(0);
    for (size_t done = 0; done < n; done += 256 << 10) sbrk(256 << 10);  /* grow the heap past the first registration */
    for (size_t i = 0; i < n; i += 64) h[i] = (unsigned char)(i * 7 + 1);
    for (int pass = 0; pass < 3; pass++)
        for (size_t i = 0; i < n; i += 64) bad += h[i] != (unsigned char)(i * 7 + 1);
    sbrk(-(long)(4 << 20));                                   /* shrink: its top is gone */
    sbrk(4 << 20);                                            /* and back: zeros, natively */
    size_t nz = 0; for (size_t i = 4 << 20; i < n; i += 64) nz += h[i] != 0;
    for (size_t i = 0; i < (4 << 20); i += 64) bad += h[i] != (unsigned char)(i * 7 + 1);
    (void)first;
    printf("bad %zu, regrown nonzero %zu\n", bad, nz);
    return bad != 0;
}
"""


def test_the_brk_heap_grown_past_its_first_registration_lives_on_the_mcomponent(
        mcomponent, tmp_path):
    exe = compile_c(tmp_path, "brk", BRK_C)
    want = native([exe])
    r = legorun([exe], stats_file=tmp_path / "s.json", timeout=300,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout == "bad 0, regrown nonzero 0\n"
    ex = r.stats["excache"]
    assert ex["evictions"] > 3 * 2048 and ex["fetches"] > 2 * 2048, ex
    assert ex["peak_resident"] <= ex["capacity_pages"] + 64, ex
    assert _held(mcomponent) == (0, 0)


HOT_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(void) {
    size_t hot_n = 64 * 4096, n = 16 << 20, bad = 0;
    unsigned char *hot = mmap(NULL, hot_n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *cold = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < n; i += 4096) {      /* a stream, with a small hot table written all along */
        cold[i] = (unsigned char)(i >> 12);
        hot[(i >> 12) % 64 * 4096] += 1;
    }
    for (size_t i = 0; i < n; i += 4096) bad += cold[i] != (unsigned char)(i >> 12);
    for (size_t k = 0; k < 64; k++) bad += hot[k * 4096] != (unsigned char)(n / 4096 / 64);
    printf("bad %zu\n", bad);
    return bad != 0;
}
"""


def test_clock_and_2q_keep_a_hot_table_that_fifo_evicts_and_all_keep_every_byte(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "hot", HOT_C)
    fetched = {}
    for policy in ("fifo", "clock", "2q"):
        r = legorun([exe], stats_file=tmp_path / f"{policy}.json", timeout=300,
                    options=("--mem", mcomponent, "--excache", "1M", "--evict", policy))
        assert r.returncode == 0, r.stderr
        assert r.stdout == "bad 0\n"
        ex = r.stats["excache"]
        assert ex["peak_resident"] <= ex["capacity_pages"] + 64, ex
        fetched[policy] = ex["fetches"]
        assert (ex["second_chances"] > 0) == (policy != "fifo"), ex
        assert (ex["refaults"] > 0) == (policy == "2q"), ex
    # FIFO throws the hot pages out once per pass over the cache and fetches
    # them back; CLOCK sees them written, 2Q sees them fault again at once
    assert fetched["clock"] < fetched["fifo"] and fetched["2q"] < fetched["fifo"], fetched
    assert _held(mcomponent) == (0, 0)


MLOCK_FUTEX_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <errno.h>
int main(void) {
    size_t n = 8 << 20, bad = 0;
    unsigned char *locked = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned *word = (unsigned *)(p + 4096);
    if (mlock(locked, 1 << 20)) { perror("mlock"); return 2; }
    memset(locked, 5, 1 << 20);
    *word = 42;
    for (size_t i = 2 * 4096; i < n; i += 64) p[i] = (unsigned char)(i * 7 + 1);   /* the word's page is evicted */
    long r = syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, 41, NULL, NULL, 0);    /* the kernel reads it */
    int e = errno;
    for (size_t i = 2 * 4096; i < n; i += 64) bad += p[i] != (unsigned char)(i * 7 + 1);
    for (size_t i = 0; i < (1 << 20); i++) bad += locked[i] != 5;
    printf("futex %ld %s, bad %zu\n", r, e == EAGAIN ? "EAGAIN" : "?", bad);
    return 0;
}
"""


def test_mlocked_pages_stay_and_futex_reads_an_evicted_word(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "mlock", MLOCK_FUTEX_C)
    want = native([exe])
    r = legorun([exe], stats_file=tmp_path / "s.json", timeout=120,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout == "futex -1 EAGAIN, bad 0\n"
    ex = r.stats["excache"]
    assert ex["locked"] == 256 and ex["evictions"] > 2048, ex  # the 1 MiB mlock()ed stayed
    assert _held(mcomponent) == (0, 0)


PY_FORKS = textwrap.dedent("""
    import multiprocessing as mp, subprocess, sys
    records = [(i, str(i), i * 0.5) for i in range(150000)]   # about 25 MiB, before the fork
    def part(k):
        mine = records[k * 37500:(k + 1) * 37500]
        return sum(r[2] for r in mine) + len({r[1] for r in mine if r[0] % 3})
    if __name__ == "__main__":
        with mp.get_context("fork").Pool(2) as pool:
            print(pool.map(part, range(4)))
        print(subprocess.run(["echo", "from a vfork child"], capture_output=True, text=True).stdout.strip())
        print(sum(r[0] for r in records))
""")


def test_python_multiprocessing_with_fork_and_subprocess_print_what_they_print_natively(
        mcomponent, tmp_path):
    script = tmp_path / "forks.py"
    script.write_text(PY_FORKS)
    want = native([PY, str(script)])
    r = legorun([PY, str(script)], stats_file=tmp_path / "s.json", timeout=300,
                options=("--mem", mcomponent, "--excache", "8M"))
    assert want.returncode == 0 and r.returncode == 0, r.stderr
    assert r.stdout == want.stdout
    ex = r.stats["excache"]
    assert ex["made_local"] == 0 and ex["processes"] >= 4 and ex["evictions"] > 0, ex
    assert _held(mcomponent) == (0, 0)


def test_a_run_without_memory_options_makes_no_memory_rpc(tmp_path):
    r = legorun([PY, "-c", "print(sum(range(10**6)))"], stats_file=tmp_path / "s.json")
    assert r.stdout == "499999500000\n"
    assert "excache" not in r.stats and "mComponent" not in r.stats["rpcs"]


KERNEL_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#define MB (1 << 20)
static void fill(unsigned char *p, size_t n, int seed) { for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 13 + seed); }
static size_t check(unsigned char *p, size_t n, int seed) { size_t bad = 0; for (size_t i = 0; i < n; i++) bad += p[i] != (unsigned char)(i * 13 + seed); return bad; }
int main(int argc, char **argv) {
    size_t n = 4 * MB;
    unsigned char *a = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *b = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(a, n, 1);
    fill(b, n, 2);                                  /* a is evicted by now */
    /* write(2) from an evicted buffer, read(2) into one: the kernel's own faults */
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
    printf("write %zd\n", write(fd, a, n));
    fill(b, n, 3);
    lseek(fd, 0, SEEK_SET);
    printf("read %zd\n", read(fd, b, n));
    printf("b now holds a: bad %zu\n", check(b, n, 1));
    /* madvise(DONTNEED) reads zeros, evicted pages included */
    madvise(a, MB, MADV_DONTNEED);
    size_t nonzero = 0;
    for (size_t i = 0; i < MB; i++) nonzero += a[i] != 0;
    printf("after DONTNEED nonzero %zu, rest bad %zu\n", nonzero, check(a + MB, n - MB, 1));
    /* mremap growth (what realloc does) keeps the contents */
    fill(a, n, 4);
    unsigned char *g = mremap(a, n, 3 * n, MREMAP_MAYMOVE);
    fill(b, n, 5);
    printf("after mremap bad %zu\n", check(g, n, 4));
    memset(g + n, 7, 2 * n);
    size_t bad7 = 0;
    for (size_t i = n; i < 3 * n; i++) bad7 += g[i] != 7;
    printf("grown part bad %zu\n", bad7);
    /* part of a region unmapped, the rest intact */
    munmap(g, MB);
    printf("after munmap bad %zu\n", check(g + MB, n - MB, 4));
    /* a child sees the parent's memory as of the fork, evicted pages included */
    fill(b, n, 6);
    pid_t pid = fork();
    if (pid == 0) {
        size_t bad = check(b, n, 6);
        fill(b, n, 8);
        printf("child bad %zu\n", bad);
        _exit(0);
    }
    waitpid(pid, NULL, 0);
    printf("parent still bad %zu\n", check(b, n, 6));
    return 0;
}
"""


def test_kernel_accesses_madvise_mremap_munmap_and_fork_keep_memory_right(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "kernel", KERNEL_C, flags=("-w",))
    want = native([exe, str(tmp_path / "native.bin")])
    r = subprocess.run([PY, "-m", "legorun", "--mem", mcomponent, "--excache", "1M", "--", exe,
                        str(tmp_path / "guest.bin")], capture_output=True, text=True, timeout=300)
    assert want.returncode == 0
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout
    assert "bad 0" in r.stdout and "nonzero 0" in r.stdout
    assert "local" not in r.stderr  # the forked child had an ExCache of its own
    assert _held(mcomponent) == (0, 0)


PY_GUEST = textwrap.dedent("""
    import random
    random.seed(7)
    data = bytearray(random.randbytes(8 << 20))
    total = sum(data[i] for i in range(0, len(data), 4096))
    recs = [(i, float(i) * 1.5, str(i)) for i in range(40000)]
    floats = sorted(random.random() for _ in range(60000))
    print(total, sum(r[1] for r in recs), round(floats[100], 6))
""")


def test_python_guest_with_an_excache_a_quarter_of_its_data_prints_what_it_prints_natively(
        mcomponent):
    want = native([PY, "-c", PY_GUEST])
    r = subprocess.run([PY, "-m", "legorun", "--mem", mcomponent, "--excache", "4M", "--", PY,
                        "-c", PY_GUEST], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout


def test_spaces_of_a_killed_legorun_are_freed_after_the_lease(mcomponent, tmp_path):
    exe = compile_c(tmp_path, "pattern", PATTERN_C)
    p = subprocess.Popen([PY, "-m", "legorun", "--mem", mcomponent, "--excache", "1M", "--", exe,
                          "8", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and _held(mcomponent)[1] == 0:
        time.sleep(0.1)
    assert _held(mcomponent)[0] == 1
    p.kill()
    p.wait()
    deadline = time.time() + 30
    while time.time() < deadline and _held(mcomponent) != (0, 0):
        time.sleep(0.2)
    assert _held(mcomponent) == (0, 0)


def _memory_lost(r, reason):
    """legorun's way out when memory cannot be served: the guest killed as the
    OOM killer would, one line naming the mComponent and why, status 137."""
    assert r.returncode == 137, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("legorun: mComponent at ") and reason in lines[0], lines[0]
    assert "killed, as the OOM killer would" in lines[0], lines[0]


def test_unreachable_mcomponent_kills_the_guest_in_one_line_once_a_page_must_go_there(tmp_path):
    r = subprocess.run([PY, "-m", "legorun", "--mem", f"unix:{tmp_path}/none.sock", "--excache",
                        "1M", "--", PY, "-c", "x = b'x' * (8 << 20)"],
                       capture_output=True, text=True, timeout=60)
    _memory_lost(r, "no such socket")


def test_a_full_mcomponent_kills_the_guest_in_one_line(tmp_path):
    address = f"unix:{tmp_path}/small.sock"
    server = start_mcomponent(address, "--capacity", "1M")
    try:
        exe = compile_c(tmp_path, "pattern", PATTERN_C)
        r = subprocess.run([PY, "-m", "legorun", "--mem", address, "--excache", "1M", "--",
                            exe, "8", "1"], capture_output=True, text=True, timeout=120)
        _memory_lost(r, "out of capacity")
        assert server.poll() is None  # the server refused, and stays up
        assert _held(address) == (0, 0)  # the space was freed all the same
    finally:
        server.terminate()
        server.wait(10)


READBACK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    size_t pages = (size_t)atol(argv[1]);
    unsigned char *p = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < pages; i++) memset(p + i * 4096, (int)(i % 251) + 1, 4096);
    for (size_t i = 0; i < pages; i++)
        if (p[i * 4096] != (unsigned char)(i % 251 + 1)) {
            printf("page %zu reads %d\n", i, p[i * 4096]);
            return 3;
        }
    printf("all %zu pages read back\n", pages);
    return 0;
}
"""


def test_a_refused_store_fails_the_fetch_after_it_instead_of_reading_back_as_zeros(tmp_path):
    """Write-backs are not waited for (several in flight), so a refusal comes
    late; the fetch after them must see it before it maps a page. Here the
    guest fills an 8 MiB ExCache and one batch more (a couple of evictions,
    their stores in flight and refused: the mComponent holds 16 pages), then
    reads back from its oldest page. Were a refused store's pages fetched as
    absent, they would read as zeros: the guest's own startup pages among
    them (it crashed with SIGSEGV when this rule was taken out), or its
    pages (it prints which one and exits 3)."""
    address = f"unix:{tmp_path}/tiny.sock"
    server = start_mcomponent(address, "--capacity", "64K")
    try:
        exe = compile_c(tmp_path, "readback", READBACK_C)
        pages = (8 << 20) // 4096 + 256
        assert native([exe, str(pages)]).returncode == 0
        r = subprocess.run([PY, "-m", "legorun", "--mem", address, "--excache", "8M", "--",
                            exe, str(pages)], capture_output=True, text=True, timeout=120)
        assert r.stdout == ""
        _memory_lost(r, "out of capacity")
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(10)


def test_an_mcomponent_killed_while_the_guest_runs_kills_the_guest_in_one_line(tmp_path):
    address = f"unix:{tmp_path}/doomed.sock"
    server = start_mcomponent(address)
    exe = compile_c(tmp_path, "pattern", PATTERN_C)
    p = subprocess.Popen([PY, "-m", "legorun", "--mem", address, "--excache", "1M", "--",
                          exe, "8", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 60
        while _held(address)[1] == 0:  # pages are on the server: the guest is under way
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        server.kill()
        server.wait(10)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    _memory_lost(subprocess.CompletedProcess(p.args, p.returncode, out, err), "")


def test_a_run_that_fits_the_excache_makes_no_rpc_and_starts_no_mcomponent(tmp_path):
    """LegoOS's p-local lines: never-written memory is zero-filled here, and
    nothing is sent while every page fits (an unreachable --mem is never asked)."""
    code = "x = b'x' * (4 << 20); y = bytearray(x); print(sum(y[::4096]))"
    want = native([PY, "-c", code])
    r = legorun([PY, "-c", code], stats_file=tmp_path / "s.json",
                options=("--mem", f"unix:{tmp_path}/none.sock", "--excache", "64M"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout
    assert r.stats["excache"]["faults"] > 0 and r.stats["excache"]["evictions"] == 0
    assert "mComponent" not in r.stats["rpcs"]


def test_records_workload_whose_lists_move_with_mremap_prints_what_it_prints_natively(mcomponent):
    """CPython grows a big list with realloc, and glibc moves it with mremap:
    evicted pages must move with it (a 4 MiB ExCache, a ~25 MiB guest)."""
    sample = os.path.join(os.path.dirname(__file__), "..", "samples", "records.py")
    want = native([PY, sample, "100000", "2"])
    r = subprocess.run([PY, "-m", "legorun", "--mem", mcomponent, "--excache", "4M", "--", PY,
                        sample, "100000", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout


def test_excache_events_are_traced_and_its_timeline_drawn(mcomponent, tmp_path):
    import json
    exe = compile_c(tmp_path, "pattern", PATTERN_C)
    r = subprocess.run([PY, "-m", "legorun", "--mem", mcomponent, "--excache", "1M", "--trace",
                        "-e", "trace=excache", "-o", str(tmp_path / "t.txt"), "--stats-json",
                        str(tmp_path / "s.json"), "--", exe, "4", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    kinds = {line.split()[3] for line in (tmp_path / "t.txt").read_text().splitlines()}
    assert {"fault", "fetch", "writeback", "evict"} <= kinds
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["timeline"] and stats["fault_latency_us"]
    # (the README's slack: pages served while an eviction waits, one batch: 32 here)
    assert all(s["resident_pages"] <= s["capacity_pages"] + 32 for s in stats["timeline"])
    out = tmp_path / "r.png"
    p = subprocess.run([PY, "-m", "legorun", "report", str(tmp_path / "s.json"), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_shows_a_guests_space_while_it_runs_and_not_after(mcomponent, tmp_path):
    import json
    exe = compile_c(tmp_path, "pattern", PATTERN_C)

    def spaces():
        p = subprocess.run([PY, "-m", "legorun", "status", mcomponent, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["components"][0]["status"]["spaces"]

    # (long enough for `legorun status` to look while it runs: 60 passes
    # take a few seconds; it then ends by itself)
    p = subprocess.Popen([PY, "-m", "legorun", "--mem", mcomponent, "--excache", "1M", "--", exe,
                          "8", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = 0
    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline and not seen:
        seen = spaces()
        time.sleep(0.1)
    p.wait(120)
    assert seen == 1 and p.returncode == 0
    deadline = time.time() + 30
    while time.time() < deadline and spaces():
        time.sleep(0.2)
    assert spaces() == 0


SIGNALS_EXIT_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>
static volatile long ticks, strays;
static pid_t main_tid;
static void on_alarm(int sig) { ticks++; if (syscall(SYS_gettid) != main_tid) strays++; }
static int threads(void) {
    char line[256]; int n = -1;
    FILE *f = fopen("/proc/self/status", "r");
    while (fgets(line, sizeof line, f)) if (!strncmp(line, "Threads:", 8)) n = atoi(line + 8);
    fclose(f);
    return n;
}
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20;
    main_tid = syscall(SYS_gettid);
    signal(SIGALRM, on_alarm);
    struct itimerval every = {{0, 500}, {0, 500}};   /* a signal every 0.5 ms of CPU... */
    setitimer(ITIMER_REAL, &every, NULL);             /* ...of wall time: mid-eviction too */
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t bad = 0;
    for (int pass = 0; pass < 3; pass++) {
        for (size_t i = 0; i < n; i += 64) p[i] = (unsigned char)((i >> 6) * 7 + pass);
        for (size_t i = 0; i < n; i += 64) bad += p[i] != (unsigned char)((i >> 6) * 7 + pass);
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("bad %zu, signals %s, strays %ld\n", bad, ticks > 0 ? "seen" : "none", strays);
    fprintf(stderr, "threads %d\n", threads());
    fflush(stdout);
    syscall(SYS_exit, bad ? 1 : 3);   /* this thread only, not exit_group: the process ends with it */
    return 0;
}
"""


def test_signals_reach_the_guests_thread_and_its_own_exit_ends_it_with_the_dropper_running(
        mcomponent, tmp_path):
    # The drops of an eviction are done by legorun's dropper thread in the
    # guest (legorun/memory/dropper.py): it never takes the guest's signals,
    # the faulting thread is not stopped for a drop, and a guest whose last
    # thread ends by exit(2) rather than exit_group still ends.
    exe = compile_c(tmp_path, "sigexit", SIGNALS_EXIT_C)
    want = native([exe, "8"])
    assert want.returncode == 3 and want.stderr == "threads 1\n"
    r = legorun([exe, "8"], stats_file=tmp_path / "s.json", timeout=120,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 3, r.stderr
    assert r.stdout == want.stdout == "bad 0, signals seen, strays 0\n"
    assert "threads 2\n" in r.stderr  # the guest's own thread and the dropper
    assert r.stats["excache"]["evictions"] > 8192, r.stats
    # without the signals: far fewer ptrace stops than evictions (batches of 32
    # pages in a 1 MiB ExCache), where each used to stop the thread once or more
    r = legorun([compile_c(tmp_path, "pattern", PATTERN_C), "8", "2"],
                stats_file=tmp_path / "p.json", timeout=120,
                options=("--mem", mcomponent, "--excache", "1M"))
    assert r.returncode == 0 and r.stdout == "bad 0\n", r.stderr
    batches = r.stats["excache"]["evictions"] // 32
    assert batches > 200 and r.stats["ptrace_stops"] < batches // 2, r.stats
    assert _held(mcomponent) == (0, 0)


def test_the_dropper_code_is_the_assembly_of_its_source(tmp_path):
    import shutil
    from legorun.memory import dropper
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("binutils (as, objcopy) are needed")
    src = pathlib.Path(dropper.__file__).with_name("dropper.S")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "d.o"), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "d.o"),
                    str(tmp_path / "d.bin")], check=True)
    assert (tmp_path / "d.bin").read_bytes() == dropper.CODE
