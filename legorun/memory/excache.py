"""The ExCache: a bounded set of a guest process's anonymous pages stays
resident; the rest lives on the mComponent (LegoOS's pComponent cache).

It covers the anonymous private mappings a process makes with mmap after it
starts (malloc's large blocks, CPython's arenas, thread stacks), its brk heap
and its main stack, for all of its threads: FIFO eviction (LegoOS's best), dirty pages written back (an
all-zero one costs nothing), clean ones dropped, never-written pages
zero-filled locally without an RPC. A forked child gets an ExCache of its
own (UFFD_EVENT_FORK hands its userfaultfd over; the mComponent copies the
space copy-on-write); a vfork child runs in its parent's ExCache until it
execs.

Dropping a page needs madvise(MADV_DONTNEED) run by the guest itself: every
thread of the process is interrupted (PTRACE_INTERRUPT), and the faulting
one is single-stepped through a `syscall` instruction of its vDSO.
"""
from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict, deque
from itertools import islice, repeat

from ..stats import Latencies
from ..kernel import ptrace as pt
from .. import memwire
from . import pagecore as PC
from .dropper import Dropper
from . import pagemap as PM
from . import uffd as U

PAGE = U.PAGE
ZERO = bytes(PAGE)
BATCH = 64                  # the smallest cache: two batches (MemoryManager.batch)
PREFETCH = 16               # pages fetched with a missed one that starts no stream (fault-around)
ASYNC_WINDOW = 64           # a stream this wide also asks for its next window ahead of the guest
ASYNC_READAHEAD = True      # (the switch, for measuring without it)
AHEAD_WINDOWS = 2           # windows of a stream in flight at once (a pipeline two deep)
READAHEAD_MAX = 256         # the most a stream's window grows to (1 MiB: one RPC costs ~0.7 ms, 16 pages ~0.26)
STREAMS = 8                 # sequential streams followed at once per process
LEAP_SLACK = 16             # pages a walk's repeated leap may differ by (_leap)
LEAPS = 8                   # leaps remembered
LEAP_FROM = 3               # a leap is from one of the streams of the last this many misses
WRITEBACKS_AHEAD = 4        # write-backs in flight at once (a refusal surfaces at most this many later)
ZERO_AROUND = 256            # pages zero-filled with a missed one while the ExCache has room
PRINT_WINDOW = 2048         # fingerprinted victims per look at whether fingerprints pay
PRINT_MIN_HITS = 0.05       # the share of them found unchanged below which they do not
PRINT_PAUSE = 8             # windows' worth of fetched pages then left without one
PROTECT_WINDOW = 1024       # write-protected prefetched victims per look at whether protecting pays
PROTECT_MAX_WRITTEN = 0.5   # the share of them written above which it does not
PROTECT_PAUSE = 16          # windows' worth of fetched pages then mapped writable before a sample
NR_MADVISE = 28
NR_PROCESS_MADVISE = 440
PIDFD_SELF_THREAD = -10000  # Linux 6.14+: "the calling thread" for pidfd arguments
IOV_MAX = 1024
MADV_DONTNEED = 4
FEATURES = U.UFFD_FEATURE_EVENT_FORK | U.UFFD_FEATURE_EVENT_REMAP | U.UFFD_FEATURE_EVENT_REMOVE | U.UFFD_FEATURE_EVENT_UNMAP \
    | U.UFFD_FEATURE_THREAD_ID | U.UFFD_FEATURE_WP_ASYNC
SPACE_ID_BYTES = 16


class MemoryStats:
    def __init__(self) -> None:
        self.faults = 0          # page faults served
        self.zero_fills = 0      # pages served locally: never written before
        self.fetches = 0         # pages served from the mComponent (prefetched ones included)
        self.evictions = 0       # pages dropped from the ExCache
        self.writebacks = 0      # evicted pages stored (all-zero ones skipped)
        self.clean_drops = 0     # evicted pages the mComponent already held as they were: no write-back
        self.unchanged = 0       # evicted pages written since fetched, back to what was fetched: no write-back
        self.deferred = 0        # evictions put off: the fault came from inside a syscall
        self.prefetched = 0      # evicted pages brought back with a missed neighbour
        self.prefetch_used = 0   # prefetched pages written before their eviction (of those write-protected)
        self.prefetch_unused = 0  # prefetched pages evicted unwritten (never used, or only read; as above)
        self.second_chances = 0  # pages CLOCK kept because they were written since its last pass
        self.refaults = 0        # pages 2Q saw fault again soon after their eviction (kept hot)
        self.locked = 0          # victims found mlock()ed: left resident, outside the budget
        self.not_present = 0     # victims found missing when evicted (books out of step)
        self.peak_resident = 0
        self.processes = 0       # processes whose memory was remote
        self.made_local = 0      # processes that went local (thread or child)

    def as_dict(self) -> dict:
        return dict(vars(self))


