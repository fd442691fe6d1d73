"""The ExCache's per-page loops: legorun/_ext/pagecore.c when it was built,
else these pure-Python versions of the same functions (the reference for
what the C does; LEGORUN_NO_FASTPATH=1 selects them, as it does for the
syscall fast path).

The books stay with the ExCache (excache.py); these walk them page by page.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os

from ..kernel import ptrace as pt
from . import pagemap as PM
from . import uffd as U

PAGE = U.PAGE
ZERO = bytes(PAGE)
_KEY = os.urandom(32)


def _fingerprint(page) -> bytes:
    """32 bytes that tell this page's 4096 bytes from any others': keyed with
    a key drawn when legorun starts, so that two different pages agree only
    by a chance the guest cannot raise (blake2b here; the C build uses NH,
    whose chance is at most 2^-128 and which is ~10x faster: see
    pagecore.c). An eviction compares the fingerprint of a written page with
    that of the bytes fetched for it, and skips the write-back if they agree."""
    if len(page) != PAGE:
        raise ValueError("fingerprint: a page is 4096 bytes")
    return hashlib.blake2b(page, digest_size=32, key=_KEY).digest()


def absent(lo: int, hi: int, stored, resident, inflight) -> list:
    """The pages of [lo, hi) held on the mComponent, neither resident nor in
    a readahead in flight: what a fetch of that window would bring."""
    return [p for p in range(lo, hi, PAGE)
            if p in stored and p not in resident and p not in inflight]


def classify(pm_fd: int, victims: list, stored, dirty, ahead) -> tuple:
    """Sort the (sorted) victims by what their eviction needs, from their
    PAGEMAP_SCAN categories (pm_fd -1: the kernel cannot say; every page
    counts as written). Returns (need: pages to read and store, zeros: still
    the shared zero page, gone: not mapped, clean: how many are as the
    mComponent holds them (written-protected since fetched, not dirty),
    used/unused: prefetched ones written / not written before eviction).
    Raises OSError if PAGEMAP_SCAN fails."""
    need, zeros, gone = [], [], []
    clean = used = unused = 0
    scanner = PM.Scanner(pm_fd) if pm_fd >= 0 else None
    for start, length in runs(victims):
        for page, kind in kinds(scanner, start, start + length):
            if kind is None:
                gone.append(page)
            elif kind & PM.PAGE_IS_PFNZERO:
                zeros.append(page)
            elif not kind & PM.PAGE_IS_WRITTEN and page in stored and page not in dirty:
                clean += 1
            else:
                need.append(page)
            if page in ahead:
                if kind is not None and kind & PM.PAGE_IS_WRITTEN and not kind & PM.PAGE_IS_PFNZERO:
                    used += 1
                else:
                    unused += 1
    return need, zeros, gone, clean, used, unused


def kinds(scanner, start: int, end: int):
    """(page, PAGEMAP_SCAN categories, or None if not mapped) for each page of
    [start, end), from a pagemap.Scanner; with None, every page counts as
    present and written. Raises OSError if PAGEMAP_SCAN fails."""
    if scanner is None:
        for page in range(start, end, PAGE):
            yield page, PM.PAGE_IS_PRESENT | PM.PAGE_IS_WRITTEN
        return
    at = start
    for lo, hi, kind in scanner.categories(start, end):
        for page in range(at, lo, PAGE):
            yield page, None
        if not kind & PM.PAGE_IS_PRESENT:
            kind = None
        for page in range(lo, hi, PAGE):
            yield page, kind
        at = hi
    for page in range(at, end, PAGE):
        yield page, None


def read_pages(pid: int, mem_fd: int, pages: list, prints: dict | None = None) -> tuple:
    """Read the (sorted) pages of a stopped guest: one process_vm_readv per
    contiguous run, page by page through /proc/PID/mem where that falls
    short. Returns (addrs, data: their bytes back to back, zeros: all-zero
    pages (not in data), gone: not readable, same: pages whose fingerprint
    is the one `prints` holds for them (not in data))."""
    addrs, chunks, zeros, gone, same = [], [], [], [], []
    for start, length in runs(pages):
        buf = ctypes.create_string_buffer(length)
        try:
            got = pt.vm_read_into(pid, start, buf, length)
        except OSError:
            got = 0
        raw = buf.raw
        for off in range(0, length, PAGE):
            if off + PAGE <= got:
                data = raw[off:off + PAGE]
            else:
                try:
                    data = os.pread(mem_fd, PAGE, start + off)
                except OSError:
                    data = b""
                if len(data) != PAGE:
                    gone.append(start + off)
                    continue
            if data == ZERO:
                zeros.append(start + off)
            elif prints is not None and prints.get(start + off) == _fingerprint(data):
                same.append(start + off)
            else:
                addrs.append(start + off)
                chunks.append(data)
    return addrs, b"".join(chunks), zeros, gone, same


def install(uffd_fd: int, pages: list, datas: list, wp: bool, prints: dict | None = None,
            books: tuple | None = None) -> tuple:
    """Map pages with these contents (None: zeros), one UFFDIO_COPY per
    contiguous run. A page already there, or outside the registered
    mappings, is skipped. Each page mapped from data (not zeros) gets its
    fingerprint in `prints`. With `books` (resident, stored, ahead), only
    the pages neither in resident nor out of stored are mapped, and each one
    mapped is added to resident (at its young end) and to ahead. Returns (the
    pages mapped, True if the kernel said EAGAIN: the layout is changing,
    the rest was left)."""
    if books is not None:
        if not (isinstance(books, tuple) and len(books) == 3):
            raise TypeError("install: books must be (resident dict, stored set, ahead set)")
        resident, stored, ahead = books
        keep = [k for k, p in enumerate(pages) if p not in resident and p in stored]
        done, again = _py_install(uffd_fd, [pages[k] for k in keep], [datas[k] for k in keep],
                                  wp, prints)
        for p in done:
            resident[p] = None
        ahead.update(done)
        return done, again
    uffd = U.Userfaultfd(uffd_fd)  # (not closed: the fd is the caller's)
    done: list = []
    i = 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and pages[j] == pages[i] + (j - i) * PAGE:
            j += 1
        blob = b"".join(ZERO if d is None else bytes(d) for d in datas[i:j])
        at, length = 0, (j - i) * PAGE
        while at < length:
            err, mapped = uffd.copy_part(pages[i] + at, blob[at:], wp)
            if err == errno.ENOENT and length - at > PAGE:
                err, mapped = uffd.copy_part(pages[i] + at, blob[at:at + PAGE], wp)
            if err in (errno.EEXIST, errno.ENOENT):
                at += PAGE
                continue
            if mapped <= 0:
                return done, True
            done += range(pages[i] + at, pages[i] + at + mapped, PAGE)
            if prints is not None:
                for off in range(at, at + mapped, PAGE):
                    if datas[i + off // PAGE] is not None:
                        prints[pages[i] + off] = _fingerprint(blob[off:off + PAGE])
            at += mapped
        i = j
    return done, False


fingerprint = _fingerprint


def runs(pages: list):
    """Contiguous runs of sorted page addresses as (start, length)."""
    start = prev = None
    for p in pages:
        if start is None:
            start = prev = p
        elif p == prev + PAGE:
            prev = p
        else:
            yield start, prev + PAGE - start
            start = prev = p
    if start is not None:
        yield start, prev + PAGE - start


def views(reply, at: int, n: int) -> list:
    """A fetch reply's pages: for each of its `n` status bytes at `at`, a
    memoryview of the page's bytes (those of the pages present follow the
    statuses back to back) or None (absent: zeros)."""
    data = memoryview(reply)
    if at < 0 or n < 0 or at + n > len(data):
        raise ValueError("page reply shorter than its statuses say")
    statuses = bytes(data[at:at + n])
    off = at + n
    if off + statuses.count(0) * PAGE > len(data):
        raise ValueError("page reply shorter than its statuses say")
    out = []
    for st in statuses:
        if st == 0:
            out.append(data[off:off + PAGE])
            off += PAGE
        else:
            out.append(None)
    return out


def take(reply, at: int, pages: list, ticket, inflight: dict, resident, page: int) -> tuple:
    """A readahead reply (statuses at `at`, as for views) sorted out for a
    fault at `page`: the pages still in flight for this ticket leave
    `inflight` (the others were faulted in, dropped or moved since it was
    sent); returns (whether `page` is among them, its data, the others among
    them that are not resident, their data)."""
    found, first, group, datas = False, None, [], []
    for p, d in zip(pages, views(reply, at, len(pages))):
        if inflight.get(p) != ticket:
            continue
        del inflight[p]
        if p == page:
            found, first = True, d
        elif p not in resident:
            group.append(p)
            datas.append(d)
    return found, first, group, datas


def choose(resident, count: int, pinned, scratch, hot) -> tuple:
    """2Q's victims: the oldest `count` pages of `resident` (in its order)
    in neither `pinned` nor `scratch` and not `hot`, and the hot ones passed
    over on the way (ExCache._choose_2q sends them to the young end)."""
    victims, passed = [], []
    if count <= 0:
        return victims, passed
    for page in resident:
        if page in pinned or page in scratch:
            continue
        if page in hot:
            passed.append(page)
            continue
        victims.append(page)
        if len(victims) == count:
            break
    return victims, passed


def within(pages, start: int, end: int) -> list:
    """The page addresses of the set or dict `pages` in [start, end), by
    whichever is shorter to walk: the range or the collection."""
    if (end - start) // PAGE <= len(pages):
        return [p for p in range(start, end, PAGE) if p in pages]
    return [p for p in pages if start <= p < end]


def _select():
    if os.environ.get("LEGORUN_NO_FASTPATH"):
        return None
    try:
        from .._ext import pagecore
    except ImportError:
        return None
    return pagecore


def run_list(pages: list) -> list:
    """runs() as a list (C where built: an eviction splits 256 victims or more)."""
    return list(runs(pages))


_py_absent, _py_classify, _py_read_pages, _py_install = absent, classify, read_pages, install
_py_run_list, _py_fingerprint = run_list, fingerprint
_py_views, _py_take, _py_within, _py_choose = views, take, within, choose
_C = _select()
if _C is not None:
    absent, classify, read_pages, install = _C.absent, _C.classify, _C.read_pages, _C.install
    run_list, fingerprint = _C.runs, _C.fingerprint
    views, take, within, choose = _C.views, _C.take, _C.within, _C.choose
IMPLEMENTATION = "C" if _C is not None else "Python"
