"""The one syscall table: for every syscall legorun touches, who serves it.

The seccomp filters, the handler dispatch and the compatibility page
(`python -m legorun.syscalls.table > docs/syscalls.md`) all come from TABLE.

Trap kinds:
  path     stops on every call (the path is read and resolved by legorun);
  always   stops on every call (fd-moving or rare calls legorun must see);
  fd       stops only when an fd argument is remote (per-fd stacked filter);
  fstatat  newfstatat/statx: as `fd` when AT_EMPTY_PATH names a real dirfd
           (glibc's fstat), else as `path`;
  mmap     stops only when mmap's fd argument is remote;
  remote   stops on every call, but only in processes that hold a remote fd
           (trapped by the per-fd filter);
  excache  stops on every call, but only when the guest's memory is remote;
  deny     refused inside the filter with `errno`, without a stop.
"""
from __future__ import annotations

import errno as E
from dataclasses import dataclass
from typing import Callable

from ..kernel import seccomp as sc
from ..kernel.sysnums import NR
from . import files, memory, process

LOCAL = "local kernel"
STORAGE = "sComponent"
LEGORUN = "legorun"


@dataclass(frozen=True)
class Entry:
    name: str
    trap: str
    handler: Callable | None
    serves: str          # who serves the call when it touches a mount
    note: str = ""
    errno: int = 0       # for trap == "deny"


def _e(name, trap, handler, serves=STORAGE, note="", errno=0):
    return Entry(name, trap, handler, serves, note, errno)