def find_syscall_insn(pid: int) -> int:
    """The address of a `syscall` instruction (0f 05) in the guest's vDSO."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                break
        else:
            raise OSError("no vDSO")
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        code = os.pread(fd, hi - lo, lo)
    finally:
        os.close(fd)
    at = code.find(b"\x0f\x05")
    if at < 0:
        raise OSError("no syscall instruction in the vDSO")
    return lo + at


class ExCache:
    """One process's (one mm's) resident pages, evicted pages and regions."""

    def __init__(self, manager, pid: int, uffd: U.Userfaultfd, insn: int) -> None:
        self.manager = manager
        self.pid = pid
        self.uffd = uffd
        # The space id is chosen here (a capability: 128 random bits); the
        # space is created on the mComponent at the first page it must hold,
        # so a run whose memory fits the ExCache makes no RPC at all.
        self.space = os.urandom(SPACE_ID_BYTES)  # (what secrets.token_bytes is; 5 ms less to import)
        self.created = False
        self.insn = insn
        self.resident: OrderedDict = OrderedDict()   # page -> None, oldest first
        self.stored: set = set()                     # pages whose data is on the mComponent
        self.ahead: set = set()                      # resident pages that came as prefetch
        self.pinned: set = set()                     # resident pages never to evict (ensure)
        self.forked: list = []                       # child uffds (FORK events) not yet claimed
        self.heap_end = None                         # the brk heap's end as last registered
        self.dirty: set = set()                      # written, then write-protected again (CLOCK)
        # resident page -> fingerprint of the mComponent's copy of it, for the
        # pages fetched (pagecore.fingerprint): a written page that still
        # holds those bytes is not written back. An entry goes when the page
        # leaves the ExCache or the mComponent's copy changes (store, discard,
        # unmap, remap), so a page never zero-filled or moved meanwhile has one.
        self.prints: dict = {}
        # (a read-only scan never writes what it fetched: fingerprints only
        # cost it, ~0.5 us a page; they are taken while they pay: evict)
        self.printing = True
        self.print_seen = self.print_hits = 0        # fingerprinted victims, and unchanged ones
        self.print_resume = 0                        # fetched pages to go before printing again
        # (fetched pages are mapped write-protected, so that an eviction
        # tells the clean ones without reading them; where the guest writes
        # most of them anyway, each write costs it a fault, and they are
        # mapped writable instead, their fingerprints telling the clean
        # ones: _protecting)
        self.protecting = True
        self.protect_seen = self.protect_written = 0  # protected prefetched victims, and written ones
        self.protect_resume = 0                      # (not protecting) fetched pages to go before a sample
        self.protect_sample = 0                      # fetched pages still to protect as that sample
        self.ghost: OrderedDict = OrderedDict()      # recently evicted pages, oldest first (2Q)
        self.hot: OrderedDict = OrderedDict()        # resident pages that faulted again soon (2Q)
        self.sharers: dict = {}                      # vfork child tid -> its blocked parent tid
        self.regions: list = []                      # [start, end, mapped on the mComponent]
        self.mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        self.pagemap = PM.Scanner(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY))
        self.writebacks: list = []                   # store tickets not yet collected
        self.storing: dict = {}                      # page -> the newest of those tickets storing it
        self.stores: dict = {}                       # ticket -> the pages it stores
        self.unmaps: list = []                       # [start, end) unmaps not sent yet (_put_off_unmap)
        self.streams: list = []                      # [start, end, window, continued, down, origin, leap] of recent fetches, newest last
        self.leaps = deque(maxlen=LEAPS)             # how far recent misses that started a stream were from where streams began (_leap)
        self.initial = PREFETCH                      # the window of a new stream (_readahead)
        self.zero_next = None                        # the page after the last zero-filled run
        self.inflight: dict = {}                     # page -> ticket of a readahead fetch not yet collected
        self.tickets: OrderedDict = OrderedDict()    # readahead ticket -> its pages, oldest first
        self.drop_batched = None                     # process_madvise works here: None until known
        self.dropper = None                          # the Dropper thread; None: not tried yet, False: none
        self.scratch: set = set()                    # pages under _drop_all's iovec: kept resident
        self.dropping: set = set()                   # the victims of the drop under way: their faults wait,
        self.drop_tid = 0                            # but those of the thread the drop is injected into

    def remote(self, fetching: bool = False):
        """The mComponent client, with this process's space created on it and
        the unmaps put off so far sent, unless only `fetching`: a fetch asks
        for pages of the books, which hold none of an unmapped range."""
        client = self.manager.client()
        if not self.created:
            client.create_space(self.space)
            self.created = True
        if self.unmaps and not fetching:
            unmaps, self.unmaps = self.unmaps, []
            for start, end in unmaps:
                client.unmap(self.space, start, end - start)
        return client

    # ---- regions

    def register(self, start: int, length: int, populated: bool = False) -> None:
        """Serve the faults of [start, start+length) from now on; with
        `populated`, the pages the kernel already has there join the books as
        resident (and so may be evicted like the rest)."""
        length = (length + PAGE - 1) & ~(PAGE - 1)
        self.uffd.register(start, length)
        self.regions.append([start, start + length, False])
        if populated and self.pagemap is not None:
            try:
                kinds = self.pagemap.categories(start, start + length)
            except OSError:
                return
            for lo, hi, kind in kinds:
                if kind & PM.PAGE_IS_PRESENT:
                    for page in range(lo, hi, PAGE):
                        self.resident[page] = None

    def adopt_heap(self) -> None:
        """Register the brk heap as it is now (its pages already there join the
        ExCache as resident), and follow its growth from here on (heap_moved)."""
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                if line.rstrip().endswith("[heap]"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    self.heap_end = hi
                    try:
                        self.register(lo, hi - lo, populated=True)
                    except OSError:
                        pass  # a heap the uffd cannot take stays local
                    return
        with open(f"/proc/{self.pid}/stat") as f:  # no heap yet: it starts at start_brk
            fields = f.read().rpartition(")")[2].split()
        self.heap_end = (int(fields[45]) + PAGE - 1) & ~(PAGE - 1)  # field 48, start_brk

    def adopt_stack(self) -> None:
        """Register the main thread's stack as it is now (its pages join the
        ExCache as resident). It grows down inside the same mapping, so the
        registration covers its growth; a fault below the part known is
        looked up in the kernel's maps (_region)."""
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                if line.rstrip().endswith("[stack]"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    try:
                        self.register(lo, hi - lo, populated=True)
                    except OSError:
                        pass  # a stack the uffd cannot take stays local
                    return

    def heap_moved(self, brk: int) -> None:
        """brk returned `brk`: register what the heap grew by (its shrink is an
        UNMAP event)."""
        end = (brk + PAGE - 1) & ~(PAGE - 1)
        if self.heap_end is not None and end > self.heap_end:
            try:
                self.register(self.heap_end, end - self.heap_end)
            except OSError:
                pass  # not a mapping the uffd can take: it stays local
        self.heap_end = end

    def _region(self, page: int):
        for r in self.regions:
            if r[0] <= page < r[1]:
                return r
        # a region that grew in place (mremap, brk-like growth): ask the kernel
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= page < hi:
                    region = [lo, hi, False]
                    self.regions = [r for r in self.regions if r[1] <= lo or hi <= r[0]]
                    self.regions.append(region)
                    return region
        return None

    def _unrecorded_span(self, region: list) -> tuple:
        """[lo, hi) of the regions around `region` that lie back to back with
        it, none recorded on the mComponent yet: recorded by one Map. CPython
        maps each 1 MiB arena on its own, just below the last, and an
        eviction reaches one some capacity's worth of arenas later: the
        arenas made since are recorded with it instead of one round trip
        each."""
        lo, hi = region[0], region[1]
        by_end = {r[1]: r for r in self.regions if not r[2]}
        by_start = {r[0]: r for r in self.regions if not r[2]}
        while lo in by_end:
            lo = by_end.pop(lo)[0]
        while hi in by_start:
            hi = by_start.pop(hi)[1]
        return lo, hi

    def _forget(self, start: int, end: int) -> None:
        # (the loops run in C: a process that exits unmaps its arenas one by
        # one, hundreds of megabytes of pages to forget)
        gone = PC.within(self.inflight, start, end)  # their readahead data is stale now
        deque(map(self.inflight.pop, gone), maxlen=0)
        deque(map(self.prints.pop, PC.within(self.prints, start, end)), maxlen=0)
        gone = PC.within(self.resident, start, end)
        deque(map(self.resident.pop, gone), maxlen=0)
        self.ahead.difference_update(gone)
        self.dirty.difference_update(gone)
        if self.hot:
            deque(map(self.hot.pop, gone, repeat(None)), maxlen=0)
        deque(map(self.ghost.pop, PC.within(self.ghost, start, end)), maxlen=0)
        self.stored.difference_update(PC.within(self.stored, start, end))

    def unmapped(self, start: int, end: int) -> None:
        self._forget(start, end)
        kept = []
        for r in self.regions:
            if r[1] <= start or end <= r[0]:
                kept.append(r)
                continue
            if r[2]:
                self._put_off_unmap(max(r[0], start), min(r[1], end))
            if r[0] < start:
                kept.append([r[0], start, r[2]])
            if end < r[1]:
                kept.append([end, r[1], r[2]])
        self.regions = kept

    def _put_off_unmap(self, start: int, end: int) -> None:
        """An unmap for the mComponent, sent before the next request of this
        space but a fetch (remote()), merged with the one before it if they
        touch. The books here forgot the range already, so no fetch asks for
        its pages; a new region there is recorded (Map) after the unmap, and
        a store waits for it too (capacity it frees). A process
        that exits frees its arenas one by one (CPython: 249 munmaps of 1 MiB
        at the end of a records run), each a round trip behind a barrier;
        they now end as one, or as nothing when the space is freed next."""
        unmaps = self.unmaps
        if unmaps and unmaps[-1][1] == start:
            unmaps[-1][1] = end
        elif unmaps and unmaps[-1][0] == end:
            unmaps[-1][0] = start
        else:
            unmaps.append([start, end])

    def protected(self, start: int, length: int, prot: int) -> None:
        """mprotect succeeded: the mComponent's record of the regions it holds
        follows (a region it has not been told of yet is recorded at its
        first store)."""
        end = start + ((length + PAGE - 1) & ~(PAGE - 1))
        if self.created and any(r[2] and r[0] < end and start < r[1] for r in self.regions):
            self.remote().protect(self.space, start, end - start, prot)

    def removed(self, start: int, end: int) -> None:
        """madvise(DONTNEED/FREE) by the guest: the range reads as zeros."""
        mapped = any(r[2] and r[0] < end and start < r[1] for r in self.regions)
        if mapped and PC.within(self.stored, start, end):
            self.remote().discard(self.space, start, end - start)
        self._forget(start, end)

    def remapped(self, old: int, new: int, length: int) -> None:
        """mremap moved [old, old+length) to new: its pages move with it.

        The evicted ones are moved here, by reading them at the old address
        and storing them at the new one (then dropping the old range): that
        keeps the mComponent's record exact however the regions were learned.
        """
        delta = new - old
        self._drop_readahead()
        self.ghost.clear()  # (2Q's memory of the moved pages is not worth moving)
        self.hot.clear()
        moving = sorted(p for p in PC.within(self.stored, old, old + length)
                        if p not in self.resident)
        for page in PC.within(self.prints, old, old + length):
            del self.prints[page]  # (moved, a page is stored anew: see below)
        moved = OrderedDict()
        for page in sorted(PC.within(self.resident, old, old + length)):
            del self.resident[page]
            moved[page + delta] = None
            self.ahead.discard(page)
            if page in self.dirty:
                self.dirty.discard(page)
                self.dirty.add(page + delta)
        self.resident.update(moved)
        # a moved resident page is no longer held at its new address: it is
        # read and stored at its eviction, clean or not (see evict)
        self.stored.difference_update(PC.within(self.stored, old, old + length))
        if not self.created:
            self._move_regions(old, new, length)
            return
        client = self.remote()
        self.collect_writebacks()
        pages = []
        for i in range(0, len(moving), 512):
            chunk = moving[i:i + 512]
            pages += [(p + delta, d) for p, d in zip(chunk, client.fetch(self.space, chunk)) if d]
        if any(r[2] and r[0] < old + length and old < r[1] for r in self.regions):
            client.unmap(self.space, old, length)
        region = self._move_regions(old, new, length)
        if pages:
            client.map(self.space, new, length, if_absent=True)
            region[2] = True
            for i in range(0, len(pages), 512):
                client.store(self.space, pages[i:i + 512])
            self.stored.update(p for p, _ in pages)

    def _move_regions(self, old: int, new: int, length: int) -> list:
        self.regions = [r for r in self.regions if r[1] <= old or old + length <= r[0]]
        self.regions = [r for r in self.regions if r[1] <= new or new + length <= r[0]]
        region = [new, new + length, False]
        self.regions.append(region)
        return region

    # ---- faults

    def fault(self, tracer, address: int, tid: int, evict: bool = True,
              write: bool = False) -> bool:
        """Serve a missing page: from the mComponent if it was evicted, else
        zeros. A page legorun believes resident may fault again (a signal woke
        the thread, or the page was dropped while this fault waited): serving
        it again is harmless (EEXIST just wakes the thread). False: try again
        later (the mm was changing).

        Fetched pages are mapped write-protected (WP_ASYNC: the kernel lifts
        it at the first write, with no message), so an eviction knows which
        ones are still as the mComponent holds them, unless the guest writes
        most of them anyway (_protecting); the faulting page of a write
        fault is mapped writable at once."""
        page = address & ~(PAGE - 1)
        stats = self.manager.stats
        began = time.perf_counter()
        stopped = False
        group = [page]
        wake_late = False  # the faulting thread is to be woken at the end
        stored = page in self.stored
        if stored and page in self.ghost:  # 2Q: evicted a moment ago, wanted again
            self._refault(page)
        region = self._region(page) if not stored else None
        arrived = None  # the data of group, from a readahead fetch sent earlier
        hint = None
        if stored and page in self.inflight:
            came, hint = self._arrived(self.inflight[page], page)
            if came is not None:
                first, rest, datas = came
                group += rest
                arrived = [first] + datas
        later = ()
        # fault-around: the pages that follow come too (not while evicting is
        # impossible: that would only overfill the cache)
        if not evict:
            del group[1:]
        elif stored:
            more, later = self._readahead(page, hint, fetching=arrived is None)
            if arrived is None:
                group += more
        else:
            # never-written memory is zero-filled in larger runs while the cache
            # has room, and where first touches go in order (memset, a growing
            # array) however full it is
            if page == self.zero_next:
                ahead = min(READAHEAD_MAX, max(PREFETCH, self.manager.capacity // 4))
            elif len(self.resident) + ZERO_AROUND > self.manager.capacity:
                ahead = PREFETCH
            else:
                ahead = ZERO_AROUND
            # up to the first page resident or stored, within the region
            # (looked up in C: a write pass zero-fills 256 pages a fault)
            end = min(page + ahead * PAGE, region[1]) if region is not None else page
            if end > page + PAGE:
                taken = PC.within(self.resident, page + PAGE, end) \
                    + PC.within(self.stored, page + PAGE, end)
                if taken:
                    end = min(taken)
                group += range(page + PAGE, end, PAGE)
            self.zero_next = group[-1] + PAGE
        incoming = len(group) - (page in self.resident)  # (a page served again is there)
        if evict and len(self.resident) + incoming > self.manager.capacity:
            stopped = self._make_room(tracer, tid, incoming)
            if len(self.resident) + incoming > self.manager.capacity:
                del group[1:]  # no room was made (put off): the missed page alone
        try:  # (whatever happens, a thread left asleep is woken at the end)
            try:
                if page in self.stored:
                    # (memoryviews of the replies: the rest is mapped from them in place)
                    if arrived is not None:
                        datas = arrived[:len(group)]
                    else:
                        datas = self._fetch(group, views=True)
                    stats.fetches += len(group)
                    stats.prefetched += len(group) - 1
                    # the faulting page first, its thread woken at the end of this
                    # fault: it shares legorun's CPU, and woken at once it preempts
                    # legorun between the copies, to fault on the next page not yet
                    # there (records at 25%, 3 alternated pairs: 3.76 -> 3.57 s)
                    first = datas[0]
                    protect = self._protecting(len(group))
                    self.uffd.copy(page, ZERO if first is None else bytes(first),
                                   wp=protect and not write, wake=len(group) == 1)  # EEXIST: it is there
                    wake_late = len(group) > 1
                    self.resident[page] = None
                    if first is not None and self._printing(len(group)):
                        self.prints[page] = PC.fingerprint(first)
                    # the rest (write-protected, unless that does not pay), one
                    # UFFDIO_COPY per run (pages made resident or dropped meanwhile
                    # are skipped; at EAGAIN the layout is changing and the rest is
                    # left to their faults); `ahead` holds the protected ones
                    if len(group) > 1:
                        PC.install(self.uffd.fd, group[1:], datas[1:], protect,
                                   self.prints if self.printing else None,
                                   (self.resident, self.stored, self.ahead if protect else set()))
                elif len(group) > 1 and (self.uffd.copy_zeros(page, len(group) * PAGE) if write
                                         else self.uffd.zero(page, len(group) * PAGE)):
                    # a write fault: what follows is most likely written too (an
                    # arena, a memset), so fresh pages rather than the zero page,
                    # which would cost the guest a copy-on-write fault per page
                    stats.zero_fills += len(group)
                    self.resident.update(zip(group, repeat(None)))
                else:
                    stats.zero_fills += 1
                    if not (self.uffd.copy_zeros(page, PAGE) if write else self.uffd.zero(page)):
                        self.uffd.wake(page, PAGE)
                    self.resident[page] = None
            except BlockingIOError:
                # EAGAIN: the mm is changing (an event not yet read, e.g. legorun's
                # own madvise in flight): the fault is served again later
                if stopped:
                    pt.cont(tid)
                return False
            stats.faults += 1
            stats.peak_resident = max(stats.peak_resident, len(self.resident))
            if stopped:
                pt.cont(tid)
            if later:  # the stream runs on: ask for its next window (after the
                # fetch above, whose reply would wait behind it; after the install,
                # so that no page in it is also resident; before the wake, which
                # would let the guest run through the window first: pagepath's
                # page-in, 3 alternated pairs, ~910 -> ~965 MB/s)
                self._send_ahead(later)
        finally:
            if wake_late:
                self.uffd.wake(page, PAGE)
        self.manager.fault_done(self, page, len(group), stored, time.perf_counter() - began)
        return True

    def _printing(self, fetched: int) -> bool:
        """Whether the `fetched` pages being mapped get fingerprints (a
        pause after fingerprints did not pay ends after PRINT_PAUSE
        windows' worth of fetched pages)."""
        if not self.printing:
            self.print_resume -= fetched
            if self.print_resume <= 0:
                self.printing = True
        return self.printing

    def _protecting(self, fetched: int) -> bool:
        """Whether the `fetched` pages being mapped are write-protected.

        Protected, a page the guest only reads is dropped at its eviction
        without being read; but each page it writes costs it a write fault
        (~1.6 us here: records at 25%, 0.3 s of the guest's 1.7 s). Every
        PROTECT_WINDOW protected prefetched pages evicted, if more than
        PROTECT_MAX_WRITTEN of them were written, fetched pages are mapped
        writable: an eviction then reads each and skips the write-back of
        those whose fingerprint says they hold what was fetched (~1.3 us a
        page, for the clean ones only: a written page is read either way).
        Meanwhile a sample of PROTECT_WINDOW fetched pages is protected
        every PROTECT_PAUSE windows' worth, to tell when that changes.
        Without fingerprints (paused: _printing), or under CLOCK, whose
        reference bit the protection is, pages stay protected."""
        if self.protecting or not self.printing or self.manager.policy == "clock":
            return True
        if self.protect_sample > 0:
            self.protect_sample -= fetched
            return True
        self.protect_resume -= fetched
        if self.protect_resume <= 0:
            self.protect_sample = PROTECT_WINDOW
            self.protect_resume = PROTECT_PAUSE * PROTECT_WINDOW
        return False

    def _protect_paid(self, written: int, clean: int) -> None:
        """An eviction met protected prefetched victims: `written` of them
        written since, `clean` not. A verdict on protecting (_protecting)
        every PROTECT_WINDOW of them (half as many while not protecting: a
        sample's pages may be unmapped before their eviction)."""
        if not (written or clean):
            return
        self.protect_seen += written + clean
        self.protect_written += written
        if self.protect_seen >= (PROTECT_WINDOW if self.protecting else PROTECT_WINDOW // 2):
            was = self.protecting
            self.protecting = self.protect_written <= PROTECT_MAX_WRITTEN * self.protect_seen
            if was and not self.protecting:
                self.protect_resume = PROTECT_PAUSE * PROTECT_WINDOW
            self.protect_seen = self.protect_written = 0

    def _prints_paid(self, printed: int, unchanged: int) -> None:
        """An eviction met `printed` fingerprinted victims, `unchanged` of
        them written back to their fetched bytes: every PRINT_WINDOW of them,
        fingerprints pause if fewer than PRINT_MIN_HITS were."""
        if not printed:
            return
        self.print_seen += printed
        self.print_hits += unchanged
        if self.print_seen >= PRINT_WINDOW:
            if self.print_hits < PRINT_MIN_HITS * self.print_seen:
                self.printing = False
                self.print_resume = PRINT_PAUSE * PRINT_WINDOW
            self.print_seen = self.print_hits = 0

    def _fetch(self, pages: list, views: bool = False) -> list:
        """Fetch these pages now. If no write-back in flight stores any of
        them, the fetch overtakes the frames in flight (MemoryClient's
        express fetch). Otherwise it follows them: their replies come before
        its reply and are collected (no wait) before any page is mapped, so
        that a refused one fails here instead of its pages reading as zeros."""
        express = self.storing.keys().isdisjoint(pages)
        datas = self.remote(fetching=True).fetch(self.space, pages, views=views, express=express)
        if not express:
            self.collect_writebacks()
        return datas

    def _readahead(self, page: int, hint: tuple | None = None, fetching: bool = True) -> tuple:
        """The evicted pages to fetch with a missed one at `page`: those of a
        window beside it that are neither resident nor never-written (resident
        ones are skipped, not a stop: CPython's size-class pools interleave
        several streams in one arena).

        A miss just past a recent fetch's window continues its stream
        upwards, one just below it continues it downwards (CPython walks many
        of its pools from the top); the stream's window then doubles, up to
        READAHEAD_MAX (and a quarter of the cache). Any other miss starts a
        stream with `self.initial` pages after it: PREFETCH at first, halved
        each time a stream is forgotten without having been continued, doubled
        back when one is continued. Random touches (sorting, hashing) so come
        down to one page per miss instead of fetching pages nobody reads.
        `hint` (window, down, leap, leapt): the miss reached a readahead
        window sent for a stream of that window (leap: see _leap, None if
        unknown; leapt: the window is one the stream was to leap to).
        Returns (pages to fetch now, unless not `fetching`: they came with a
        readahead; what to ask for ahead, for _send_ahead)."""
        streams = self.streams
        window, down, going, continued = self.initial, False, False, False
        origin, leap, jump = page, None, None
        cap = min(READAHEAD_MAX, max(PREFETCH, self.manager.capacity // 4))
        for i in range(len(streams) - 1, -1, -1):
            lo, hi, w, _, _, start, stride = streams[i]
            # just past the window (as many pages of slack as it is wide, at
            # most PREFETCH: resident ones were skipped), so that neither a
            # wide window nor a narrow one makes random misses look sequential
            slack = min(w, PREFETCH) * PAGE
            if hi <= page < hi + slack:
                pass
            elif lo - slack <= page < lo:
                down = True
            else:
                continue
            window = min(2 * w, cap)
            going, continued = ASYNC_READAHEAD and window >= ASYNC_WINDOW, True
            origin, leap = start, stride
            if not streams[i][3]:
                self.initial = min(PREFETCH, 2 * self.initial)
            del streams[i]
            break
        else:
            if hint is None:
                hint = self._leap(page)
            if hint is not None:  # its stream was forgotten meanwhile, or
                # this is where it leaps to: it goes on
                window, down, leap, leapt = hint
                going, continued = ASYNC_READAHEAD and window >= ASYNC_WINDOW, True
                if leapt:  # and where it will leap next
                    jump = page + leap
            if len(streams) >= STREAMS:  # the oldest goes (a running stream
                # pushed out by random misses comes back through `hint`)
                if not streams[0][3]:
                    self.initial = max(1, self.initial // 2)
                del streams[0]
        # (a leap is a guess: what is fetched now for it is fault-around,
        # the rest of its window comes ahead)
        reach = min(window, PREFETCH) if jump is not None and fetching else window
        if down:
            lo, hi = page - (reach - 1) * PAGE, page + PAGE
        else:
            lo, hi = page, page + reach * PAGE
        streams.append([lo, hi, window, continued, down, origin, leap])
        resident, stored, inflight = self.resident, self.stored, self.inflight
        now = (PC.absent(lo, page, stored, resident, inflight) if down
               else PC.absent(page + PAGE, hi, stored, resident, inflight)) if fetching else []
        if not going or len(inflight) + window > self.manager.capacity // 4:
            return now, ()
        return now, (window, down, lo if down else hi, leap, jump)

    def _leap(self, page: int) -> tuple | None:
        """(window, down, leap, True) of a recent stream, if this miss, which
        continues none, is as far from where that stream began as a recent
        such miss was from where a stream began: a walk that goes on
        elsewhere by the same leap each time. CPython's arenas are mapped
        top-down and filled bottom-up, so a pass over objects in the order
        they were made leaves each 1 MiB arena at its top for the bottom of
        the one below: without this every arena started a new stream, some
        five fetches of 4 to 64 pages before it ran ahead. The leaps
        remembered are those from the streams that run ahead (a slow stream
        beside them, such as a list's array of pointers, would only add
        noise), and only those leap, from the streams of the last few misses:
        random misses, in a small space, would often land a leap away from
        some slow or stale stream. Such a stream also asks for a window where
        it will leap next, ahead (_send_ahead)."""
        streams, leaps = self.streams, self.leaps
        slack = LEAP_SLACK * PAGE
        fast = [stream for stream in streams[-LEAP_FROM:] if stream[2] >= ASYNC_WINDOW]
        for stream in reversed(fast):
            leap = page - stream[5]
            for seen in leaps:
                if abs(leap - seen) <= slack:
                    return stream[2], stream[4], leap, True
        leaps.extend(page - stream[5] for stream in fast)
        return None

    def _send_ahead(self, later: tuple) -> None:
        """Ask for a stream's next window without waiting (asynchronous
        readahead): the guest computes on the window just served while the
        reply travels; the miss that reaches the new window collects it.
        `later`: (the stream's window, downwards, where the stream leaves its
        current window, its leap, where it leaps next or None). One request
        per window, the nearest first, so that the first reply is not held
        back by the second; a window asked for at an earlier miss is mostly
        in flight still: only the rest goes. A stream that just leapt (_leap)
        also asks for the window it will leap to next, last."""
        window, down, start, leap, jump = later
        # the books as they are now (after this fault's install)
        resident, stored, inflight = self.resident, self.stored, self.inflight
        span = window * PAGE
        ahead = []  # (lo, hi, where a leap lands)
        for k in range(AHEAD_WINDOWS):
            if down:
                ahead.append((start - (k + 1) * span, start - k * span, False))
            else:
                ahead.append((start + k * span, start + (k + 1) * span, False))
        if jump is not None:
            ahead.append((jump - span + PAGE, jump + PAGE, True) if down
                         else (jump, jump + span, True))
        for lo, hi, leapt in ahead:
            chunk = PC.absent(lo, hi, stored, resident, inflight)
            if not chunk or len(inflight) + len(chunk) > self.manager.capacity // 4:
                continue
            ticket = self.remote(fetching=True).submit(self.space, fetch_addrs=chunk,
                                                       kind="readahead")
            # where the stream enters the window: a miss there (give or take
            # the slack) continues it; one elsewhere in the window is a random hit
            edge = chunk[-1] if down else chunk[0]
            self.tickets[ticket] = (chunk, (window, down, edge, leap, leapt))
            for p in chunk:
                inflight[p] = ticket
        while len(self.tickets) > 2 * STREAMS:  # a stream that stopped: drop its window
            self._drop_ticket(next(iter(self.tickets)))

    def _arrived(self, ticket: int, page: int) -> tuple:
        """Collect a readahead reply for a fault at `page`, one of its pages:
        ((its data, the other pages of the reply still as they were when it
        was sent (not faulted in, dropped or moved since: those left
        `inflight`) and not resident, their data (None: zeros)), the stream's
        hint). The first is None if `page` is not among them (it cannot be:
        the fault came here because it was in flight for this reply)."""
        pages, (window, down, edge, leap, leapt) = self.tickets.pop(ticket)
        reply, at = self.manager.client().collect_reply(ticket)
        # the stores sent before it: as in _fetch, a refused one must fail
        # here rather than its pages read as zeros (their replies came first)
        self.collect_writebacks(before=ticket)
        slack = min(window, PREFETCH) * PAGE
        hint = (window, down, leap, leapt) if (edge - slack < page <= edge if down
                                               else edge <= page < edge + slack) else None
        # (views of the reply, sorted out in C where built)
        found, first, rest, datas = PC.take(reply, at, pages, ticket, self.inflight,
                                            self.resident, page)
        return (first, rest, datas) if found else None, hint

    def _drop_ticket(self, ticket: int) -> None:
        pages, meta = self.tickets.pop(ticket, ((), None))
        if meta is not None and meta[4]:  # where a leap was to land, unused:
            self.leaps.clear()            # the guess was wrong, unlearn them
        for p in pages:
            if self.inflight.get(p) == ticket:
                del self.inflight[p]
        self.manager.client().forget(ticket)

    def _drop_readahead(self) -> None:
        """Forget every readahead in flight (the books are about to change
        wholesale: mremap, fork, going local, the end)."""
        for ticket in list(self.tickets):
            self._drop_ticket(ticket)

    def _make_room(self, tracer, tid: int, incoming: int) -> bool:
        """Evict a batch and room for `incoming` pages; True if the thread was
        stopped for it (resume it)."""
        try:
            fd = os.open(f"/proc/{tid}/syscall", os.O_RDONLY)
            try:
                state = os.read(fd, 64).split(None, 1)[0]
            finally:
                os.close(fd)
        except (OSError, IndexError):
            return False
        if state != b"-1":  # inside a syscall (a kernel fault) or running: later
            self.manager.stats.deferred += 1
            return False
        # Every other thread of the mm is stopped first: none may write a
        # victim between its read and its drop (nor the kernel on its behalf).
        # The faulting thread itself is blocked in its fault; it is stopped
        # only to start the dropper, or where there is none, to run the drop.
        # (A vfork child sharing the mm drops the old way: the dropper is
        # its parent's thread.)
        held = tracer.hold_threads(tid, self)
        own = not self.sharers
        stopped = False
        try:
            if not (self.dropper and own):
                pt.interrupt(tid)
                if not tracer.wait_interrupt(tid, self):
                    return False
                stopped = True
                if self.dropper is None and own:
                    self.dropper = (self.drop_batched is not False
                                    and Dropper.start(tracer, self, tid)) or False
            # a batch, and what the incoming pages (and faults served
            # meanwhile) would put over the capacity
            self.manager.prepare()
            count = self.manager.batch + max(0, len(self.resident) + incoming - self.manager.capacity)
            victims = self._choose(count)
            if victims:
                self.evict(tracer, tid, victims, stopped)
            return stopped
        finally:
            tracer.release_threads(held)

    def _choose(self, count: int) -> list:
        """`count` victims, oldest first. FIFO (LegoOS's best) takes the oldest;
        CLOCK gives a page written since the hand last passed it a second
        chance: it goes to the young end, write-protected again (the write bit
        is the reference bit user space can see), and is remembered as dirty."""
        if self.manager.policy == "2q":
            return self._choose_2q(count)
        victims: list = []
        chosen: set = set()
        clock = self.manager.policy == "clock" and self.pagemap is not None
        passed = 0
        pinned, scratch = self.pinned, self.scratch
        while len(victims) < count and passed < 2 * len(self.resident):
            # the oldest pages but those kept: among the first `want` plus as
            # many as are kept (islice, not a loop over every page in Python)
            want = count - len(victims)
            kept = len(pinned) + len(chosen) + len(scratch)
            batch = list(islice(self.resident, want + kept))
            if kept:
                batch = [p for p in batch if p not in pinned and p not in chosen
                         and p not in scratch][:want]
            if not batch:
                break
            if not clock:
                victims += batch
                break
            passed += len(batch)
            spared = []
            for start, length in PC.run_list(sorted(batch)):
                for page, kind in self._kinds(start, start + length):
                    if kind is not None and kind & PM.PAGE_IS_WRITTEN \
                            and not kind & PM.PAGE_IS_PFNZERO:
                        spared.append(page)
                    else:
                        victims.append(page)
                        chosen.add(page)
            for start, length in PC.run_list(sorted(spared)):
                try:
                    self.uffd.writeprotect(start, length)
                except OSError:  # the layout is changing: evict them after all
                    late = [p for p in spared if start <= p < start + length]
                    victims += late
                    chosen.update(late)
                    continue
                for page in range(start, start + length, PAGE):
                    self.dirty.add(page)
                    self.resident.move_to_end(page)
            self.manager.stats.second_chances += len(spared)
        return victims

    def _choose_2q(self, count: int) -> list:
        """FIFO that passes over hot pages (2Q's protected queue): they go to
        the young end instead, and stay hot until more recent refaults push
        them out of the hot set."""
        victims, passed = PC.choose(self.resident, count, self.pinned, self.scratch, self.hot)
        for page in passed:
            self.resident.move_to_end(page)
        self.manager.stats.second_chances += len(passed)
        return victims

    def _refault(self, page: int) -> None:
        """A page faulted again while it was among the last capacity/2
        evicted (2Q's A1out): it joins the hot set, at most a quarter of the
        cache (the oldest hot page goes back to plain FIFO)."""
        del self.ghost[page]
        self.hot[page] = None
        self.manager.stats.refaults += 1
        while len(self.hot) > self.manager.capacity // 4:
            self.hot.popitem(last=False)

    def ensure(self, addr: int, length: int, pin: bool = False) -> bool:
        """Make the registered pages of [addr, addr+length) resident without
        evicting (legorun is about to read them, or the kernel to write them
        where no fault can be served); with `pin`, keep them from eviction
        until unpin(). Pages outside the registered regions (a `.bss`,
        say) are left alone: they are not the ExCache's. False if a page
        could not be mapped because an event not yet read holds the mm
        (EAGAIN): a fault there is served as usual, but where none can be,
        read the events and call again."""
        lo, hi = addr & ~(PAGE - 1), addr + max(length, 1)
        want = []
        # (a comprehension: a guest has hundreds of regions, CPython's arenas)
        for r in [r for r in self.regions if r[0] < hi and lo < r[1]]:
            for page in range(max(lo, r[0]), min(hi, r[1]), PAGE):
                if pin:
                    self.pinned.add(page)
                if page not in self.resident:
                    want.append(page)
        if not want:
            return True
        for page in want:
            self.inflight.pop(page, None)  # fetched here: a readahead's copy would be stale later
        fetch = [p for p in want if p in self.stored]
        datas = {}
        for i in range(0, len(fetch), 4096):  # one round trip for a whole buffer
            chunk = fetch[i:i + 4096]
            datas.update(zip(chunk, self._fetch(chunk)))
        complete = True
        for page in want:
            try:
                if page in datas:
                    mapped = self.uffd.copy(page, datas[page] or ZERO, wp=True)
                else:
                    mapped = self.uffd.zero(page)
            except BlockingIOError:
                complete = False  # the layout is changing
                continue
            if mapped:
                self.resident[page] = None
                if datas.get(page) is not None and self.printing:
                    self.prints[page] = PC.fingerprint(datas[page])
        return complete

    def unpin(self, addr: int) -> None:
        self.pinned.discard(addr & ~(PAGE - 1))

    def evict(self, tracer, tid: int, victims: list, stopped: bool = True) -> None:
        """Write back and drop these resident pages; `tid` is blocked in a
        fault. If it is `stopped` the drop is injected into it; else the
        process's dropper drops them.

        A page still write-protected since it was fetched is as the
        mComponent holds it: dropped without a write-back. A page still the
        shared zero page holds zeros: nothing to read. The rest are read
        (one process_vm_readv per contiguous run) and stored, all-zero ones
        excepted."""
        stats = self.manager.stats
        chosen, victims = victims, sorted(victims)
        try:
            need, zeros, gone, clean, used, unused = PC.classify(
                self.pagemap.fd if self.pagemap is not None else -1,
                victims, self.stored, self.dirty, self.ahead)
        except OSError:  # no PAGEMAP_SCAN (Linux < 6.7): write every page back
            self._no_pagemap()
            need, zeros, gone, clean, used, unused = PC.classify(
                -1, victims, self.stored, self.dirty, self.ahead)
        stats.prefetch_used += used
        stats.prefetch_unused += unused
        self._protect_paid(used, unused)
        # one process_vm_readv per contiguous run (about twice as fast as a
        # pread of /proc/PID/mem); all-zero pages are not stored, nor those
        # written that hold what was fetched (their fingerprints agree:
        # CPython raises and lowers reference counts in a pass over objects)
        addrs, data, read_zeros, read_gone, same = PC.read_pages(self.pid, self.mem_fd, need,
                                                                 self.prints)
        self._prints_paid(sum(map(self.prints.__contains__, victims)), len(same))
        zeros += read_zeros
        gone += read_gone
        stores = memwire.Pages(addrs, data)
        if stores:
            client = self.remote()
            region = None
            for page in addrs:  # the regions of these pages, each looked up once
                if region is not None and region[0] <= page < region[1]:
                    continue
                region = self._region(page)
                if region is not None and not region[2]:
                    lo, hi = self._unrecorded_span(region)
                    client.map(self.space, lo, hi - lo, if_absent=True)
                    for r in self.regions:  # regions merged by the kernel, and
                        if lo <= r[0] and r[1] <= hi:  # the span: all recorded now
                            r[2] = True
                    region[2] = True
            # (a store's reply takes longer than the guest takes to fill the
            # next batch: waiting for each before sending the next left the
            # write pass waiting ~0.8 ms a batch)
            self.collect_writebacks(keep=WRITEBACKS_AHEAD - 1)
            self.manager.event(self.pid, "writeback", addrs[0], len(stores), "mComponent", 0.0)
            # off the fault path: the reply is collected WRITEBACKS_AHEAD
            # evictions later, or at the next fetch (_fetch, _arrived); the
            # server applies frames in order, so a later fetch sees them
            ticket = client.submit(self.space, stores=stores, kind="store")
            self.writebacks.append(ticket)
            self.stores[ticket] = addrs
            self.storing.update(dict.fromkeys(addrs, ticket))
            stats.writebacks += len(stores)
        # the books first: a victim that faults while it is being dropped is
        # served from what was just stored
        # (map: the loops run in C)
        deque(map(self.resident.pop, victims, repeat(None)), maxlen=0)
        if self.prints:
            deque(map(self.prints.pop, victims, repeat(None)), maxlen=0)
        self.ahead.difference_update(victims)
        self.dirty.difference_update(victims)
        if self.manager.policy == "2q":
            # (no victim is hot: _choose_2q passes over the hot ones)
            ghost = self.ghost
            ghost.update(zip(chosen, repeat(None)))  # (oldest first)
            excess = len(ghost) - self.manager.capacity // 2
            if excess > 0:
                deque(map(ghost.popitem, repeat(False, excess)), maxlen=0)
        self.stored.update(addrs)
        self.stored.difference_update(zeros)
        stats.not_present += len(gone)
        stats.clean_drops += clean
        stats.unchanged += len(same)
        stats.evictions += len(victims)
        self.manager.event(self.pid, "evict", min(victims), len(victims), "legorun", 0.0)
        runs = PC.run_list(victims)
        # (a fault on a victim served while the drop runs would land before
        # the kernel zaps the page, and be lost: such faults wait for its end;
        # but not those of the thread that runs it: on its way back from the
        # madvise the kernel updates its rseq area, which may be a victim)
        self.dropping = set(victims)
        self.drop_tid = tid if stopped else 0
        try:
            if self.dropper and not stopped:
                self._drop_by_thread(tracer, runs)
                return
            done = self._drop_all(tracer, tid, runs, self.dropping) if len(runs) > 1 else 0
            refused, done = done < 0, max(done, 0)
            for start, length in runs[done:]:
                if self._madvise(tracer, tid, start, length) < 0:
                    # EINVAL: mlock()ed (VM_LOCKED). The pages stay, as natively,
                    # outside the ExCache's budget (never chosen again: not in its
                    # books); what was stored of them is never fetched while they
                    # stay, and is stored anew if they are evicted after munlock
                    stats.locked += length // PAGE
                elif refused and self.drop_batched is None:
                    # madvise takes the run process_madvise refused: an older kernel
                    self.drop_batched = False
                refused = False
        finally:
            self.dropping = set()

    def _drop_by_thread(self, tracer, runs: list) -> None:
        """Drop the runs through the dropper, IOV_MAX at a time; a run the
        kernel refuses (mlock()ed: see evict) is passed over."""
        stats = self.manager.stats
        i = 0
        try:
            while i < len(runs):
                chunk = runs[i:i + IOV_MAX]
                done = _runs_covered(chunk, self.dropper.drop(tracer, self, chunk))
                i += done
                if done < len(chunk):
                    stats.locked += runs[i][1] // PAGE
                    i += 1
        except ProcessLookupError:
            pass  # the process is gone (killed meanwhile): its exit follows

    def _drop_all(self, tracer, tid: int, runs: list, victims_set: set) -> int:
        """Drop many runs with one injected process_madvise(PIDFD_SELF_THREAD,
        iovec, n, MADV_DONTNEED) (Linux 6.14+; PLATFORM.md): one single-step
        for the whole batch instead of one per run. The iovec is written below
        the stopped thread's red zone (memory the ABI lets a signal handler
        clobber) and the bytes there are put back after. Returns how many of
        `runs` were dropped (-1: the kernel refused the first); the rest are
        left to madvise, one by one (an mlock()ed run stops process_madvise;
        an older kernel refuses it)."""
        if self.drop_batched is False:
            return 0
        runs = runs[:IOV_MAX]
        regs = pt.getregs(tid)
        size = 16 * len(runs)
        # Not where a write would fault into this userfaultfd (a registered page
        # not resident, or one being dropped): legorun would wait for itself.
        # Below a victim (the stack's own pages are evicted too) the next pages
        # down are tried; registered pages there that are not resident (the
        # stack below its deepest use so far, or evicted) are brought in
        # first: one fetch or zero-fill instead of a single-step per run.
        lo = (regs.rsp - 128 - size) & ~15
        for _ in range(8):
            pages = range(lo & ~(PAGE - 1), lo + size, PAGE)
            if victims_set.isdisjoint(pages):
                break
            lo -= PAGE
        else:
            return 0
        near = [r for r in self.regions if r[0] < pages[-1] + PAGE and pages[0] < r[1]]
        registered = [p for p in pages if any(r[0] <= p < r[1] for r in near)]
        self.scratch = set(registered)  # not evicted while they are the scratch (_choose)
        if registered:
            self.ensure(registered[0], registered[-1] + PAGE - registered[0])
        if any(p not in self.resident for p in registered):
            return 0
        # pages as the mComponent holds them stay so (write-protected again
        # once their bytes are back): borrowing them costs no write-back
        clean = [p for p, kind in self._kinds(pages[0], pages[-1] + PAGE)
                 if p in registered and kind is not None and not kind & PM.PAGE_IS_WRITTEN]
        try:
            saved = os.pread(self.mem_fd, size, lo)
            if len(saved) != size:
                return 0
            os.pwrite(self.mem_fd, struct.pack(f"<{2 * len(runs)}Q",
                                               *[x for run in runs for x in run]), lo)
        except OSError:
            return 0  # not mapped there
        saved_regs = pt.user_regs_struct()
        pt.ctypes.pointer(saved_regs)[0] = regs
        regs.rip = self.insn
        regs.rax = NR_PROCESS_MADVISE
        regs.rdi, regs.rsi, regs.rdx = PIDFD_SELF_THREAD & (1 << 64) - 1, lo, len(runs)
        regs.r10, regs.r8 = MADV_DONTNEED, 0
        pt.setregs(tid, regs)
        try:
            pt.singlestep(tid)
            tracer.wait_step(tid, self, (runs[0][0], runs[-1][0] + runs[-1][1]))
            result = pt.getregs(tid, regs).rax
        finally:
            pt.setregs(tid, saved_regs)
            os.pwrite(self.mem_fd, saved, lo)
            for p in clean:
                self.uffd.writeprotect(p, PAGE)
        if result >= 1 << 63:
            return -1
        self.drop_batched = True
        return _runs_covered(runs, result)

    def _kinds(self, start: int, end: int) -> list:
        """(page, PAGEMAP_SCAN categories or None if not mapped) for each page
        of [start, end); every page counts as written if the kernel cannot say."""
        try:
            return list(PC.kinds(self.pagemap, start, end))
        except OSError:  # no PAGEMAP_SCAN (Linux < 6.7): write every page back
            self._no_pagemap()
            return list(PC.kinds(None, start, end))

    def _no_pagemap(self) -> None:
        os.close(self.pagemap.fd)
        self.pagemap = None

    def collect_writebacks(self, keep: int = 0, before: int | None = None) -> None:
        """Wait for the replies of the write-backs in flight but the newest
        `keep` (or, with `before`, of those sent before that ticket); raise
        (ComponentError) if one was refused (_fetch and _arrived say why
        the ones sent before a fetch are collected before it is mapped)."""
        wb = self.writebacks
        if before is not None:
            cut = 0
            while cut < len(wb) and wb[cut] < before:
                cut += 1
        else:
            cut = len(wb) - keep
        if cut <= 0:
            return
        client = self.manager.client()
        tickets, self.writebacks = wb[:cut], wb[cut:]
        storing = self.storing
        for ticket in tickets:
            for page in self.stores.pop(ticket, ()):
                if storing.get(page) == ticket:
                    del storing[page]
            client.collect(ticket)

    def _madvise(self, tracer, tid: int, start: int, length: int) -> int:
        """Run madvise(start, length, MADV_DONTNEED) in the stopped thread `tid`;
        returns its raw result (negative errno)."""
        regs = pt.getregs(tid)
        saved = pt.user_regs_struct()
        pt.ctypes.pointer(saved)[0] = regs
        regs.rip = self.insn
        regs.rax = NR_MADVISE
        regs.rdi, regs.rsi, regs.rdx = start, length, MADV_DONTNEED
        pt.setregs(tid, regs)
        try:
            pt.singlestep(tid)
            tracer.wait_step(tid, self, (start, start + length))
            result = pt.getregs(tid, regs).rax
        finally:
            pt.setregs(tid, saved)
        return result - (1 << 64) if result >= 1 << 63 else result

    # ---- fork

    def fork_child(self, pid: int, uffd: U.Userfaultfd) -> "ExCache":
        """The ExCache of a child forked from this process (its userfaultfd came
        with UFFD_EVENT_FORK): the kernel copied the resident pages, the
        mComponent copies the evicted ones (ForkSpace, copy-on-write), and the
        books start as a copy of the parent's."""
        child = ExCache(self.manager, pid, uffd, self.insn)
        if self.created:
            self._drop_readahead()  # (their replies would come after the fork's)
            self.collect_writebacks()  # the child sees what the parent stored
            child.space = self.remote().fork_space(self.space, child.space)
            child.created = True
        child.resident = OrderedDict(self.resident)
        child.stored = set(self.stored)
        child.ahead = set(self.ahead)
        child.dirty = set(self.dirty)
        child.prints = dict(self.prints)  # (the child's space is a copy of this one)
        child.ghost = OrderedDict(self.ghost)
        child.hot = OrderedDict(self.hot)
        child.regions = [list(r) for r in self.regions]
        child.heap_end = self.heap_end
        child._after_fork()
        return child

    def _after_fork(self) -> None:
        """madvise(MADV_DONTFORK) ranges are not in the child and
        MADV_WIPEONFORK ones read as zeros there: the books follow."""
        mapped, wiped = [], []
        try:
            with open(f"/proc/{self.pid}/smaps") as f:
                vma = None
                for line in f:
                    head = line.split(None, 1)[0]
                    if "-" in head and not head.endswith(":"):
                        vma = tuple(int(x, 16) for x in head.split("-"))
                        mapped.append(vma)
                    elif head == "VmFlags:" and " wf" in line and vma is not None:
                        wiped.append(vma)
        except OSError:
            return
        for r in list(self.regions):
            for lo, hi in _gaps(r[0], r[1], mapped):
                self.unmapped(lo, hi)
        for lo, hi in wiped:
            if any(r[0] < hi and lo < r[1] for r in self.regions):
                self.removed(lo, hi)

    # ---- going local, and the end

    def make_local(self) -> None:
        """Bring every remote page back and stop following this process's memory
        (it is about to start a thread or a child; it is stopped)."""
        self._drop_readahead()
        pages = sorted(p for p in self.stored if p not in self.resident)
        for i in range(0, len(pages), 512):
            chunk = pages[i:i + 512]
            for page, data in zip(chunk, self._fetch(chunk)):
                self.uffd.copy(page, data or ZERO)
        for start, end, _ in self.regions:
            try:
                self.uffd.unregister(start, end - start)
            except OSError:
                pass  # unmapped meanwhile
        self.manager.stats.made_local += 1
        self.close()

    def stop_dropper(self, status: int = 0) -> None:
        """End the dropper thread, if any (Dropper.stop); evictions go back
        to injecting the drop into the faulting thread."""
        if self.dropper:
            self.dropper.stop(status)
        self.dropper = False

    def close(self) -> None:
        self.stop_dropper()
        try:
            self._drop_readahead()
            self.collect_writebacks()
        except Exception:  # noqa: BLE001 - the space is freed next anyway
            pass
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1
        if self.pagemap is not None:
            os.close(self.pagemap.fd)
            self.pagemap = None
        self.manager.forget(self)
        self.uffd.close()
        if not self.created:
            return
        try:
            self.manager.client().free_space(self.space)
        except Exception:  # noqa: BLE001 - the component may be gone; its lease frees it
            pass


def _runs_covered(runs: list, result: int) -> int:
    """How many of the (start, length) `runs` a process_madvise over them
    covered, from its result (bytes advised; negative: none)."""
    done = 0
    for _, length in runs:
        if result < length:
            break
        result -= length
        done += 1
    return done


def _gaps(start: int, end: int, ranges: list):
    """The parts of [start, end) that no (lo, hi) of `ranges` (sorted) covers."""
    at = start
    for lo, hi in ranges:
        if hi <= at or lo >= end:
            continue
        if lo > at:
            yield at, lo
        at = max(at, hi)
    if at < end:
        yield at, end




class MemoryManager:
    """The run's remote memory: the mComponent client, the budget, the caches."""

    def __init__(self, capacity_pages: int, connect, policy: str = "2q", prepare=None) -> None:
        self.capacity = max(capacity_pages, 64)
        self.policy = policy        # "fifo", "clock" or "2q" (ExCache._choose)
        # evicted together: one store, few madvise; larger batches for larger caches
        self.batch = max(16, min(256, self.capacity // 8))
        self._connect = connect     # () -> MemoryClient, started on first use
        self._prepare = prepare     # () -> None: at the first eviction, get ready to connect
        self._client = None
        self.by_fd: dict = {}       # uffd fd -> ExCache
        self.stats = MemoryStats()
        self.trace = None           # legorun.trace.TraceWriter, for -e trace=excache
        self.started = time.monotonic()
        self.timeline: list = []    # occupancy over time, for `legorun report`
        self.latencies = Latencies()
        self._next_sample = 0.0

    def event(self, pid: int, kind: str, address: int, pages: int, served_by: str,
              seconds: float) -> None:
        if self.trace is not None:
            self.trace.memory_event(pid, kind, address, pages, served_by, seconds)

    def fault_done(self, cache, page: int, pages: int, fetched: bool, seconds: float) -> None:
        self.latencies.add(seconds)
        if self._prepare is not None and len(cache.resident) >= self.capacity // 2:
            self.prepare()  # (the ExCache fills: an eviction, and a store, may come soon)
        if self.trace is not None:
            self.event(cache.pid, "fetch" if fetched else "fault", page, pages,
                       "mComponent" if fetched else "legorun", seconds)
        now = time.monotonic() - self.started
        if now >= self._next_sample:  # a sample every 20 ms at most
            self._next_sample = now + 0.02
            st = self.stats
            self.timeline.append({
                "t": round(now, 4), "capacity_pages": self.capacity,
                "resident_pages": sum(len(c.resident) for c in self.by_fd.values()),
                "faults": st.faults, "evictions": st.evictions})

    def client(self):
        if self._client is None:
            self._client = self._connect()
        return self._client

    def prepare(self) -> None:
        """The ExCache half full, or the first eviction: what
        connecting needs starts now (the embedded mComponent boots while the
        guest runs on), in case pages go out."""
        if self._prepare is not None:
            prepare, self._prepare = self._prepare, None
            prepare()

    def page_stream(self) -> str | None:
        """Which Pages stream the run used ("legorun" or "grpcio"), None if none."""
        return self._client.page_stream if self._client is not None else None

    def add(self, cache: ExCache) -> None:
        self.by_fd[cache.uffd.fd] = cache
        self.stats.processes += 1

    def forget(self, cache: ExCache) -> None:
        self.by_fd.pop(cache.uffd.fd, None)

    def close(self) -> None:
        for cache in list(self.by_fd.values()):
            cache.close()
        if self._client is not None:
            self._client.close()
