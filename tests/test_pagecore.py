"""The ExCache's per-page loops (legorun/memory/pagecore.py): the C build and
the pure-Python reference give the same answers, on this process's own
memory, its own pagemap and a userfaultfd of its own."""
from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from legorun.memory import pagecore, uffd as U

PAGE = 4096
C = pytest.importorskip("legorun._ext.pagecore")
IMPLS = {"C": C, "Python": pagecore}
# the reference functions, whichever pagecore selected at import
PY = {name: getattr(pagecore, "_py_" + name) for name in ("absent", "classify", "read_pages", "install")}
PY_VIEWS, PY_TAKE = pagecore._py_views, pagecore._py_take


def _addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


@pytest.fixture
def region():
    """16 pages: 0-3 never touched, 4-7 written, 8-11 written with zeros,
    12-15 only read (the shared zero page)."""
    m = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = _addr(m)
    for i in range(4, 8):
        m[i * PAGE:(i + 1) * PAGE] = bytes([i]) * PAGE
    for i in range(8, 12):
        m[i * PAGE] = 1
        m[i * PAGE] = 0
    for i in range(12, 16):
        assert m[i * PAGE] == 0
    yield m, base
    m.close()


@pytest.fixture
def registered():
    """12 pages of this process's own memory, registered (missing mode) with
    a userfaultfd of its own: (uffd, the mmap, its address). A page not
    mapped there must not be read: nothing would serve its fault."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)  # userfaultfd(2)
    if fd < 0:
        pytest.skip(f"userfaultfd: {os.strerror(ctypes.get_errno())}")
    uffd = U.Userfaultfd(fd)
    m = mmap.mmap(-1, 12 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        uffd.api(0)
        base = _addr(m)
        uffd.register(base, 12 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
        yield uffd, m, base
    finally:
        uffd.close()
        m.close()


def test_absent_keeps_pages_stored_neither_resident_nor_in_flight():
    stored = {p * PAGE for p in range(0, 20)}
    resident = dict.fromkeys([3 * PAGE, 4 * PAGE])
    inflight = {5 * PAGE: 1, 30 * PAGE: 2}
    want = [p * PAGE for p in range(2, 10) if p not in (3, 4, 5)]
    assert C.absent(2 * PAGE, 10 * PAGE, stored, resident, inflight) == want
    assert PY["absent"](2 * PAGE, 10 * PAGE, stored, resident, inflight) == want


def test_runs_splits_sorted_pages_into_contiguous_runs():
    pages = [p * PAGE for p in (1, 2, 3, 7, 9, 10)] + [(1 << 47) - PAGE]
    want = [(PAGE, 3 * PAGE), (7 * PAGE, PAGE), (9 * PAGE, 2 * PAGE), ((1 << 47) - PAGE, PAGE)]
    assert C.runs(pages) == pagecore._py_run_list(pages) == want
    assert C.runs([]) == pagecore._py_run_list([]) == []
    with pytest.raises(TypeError):
        C.runs([PAGE, "x"])
    with pytest.raises(TypeError):
        C.runs((PAGE,))


def test_classify_sorts_victims_by_what_their_eviction_needs(region):
    _, base = region
    pages = [base + i * PAGE for i in range(16)]
    stored = {pages[5], pages[13]}
    dirty = {pages[13]}
    ahead = {pages[4], pages[14]}
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        got = {name: f(fd, pages, stored, dirty, ahead)
               for name, f in (("C", C.classify), ("Python", PY["classify"]))}
    finally:
        os.close(fd)
    assert got["C"] == got["Python"]
    need, zeros, gone, clean, used, unused = got["C"]
    assert gone == pages[0:4]                    # never touched: not mapped
    assert zeros == pages[12:16]                 # still the zero page
    assert need == pages[4:12]                   # written (zeros or not): to read
    assert (clean, used, unused) == (0, 1, 1)    # written pages are not clean
    # without PAGEMAP_SCAN every page counts as present and written
    assert C.classify(-1, pages, stored, dirty, ahead) == \
        PY["classify"](-1, pages, stored, dirty, ahead) == ([*pages], [], [], 0, 2, 0)


def _hole() -> int:
    """An address where nothing is mapped (two pages mapped, the second unmapped)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    at = libc.mmap(None, 2 * PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert libc.munmap(at + PAGE, PAGE) == 0
    return at + PAGE


def test_read_pages_skips_zero_pages_and_reports_unreadable_ones(region):
    m, base = region
    hole = _hole()
    pages = [base + i * PAGE for i in range(4, 12)] + [hole]
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        got = {name: f(os.getpid(), fd, pages)
               for name, f in (("C", C.read_pages), ("Python", PY["read_pages"]))}
    finally:
        os.close(fd)
    assert got["C"] == got["Python"]
    addrs, data, zeros, gone, same = got["C"]
    assert addrs == pages[0:4] and data == b"".join(bytes([i]) * PAGE for i in range(4, 8))
    assert zeros == pages[4:8]
    assert gone == [hole]
    assert same == []


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_read_pages_leaves_out_pages_that_still_hold_what_their_fingerprint_says(impl, region):
    """A written page whose bytes are those fingerprinted (fetched, written,
    written back as it was) is not read out for a write-back; one that
    differs by a single bit, or has no fingerprint, is."""
    m, base = region
    fp = C.fingerprint if impl == "C" else pagecore._py_fingerprint
    read = C.read_pages if impl == "C" else PY["read_pages"]
    pages = [base + i * PAGE for i in range(4, 8)]
    prints = {pages[0]: fp(bytes([4]) * PAGE),                        # as it is
              pages[1]: fp(bytes([5]) * (PAGE - 1) + bytes([5 ^ 0x80])),  # one bit off
              pages[2]: fp(bytes(PAGE))}                              # zeros, not these bytes
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        addrs, data, zeros, gone, same = read(os.getpid(), fd, pages, prints)
    finally:
        os.close(fd)
    assert same == pages[:1]
    assert addrs == pages[1:] and data == b"".join(bytes([i]) * PAGE for i in range(5, 8))
    assert zeros == gone == []


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_fingerprints_tell_pages_apart_and_keep_to_this_process(impl):
    fp = C.fingerprint if impl == "C" else pagecore._py_fingerprint
    page = bytearray(os.urandom(PAGE))
    print_ = fp(bytes(page))
    assert len(print_) == 32 and fp(memoryview(page)) == print_
    for bit in (0, 7, 8 * 2048 + 3, 8 * PAGE - 1):  # every word of the page counts
        page[bit // 8] ^= 1 << bit % 8
        assert fp(bytes(page)) != print_
        page[bit // 8] ^= 1 << bit % 8
    with pytest.raises(ValueError):
        fp(b"short")
    # the key is drawn per process: another process prints the page otherwise
    import subprocess
    import sys
    name = "fingerprint" if impl == "C" else "_py_fingerprint"
    mod = "legorun._ext.pagecore" if impl == "C" else "legorun.memory.pagecore"
    other = subprocess.run([sys.executable, "-c", f"import sys, {mod} as m; "
                            f"sys.stdout.write(m.{name}(bytes({PAGE})).hex())"],
                           capture_output=True, text=True, check=True).stdout
    assert len(other) == 64 and other != fp(bytes(PAGE)).hex()


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_install_maps_runs_skips_pages_already_there_and_keeps_contents(impl, registered):
    uffd, m, base = registered
    fd = uffd.fd
    assert uffd.copy(base + 2 * PAGE, b"\x07" * PAGE)  # there already: skipped
    pages = [base + i * PAGE for i in (0, 1, 2, 3, 6)]
    datas = [b"\x01" * PAGE, memoryview(b"\x02" * PAGE), b"\x03" * PAGE, None, b"\x06" * PAGE]
    install = C.install if impl == "C" else PY["install"]
    fp = C.fingerprint if impl == "C" else pagecore._py_fingerprint
    prints = {}
    done, again = install(fd, pages, datas, False, prints)
    assert (done, again) == ([base, base + PAGE, base + 3 * PAGE, base + 6 * PAGE], False)
    assert [m[i * PAGE] for i in (0, 1, 2, 3, 6)] == [1, 2, 7, 0, 6]
    assert m[PAGE:2 * PAGE] == b"\x02" * PAGE
    # the pages mapped from data have their fingerprints; zeros and the page
    # that was there already have none
    assert prints == {base: fp(b"\x01" * PAGE), base + PAGE: fp(b"\x02" * PAGE),
                      base + 6 * PAGE: fp(b"\x06" * PAGE)}


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_install_with_the_books_maps_only_pages_absent_and_stored_and_enters_them(impl, registered):
    from collections import OrderedDict
    uffd, m, base = registered
    pages = [base + i * PAGE for i in range(6)]
    datas = [bytes([i + 1]) * PAGE for i in range(6)]
    old = base + 9 * PAGE
    resident = OrderedDict([(old, None), (pages[1], None)])  # page 1: faulted in meanwhile
    stored = set(pages) - {pages[4]}                         # page 4: discarded meanwhile
    ahead = set()
    install = C.install if impl == "C" else PY["install"]
    done, again = install(uffd.fd, pages, datas, False, None, (resident, stored, ahead))
    want = [pages[i] for i in (0, 2, 3, 5)]
    assert (done, again) == (want, False)
    assert list(resident) == [old, pages[1], *want]  # at the young end, in order
    assert ahead == set(want)
    assert [m[i * PAGE] for i in (0, 2, 3, 5)] == [1, 3, 4, 6]
    with pytest.raises(TypeError):
        install(uffd.fd, pages, datas, False, None, (resident, stored))


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_install_maps_views_of_one_reply_in_place_and_views_apart_gathered(impl, registered):
    """Pages as a fetch reply's memoryviews (MemoryClient views=True): a run
    whose views lie back to back (the C build maps it from the reply in
    place) and a run whose views do not (out of order, of another reply,
    None: gathered) both land with their own bytes."""
    uffd, m, base = registered
    fd = uffd.fd
    reply = memoryview(b"header" + b"".join(bytes([i]) * PAGE for i in range(1, 9)))
    page = [reply[6 + i * PAGE:6 + (i + 1) * PAGE] for i in range(8)]  # bytes 1..8
    other = memoryview(b"\x09" * PAGE)
    # run 0-3: views back to back; run 5-8: views out of order, one of
    # another reply, and zeros
    pages = [base + i * PAGE for i in (0, 1, 2, 3, 5, 6, 7, 8)]
    datas = page[:4] + [page[5], other, None, page[4]]
    install = C.install if impl == "C" else PY["install"]
    fp = C.fingerprint if impl == "C" else pagecore._py_fingerprint
    prints = {}
    done, again = install(fd, pages, datas, False, prints)
    assert (done, again) == (pages, False)
    want = [1, 2, 3, 4, 6, 9, None, 5]
    assert prints == {p: fp(bytes([b]) * PAGE) for p, b in zip(pages, want) if b is not None}
    # (page 4 is not read: nothing would serve its fault)
    assert [m[i * PAGE] for i in (0, 1, 2, 3, 5, 6, 7, 8)] == [1, 2, 3, 4, 6, 9, 0, 5]
    assert m[:4 * PAGE] == bytes(reply[6:6 + 4 * PAGE])
    assert m[8 * PAGE:9 * PAGE] == b"\x05" * PAGE


def _reply(statuses: bytes, pages: list) -> bytes:
    """A page reply's tail as views() and take() read it: a 3-byte header of
    its own here, the statuses, then the pages present."""
    return b"hdr" + statuses + b"".join(pages)


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_views_are_the_pages_present_in_a_reply_and_none_for_absent_ones(impl):
    views = getattr(C, "views") if impl == "C" else PY_VIEWS
    a, b = bytes([1]) * PAGE, bytes([2]) * PAGE
    raw = bytearray(_reply(bytes([0, 2, 0]), [a, b]))
    got = views(raw, 3, 3)
    assert [None if v is None else bytes(v) for v in got] == [a, None, b]
    # views of the reply itself, in place, back to back
    raw[3 + 3] = 9
    assert got[0][0] == 9
    assert views(raw, 3, 0) == []
    for at, n in ((3, 4), (-1, 1), (len(raw), 1)):  # statuses beyond the reply
        with pytest.raises(ValueError):
            views(raw, at, n)
    with pytest.raises(ValueError):  # a page announced but not there
        views(_reply(bytes([0, 0]), [a]), 3, 2)


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_take_sorts_a_readahead_reply_out_for_the_faulting_page(impl):
    take = getattr(C, "take") if impl == "C" else PY_TAKE
    pages = [p * PAGE for p in range(10, 16)]
    datas = [bytes([p]) * PAGE for p in range(10, 16)]
    statuses = bytes([0, 0, 2, 0, 0, 0])         # page 12: absent (zeros)
    raw = _reply(statuses, [d for d, s in zip(datas, statuses) if s == 0])
    # 11 faulted in meanwhile (its entry went), 14 asked for again by ticket 8
    inflight = {p: 7 for p in pages if p not in (11 * PAGE, 14 * PAGE)}
    inflight[14 * PAGE] = 8
    inflight[99 * PAGE] = 7
    resident = dict.fromkeys([15 * PAGE])        # in flight still, and resident
    found, first, group, got = take(raw, 3, pages, 7, inflight, resident, 13 * PAGE)
    assert found and bytes(first) == datas[3]
    assert group == [10 * PAGE, 12 * PAGE]
    assert bytes(got[0]) == datas[0] and got[1] is None
    # this ticket's pages left `inflight`; another ticket's and pages not in it stay
    assert inflight == {14 * PAGE: 8, 99 * PAGE: 7}
    # the faulting page no longer in flight for it: not found
    inflight = {10 * PAGE: 7}
    found, first, group, got = take(raw, 3, pages, 7, inflight, {}, 13 * PAGE)
    assert (found, first, group, [bytes(d) for d in got]) == (False, None, [10 * PAGE], [datas[0]])
    assert inflight == {}
    with pytest.raises(ValueError):
        take(raw, 3, pages + [16 * PAGE, 17 * PAGE], 7, {}, {}, 13 * PAGE)


@pytest.mark.parametrize("impl", ["C", "Python"])
def test_messages_reads_every_fault_waiting_on_the_userfaultfd(impl, registered):
    """Two threads fault on pages nobody serves yet: one read returns both
    messages (event, flags, address, thread id); served, the threads go on."""
    import select
    import threading
    import time
    uffd, m, base = registered
    read = (lambda: C.messages(uffd.fd)) if impl == "C" else (lambda: list(uffd._messages()))
    assert read() == []
    seen = []
    libc = ctypes.CDLL(None)  # (its calls let go of the GIL: the faulting threads block in them)

    def touch(i: int) -> None:
        byte = ctypes.c_char()
        libc.memcpy(ctypes.byref(byte), ctypes.c_void_p(base + i * PAGE), ctypes.c_size_t(1))
        seen.append(byte.value[0])

    threads = [threading.Thread(target=touch, args=(i,)) for i in (1, 5)]
    for t in threads:
        t.start()
    got, deadline = [], time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        select.select([uffd.fd], [], [], 1)
        got += read()
    assert sorted(msg[2] for msg in got) == [base + PAGE, base + 5 * PAGE]
    assert all(msg[0] == U.UFFD_EVENT_PAGEFAULT for msg in got)
    for i in (1, 5):
        assert uffd.copy(base + i * PAGE, bytes([i]) * PAGE)
    for t in threads:
        t.join(10)
    assert sorted(seen) == [1, 5]
    with pytest.raises(OSError):
        C.messages(-1) if impl == "C" else list(U.Userfaultfd(-1)._messages())


def test_within_finds_the_pages_of_a_range_walking_the_range_or_the_collection():
    from collections import OrderedDict
    pages = [p * PAGE for p in (1, 2, 5, 9, 40)]
    for books in (set(pages), dict.fromkeys(pages), OrderedDict.fromkeys(pages)):
        for start, end in ((0, 6 * PAGE), (2 * PAGE, 3 * PAGE), (0, 1 << 40), (6 * PAGE, 2 * PAGE)):
            want = sorted(p for p in pages if start <= p < end)
            assert sorted(C.within(books, start, end)) == want, (type(books), start, end)
            assert sorted(pagecore._py_within(books, start, end)) == want
    with pytest.raises(TypeError):
        C.within(pages, 0, PAGE)


def test_choose_takes_the_oldest_pages_but_those_kept_and_passes_over_the_hot_ones():
    from collections import OrderedDict
    import random
    rnd = random.Random(3)
    for _ in range(200):
        order = rnd.sample(range(64), 64)
        resident = OrderedDict.fromkeys(p * PAGE for p in order)
        pinned = {p * PAGE for p in rnd.sample(range(64), 5)}
        scratch = {p * PAGE for p in rnd.sample(range(64), 2)}
        hot = OrderedDict.fromkeys(p * PAGE for p in rnd.sample(range(64), rnd.randrange(20)))
        count = rnd.randrange(0, 70)
        got = C.choose(resident, count, pinned, scratch, hot)
        assert got == pagecore._py_choose(resident, count, pinned, scratch, hot)
        victims, passed = got
        kept = [p for p in resident if p not in pinned and p not in scratch]
        cold = [p for p in kept if p not in hot]
        assert victims == cold[:count]
        # the hot pages met before the last victim (all of them if the cold ran out)
        end = kept.index(victims[-1]) if victims and len(victims) == count else len(kept)
        assert passed == [p for p in kept[:end] if p in hot]
