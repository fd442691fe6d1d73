"""The mComponent's per-page loops (legorun/_ext/mstore.c): the C build and
the pure-Python reference in components/mcomponent.py apply the same stores
and answer the same fetches, page for page, over spaces that share pages
with a fork, stale and replayed stores, zero pages and a full capacity."""
from __future__ import annotations

import errno
import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from legorun import memwire
from legorun_components import mcomponent as M

PAGE = 4096
C = pytest.importorskip("legorun._ext.mstore")
BASE = 0x7F0000000000
REGIONS = [M.Region(BASE, BASE + 8 * PAGE, 3, 0, 0),
           M.Region(BASE + 8 * PAGE, BASE + 12 * PAGE, 3, 0, 50)]  # (floor 50: older seqs stale)


def region_at(addr: int):
    return next((r for r in REGIONS if r.start <= addr < r.end), None)


def content(kind: int) -> bytes:
    """0: zeros; else a page that is zero but for one byte far in (the C
    decides most pages by their first word: this one it must read on)."""
    return bytes(PAGE) if kind == 0 else bytes(PAGE - 1) + bytes([kind])


def world(held_pages: list):
    """(child pages, parent pages) from (slot, kind or None, version,
    shared) tuples: a shared page is the same object in both (a fork's)."""
    child, parent = {}, {}
    for slot, kind, version, shared in held_pages:
        addr = BASE + slot * PAGE
        p = M.Page(None if kind is None else content(kind), version)
        child[addr] = p
        if shared:
            p.refs = 2
            parent[addr] = p
    return child, parent


def snapshot(pages: dict) -> dict:
    return {a: (p.data, p.version, p.refs) for a, p in pages.items()}


slots = hst.integers(0, 13)  # (12 and 13: in no region)
held_pages = hst.lists(hst.tuples(slots, hst.one_of(hst.none(), hst.integers(1, 255)),
                                  hst.integers(0, 100), hst.booleans()),
                       unique_by=lambda t: t[0], max_size=10)
stores = hst.lists(hst.tuples(slots, hst.integers(0, 3)), max_size=16)


@settings(max_examples=300, deadline=None)
@given(held_pages, stores, hst.integers(0, 120), hst.integers(0, 20), hst.lists(slots, max_size=16))
def test_store_and_fetch_agree_with_the_python_reference(held, batch, seq, room, fetches):
    addrs = [BASE + slot * PAGE for slot, _ in batch]
    data = b"".join(content(kind) for _, kind in batch)
    frame = memwire.request(1, bytes(16), seq, addrs, (data,), [])
    data_off = memwire.REQ.size + 8 * len(addrs)
    fetch_addrs = tuple(BASE + slot * PAGE for slot in fetches)
    results = []
    for impl in ((C.store, C.fetch), (M._store_py, M._fetch_py)):
        child, parent = world(held)
        status = bytearray(len(addrs) + len(fetch_addrs))
        held_bytes = 10 * PAGE
        got = impl[0](child, frame, tuple(addrs), data_off, seq, region_at, held_bytes,
                      held_bytes + room * PAGE, M.Page, status)
        out = []
        fetched = impl[1](child, fetch_addrs, status, len(addrs), out)
        results.append((got, bytes(status), snapshot(child), snapshot(parent), out, fetched))
    assert results[0] == results[1]


def test_the_outcomes_of_a_store_frame():
    child, parent = world([(0, 7, 10, False), (1, 7, 10, True), (2, None, 10, False),
                           (3, 7, 60, False)])
    shared = child[BASE + PAGE]
    order = [(0, 1), (1, 2), (2, 0), (3, 1), (4, 3), (8, 1), (12, 1)]
    addrs = tuple(BASE + slot * PAGE for slot, _ in order)
    frame = memwire.request(1, bytes(16), 40, addrs, (b"".join(content(k) for _, k in order),), [])
    status = bytearray(len(addrs))
    held, stored, nomem, added = C.store(child, frame, addrs, memwire.REQ.size + 8 * len(addrs), 40,
                                         region_at, 0, PAGE, M.Page, status)
    assert list(status) == [0, 0, 0, errno.ESTALE, errno.ENOMEM, errno.ESTALE, errno.EFAULT]
    # page 0 replaced in place (no new bytes held); page 1 copied away from
    # the fork's, which keeps its bytes; page 2 stored as zeros (absent); page
    # 4 found the capacity full (one page: page 1's copy took it)
    assert (held, stored, nomem, added) == (PAGE, 3, 1, 0)
    assert child[BASE].data == content(1) and child[BASE].version == 40
    assert child[BASE + PAGE] is not shared and child[BASE + PAGE].data == content(2)
    assert parent[BASE + PAGE] is shared and shared.refs == 1 and shared.data == content(7)
    assert child[BASE + 2 * PAGE].data is None
    assert child[BASE + 3 * PAGE].version == 60 and BASE + 4 * PAGE not in child
    assert not gc.is_tracked(child[BASE + PAGE])  # (never in a cycle: kept out of the GC's walks)


def test_a_frame_shorter_than_its_stores_is_refused():
    with pytest.raises(ValueError):
        C.store({}, b"\0" * 100, (BASE,), 0, 1, region_at, 0, 1 << 20, M.Page, bytearray(1))
    with pytest.raises(ValueError):
        C.fetch({}, (BASE, BASE), bytearray(1), 0, [])
