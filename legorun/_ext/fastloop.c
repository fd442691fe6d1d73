/*
 * legorun's stop fast path: wait for tracee events and answer the most common
 * one, a path syscall on a local absolute path, without entering Python.
 *
 * Every path syscall stops the guest (a seccomp filter cannot read strings).
 * Most of those paths are local and need nothing but PTRACE_CONT; doing that
 * here costs a few microseconds instead of Python's ~15. Anything else (an
 * event, a signal, a remote or relative path) is returned to the Python
 * tracer untouched, which handles it exactly as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <unistd.h>
#include <linux/openat2.h>
#include <sys/stat.h>

#define NR_MAX 512
#define PATH_FIRST 256
#define MAX_PREFIXES 16
#define EVENT_SECCOMP 7

static unsigned char path_arg[NR_MAX];      /* 1 + index of the path argument, 0: not ours */
static char *prefixes[MAX_PREFIXES];        /* mount paths, e.g. "/lego" */
static size_t prefix_len[MAX_PREFIXES];
static int nprefixes;
static unsigned long long handled;         /* stops answered here */

/* With remote memory, the path may lie in a page the ExCache evicted:
   reading it would fault into the userfaultfd that legorun itself serves
   (a deadlock). Such a stop is left to Python, which brings the page in
   first. Presence comes from /proc/TID/pagemap (bit 63), one fd per tid. */
#define PAGEMAP_FDS 16
static int check_present;
static pid_t pm_tid[PAGEMAP_FDS];
static int pm_fd[PAGEMAP_FDS] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1};
static unsigned pm_next;

static int page_present(pid_t tid, unsigned long long addr)
{
    int fd = -1;
    for (int i = 0; i < PAGEMAP_FDS; i++)
        if (pm_fd[i] >= 0 && pm_tid[i] == tid)
            fd = pm_fd[i];
    if (fd < 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/pagemap", (int)tid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return 0;
        unsigned slot = pm_next++ % PAGEMAP_FDS;
        if (pm_fd[slot] >= 0)
            close(pm_fd[slot]);
        pm_tid[slot] = tid;
        pm_fd[slot] = fd;
    }
    unsigned long long entry;
    if (pread(fd, &entry, sizeof entry, (off_t)(addr / 4096) * 8) != (ssize_t)sizeof entry)
        return 0;  /* a tid gone (or reused: the old fd reads nothing): Python decides */
    return (int)(entry >> 63);
}

static int has_dot_component(const char *p, size_t n)
{
    /* a "." or ".." component (a "/." followed by "/", "./" or the end) */
    for (const char *q = p; (q = memmem(q, n - (q - p), "/.", 2)) != NULL; q += 2) {
        size_t rest = n - (q - p) - 2;
        if (rest == 0 || q[2] == '/' || (q[2] == '.' && (rest == 1 || q[3] == '/')))
            return 1;
    }
    return 0;
}

static int surely_local(const char *p, size_t n)
{
    /* absolute, already normal (no "//", no "." or ".." component), on no mount */
    if (n == 0 || p[0] != '/')
        return 0;
    if (memmem(p, n, "//", 2) || has_dot_component(p, n))
        return 0;
    for (int i = 0; i < nprefixes; i++) {
        size_t m = prefix_len[i];
        if (n >= m && memcmp(p, prefixes[i], m) == 0 && (n == m || p[m] == '/'))
            return 0;
    }
    return 1;
}

static int no_symlink_on_the_way(const char *path)
{
    /* The kernel resolves as lexically as we do unless a symlink sits on the
       path (a local one may point into a mount). Ask it: RESOLVE_NO_SYMLINKS
       fails with ELOOP at a symlink among the directories, and O_NOFOLLOW
       hands back a final symlink itself, which Python then looks at. A
       missing component is fine: no symlink came before it. */
    struct open_how how = {.flags = O_PATH | O_CLOEXEC | O_NOFOLLOW,
                           .resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS};
    long fd = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
    if (fd < 0)
        return errno == ENOENT || errno == ENOTDIR || errno == EACCES;
    struct stat st;
    int ok = fstat((int)fd, &st) == 0 && !S_ISLNK(st.st_mode);
    close((int)fd);
    return ok;
}