_REFUSED_XATTR = "the sComponent stores no extended attributes"
TABLE: list[Entry] = [
    # --- fstat and friends first: their filter jumps must stay short
    _e("newfstatat", "fstatat", files.sys_newfstatat, note="glibc's stat/lstat/fstat"),
    _e("statx", "fstatat", files.sys_statx, note="STATX_BASIC_STATS; no birth time"),
    # --- opening
    _e("open", "path", files.sys_open),
    _e("openat", "path", files.sys_openat),
    _e("openat2", "path", files.sys_openat2, note="RESOLVE_* flags other than RESOLVE_NO_SYMLINKS are ignored"),
    _e("creat", "path", files.sys_creat),
    _e("close", "fd", files.sys_close, serves=LEGORUN, note="legorun\'s fd table; the kernel keeps a placeholder at the same number"),
    _e("close_range", "always", files.sys_close_range, serves=LEGORUN, note="legorun\'s fd table; the kernel keeps a placeholder at the same number"),
    _e("dup", "fd", files.sys_dup, serves=LEGORUN, note="legorun\'s fd table; the kernel keeps a placeholder at the same number"),
    _e("dup2", "always", files.sys_dup2, serves=LEGORUN, note="legorun\'s fd table; the kernel keeps a placeholder at the same number"),
    _e("dup3", "always", files.sys_dup3, serves=LEGORUN, note="legorun\'s fd table; the kernel keeps a placeholder at the same number"),
    _e("fcntl", "fd", files.sys_fcntl, serves=LEGORUN, note="F_DUPFD*, F_GETFD/SETFD, F_GETFL/SETFL in legorun; record and OFD locks held by the sComponent (F_SETLKW waits in legorun, not in the guest)"),
    _e("flock", "fd", files.sys_flock, note="held by the sComponent for the open file description"),
    # --- data
    _e("read", "fd", files.sys_read),
    _e("write", "fd", files.sys_write),
    _e("pread64", "fd", files.sys_pread64),
    _e("pwrite64", "fd", files.sys_pwrite64),
    _e("readv", "fd", files.sys_readv),
    _e("writev", "fd", files.sys_writev),
    _e("preadv", "fd", files.sys_preadv),
    _e("pwritev", "fd", files.sys_pwritev),
    _e("preadv2", "fd", files.sys_preadv2, note="RWF_* flags ignored"),
    _e("pwritev2", "fd", files.sys_pwritev2, note="RWF_APPEND honoured, other RWF_* flags ignored"),
    _e("lseek", "fd", files.sys_lseek, serves=LEGORUN, note="offsets live in legorun's open file descriptions; SEEK_DATA/SEEK_HOLE see no holes"),
    _e("sendfile", "always", files.sys_sendfile, note="either side remote; to or from a local fd it moves up to 16 KiB a call through the guest's stack"),
    _e("copy_file_range", "always", files.sys_copy_file_range, note="between two remote fds; remote/local mix refused with EXDEV"),
    _e("splice", "always", files.sys_splice, note="a remote file and a pipe: up to 16 KiB a call through the guest's stack"),
    _e("tee", "always", files.sys_tee, serves=LEGORUN, note="EINVAL on a remote fd, as for any non-pipe"),
    _e("fsync", "fd", files.sys_fsync),
    _e("fdatasync", "fd", files.sys_fdatasync),
    _e("sync_file_range", "fd", files.sys_fdatasync),
    _e("syncfs", "fd", files.sys_fsync),
    _e("fadvise64", "fd", files.sys_noop, serves=LEGORUN, note="advice accepted and ignored"),
    _e("readahead", "fd", files.sys_noop, serves=LEGORUN, note="accepted and ignored"),
    _e("ftruncate", "fd", files.sys_ftruncate),
    _e("fallocate", "fd", files.sys_fallocate),
    _e("getdents64", "fd", files.sys_getdents64, note="names in byte order; '.' and '..' first"),
    _e("getdents", "fd", files.sys_getdents),
    _e("ioctl", "fd", files.sys_ioctl, serves=LEGORUN, note="FIONREAD answered; others ENOTTY, as for most regular files"),
    _e("mmap", "mmap", memory.sys_mmap, serves=LEGORUN, note="a remote file is mapped from a local snapshot taken at the mmap (read-only or MAP_PRIVATE); writable MAP_SHARED refused with ENODEV"),
    # --- metadata by path
    _e("stat", "path", files.sys_stat),
    _e("lstat", "path", files.sys_lstat),
    _e("fstat", "fd", files.sys_fstat),
    _e("statfs", "path", files.sys_statfs),
    _e("fstatfs", "fd", files.sys_fstatfs),
    _e("access", "path", files.sys_access),
    _e("faccessat", "path", files.sys_faccessat),
    _e("faccessat2", "path", files.sys_faccessat2),
    _e("readlink", "path", files.sys_readlink),
    _e("readlinkat", "path", files.sys_readlinkat),
    _e("chmod", "path", files.sys_chmod),
    _e("fchmod", "fd", files.sys_fchmod),
    _e("fchmodat", "path", files.sys_fchmodat),
    _e("fchmodat2", "path", files.sys_fchmodat2),
    _e("chown", "path", files.sys_chown),
    _e("lchown", "path", files.sys_lchown),
    _e("fchown", "fd", files.sys_fchown),
    _e("fchownat", "path", files.sys_fchownat),
    _e("utime", "path", files.sys_utime),
    _e("utimes", "path", files.sys_utimes),
    _e("futimesat", "path", files.sys_futimesat),
    _e("utimensat", "path", files.sys_utimensat),
    _e("truncate", "path", files.sys_truncate),
    # --- the namespace
    _e("mkdir", "path", files.sys_mkdir),
    _e("mkdirat", "path", files.sys_mkdirat),
    _e("rmdir", "path", files.sys_rmdir),
    _e("unlink", "path", files.sys_unlink, note="an open file is renamed aside until its last close (NFS's silly rename)"),
    _e("unlinkat", "path", files.sys_unlinkat),
    _e("rename", "path", files.sys_rename),
    _e("renameat", "path", files.sys_renameat),
    _e("renameat2", "path", files.sys_renameat2, note="RENAME_NOREPLACE, RENAME_EXCHANGE"),
    _e("link", "path", files.sys_link),
    _e("linkat", "path", files.sys_linkat),
    _e("symlink", "path", files.sys_symlink),
    _e("symlinkat", "path", files.sys_symlinkat),
    _e("mknod", "path", files.refuse_path(E.EPERM), serves=LEGORUN, note="device and FIFO nodes refused with EPERM"),
    _e("mknodat", "path", files.refuse_path(E.EPERM, dirfd=True), serves=LEGORUN, note="refused with EPERM"),
    # --- extended attributes
    *[_e(n, "path", files.refuse_path(E.ENOTSUP, dirfd=n.endswith("at")), serves=LEGORUN, note=_REFUSED_XATTR)
      for n in ("setxattr", "lsetxattr", "getxattr", "lgetxattr", "listxattr", "llistxattr",
                "removexattr", "lremovexattr", "setxattrat", "getxattrat", "listxattrat", "removexattrat")],
    *[_e(n, "fd", files.refuse_fd(E.ENOTSUP), serves=LEGORUN, note=_REFUSED_XATTR)
      for n in ("fsetxattr", "fgetxattr", "flistxattr", "fremovexattr")],
    # --- directories and the cwd
    _e("chdir", "path", files.sys_chdir),
    _e("fchdir", "fd", files.sys_fchdir, serves=LEGORUN, note="legorun tracks a cwd on a mount"),
    _e("getcwd", "always", files.sys_getcwd, serves=LEGORUN, note="legorun tracks a cwd on a mount"),
    _e("umask", "always", files.sys_umask, serves=LOCAL, note="legorun notes the mask to apply it to remote creations"),
    # --- rare path calls that must not reach the local kernel with a remote path
    _e("inotify_add_watch", "path", files.refuse_path(E.ENOSYS, path_arg=1), serves=LEGORUN, note="no change notification on a mount"),
    _e("name_to_handle_at", "path", files.refuse_path(E.EOPNOTSUPP, dirfd=True), serves=LEGORUN, note="no file handles"),
    _e("chroot", "path", files.refuse_path(E.EPERM), serves=LEGORUN, note="refused on a mount"),
    _e("acct", "path", files.refuse_path(E.EPERM), serves=LEGORUN, note="refused on a mount"),
    _e("swapon", "path", files.refuse_path(E.EPERM), serves=LEGORUN, note="refused on a mount"),
    _e("umount2", "path", files.refuse_path(E.EINVAL), serves=LEGORUN, note="refused on a mount"),
    _e("swapoff", "path", files.refuse_path(E.EPERM), serves=LEGORUN, note="refused on a mount"),
    _e("uselib", "path", files.refuse_path(E.ENOSYS), serves=LEGORUN, note="refused on a mount"),
    _e("pivot_root", "path", files.refuse_path(E.EINVAL), serves=LEGORUN, note="refused on a mount"),
    _e("mount", "path", files.refuse_path(E.EPERM, path_arg=1), serves=LEGORUN,
       note="mounting onto a mount path refused"),
    _e("open_tree", "path", files.refuse_path(E.EOPNOTSUPP, dirfd=True), serves=LEGORUN, note="refused on a mount"),
    _e("fspick", "path", files.refuse_path(E.EOPNOTSUPP, dirfd=True), serves=LEGORUN, note="refused on a mount"),
    _e("mount_setattr", "path", files.refuse_path(E.EOPNOTSUPP, dirfd=True), serves=LEGORUN, note="refused on a mount"),
    _e("fanotify_mark", "always", files.sys_fanotify_mark, serves=LEGORUN, note="no change notification on a mount (ENOSYS)"),
    _e("file_getattr", "path", files.refuse_path(E.ENOTSUP, dirfd=True), serves=LEGORUN, note="refused on a mount"),
    _e("file_setattr", "path", files.refuse_path(E.ENOTSUP, dirfd=True), serves=LEGORUN, note="refused on a mount"),
    # --- processes
    _e("execve", "path", process.sys_execve, note="a program on a mount runs from a local snapshot (argv unchanged; /proc/self/exe and a script's $0 name the copy)"),
    _e("execveat", "path", process.sys_execveat, note="as execve"),
    _e("unshare", "always", process.sys_unshare, serves=LOCAL,
       note="legorun follows CLONE_FILES and CLONE_FS for its remote fd table and cwd"),
    _e("ptrace", "always", process.sys_ptrace, serves=LEGORUN, note="refused with EPERM: the guest is already traced by legorun"),
    _e("sched_getaffinity", "always", process.sys_sched_getaffinity, serves=LEGORUN,
       note="with --cpus one, reports the CPUs the guest would have natively"),
    _e("sched_setaffinity", "always", process.sys_sched_setaffinity, serves=LOCAL,
       note="the guest's own choice is kept and reported as is"),
    _e("sendmsg", "remote", process.sys_sendmsg, serves=LEGORUN,
       note="SCM_RIGHTS of a remote fd refused with EOPNOTSUPP (stops only processes holding remote fds)"),
    _e("sendmmsg", "remote", process.sys_sendmmsg, serves=LEGORUN, note="as sendmsg"),
    _e("bind", "always", process.sys_bind_or_connect, serves=LEGORUN,
       note="a Unix socket path on a mount refused with EOPNOTSUPP"),
    _e("connect", "always", process.sys_bind_or_connect, serves=LEGORUN,
       note="a Unix socket path on a mount refused with EOPNOTSUPP"),
    _e("pidfd_getfd", "always", process.sys_pidfd_getfd, serves=LEGORUN,
       note="taking another process's remote fd refused with EOPNOTSUPP"),
    _e("brk", "excache", memory.sys_brk, serves=LOCAL,
       note="with --excache: the heap's growth is registered with the process's ExCache"),
    _e("mprotect", "excache", memory.sys_mprotect, serves=LOCAL,
       note="with --excache: the mComponent's record of the regions it holds follows"),
    _e("clone", "excache", memory.sys_new_task, serves=LOCAL,
       note="with --excache: a thread shares the ExCache, a forked child gets its own, a "
            "vfork child runs in its parent's; clone(CLONE_VM) alone makes the memory local"),
    _e("clone3", "excache", memory.sys_new_task, serves=LOCAL, note="as clone"),
    _e("fork", "excache", memory.sys_new_task, serves=LOCAL, note="as clone"),
    _e("vfork", "excache", memory.sys_new_task, serves=LOCAL, note="as clone"),
    _e("io_uring_setup", "deny", None, serves=LEGORUN, errno=E.ENOSYS, note="io_uring would bypass interception"),
]

