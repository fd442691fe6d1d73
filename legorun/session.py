"""One legorun run: mounts, component clients, the remote open-file registry, stats."""
from __future__ import annotations

import errno as E
import os
import signal
import sys
from typing import TYPE_CHECKING

from .components import EmbeddedComponent, StartError, default_storage_root
from .errors import ComponentError, FatalError
from .fdtable import ATTIC
from .kernel.seccomp import SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_SET_MODE_FILTER, SECCOMP_SYSCALL
from .kernel.sysnums import NAMES
from .paths import MountTable
from .proto import storage as pb
from .stats import RunStats
from .syscalls import table

if TYPE_CHECKING:
    from .storage_client import StorageClient


class Session:
    def __init__(self, mounts: list, storage: str | None = None, token: str | None = None,
                 tls_ca: str | None = None) -> None:
        self.mounts = MountTable(mounts)
        self.storage_address = storage
        self.token = token
        self.tls_ca = tls_ca
        self.stats = RunStats()
        self.trace = None           # legorun.trace.TraceWriter with --trace
        self.memory = None          # legorun.memory.excache.MemoryManager with --excache/--mem
        self._said = set()
        self.tracer = None          # set by the Tracer that runs this session
        self._client = None
        self._embedded = []
        self._failed = set()
        self.open_files: dict = {}  # (mount, path) -> set of OpenFile
        self.session_id = os.urandom(8).hex()  # names this run's lock owners on servers
        self.lock_epoch = 0         # bumped on every unlock: parked lock waiters retry
        self.snapshots: dict = {}   # (mount path, rel) -> (size, mtime_ns, local copy)
        self._snapshot_dir = None
        self.native_cpus = None     # the guest's CPUs natively, when legorun pinned it
        self.guest_set_affinity = set()  # tids whose affinity the guest chose itself

    # ---- components

    def storage(self, mount) -> StorageClient:
        client = self._client
        if client is None:
            client = self._client = self._connect_storage()
        return client

    def _connect_storage(self) -> StorageClient:
        address = self.storage_address
        comp = None
        if address is None:
            root = default_storage_root()
            os.makedirs(root, exist_ok=True)
            comp = EmbeddedComponent("scomponent", "legorun_components.scomponent", ["--root", root])
            try:
                comp.launch(cpus=self.component_cpus())
            except StartError as e:
                raise FatalError(str(e)) from None
        # Loading gRPC here takes ~45 ms: while an embedded component boots
        # (~90 ms, on another CPU), not after it.
        from .storage_client import StorageClient
        if comp is not None:
            try:
                address = comp.wait_ready()
            except StartError as e:
                raise FatalError(str(e)) from None
            self._embedded.append(comp)
        client = StorageClient(address, token=self.token, tls_ca=self.tls_ca, name="sComponent")
        try:
            client.connect()
        except ComponentError as e:
            raise FatalError(str(e)) from None
        return client

    def pin(self) -> None:
        """Run legorun and the guest on one CPU: a ptrace stop that crosses CPUs
        costs several times more than one that stays (a wake-up IPI each way)."""
        cpus = os.sched_getaffinity(0)
        if len(cpus) < 2:
            return
        try:  # field 39 of /proc/self/stat: the CPU this process last ran on
            with open("/proc/self/stat") as f:
                here = int(f.read().rpartition(")")[2].split()[36])
        except (OSError, ValueError, IndexError):
            here = -1
        cpu = here if here in cpus else max(cpus)
        self.native_cpus = sorted(cpus)
        os.sched_setaffinity(0, {cpu})

    def component_cpus(self):
        """Embedded components run beside the guest, on the other CPUs."""
        if self.native_cpus is None:
            return None
        return set(self.native_cpus) - os.sched_getaffinity(0) or None

    def component_failed(self, err: ComponentError) -> None:
        key = (err.name, err.address)  # one line per component, not per failed call
        if key not in self._failed:
            self._failed.add(key)
            self.say(f"{err}; the guest gets EIO")

    def snapshot_dir(self) -> str:
        """Where local copies of remote files live while the guest maps or runs them."""
        if self._snapshot_dir is None:
            import tempfile
            self._snapshot_dir = tempfile.mkdtemp(prefix="legorun-snapshots-")
        return self._snapshot_dir

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
        if self._snapshot_dir is not None:
            import shutil
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
        if self._client is not None:
            self._client.close()
        for comp in self._embedded:
            comp.stop()

    def rpc_stats(self) -> dict:
        out = {"sComponent": self._client.stats()} if self._client is not None else {}
        if self.memory is not None and self.memory._client is not None:
            out["mComponent"] = self.memory._client.stats()
        return out

    # ---- user-facing one-liners

    def say(self, text: str) -> None:
        print(f"legorun: {text}", file=sys.stderr, flush=True)

    def say_once(self, key, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(text)

    def enable_memory(self, excache_bytes: int, address: str | None, policy: str = "2q") -> None:
        """Remote memory: an ExCache of `excache_bytes` per guest process, pages on
        the mComponent at `address` (or one started here when first needed)."""
        from .memory.excache import PAGE, MemoryManager
        booting = {}  # the embedded mComponent launched ahead, or why it could not be

        def prepare():
            """The ExCache is half full for the first time: pages may have to
            go out soon. The embedded mComponent boots meanwhile (~150 ms, on
            another CPU), and gRPC loads (~70 ms) while it does, instead of
            both at the first page sent. (gRPC loaded in a thread of its own
            beside the booting mComponent was slower: 270 ms, and the first
            store waited for it.)"""
            if address is None and not booting:
                comp = EmbeddedComponent("mcomponent", "legorun_components.mcomponent", [])
                try:
                    comp.launch(cpus=self.component_cpus())
                    booting["comp"] = comp
                    self._embedded.append(comp)  # (stopped at the end, used or not)
                except StartError as e:
                    booting["error"] = e
            from . import memory_client  # noqa: F401

        def connect():
            from .memory_client import MemoryClient
            addr = address
            if addr is None:
                prepare()
                try:
                    if "error" in booting:
                        raise booting["error"]
                    comp = booting["comp"]
                    addr = comp.wait_ready()
                except StartError as e:
                    # (the guest's memory cannot be served: the tracer kills it)
                    raise ComponentError("mComponent", "(embedded)", str(e)) from None
            client = MemoryClient(addr, token=self.token, tls_ca=self.tls_ca)
            # (the replies are read beside legorun's CPU, where the mComponent runs
            # when it is embedded)
            client.reader_cpus = self.component_cpus()
            client.connect()  # ComponentError: the tracer kills the guest (MemoryLost)
            return client
        self.memory = MemoryManager(excache_bytes // PAGE, connect, policy, prepare)

    def on_guest_job_stop(self, sig: int) -> None:
        """The guest stopped for the terminal (Ctrl-Z): stop legorun with the same
        signal, so its shell sees the job stop as it would natively."""
        previous = signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)  # returns once the shell sends SIGCONT (fg, bg)
        signal.signal(sig, previous)

    def record(self, t, nr: int, result: int, seconds: float, args: tuple = ()) -> None:
        name = NAMES.get(nr, str(nr))
        self.stats.record(name, result, seconds)
        if self.trace is not None:
            entry = table.BY_NAME.get(name)
            self.trace.syscall(t, name, args, result, entry.serves if entry else "legorun", seconds)

    # ---- the remote fd table

    def install_fd(self, tracer, t, fd: int, ofd, cloexec: bool) -> None:
        proc = t.process
        old = proc.fds.install(fd, ofd, cloexec)
        if old is not None:
            self.release(old)
        self.open_files.setdefault((ofd.mount, ofd.path), set()).add(ofd)
        if fd not in proc.covered_fds:
            self._cover(tracer, t, fd)

    def _cover(self, tracer, t, fd: int) -> None:
        """Stack a filter so that this fd's calls stop in every thread of the process."""
        prog = table.fd_filter(fd)
        addr = t.scratch(len(prog) + 16)
        t.poke(addr, (len(prog) // 8).to_bytes(2, "little") + bytes(6)
               + (addr + 16).to_bytes(8, "little") + prog)
        result = tracer.inject_syscall(t, SECCOMP_SYSCALL, (SECCOMP_SET_MODE_FILTER,
                                                            SECCOMP_FILTER_FLAG_TSYNC, addr))
        if result != 0:
            raise RuntimeError(f"cannot stack the seccomp filter for fd {fd}: result {result}")
        t.process.covered_fds.add(fd)

    def process_of(self, pid: int):
        """The traced process with this pid (or a thread id of it), if any."""
        tracer = self.tracer
        t = tracer.threads.get(pid) if tracer is not None else None
        return t.process if t is not None else None

    # ---- advisory locks

    def process_lock_owner(self, proc) -> str:
        return f"{self.session_id}:p{proc.pid}"

    def ofd_lock_owner(self, ofd) -> str:
        return f"{self.session_id}:o{id(ofd):x}"

    def locks_released(self) -> None:
        self.lock_epoch += 1

    def _release_locks(self, mount, owner: str, path: str = "") -> None:
        try:
            self.storage(mount).call(release_locks=pb.ReleaseLocks(owner=owner, path=path))
        except ComponentError as e:
            self.component_failed(e)
        self.locks_released()

    def close_file_locks(self, proc, ofd) -> None:
        """close(2) drops the process's fcntl locks on that file (POSIX's rule)."""
        key = (ofd.mount, ofd.path)
        if key in proc.lock_files:
            proc.lock_files.discard(key)
            self._release_locks(ofd.mount, self.process_lock_owner(proc), ofd.path)

    def process_gone(self, proc) -> None:
        for mount in {m for m, _ in proc.lock_files}:
            self._release_locks(mount, self.process_lock_owner(proc))
        proc.lock_files.clear()

    def invalidate_ahead(self, mount, path: str) -> None:
        """This run changes the file: read-aheads of it would be stale."""
        for ofd in self.open_files.get((mount, path.rstrip("/")), ()):
            if ofd.ahead is not None:
                self._client.forget(ofd.ahead[2])
                ofd.ahead = None

    def release(self, ofd) -> None:
        """The last fd of an open file description is gone."""
        if ofd.ahead is not None and self._client is not None:
            self._client.forget(ofd.ahead[2])
            ofd.ahead = None
        if ofd.locked:
            ofd.locked = False
            self._release_locks(ofd.mount, self.ofd_lock_owner(ofd))
        key = (ofd.mount, ofd.path)
        group = self.open_files.get(key)
        if group is not None:
            group.discard(ofd)
            if not group:
                del self.open_files[key]
        if ofd.silly_name is not None and key not in self.open_files:
            try:
                self.storage(ofd.mount).call(unlink=pb.Unlink(path=ofd.path))
            except ComponentError as e:
                self.component_failed(e)

    def is_open(self, mount, rel: str) -> bool:
        return (mount, rel.rstrip("/")) in self.open_files

    def silly_rename(self, mount, rel: str) -> None:
        """Unlink of an open file: hide it until the last close (as NFS clients do)."""
        rel = rel.rstrip("/")
        head, _, name = rel.rpartition("/")
        # Out of its directory, into the attic at the mount root: natively the name is
        # gone at once, so the directory must list as before and rmdir must succeed.
        hidden = f"{ATTIC}/{os.urandom(6).hex()}-{name}"[:len(ATTIC) + 256]
        client = self.storage(mount)
        reply = client.call(rename=pb.Rename(old_path=rel, new_path=hidden))
        if reply.errno == E.ENOENT:  # first use on this mount: make the attic, retry
            client.call(mkdir=pb.Mkdir(path=ATTIC, mode=0o700))
            reply = client.call(rename=pb.Rename(old_path=rel, new_path=hidden))
        if reply.errno == E.EXDEV:  # another file system below the root: stay beside it
            hidden = f".legorun-{os.urandom(6).hex()}-{name}"[:255]
            hidden = f"{head}/{hidden}" if head else hidden
            reply = client.call(rename=pb.Rename(old_path=rel, new_path=hidden))
        if reply.errno:
            from .tracee import GuestError
            raise GuestError(reply.errno)
        self._move(mount, rel, hidden)
        for ofd in self.open_files.get((mount, hidden), ()):
            ofd.silly_name = hidden

    def renamed(self, mount, old: str, new: str, exchange: bool = False) -> None:
        old, new = old.rstrip("/"), new.rstrip("/")
        if exchange:
            tmp = f"\0{old}"
            self._move(mount, old, tmp)
            self._move(mount, new, old)
            self._move(mount, tmp, new)
        else:
            self._move(mount, old, new)

    def _move(self, mount, old: str, new: str) -> None:
        prefix = old + "/"
        for (m, path) in list(self.open_files):
            if m is not mount or not (path == old or path.startswith(prefix)):
                continue
            moved = new + path[len(old):]
            group = self.open_files.pop((m, path))
            for ofd in group:
                ofd.path = moved
            self.open_files.setdefault((m, moved), set()).update(group)