static int local_path_stop(pid_t tid)
{
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, tid, 0, &regs) != 0)
        return 0;
    unsigned long long nr = regs.orig_rax;
    if (nr >= NR_MAX || !path_arg[nr])
        return 0;
    unsigned long long args[6] = {regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9};
    unsigned long long addr = args[path_arg[nr] - 1];
    if (addr == 0)
        return 0;
    if (check_present && !page_present(tid, addr))
        return 0;
    char buf[PATH_FIRST + 1];
    size_t want = PATH_FIRST;
    size_t page_left = 4096 - (addr & 4095);
    if (want > page_left)
        want = page_left;
    struct iovec local = {buf, want}, remote = {(void *)addr, want};
    ssize_t got = process_vm_readv(tid, &local, 1, &remote, 1, 0);
    if (got <= 0)
        return 0;
    char *nul = memchr(buf, 0, (size_t)got);
    if (!nul)
        return 0;          /* long path: Python reads it */
    if (!surely_local(buf, (size_t)(nul - buf)))
        return 0;
    if (!no_symlink_on_the_way(buf))
        return 0;
    if (ptrace(PTRACE_CONT, tid, 0, 0) != 0)
        return 0;
    handled++;
    return 1;
}

static PyObject *configure(PyObject *self, PyObject *args)
{
    PyObject *pfx, *table;
    int present = 0;
    if (!PyArg_ParseTuple(args, "OY|p", &pfx, &table, &present))
        return NULL;
    check_present = present;
    PyObject *seq = PySequence_Fast(pfx, "prefixes must be a sequence of bytes");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_PREFIXES) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many mounts for the fast path");
        return NULL;
    }
    for (int i = 0; i < nprefixes; i++)
        PyMem_Free(prefixes[i]);
    nprefixes = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char *s;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(seq, i), &s, &len) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        prefixes[i] = PyMem_Malloc(len + 1);
        memcpy(prefixes[i], s, len + 1);
        prefix_len[i] = (size_t)len;
        nprefixes++;
    }
    Py_DECREF(seq);
    memset(path_arg, 0, sizeof path_arg);
    Py_ssize_t tn = PyByteArray_Size(table);
    memcpy(path_arg, PyByteArray_AsString(table), tn < NR_MAX ? tn : NR_MAX);
    Py_RETURN_NONE;
}

static PyObject *wait_event(PyObject *self, PyObject *noargs)
{
    for (;;) {
        int status;
        pid_t pid;
        Py_BEGIN_ALLOW_THREADS
        pid = waitpid(-1, &status, __WALL);
        Py_END_ALLOW_THREADS
        if (pid < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return NULL;
                continue;
            }
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (WIFSTOPPED(status) && (status >> 16) == EVENT_SECCOMP && local_path_stop(pid))
            continue;
        return Py_BuildValue("(ii)", (int)pid, status);
    }
}

static PyObject *poll_event(PyObject *self, PyObject *noargs)
{
    /* As wait(), without blocking: None when no tracee has anything to report. */
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, __WALL | WNOHANG);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (pid == 0)
            Py_RETURN_NONE;
        if (WIFSTOPPED(status) && (status >> 16) == EVENT_SECCOMP && local_path_stop(pid))
            continue;
        return Py_BuildValue("(ii)", (int)pid, status);
    }
}

static PyObject *counters(PyObject *self, PyObject *noargs)
{
    return PyLong_FromUnsignedLongLong(handled);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(prefixes: list[bytes], path_arg: bytearray, remote_memory=False) -- mount "
     "paths, for each syscall number 1 + the index of its path argument (0: never answered "
     "here), and whether a path's page must be checked present first"},
    {"wait", wait_event, METH_NOARGS,
     "wait() -> (tid, status) of the next event Python must see; local path stops are "
     "answered (PTRACE_CONT) without returning"},
    {"poll", poll_event, METH_NOARGS,
     "poll() -> (tid, status) or None: as wait(), but never blocks"},
    {"handled", counters, METH_NOARGS, "stops answered by the fast path so far"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "legorun._ext.fastloop",
                                    "legorun's stop fast path", -1, methods};

PyMODINIT_FUNC PyInit_fastloop(void) { return PyModule_Create(&module); }
