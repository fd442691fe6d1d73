"""The event loop: start the guest under ptrace + seccomp and follow every task.

One thread waits for every tracee (waitpid(-1, __WALL)), dispatches seccomp
stops to the syscall handlers and follows clone/fork/vfork/exec/exit. The
guest stops only for syscalls that the base filter (or a per-fd filter
stacked later) traps; everything else runs at native speed.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time

from .fdtable import FdTable
from .kernel import ptrace as pt
from .kernel import seccomp
from .kernel.sysnums import NAMES, NR
from .errors import ComponentError, FatalError, MemoryLost
from .tracee import FsState, GuestError, Process, Thread
from .syscalls.base import Park, Rewrite
from .syscalls import table
from .syscalls.files import Redirected

OPTIONS = (pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_TRACEFORK
           | pt.PTRACE_O_TRACEVFORK | pt.PTRACE_O_TRACEEXEC | pt.PTRACE_O_TRACESECCOMP
           | pt.PTRACE_O_TRACEEXIT | pt.PTRACE_O_EXITKILL)

CLONE_VM = 0x100
CLONE_FS = 0x200
CLONE_FILES = 0x400
CLONE_VFORK = 0x4000
CLONE_THREAD = 0x10000
STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
TERMINAL_STOPS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# Signals that the terminal sends to the whole foreground group: the guest
# gets them from the terminal itself, so legorun must not forward them again.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
SIGTRAP_SYSCALL = signal.SIGTRAP | 0x80
NR_CLONE3 = NR["clone3"]
NR_CLONE = NR["clone"]


MAX_SYMLINKS = 40


def _tgkill(tgid: int, tid: int, sig: int) -> None:
    try:
        pt.libc_syscall(NR["tgkill"], tgid, tid, sig)
    except OSError:
        pass


PAGE_MASK = ~4095


def _waits_for_drop(cache, m: tuple) -> bool:
    """A fault on a page being dropped, of a thread other than the one the
    drop runs in: served once the drop is over (ExCache.evict)."""
    return (m[2] & PAGE_MASK) in cache.dropping and (m[3] & 0xFFFFFFFF) != cache.drop_tid


def _in_kernel_fault(tid: int) -> bool:
    """Blocked in a userfaultfd fault taken inside a syscall (not interruptible
    by PTRACE_INTERRUPT until the fault is served)."""
    try:
        with open(f"/proc/{tid}/wchan") as f:
            if f.read() != "handle_userfault":
                return False
        with open(f"/proc/{tid}/syscall") as f:
            return f.read().split()[0] not in ("-1", "running")
    except (OSError, IndexError):
        return False


def _apply_event(cache, event: int, a: int, b: int, c: int) -> None:
    """A userfaultfd event other than a page fault: the ExCache's books follow
    the change the kernel made (FORK: the child's uffd, claimed at its ptrace
    fork event)."""
    from .memory import uffd as U
    if event == U.UFFD_EVENT_FORK:
        cache.forked.append(a & 0xFFFFFFFF)
    elif event == U.UFFD_EVENT_UNMAP:
        cache.unmapped(a, b)
    elif event == U.UFFD_EVENT_REMOVE:
        cache.removed(a, b)
    elif event == U.UFFD_EVENT_REMAP:
        cache.remapped(a, b, c)


def _kernel_result(tracer, t, result: int) -> int:
    return result


def _fast_path(session):
    """The C fast path (legorun/_ext/fastloop.c), configured for this run's
    mounts; None if it was not built or LEGORUN_NO_FASTPATH is set."""
    if os.environ.get("LEGORUN_NO_FASTPATH"):
        return None
    try:
        from ._ext import fastloop
    except ImportError:
        return None
    from .paths import MAGIC_PREFIXES
    prefixes = [os.fsencode(m.guest_path) for m in session.mounts.mounts]
    prefixes += [p.rstrip(b"/") for p in MAGIC_PREFIXES]  # fd magic links need Python
    try:  # with remote memory a path's page must be present before it is read
        fastloop.configure(prefixes, table.fast_path_table(), session.memory is not None)
    except TypeError:  # an older build: fine without remote memory
        if session.memory is not None:
            return None
        fastloop.configure(prefixes, table.fast_path_table())
    return fastloop


class LaunchError(Exception):
    """The guest could not be started (one line for the user)."""


class Tracer:
    def __init__(self, session) -> None:
        self.session = session
        session.tracer = self
        self.threads: dict[int, Thread] = {}
        self.main_pid = 0
        self.main_status: int | None = None
        self.stats = session.stats
        self.handlers = table.HANDLERS
        self.parked: dict = {}  # tid -> (Thread, Park, nr, start): blocked in a lock wait
        self.deferred: list = []  # (tid, status) stops seen while holding threads, to handle
        self.frozen: set = set()  # tids blocked in a fault in a syscall during an eviction
        self._wake_fd: int | None = None  # the polling loop's SIGCHLD wake-up pipe
        self._woken = False

    # ---- start

    def spawn(self, argv: list, env: dict | None = None) -> int:
        program = table.base_filter(excache=self.session.memory is not None)
        saved = {s: signal.getsignal(s) for s in TERMINAL_SIGNALS}
        ready_r, ready_w = os.pipe()
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the guest-to-be
            try:
                os.close(ready_w)
                os.close(err_r)
                os.read(ready_r, 1)  # wait until the tracer has seized us
                os.close(ready_r)
                for s, h in saved.items():
                    signal.signal(s, h)
                # CPython ignores SIGPIPE and SIGXFSZ; a native guest would not
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
                seccomp.install(program)
                if env is None:
                    os.execvp(argv[0], argv)
                else:
                    os.execvpe(argv[0], argv, env)
            except OSError as e:
                code = 127 if e.errno == errno.ENOENT else 126
                os.write(err_w, f"{code} {argv[0]}: {e.strerror}".encode())
                os._exit(code)
            except BaseException:  # never fall back into the launcher's code
                os._exit(126)
        os.close(ready_r)
        os.close(err_w)
        # The terminal sends these to the whole foreground group; the guest gets
        # them itself. legorun stops itself (SIGSTOP) only once the guest has stopped.
        for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP):
            signal.signal(s, signal.SIG_IGN)
        try:
            pt.seize(pid, OPTIONS)
        except OSError as e:
            os.kill(pid, signal.SIGKILL)
            raise LaunchError(f"cannot trace the guest: {e.strerror}") from e
        self.main_pid = pid
        proc = Process(pid, FdTable(), FsState())
        t = Thread(pid, proc)
        t.attached = True
        proc.threads.add(t)
        self.threads[pid] = t
        os.write(ready_w, b"x")
        os.close(ready_w)
        self._err_pipe = err_r
        return pid

    # ---- the loop

    def run(self) -> int:
        """Follow tracees until the last one is gone; returns the main guest's wait status."""
        if self.session.memory is not None:
            self._run_polling()
            self._read_exec_error()
            return self.main_status if self.main_status is not None else 0
        fast = _fast_path(self.session)
        wait = fast.wait if fast is not None else lambda: os.waitpid(-1, pt.WALL)
        threads = self.threads
        try:
            while threads:
                if self.parked:
                    self._run_with_parked()
                    continue
                try:
                    tid, status = wait()
                except ChildProcessError:
                    break
                self._on_wait(tid, status)
        finally:
            if fast is not None:  # stops the C fast path answered on its own
                self.stats.ptrace_stops += fast.handled()
                self.stats.trapped += fast.handled()
        self._read_exec_error()
        return self.main_status if self.main_status is not None else 0

    def _on_wait(self, tid: int, status: int) -> None:
        t = self.threads.get(tid)
        if os.WIFSTOPPED(status):
            self.stats.ptrace_stops += 1
            if t is None:
                t = self._new_thread(tid)
            try:
                self._on_stop(t, status)
            except ProcessLookupError:
                pass  # the task was killed while stopped (SIGKILL); its exit follows
        else:
            if tid == self.main_pid:
                self.main_status = status
            if t is not None:
                self._forget_thread(t)

    RETRY_S = 0.02

    # ---- remote memory: tracee events and userfaultfd messages in one loop

    def _run_polling(self) -> None:
        """With --excache a thread blocked in a page fault makes no ptrace stop:
        wait for tracee events (SIGCHLD, through a wake-up pipe) and for the
        userfaultfds at once."""
        import select
        memory = self.session.memory
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_fd = signal.set_wakeup_fd(w)
        self._wake_fd = r
        self._woken = False
        old_handler = signal.signal(signal.SIGCHLD, lambda *_: None)
        self.pending_uffd = []
        fast = _fast_path(self.session)
        if fast is not None and not hasattr(fast, "poll"):
            fast = None  # an older build of the extension
        handled_before = fast.handled() if fast is not None else 0
        try:
            while self.threads:
                while True:
                    try:
                        if fast is not None:
                            event = fast.poll()
                            tid, status = event if event is not None else (0, 0)
                        else:
                            tid, status = os.waitpid(-1, pt.WALL | os.WNOHANG)
                    except ChildProcessError:
                        return
                    if tid == 0:
                        break
                    self._on_wait(tid, status)
                while self.deferred:
                    self._on_wait(*self.deferred.pop(0))
                for cache in list(memory.by_fd.values()):
                    self._serve(cache)
                if self.parked:
                    self._retry_parked()
                if not self.threads:
                    break
                poller = select.poll()
                poller.register(r, select.POLLIN)
                for fd in memory.by_fd:
                    poller.register(fd, select.POLLIN)
                if self._woken:  # a SIGCHLD drained by _wait_for: look again at once
                    self._woken = False
                    continue
                poller.poll(1 if self.pending_uffd else
                            int(self.RETRY_S * 1000) if self.parked else 1000)
                try:
                    while os.read(r, 4096):
                        pass
                except BlockingIOError:
                    pass
        except ComponentError as e:
            # a fault, an eviction, a syscall's buffer or a fork needed the
            # mComponent and it is gone or refused: no error can be handed to a
            # page fault, so the guest dies as the OOM killer would kill it
            if e.name != "mComponent":
                raise FatalError(str(e)) from None
            self._kill_all()
            raise MemoryLost(f"{e}; the guest (pid {self.main_pid}) was killed, as the OOM "
                             "killer would") from None
        finally:
            if fast is not None:  # stops the C fast path answered on its own
                self.stats.ptrace_stops += fast.handled() - handled_before
                self.stats.trapped += fast.handled() - handled_before
            signal.signal(signal.SIGCHLD, old_handler)
            signal.set_wakeup_fd(old_fd)
            self._wake_fd = None
            os.close(r)
            os.close(w)

    def _kill_all(self) -> None:
        for tid in list(self.threads):
            try:
                os.kill(tid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _serve(self, cache) -> None:
        from .memory import uffd as U
        queued, self.pending_uffd = self.pending_uffd, []
        messages = [m for c, m in queued if c is cache] + cache.uffd.messages()
        self.pending_uffd += [(c, m) for c, m in queued if c is not cache]
        # The events first: once read, an event no longer holds UFFDIO_COPY
        # back (EAGAIN), so a page served now lands in the mm as the event left
        # it; a fault still waiting may take effect after the event, as it could
        # natively (its access has not happened yet).
        faults = []
        for m in messages:
            if m[0] == U.UFFD_EVENT_PAGEFAULT:
                faults.append(m)
            elif cache.uffd.fd >= 0:
                _apply_event(cache, *m)
        for event, a, b, c in faults:
            if cache.uffd.fd < 0:
                return  # made local or gone meanwhile
            tid = c & 0xFFFFFFFF
            t = self.threads.get(tid)
            # a vfork child runs in this mm but is not stopped for evictions
            evict = t is None or t.process is None or t.process.excache is cache
            if not cache.fault(self, b, tid, evict=evict,
                               write=bool(a & U.UFFD_PAGEFAULT_FLAG_WRITE)):
                self.pending_uffd.append((cache, (event, a, b, c)))

    def wait_interrupt(self, tid: int, cache) -> bool:
        """After PTRACE_INTERRUPT: wait until `tid` stops for it (True), or is gone.
        Faults that come meanwhile (the kernel touching the guest's memory on
        its way, e.g. its rseq area) are served."""
        while True:
            status = self._wait_serving(tid, cache, None)
            if status is None or not os.WIFSTOPPED(status):
                if status is not None:
                    self._on_wait(tid, status)
                return False
            if (status >> 16) == pt.PTRACE_EVENT_STOP:
                return True
            sig = os.WSTOPSIG(status)
            if (status >> 16) == 0 and sig not in (signal.SIGTRAP, SIGTRAP_SYSCALL):
                self.threads[tid].pending_signal = sig
            pt.cont(tid)

    def hold_threads(self, tid: int, cache) -> list:
        """Stop every other thread of `tid`'s process (PTRACE_INTERRUPT), serving
        `cache`'s faults meanwhile; returns the tids to resume.

        A thread that stops for another reason first (a syscall, a signal)
        stays stopped and its stop is handled later, from the main loop. A
        thread blocked in a page fault inside a syscall (futex on an evicted
        word, read(2) into an evicted buffer) cannot stop before its fault is
        served: it is *frozen* instead, its faults left unserved until
        release_threads(), so neither it nor the kernel on its behalf runs
        while victims are read and dropped."""
        import select
        t = self.threads.get(tid)
        if t is None or t.process is None or (len(t.process.threads) < 2 and not cache.sharers):
            return []
        sharers = [self.threads[c] for c in cache.sharers if c in self.threads]
        waiting = set()
        for o in list(t.process.threads) + sharers:
            if o.tid == tid or not o.attached or o.tid in self.parked \
                    or o.tid in cache.sharers.values() \
                    or any(d[0] == o.tid for d in self.deferred):
                continue  # (a parent blocked in vfork cannot run)
            try:
                pt.interrupt(o.tid)
                waiting.add(o.tid)
            except ProcessLookupError:
                pass
        held: list = []
        retry: list = []
        while waiting:
            for other in list(waiting):
                try:
                    got, status = os.waitpid(other, pt.WALL | os.WNOHANG)
                except ChildProcessError:
                    waiting.discard(other)
                    continue
                if got:
                    waiting.discard(other)
                    if os.WIFSTOPPED(status):
                        self.stats.ptrace_stops += 1
                        if (status >> 16) == pt.PTRACE_EVENT_STOP:
                            held.append(other)
                        else:
                            self.deferred.append((other, status))
                    else:
                        self._on_wait(other, status)
                elif _in_kernel_fault(other):
                    waiting.discard(other)
                    self.frozen.add(other)  # its interrupt stop comes once it is served
            if waiting:
                self._serve_meanwhile(cache, None, retry)
                # /proc says when a thread is in a kernel fault: look again soon
                self._wait_for(cache, 0.001)
        self.pending_uffd += [(cache, m) for m in retry]
        return held

    def release_threads(self, held: list) -> None:
        self.frozen.clear()
        for tid in held:
            try:
                pt.cont(tid)
            except ProcessLookupError:
                pass

    def wait_step(self, tid: int, cache, removing: tuple) -> None:
        """After PTRACE_SINGLESTEP through an injected madvise: the madvise waits
        until its REMOVE event is read, so read the userfaultfd meanwhile."""
        status = self._wait_serving(tid, cache, removing)
        if status is None or not os.WIFSTOPPED(status):
            raise ProcessLookupError(tid)

    def _wait_serving(self, tid: int, cache, removing):
        """waitpid(tid) while serving `cache`'s userfaultfd (faults without
        eviction; REMOVE events of `removing` are legorun's own)."""
        import select
        retry: list = []
        while True:
            try:
                got, status = os.waitpid(tid, pt.WALL | os.WNOHANG)
            except ChildProcessError:
                return None
            if got:
                if os.WIFSTOPPED(status):
                    self.stats.ptrace_stops += 1
                self.pending_uffd += [(cache, m) for m in retry]
                return status
            self._serve_meanwhile(cache, removing, retry)
            self._wait_for(cache, 0.05)

    def _wait_for(self, cache, timeout: float) -> None:
        """Sleep until `cache`'s userfaultfd has a message, a tracee changes
        state (SIGCHLD, on the main loop's wake-up pipe) or `timeout` passes.
        A drained wake-up is remembered for the main loop (self._woken)."""
        import select
        fds = [cache.uffd.fd] if self._wake_fd is None else [cache.uffd.fd, self._wake_fd]
        ready = select.select(fds, [], [], timeout)[0]
        if self._wake_fd is not None and self._wake_fd in ready:
            try:
                while os.read(self._wake_fd, 4096):
                    pass
            except BlockingIOError:
                pass
            self._woken = True

    def _serve_meanwhile(self, cache, removing, retry: list) -> int:
        """Serve the faults waiting on `cache`'s userfaultfd without evicting,
        except those of frozen threads (they stay blocked until the eviction
        is over) and those of pages being dropped (served once the drop is
        over); other events are queued for the main loop. Returns the
        bytes of the REMOVE events of `removing` read (legorun's own drop)."""
        from .memory import uffd as U
        own = 0
        for m in cache.uffd.messages():
            if m[0] == U.UFFD_EVENT_REMOVE and removing and removing[0] <= m[1] \
                    and m[2] <= removing[1]:
                own += m[2] - m[1]
                continue  # our own drop
            if m[0] != U.UFFD_EVENT_PAGEFAULT:
                # Applied now, not queued: once read, the event no longer
                # makes UFFDIO_COPY fail (EAGAIN), so a page served after this
                # (a fault below, the one being served) must see its effect
                _apply_event(cache, *m)
            elif (m[3] & 0xFFFFFFFF) not in self.frozen and not _waits_for_drop(cache, m):
                retry.append(m)
            else:
                self.pending_uffd.append((cache, m))
        for m in retry[:]:
            if (m[3] & 0xFFFFFFFF) in self.frozen or _waits_for_drop(cache, m):
                # (frozen since it was queued; or a page being dropped: once
                # its REMOVE event is read the kernel zaps it, so a copy made
                # before the zap would be lost while the books say resident)
                retry.remove(m)
                self.pending_uffd.append((cache, m))
            elif cache.fault(self, m[2], m[3] & 0xFFFFFFFF, evict=False,
                             write=bool(m[1] & U.UFFD_PAGEFAULT_FLAG_WRITE)):
                retry.remove(m)
        return own

    def _run_with_parked(self) -> None:
        """Some threads wait for a lock: wake up for tracee events or to retry them."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            epoch = -1
            while self.parked and self.threads:
                drained = False
                while True:
                    try:
                        tid, status = os.waitpid(-1, pt.WALL | os.WNOHANG)
                    except ChildProcessError:
                        return
                    if tid == 0:
                        break
                    drained = True
                    self._on_wait(tid, status)
                if self.session.lock_epoch != epoch or not drained:
                    epoch = self.session.lock_epoch
                    self._retry_parked()
                if self.parked and not drained:
                    signal.sigtimedwait([signal.SIGCHLD], self.RETRY_S)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _retry_parked(self) -> None:
        for tid, (t, park, nr, start) in list(self.parked.items()):
            try:
                result = park.retry()
            except GuestError as e:
                result = -e.errno
            if result is None:
                continue
            del self.parked[tid]
            r = t.regs
            self.session.record(t, nr, result, time.perf_counter() - start,
                                (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9))
            try:
                t.set_result(result)
                pt.cont(t.tid)
            except ProcessLookupError:
                pass

    def _note_peak_rss(self, pid: int) -> None:
        """The process is about to exit: its mm's high-water mark is the guest's
        true peak RSS (wait4's would include the Python legorun forked it from)."""
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        kb = int(line.split()[1])
                        self.stats.peak_rss_kb = max(self.stats.peak_rss_kb, kb)
                        return
        except (OSError, ValueError):
            pass

    def _read_exec_error(self) -> None:
        try:
            msg = os.read(self._err_pipe, 4096).decode(errors="replace")
            os.close(self._err_pipe)
        except OSError:
            return
        if msg:
            _, _, text = msg.partition(" ")
            print(f"legorun: {text}", file=sys.stderr)

    def _on_stop(self, t: Thread, status: int) -> None:
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event == pt.PTRACE_EVENT_SECCOMP:
            self._on_seccomp(t)
        elif sig == SIGTRAP_SYSCALL:
            self._on_syscall_exit(t)
        elif event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
            self._on_clone(t, event)
        elif event == pt.PTRACE_EVENT_EXEC:
            self._on_exec(t)
        elif event == pt.PTRACE_EVENT_STOP:
            self._on_event_stop(t, sig)
        elif event == pt.PTRACE_EVENT_EXIT:
            if t.process is not None and t.tid == t.process.pid:
                self._note_peak_rss(t.tid)
            if t.clear_tid and t.process is not None and t.process.excache is not None:
                # the kernel writes 0 there on its way out, where a fault can
                # no longer be served (PF_EXITING): pthread_join waits for it.
                # (Another thread's madvise, glibc freeing an exited thread's
                # stack, may hold the mm: its event is read and the page
                # mapped again.)
                cache, retry = t.process.excache, []
                for _ in range(1000):
                    if cache.ensure(t.clear_tid, 4, pin=True):
                        break
                    self._wait_for(cache, 0.001)
                    self._serve_meanwhile(cache, None, retry)
                self.pending_uffd += [(cache, m) for m in retry]
            if t.process is not None and len(t.process.threads) == 1 \
                    and t.process.excache is not None:
                # the last thread leaves (by exit(2) perhaps, not exit_group):
                # the dropper must not keep the process alive, and ends with
                # the same status (PTRACE_GETEVENTMSG: the exit's wait status)
                t.process.excache.stop_dropper(pt.geteventmsg(t.tid) >> 8 & 0xFF)
            pt.cont(t.tid)
        elif event:
            pt.cont(t.tid)
        else:  # signal-delivery-stop: hand the signal on
            pt.cont(t.tid, sig)

    # ---- syscalls

    def _on_seccomp(self, t: Thread) -> None:
        regs = t.fetch_regs()
        nr = regs.orig_rax
        handler = self.handlers.get(nr)
        if handler is None:
            pt.cont(t.tid)
            return
        self.stats.trapped += 1
        session = self.session
        start = time.perf_counter()
        args = (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)
        try:
            outcome = handler(session, t, args)
        except GuestError as e:
            outcome = -e.errno
        except Redirected as r:
            outcome = self._redirected(t, nr, handler, args, r)
        except (FatalError, ProcessLookupError):
            raise
        except ComponentError as e:
            if e.name != "mComponent":
                raise FatalError(str(e)) from None
            raise  # the guest's memory cannot be served: _run_polling kills it
        except Exception as e:  # a bug in a handler: one line, and the call fails
            session.say(f"internal error in {NAMES.get(nr, nr)} for pid {t.tid}: {e!r}; "
                        "the call fails with EIO")
            outcome = -errno.EIO
        if outcome is None:
            pt.cont(t.tid)
            return
        if isinstance(outcome, Rewrite):
            outcome.apply(t)
            t.on_exit = (outcome, nr, start)
            pt.syscall(t.tid)
            return
        if isinstance(outcome, Park):
            self.parked[t.tid] = (t, outcome, nr, start)
            return
        session.record(t, nr, outcome, time.perf_counter() - start, args)
        t.set_result(outcome)
        pt.cont(t.tid)

    def _redirected(self, t: Thread, nr: int, handler, args: tuple, r):
        """The path crossed a symlink off its mount: make the call again with the
        guest path it leads to (on a mount, or local for the kernel to serve)."""
        for _ in range(MAX_SYMLINKS):
            try:
                index = args.index(t.path_addr)
            except ValueError:
                return -errno.EXDEV
            data = os.fsencode(r.path) + b"\0"
            addr = t.scratch(len(data), below=4096)  # clear of other scratch writes
            t.poke(addr, data)
            args = args[:index] + (addr,) + args[index + 1:]
            try:
                outcome = handler(self.session, t, args)
            except GuestError as e:
                return -e.errno
            except Redirected as again:
                r = again
                continue
            if outcome is None:  # a local path now: the kernel runs it
                return Rewrite(nr, args, _kernel_result)
            return outcome
        return -errno.ELOOP

    def _on_syscall_exit(self, t: Thread) -> None:
        pending = t.on_exit
        if pending is None:  # not ours (e.g. after an injected syscall); keep going
            pt.cont(t.tid)
            return
        t.on_exit = None
        rewrite, nr, start = pending
        regs = t.fetch_regs()
        result = regs.rax - (1 << 64) if regs.rax >= 1 << 63 else regs.rax
        try:
            value = rewrite.finish(self, t, result)
        except GuestError as e:
            value = -e.errno
        rewrite.restore(t, value)
        t.regs.rax = value & 0xFFFFFFFFFFFFFFFF
        pt.setregs(t.tid, t.regs)
        r = t.regs
        self.session.record(t, nr, value, time.perf_counter() - start,
                            (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9))
        if t.pending_signal:  # raise it again: a restart at a syscall stop may not inject it
            _tgkill(t.process.pid if t.process else t.tid, t.tid, t.pending_signal)
            t.pending_signal = 0
        pt.cont(t.tid)

    def inject_syscall(self, t: Thread, nr: int, args: tuple) -> int:
        """Run one syscall in the guest thread `t`, stopped at a syscall-exit stop.

        Rewinds to the `syscall` instruction that just ran, runs `nr` there and
        restores every register; returns the raw result (negative errno).
        """
        saved = pt.user_regs_struct()
        pt.ctypes.pointer(saved)[0] = t.regs
        regs = t.regs
        regs.rip -= 2
        regs.rax = nr
        regs.orig_rax = nr
        regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = (list(args) + [0] * 6)[:6]
        pt.setregs(t.tid, regs)
        try:
            for _ in range(2):  # syscall-enter stop, then syscall-exit stop
                pt.syscall(t.tid, 0)
                self._wait_syscall_stop(t)
            pt.getregs(t.tid, regs)
            result = regs.rax - (1 << 64) if regs.rax >= 1 << 63 else regs.rax
        finally:
            pt.ctypes.pointer(t.regs)[0] = saved
            pt.setregs(t.tid, t.regs)
        return result

    def _wait_syscall_stop(self, t: Thread) -> None:
        while True:
            _, status = os.waitpid(t.tid, pt.WALL)
            self.stats.ptrace_stops += 1
            if os.WIFSTOPPED(status) and os.WSTOPSIG(status) == SIGTRAP_SYSCALL:
                return
            if not os.WIFSTOPPED(status):
                raise ProcessLookupError(t.tid)
            sig = os.WSTOPSIG(status)
            if (status >> 16) == 0 and sig != signal.SIGTRAP:
                t.pending_signal = sig  # deliver once the injection is done
            pt.syscall(t.tid, 0)

    # ---- tasks

    def _new_thread(self, tid: int) -> Thread:
        """A task we have not been told about yet (its creator's event comes later)."""
        t = Thread(tid, None)
        self.threads[tid] = t
        return t

    def _on_event_stop(self, t: Thread, sig: int) -> None:
        if t.process is None or not t.attached:
            # a new task's first stop: run it once we know whose it is
            t.attached = True
            if t.process is not None:
                pt.cont(t.tid)
            return
        if sig in STOP_SIGNALS:  # group-stop: stay stopped but keep reporting
            pt.listen(t.tid)
            if sig in TERMINAL_STOPS and t.process.pid == self.main_pid:
                self.session.on_guest_job_stop(sig)
            return
        pt.cont(t.tid)

    def _on_clone(self, parent: Thread, event: int) -> None:
        child_tid = pt.geteventmsg(parent.tid)
        regs = parent.fetch_regs()
        if event == pt.PTRACE_EVENT_FORK:
            flags = 0
        elif event == pt.PTRACE_EVENT_VFORK:
            flags = CLONE_VM | CLONE_VFORK
        elif regs.orig_rax == NR_CLONE3:
            if parent.process.excache is not None:
                parent.process.excache.ensure(regs.rdi, 8)
            flags = int.from_bytes(parent.read_bytes(regs.rdi, 8), "little")
        else:
            flags = regs.rdi
        pproc = parent.process
        if flags & CLONE_THREAD:
            proc = pproc
        else:
            proc = Process(child_tid,
                           pproc.fds.share() if flags & CLONE_FILES else pproc.fds.copy(),
                           pproc.fs if flags & CLONE_FS else pproc.fs.copy(),
                           set(pproc.covered_fds))
            if pproc.excache is not None:
                self._child_memory(pproc.excache, proc, parent, flags)
        child = self.threads.get(child_tid)
        if child is None:
            child = Thread(child_tid, proc)
            self.threads[child_tid] = child
        else:
            child.process = proc
            if child.attached:  # its first stop came before this event
                pt.cont(child_tid)
        child.clear_tid, parent.next_clear_tid = parent.next_clear_tid, 0
        proc.threads.add(child)
        pt.cont(parent.tid)

    def _child_memory(self, cache, proc: Process, parent: Thread, flags: int) -> None:
        """A new process whose parent's memory is remote: a vfork child runs in
        the parent's mm (and ExCache) until it execs; a forked one gets its own
        ExCache, from the userfaultfd the FORK event handed over."""
        from .memory import uffd as U
        if flags & CLONE_VM:
            proc.excache_off = True  # no userfaultfd of its own in a borrowed mm
            proc.shares_mm = cache
            cache.sharers[proc.pid] = parent.tid
            return
        if not cache.forked:
            proc.excache_off = True
            self.session.say_once(f"nofork{proc.pid}", f"no userfaultfd came with the fork of "
                                  f"pid {proc.pid}: its memory is local")
            return
        uffd = U.Userfaultfd(cache.forked.pop(0))
        os.set_blocking(uffd.fd, False)
        proc.excache = cache.fork_child(proc.pid, uffd)
        self.session.memory.add(proc.excache)

    def _unshare_mm(self, proc: Process) -> None:
        """A vfork child execs or exits: its parent runs again, alone in its mm."""
        if proc.shares_mm is not None:
            proc.shares_mm.sharers.pop(proc.pid, None)
            proc.shares_mm = None

    def _on_exec(self, t: Thread) -> None:
        former = pt.geteventmsg(t.tid)
        proc = t.process
        if former != t.tid:
            old = self.threads.pop(former, None)
            if old is not None:
                proc.threads.discard(old)
        for other in list(proc.threads):
            if other is not t:
                proc.threads.discard(other)
                self.threads.pop(other.tid, None)
        if proc.excache is not None:  # the old mm is gone with its userfaultfd
            proc.excache.close()
            proc.excache = None
        self._unshare_mm(proc)
        proc.excache_off = False
        # execve unshares the fd table, then closes close-on-exec fds
        proc.fds = proc.fds.copy_private()
        for ofd in proc.fds.close_on_exec():
            self.session.release(ofd)
        pt.cont(t.tid)

    def _forget_thread(self, t: Thread) -> None:
        self.threads.pop(t.tid, None)
        self.parked.pop(t.tid, None)
        proc = t.process
        if proc is None:
            return
        proc.threads.discard(t)
        if t.clear_tid and proc.excache is not None:
            proc.excache.unpin(t.clear_tid)
        if not proc.threads:
            self._unshare_mm(proc)
            if proc.excache is not None:
                proc.excache.close()
                proc.excache = None
            self.session.process_gone(proc)
            for ofd in proc.fds.drop_all():
                self.session.release(ofd)