BY_NAME = {e.name: e for e in TABLE}

# Path calls whose handler does nothing at all for a local path: legorun's C
# fast path may answer them (PTRACE_CONT) without Python. name -> path argument.
FAST_PATH_ARG = {
    "open": 0, "creat": 0, "openat": 1, "openat2": 1, "stat": 0, "lstat": 0, "newfstatat": 1,
    "statx": 1, "access": 0, "faccessat": 1, "faccessat2": 1, "readlink": 0, "readlinkat": 1,
    "statfs": 0, "mkdir": 0, "mkdirat": 1, "rmdir": 0, "unlink": 0, "unlinkat": 1, "chmod": 0,
    "fchmodat": 1, "fchmodat2": 1, "chown": 0, "lchown": 0, "fchownat": 1, "truncate": 0,
    "utime": 0, "utimes": 0, "futimesat": 1, "utimensat": 1, "execve": 0, "execveat": 1,
}


def fast_path_table() -> bytearray:
    """For each syscall number: 1 + the index of its path argument, or 0."""
    out = bytearray(512)
    for name, index in FAST_PATH_ARG.items():
        assert BY_NAME[name].trap in ("path", "fstatat"), name
        out[NR[name]] = index + 1
    return out
HANDLERS = {NR[e.name]: e.handler for e in TABLE if e.handler is not None}

