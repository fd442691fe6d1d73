"""The pComponent's fd table for remote files, in the kernel's model.

An fd points to an open file description (OpenFile: path, offset, status
flags), which dup and fork share; FD_CLOEXEC belongs to the fd. Only remote
fds are recorded here: every remote fd also holds a local placeholder at the
same number in the guest (an O_PATH descriptor), so the kernel hands out
numbers exactly as it would and local fds never collide with remote ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Files unlinked while open wait here, at the mount root, until their last close
# (Session.silly_rename); legorun hides this name from listings of the root.
ATTIC = ".legorun-unlinked"


@dataclass(eq=False)
class OpenFile:
    """An open file description on a mount (shared by dup'ed and inherited fds)."""
    mount: object          # legorun.paths.Mount
    path: str              # relative to the mount's root
    flags: int             # O_* status flags and access mode
    is_dir: bool = False
    offset: int = 0
    dir_after: str = ""    # getdents64: resume after this name
    dir_pos: int = 0       # entries returned so far (the d_off we hand out)
    dir_end: bool = False
    silly_name: str | None = None  # unlinked while open: renamed to this hidden name
    ino: int = 0           # the file's inode number on the server
    locked: bool = False   # took OFD or flock locks (released with the description)
    seq_next: int = 0      # where a sequential reader reads next
    ahead: tuple | None = None  # a read-ahead in flight: (offset, sizes, frame ids)
    refs: int = 0


@dataclass
class FdTable:
    """fd number -> (OpenFile, cloexec) for remote fds of one or more processes."""
    entries: dict = field(default_factory=dict)
    users: int = 1  # processes sharing this table (CLONE_FILES)

    def get(self, fd: int):
        entry = self.entries.get(fd)
        return entry[0] if entry else None

    def install(self, fd: int, ofd: OpenFile, cloexec: bool) -> OpenFile | None:
        """Point fd at ofd; returns the description it pointed to before, if any."""
        old = self.remove(fd)
        ofd.refs += 1
        self.entries[fd] = (ofd, cloexec)
        return old

    def remove(self, fd: int) -> OpenFile | None:
        """Forget fd; returns its description if this was the last reference."""
        entry = self.entries.pop(fd, None)
        if entry is None:
            return None
        ofd = entry[0]
        ofd.refs -= 1
        return ofd if ofd.refs == 0 else None

    def cloexec(self, fd: int) -> bool:
        return self.entries[fd][1]

    def set_cloexec(self, fd: int, value: bool) -> None:
        self.entries[fd] = (self.entries[fd][0], value)

    def copy(self) -> "FdTable":
        """fork without CLONE_FILES: same descriptions, new table."""
        table = FdTable(dict(self.entries))
        for ofd, _ in table.entries.values():
            ofd.refs += 1
        return table

    def share(self) -> "FdTable":
        """clone with CLONE_FILES: one more process uses this table."""
        self.users += 1
        return self

    def copy_private(self) -> "FdTable":
        """execve unshares a shared table."""
        if self.users == 1:
            return self
        self.users -= 1
        return self.copy()

    def drop_all(self) -> list:
        """A process using the table is gone; returns descriptions now unreferenced."""
        self.users -= 1
        if self.users > 0:
            return []
        return [ofd for ofd in (self.remove(fd) for fd in list(self.entries)) if ofd is not None]

    def close_on_exec(self) -> list:
        """execve: drop FD_CLOEXEC fds; returns descriptions now unreferenced."""
        freed = []
        for fd in [fd for fd, (_, cx) in self.entries.items() if cx]:
            ofd = self.remove(fd)
            if ofd is not None:
                freed.append(ofd)
        return freed

    def __contains__(self, fd: int) -> bool:
        return fd in self.entries

    def __len__(self) -> int:
        return len(self.entries)
