"""userfaultfd(2): ioctls, message parsing, names as in <linux/userfaultfd.h>."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

UFFD_API = 0xAA
PAGE = 4096


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFD_API << 8) | nr


_IOWR, _IOR = 3, 2
UFFDIO_API = _ioc(_IOWR, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_IOWR, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_IOR, 0x01, 16)
UFFDIO_WAKE = _ioc(_IOR, 0x02, 16)
UFFDIO_COPY = _ioc(_IOWR, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_IOWR, 0x04, 32)

UFFDIO_WRITEPROTECT = _ioc(_IOWR, 0x06, 24)

UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_COPY_MODE_WP = 1, 2
UFFDIO_WRITEPROTECT_MODE_WP = 1

UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1

MSG = struct.Struct("<B7xQQQ")  # event, then the union as three u64
NR_USERFAULTFD = 323
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# The ioctls and reads of the fault path keep the GIL: each takes a few
# microseconds, and a call that lets go of it (fcntl.ioctl, os.read) hands it
# to gRPC's threads, whose turn the fault then waits out before it goes on.
_held = ctypes.PyDLL(None, use_errno=True)
_ioctl = _held.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_read = _held.read
_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_read.restype = ctypes.c_ssize_t


ZEROS_MAX = 256 * PAGE
_ZEROS = ctypes.create_string_buffer(ZEROS_MAX)  # the source of copy_zeros
_ZEROS_AT = ctypes.addressof(_ZEROS)


class Userfaultfd:
    """legorun's copy of a guest's userfaultfd (taken with pidfd_getfd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._copy = ctypes.create_string_buffer(40)   # struct uffdio_copy
        self._range = ctypes.create_string_buffer(32)  # uffdio_zeropage, _writeprotect, _range
        self._msgs = ctypes.create_string_buffer(MSG.size * 64)

    def _call(self, request: int, arg) -> int:
        """ioctl holding the GIL: 0, or the errno."""
        return 0 if _ioctl(self.fd, request, arg) == 0 else ctypes.get_errno()

    @classmethod
    def take(cls, pid: int, guest_fd: int) -> "Userfaultfd":
        pidfd = _libc.syscall(NR_PIDFD_OPEN, pid, 0)
        if pidfd < 0:
            raise OSError(ctypes.get_errno(), "pidfd_open")
        try:
            fd = _libc.syscall(NR_PIDFD_GETFD, pidfd, guest_fd, 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
        finally:
            os.close(pidfd)
        os.set_blocking(fd, False)
        return cls(fd)

    def api(self, features: int) -> None:
        buf = bytearray(struct.pack("<QQQ", UFFD_API, features, 0))
        fcntl.ioctl(self.fd, UFFDIO_API, buf)

    def register(self, start: int, length: int,
                 mode: int = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP) -> None:
        buf = bytearray(struct.pack("<QQQQ", start, length, mode, 0))
        fcntl.ioctl(self.fd, UFFDIO_REGISTER, buf)

    def unregister(self, start: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, bytearray(struct.pack("<QQ", start, length)))

    def copy(self, dst: int, data: bytes, wp: bool = False, wake: bool = True) -> bool:
        """Map pages with these contents (len(data) a multiple of PAGE) and
        wake the faulting thread; with `wp`, write-protected (with WP_ASYNC the
        kernel lifts that at the first write, which marks the page written).
        False if a page was already there (a raced, repeated fault)."""
        return self._copy_from(dst, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value,
                               len(data), wp, wake)

    def copy_zeros(self, dst: int, length: int) -> bool:
        """Map fresh zeroed pages, writable, over [dst, dst+length) (at most
        ZEROS_MAX bytes): for a write fault, where the shared zero page would
        cost the guest a second fault per page, to copy it."""
        if length > ZEROS_MAX:
            raise ValueError(f"copy_zeros: {length} bytes, at most {ZEROS_MAX}")
        return self._copy_from(dst, _ZEROS_AT, length, False)

    def _copy_from(self, dst: int, src: int, length: int, wp: bool, wake: bool = True) -> bool:
        err, _ = self._copy_raw(dst, src, length, wp, wake)
        if err in (errno.EEXIST, errno.ENOENT):
            # EEXIST: there already; ENOENT: the range is not one registered
            # mapping (any more): it was split (mprotect) or is being unmapped
            return False
        if err:
            raise OSError(err, os.strerror(err))  # (EAGAIN: BlockingIOError)
        return True

    def copy_part(self, dst: int, data: bytes, wp: bool = False) -> tuple:
        """UFFDIO_COPY that tells a partial copy from none: (0 or the errno,
        bytes mapped). A run that meets a page already there maps the pages
        before it and fails EAGAIN with their count (mfill_atomic)."""
        return self._copy_raw(dst, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value,
                              len(data), wp)

    def _copy_raw(self, dst: int, src: int, length: int, wp: bool, wake: bool = True) -> tuple:
        struct.pack_into("<QQQQq", self._copy, 0, dst, src, length,
                         (UFFDIO_COPY_MODE_WP if wp else 0) | (0 if wake else UFFDIO_COPY_MODE_DONTWAKE), 0)
        err = self._call(UFFDIO_COPY, self._copy)
        if err:
            return err, max(struct.unpack_from("<q", self._copy, 32)[0], 0)
        return 0, length

    def zero(self, dst: int, length: int = PAGE) -> bool:
        """Map the zero page over [dst, dst+length); False if a page was there
        or the range is not one registered mapping."""
        struct.pack_into("<QQQq", self._range, 0, dst, length, 0, 0)
        err = self._call(UFFDIO_ZEROPAGE, self._range)
        if err in (errno.EEXIST, errno.ENOENT):  # as for copy
            return False
        if err:
            raise OSError(err, os.strerror(err))
        return True

    def writeprotect(self, start: int, length: int) -> None:
        """Write-protect [start, start+length) again (with WP_ASYNC the next
        write lifts it and shows in PAGEMAP_SCAN as written)."""
        struct.pack_into("<QQQ", self._range, 0, start, length, UFFDIO_WRITEPROTECT_MODE_WP)
        err = self._call(UFFDIO_WRITEPROTECT, self._range)
        if err:
            raise OSError(err, os.strerror(err))

    def wake(self, start: int, length: int) -> None:
        struct.pack_into("<QQ", self._range, 0, start, length)
        self._call(UFFDIO_WAKE, self._range)  # (an error: no longer registered,
        # the thread was woken by the unmap)

    def messages(self):
        """Every message waiting now, as (event, a, b, c) tuples (a list, read
        in C where built)."""
        if _c_messages is not None:
            return _c_messages(self.fd)
        return list(self._messages())

    def _messages(self):
        buf = self._msgs
        while True:
            n = _read(self.fd, buf, len(buf))
            if n <= 0:
                if n < 0 and ctypes.get_errno() not in (errno.EAGAIN, errno.EINTR):
                    raise OSError(ctypes.get_errno(), "read of the userfaultfd")
                return
            # (the messages of one read are unpacked before the next one)
            for msg in [MSG.unpack_from(buf, off) for off in range(0, n, MSG.size)]:
                yield msg

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _select_messages():
    """pagecore's messages() where it was built (LEGORUN_NO_FASTPATH=1: this
    module's own loop, as pagecore.py does for its functions)."""
    if os.environ.get("LEGORUN_NO_FASTPATH"):
        return None
    try:
        from .._ext.pagecore import messages
    except ImportError:
        return None
    return messages


_c_messages = _select_messages()