AT_FDCWD = 0xFFFFFF9C
AT_EMPTY_PATH = 0x1000
_RET_TRACE = sc.SECCOMP_RET_TRACE
_RET_ALLOW = sc.SECCOMP_RET_ALLOW


def base_filter(excache: bool = False) -> bytes:
    """The filter installed before exec: path and fd-moving calls stop (and,
    with remote memory, every mmap and the calls that start tasks)."""
    a = sc.Assembler()
    a.load(sc.OFF_ARCH)
    a.jeq(sc.AUDIT_ARCH_X86_64, jt=1, jf=0)
    a.ret(sc.SECCOMP_RET_ERRNO | E.ENOSYS)  # i386 syscalls would bypass the table
    a.load(sc.OFF_NR)
    a.jge(sc.X32_SYSCALL_BIT, jt="enosys", jf="next")
    for e in TABLE:
        nr = NR[e.name]
        if e.trap == "fstatat":
            a.jeq(nr, jt="statx" if e.name == "statx" else "fstatat")
        elif e.trap in ("path", "always"):
            a.jeq(nr, jt=0, jf=1)
            a.ret(_RET_TRACE)
        elif e.trap == "deny":
            a.jeq(nr, jt=0, jf=1)
            a.ret(sc.SECCOMP_RET_ERRNO | e.errno)
        elif excache and (e.trap == "excache" or e.name == "mmap"):
            a.jeq(nr, jt=0, jf=1)
            a.ret(_RET_TRACE)
    a.ret(_RET_ALLOW)
    a.label("enosys")
    a.ret(sc.SECCOMP_RET_ERRNO | E.ENOSYS)
    a.label("fstatat")  # newfstatat(dirfd, path, buf, flags)
    a.load(sc.off_arg_lo(3))
    a.jset(AT_EMPTY_PATH, jt="fd_based", jf=0)
    a.ret(_RET_TRACE)
    a.label("statx")  # statx(dirfd, path, flags, mask, buf)
    a.load(sc.off_arg_lo(2))
    a.jset(AT_EMPTY_PATH, jt="fd_based", jf=0)
    a.ret(_RET_TRACE)
    a.label("fd_based")  # AT_EMPTY_PATH on a real fd: a per-fd filter decides
    a.load(sc.off_arg_lo(0))
    a.jeq(AT_FDCWD, jt=0, jf=1)
    a.ret(_RET_TRACE)
    a.ret(_RET_ALLOW)
    return a.assemble()


