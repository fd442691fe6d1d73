"""Advisory locks as Linux keeps them: byte ranges per owner, per file.

Pure bookkeeping (no I/O), so it can be tested as a state machine. A file
is named by any hashable key (the sComponent uses (st_dev, st_ino)).
Within one space, a lock conflicts with another owner's overlapping lock
when either is a write lock. Setting a lock replaces the owner's own locks
over its range (splitting them), as fcntl(F_SETLK) does.
"""
from __future__ import annotations

from dataclasses import dataclass

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
EOF_ = 1 << 64  # "to the end of the file"


@dataclass(frozen=True)
class Held:
    owner: str
    type: int
    start: int
    end: int     # exclusive; EOF_ for "to the end"
    pid: int


class LockTable:
    def __init__(self) -> None:
        self._files: dict = {}  # (key, space) -> list[Held]

    def __len__(self) -> int:
        return sum(len(v) for v in self._files.values())

    @staticmethod
    def _end(start: int, length: int) -> int:
        return EOF_ if length == 0 else start + length

    def conflict(self, key, space: int, owner: str, type_: int, start: int, length: int):
        """The first lock of another owner that a lock of this type would conflict with."""
        end = self._end(start, length)
        for h in self._files.get((key, space), ()):
            if h.owner != owner and h.start < end and start < h.end and (
                    type_ == F_WRLCK or h.type == F_WRLCK):
                return h
        return None

    def set(self, key, space: int, owner: str, type_: int, start: int, length: int,
            pid: int = 0) -> bool:
        """Take (or with F_UNLCK release) the range; False on a conflict, changing nothing."""
        if type_ != F_UNLCK and self.conflict(key, space, owner, type_, start, length):
            return False
        end = self._end(start, length)
        held = self._files.get((key, space), [])
        kept = []
        for h in held:
            if h.owner != owner or h.end <= start or end <= h.start:
                kept.append(h)
                continue
            if h.start < start:  # the part before the new range survives
                kept.append(Held(h.owner, h.type, h.start, start, h.pid))
            if end < h.end:      # and the part after it
                kept.append(Held(h.owner, h.type, end, h.end, h.pid))
        if type_ != F_UNLCK:
            kept.append(Held(owner, type_, start, end, pid))
        if kept:
            self._files[(key, space)] = kept
        else:
            self._files.pop((key, space), None)
        return True

    def release(self, owner: str, key=None) -> int:
        """Drop every lock of owner (on one file when key is given); returns how many."""
        dropped = 0
        for k in list(self._files):
            if key is not None and k[0] != key:
                continue
            held = self._files[k]
            kept = [h for h in held if h.owner != owner]
            dropped += len(held) - len(kept)
            if kept:
                self._files[k] = kept
            else:
                del self._files[k]
        return dropped

    def owned(self, owner: str) -> list:
        return [h for held in self._files.values() for h in held if h.owner == owner]
