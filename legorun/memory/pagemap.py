"""PAGEMAP_SCAN (Linux 6.7+) on a guest's /proc/PID/pagemap: which of its pages
were written since legorun mapped them write-protected, and which are still
the shared zero page. Names as in <linux/fs.h>; Debian's headers predate
the ioctl, so its number is computed here.

With UFFD_FEATURE_WP_ASYNC the kernel resolves a write to a write-protected
page by itself (no message, no stop): the page's uffd-wp bit is cleared and
PAGEMAP_SCAN reports it as written. That is the ExCache's dirty bit.
"""
from __future__ import annotations

import ctypes
import fcntl
import struct

PAGE = 4096

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5

_ARG = struct.Struct("<12Q")   # struct pm_scan_arg
_REGION = struct.Struct("<3Q")  # struct page_region: start, end, categories
PAGEMAP_SCAN = (3 << 30) | (_ARG.size << 16) | (ord("f") << 8) | 16


class Scanner:
    """Reads page categories of one process through its pagemap fd."""

    def __init__(self, fd: int, max_regions: int = 4096) -> None:
        self.fd = fd
        self._vec = ctypes.create_string_buffer(_REGION.size * max_regions)
        self._max = max_regions
        self._arg = bytearray(_ARG.size)

    def categories(self, start: int, end: int) -> list:
        """[(start, end, categories)] covering the pages of [start, end) that
        are mapped, in address order (adjacent pages alike share a tuple)."""
        out = []
        vec = ctypes.addressof(self._vec)
        mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_PFNZERO
        while start < end:
            _ARG.pack_into(self._arg, 0, _ARG.size, 0, start, end, 0, vec, self._max, 0,
                           0, 0, 0, mask)
            n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, self._arg)
            raw = self._vec.raw[:n * _REGION.size]
            out += [_REGION.unpack_from(raw, i * _REGION.size) for i in range(n)]
            walked = _ARG.unpack_from(self._arg)[4]  # walk_end
            if n < self._max or walked <= start:
                break
            start = walked
        return out