def fd_filter(fd: int) -> bytes:
    """A filter stacked when `fd` becomes remote: its fd calls stop from now on."""
    a = sc.Assembler()
    a.load(sc.OFF_NR)
    for e in TABLE:
        if e.trap in ("fd", "fstatat"):
            a.jeq(NR[e.name], jt="arg0")
        elif e.trap == "mmap":
            a.jeq(NR[e.name], jt="arg4")
        elif e.trap == "remote":
            a.jeq(NR[e.name], jt="trace")
    a.ret(_RET_ALLOW)
    a.label("trace")
    a.ret(_RET_TRACE)
    a.label("arg0")
    a.load(sc.off_arg_lo(0))
    a.jeq(fd & 0xFFFFFFFF, jt=0, jf=1)
    a.ret(_RET_TRACE)
    a.ret(_RET_ALLOW)
    a.label("arg4")
    a.load(sc.off_arg_lo(4))
    a.jeq(fd & 0xFFFFFFFF, jt=0, jf=1)
    a.ret(_RET_TRACE)
    a.ret(_RET_ALLOW)
    return a.assemble()


def compatibility_page() -> str:
    """The docs page generated from TABLE."""
    lines = ["# Syscall compatibility", "",
             "Generated from `legorun/syscalls/table.py` by "
             "`python -m legorun.syscalls.table`; do not edit by hand.", "",
             "Every syscall not listed runs on the local kernel untouched, at native speed "
             "(the seccomp filter lets it through without a stop).", "",
             "| syscall | stops the guest | on a mount, served by | notes |",
             "| --- | --- | --- | --- |"]
    stops = {"path": "every call", "always": "every call", "fd": "only on a remote fd",
             "fstatat": "path form: every call; fd form: only on a remote fd",
             "mmap": "only on a remote fd", "deny": "never (refused in the filter)",
             "remote": "every call, in a process holding a remote fd",
             "excache": "every call, with --excache; never otherwise"}
    for e in sorted(TABLE, key=lambda e: e.name):
        serves = e.serves if e.trap != "deny" else f"refused: {E.errorcode[e.errno]}"
        lines.append(f"| `{e.name}` | {stops[e.trap]} | {serves} | {e.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(compatibility_page(), end="")
