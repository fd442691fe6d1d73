/*
 * The ExCache's per-page loops in C (legorun/memory/pagecore.py is the same
 * API in pure Python, and the reference for what each function does).
 *
 * The books (which pages are resident, stored on the mComponent, dirty,
 * prefetched, in flight) stay Python sets and dicts owned by
 * legorun/memory/excache.py; these functions only walk them page by page,
 * where Python costs ~0.1-0.3 us per page and per lookup. Profiled on the
 * records benchmark at ExCache 25%, those walks were about a quarter of the
 * main thread's time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#define PAGE 4096ULL

/* PAGEMAP_SCAN (Linux 6.7+, <linux/fs.h>; older headers lack it) */
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct page_region { uint64_t start, end, categories; };
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_PFNZERO (1 << 5)
#define NOT_MAPPED (~0ULL)
#define VEC_LEN 4096

static struct page_region vec[VEC_LEN];

/* ---- fingerprints

   A page fetched from the mComponent and written since may still hold what
   the mComponent holds (CPython's reference counts: a pass over objects
   raises and lowers them again). Its eviction compares a fingerprint of its
   bytes with one of the bytes fetched and skips the write-back when they
   are equal. The fingerprint is NH (the hash of UMAC, RFC 4418) over 64-bit
   words, two passes with the key shifted by two words (Toeplitz): for two
   different pages, the chance that their fingerprints are equal is at most
   2^-128 over the choice of the key (Black et al., "UMAC: fast and secure
   message authentication", 1999), whatever the pages hold, as long as they
   do not depend on the key. The key is drawn from getrandom() when this
   module loads and never leaves legorun. ~0.3 us a page here. */

#define NH_WORDS (PAGE / 8)
#define PRINT_SIZE 32
static uint64_t nh_key[NH_WORDS + 2];

typedef unsigned __int128 u128;

static void fingerprint_of(const unsigned char *p, unsigned char out[PRINT_SIZE])
{
    u128 s0 = 0, s1 = 0;
    for (size_t i = 0; i < NH_WORDS; i += 2) {
        uint64_t a, b;
        memcpy(&a, p + 8 * i, 8);
        memcpy(&b, p + 8 * i + 8, 8);
        s0 += (u128)(a + nh_key[i]) * (b + nh_key[i + 1]);
        s1 += (u128)(a + nh_key[i + 2]) * (b + nh_key[i + 3]);
    }
    memcpy(out, &s0, 16);
    memcpy(out + 16, &s1, 16);
}

/* prints[page] = the fingerprint of these bytes; -1 with an exception set */
static int set_print(PyObject *prints, uint64_t page, const unsigned char *p)
{
    unsigned char fp[PRINT_SIZE];
    fingerprint_of(p, fp);
    PyObject *k = PyLong_FromUnsignedLongLong(page);
    PyObject *v = PyBytes_FromStringAndSize((const char *)fp, PRINT_SIZE);
    int r = (k && v) ? PyDict_SetItem(prints, k, v) : -1;
    Py_XDECREF(k);
    Py_XDECREF(v);
    return r;
}

/* 1 if prints[page] is the fingerprint of these bytes, 0 if not or absent */
static int same_print(PyObject *prints, uint64_t page, const unsigned char *p)
{
    PyObject *k = PyLong_FromUnsignedLongLong(page);
    if (!k)
        return -1;
    PyObject *v = PyDict_GetItemWithError(prints, k);   /* borrowed */
    Py_DECREF(k);
    if (!v)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) != PRINT_SIZE)
        return 0;
    unsigned char fp[PRINT_SIZE];
    fingerprint_of(p, fp);
    return memcmp(fp, PyBytes_AS_STRING(v), PRINT_SIZE) == 0;
}

static PyObject *fingerprint(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len != (Py_ssize_t)PAGE) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "fingerprint: a page is 4096 bytes");
        return NULL;
    }
    unsigned char fp[PRINT_SIZE];
    fingerprint_of(view.buf, fp);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)fp, PRINT_SIZE);
}

/* ---- small helpers */

static int contains(PyObject *set, PyObject *key)
{
    return PySet_Contains(set, key);   /* -1 on error */
}

static int append_int(PyObject *list, unsigned long long v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (!o)
        return -1;
    int r = PyList_Append(list, o);
    Py_DECREF(o);
    return r;
}

static int all_zero(const unsigned char *p)
{
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < PAGE / 8; i += 4)
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3])
            return 0;
    return 1;
}

/* The end of the contiguous run of page addresses starting at list[i] (the
   list sorted): its first address in *start, the index past it returned;
   -1 with an exception set if an item is not an address. */
static Py_ssize_t run_end(PyObject *list, Py_ssize_t i, uint64_t *start)
{
    Py_ssize_t n = PyList_GET_SIZE(list), j = i + 1;
    *start = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list, i));
    if (PyErr_Occurred())
        return -1;
    for (; j < n; j++) {
        uint64_t p = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list, j));
        if (PyErr_Occurred())
            return -1;
        if (p != *start + (uint64_t)(j - i) * PAGE)
            break;
    }
    return j;
}

/* ---- runs(pages): the contiguous runs of sorted addresses, as a list of
   (start, length); an eviction's victims are split so, 256 of them or more
   (a Python generator took ~0.12 ms a batch) */

static PyObject *runs(PyObject *self, PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "runs() takes a list of page addresses");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(arg), i = 0;
    while (i < n) {
        uint64_t start;
        Py_ssize_t j = run_end(arg, i, &start);
        if (j < 0)
            goto fail;
        PyObject *run = Py_BuildValue("(KK)", (unsigned long long)start,
                                      (unsigned long long)(j - i) * PAGE);
        if (!run || PyList_Append(out, run) < 0) {
            Py_XDECREF(run);
            goto fail;
        }
        Py_DECREF(run);
        i = j;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* ---- absent(lo, hi, stored, resident, inflight) */

static PyObject *absent(PyObject *self, PyObject *args)
{
    unsigned long long lo, hi;
    PyObject *stored, *resident, *inflight;
    if (!PyArg_ParseTuple(args, "KKOOO", &lo, &hi, &stored, &resident, &inflight))
        return NULL;
    if (!PyAnySet_Check(stored) || !PyDict_Check(resident) || !PyDict_Check(inflight)) {
        PyErr_SetString(PyExc_TypeError, "absent: stored must be a set, resident and inflight dicts");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (unsigned long long p = lo; p < hi; p += PAGE) {
        PyObject *key = PyLong_FromUnsignedLongLong(p);
        if (!key)
            goto fail;
        /* in flight first: a window asked for at the last miss mostly is */
        int keep = !PyDict_Contains(inflight, key) && contains(stored, key) == 1
                   && !PyDict_Contains(resident, key);
        if (PyErr_Occurred() || (keep && PyList_Append(out, key) < 0)) {
            Py_DECREF(key);
            goto fail;
        }
        Py_DECREF(key);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* ---- classify(pm_fd, victims, stored, dirty, ahead) */

/* The categories of the pages [start, end) into kinds[] (NOT_MAPPED where
   the scan reports nothing). -1 with errno set if the ioctl fails. */
static int scan(int fd, uint64_t start, uint64_t end, uint64_t *kinds)
{
    uint64_t n_pages = (end - start) / PAGE;
    for (uint64_t i = 0; i < n_pages; i++)
        kinds[i] = NOT_MAPPED;
    uint64_t at = start;
    while (at < end) {
        struct pm_scan_arg arg = {
            .size = sizeof arg, .start = at, .end = end, .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = VEC_LEN,
            .return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
        };
        long n = ioctl(fd, PAGEMAP_SCAN, &arg);
        if (n < 0)
            return -1;
        for (long r = 0; r < n; r++) {
            uint64_t kind = vec[r].categories;
            if (!(kind & PAGE_IS_PRESENT))
                continue;
            for (uint64_t p = vec[r].start; p < vec[r].end; p += PAGE)
                kinds[(p - start) / PAGE] = kind;
        }
        if (n < VEC_LEN || arg.walk_end <= at)
            break;
        at = arg.walk_end;
    }
    return 0;
}

static PyObject *classify(PyObject *self, PyObject *args)
{
    int fd;
    PyObject *victims, *stored, *dirty, *ahead;
    if (!PyArg_ParseTuple(args, "iO!OOO", &fd, &PyList_Type, &victims, &stored, &dirty, &ahead))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(victims);
    PyObject *need = PyList_New(0), *zeros = PyList_New(0), *gone = PyList_New(0);
    uint64_t *kinds = NULL;
    long clean = 0, used = 0, unused = 0;
    if (!need || !zeros || !gone)
        goto fail;
    Py_ssize_t i = 0;
    size_t kinds_len = 0;
    while (i < n) {
        /* one contiguous run of the (sorted) victims: one scan */
        uint64_t start;
        Py_ssize_t j = run_end(victims, i, &start);
        if (j < 0)
            goto fail;
        size_t len = (size_t)(j - i);
        if (len > kinds_len) {
            PyMem_Free(kinds);
            kinds = PyMem_Malloc(len * sizeof *kinds);
            if (!kinds) {
                PyErr_NoMemory();
                goto fail;
            }
            kinds_len = len;
        }
        if (fd < 0) {  /* the kernel cannot say: every page counts as written */
            for (size_t k = 0; k < len; k++)
                kinds[k] = PAGE_IS_PRESENT | PAGE_IS_WRITTEN;
        } else if (scan(fd, start, start + len * PAGE, kinds) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        for (size_t k = 0; k < len; k++) {
            PyObject *key = PyList_GET_ITEM(victims, i + (Py_ssize_t)k);
            uint64_t kind = kinds[k];
            PyObject *to;
            if (kind == NOT_MAPPED) {
                to = gone;
            } else if (kind & PAGE_IS_PFNZERO) {
                to = zeros;
            } else if (!(kind & PAGE_IS_WRITTEN)) {
                int s = contains(stored, key), d = s == 1 ? contains(dirty, key) : 0;
                if (s < 0 || d < 0)
                    goto fail;
                to = s && !d ? NULL : need;
                if (!to)
                    clean++;
            } else {
                to = need;
            }
            if (to && PyList_Append(to, key) < 0)
                goto fail;
            int a = contains(ahead, key);
            if (a < 0)
                goto fail;
            if (a) {
                if (kind != NOT_MAPPED && kind & PAGE_IS_WRITTEN && !(kind & PAGE_IS_PFNZERO))
                    used++;
                else
                    unused++;
            }
        }
        i = j;
    }
    PyMem_Free(kinds);
    return Py_BuildValue("(NNNlll)", need, zeros, gone, clean, used, unused);
fail:
    PyMem_Free(kinds);
    Py_XDECREF(need);
    Py_XDECREF(zeros);
    Py_XDECREF(gone);
    return NULL;
}

/* ---- read_pages(pid, mem_fd, pages) */

static PyObject *read_pages(PyObject *self, PyObject *args)
{
    int pid, mem_fd;
    PyObject *pages, *prints = Py_None;
    if (!PyArg_ParseTuple(args, "iiO!|O", &pid, &mem_fd, &PyList_Type, &pages, &prints))
        return NULL;
    if (prints != Py_None && !PyDict_Check(prints)) {
        PyErr_SetString(PyExc_TypeError, "read_pages: prints must be a dict or None");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(pages);
    PyObject *data = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)PAGE);
    PyObject *addrs = PyList_New(0), *zeros = PyList_New(0), *gone = PyList_New(0);
    PyObject *same = PyList_New(0);
    if (!data || !addrs || !zeros || !gone || !same)
        goto fail;
    unsigned char *buf = (unsigned char *)PyBytes_AS_STRING(data);
    size_t kept = 0;       /* pages kept, compacted at the front of buf */
    Py_ssize_t i = 0;
    while (i < n) {
        uint64_t start;
        Py_ssize_t j = run_end(pages, i, &start);
        if (j < 0)
            goto fail;
        size_t length = (size_t)(j - i) * PAGE;
        unsigned char *at = buf + kept * PAGE;   /* the run lands after what was kept */
        struct iovec local = {at, length}, remote = {(void *)(uintptr_t)start, length};
        /* (the GIL is kept through the calls here and in install: each takes
           microseconds, and letting go of it hands it to gRPC's threads, whose
           turn the eviction or the fault would then wait out) */
        ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (got < 0)
            got = 0;
        for (size_t off = 0; off < length; off += PAGE) {
            uint64_t page = start + off;
            unsigned char *src = at + off;
            if (off + PAGE > (size_t)got) {  /* not all there: read page by page */
                ssize_t r = pread(mem_fd, src, PAGE, (off_t)page);
                if (r != (ssize_t)PAGE) {
                    if (append_int(gone, page) < 0)  /* not present after all */
                        goto fail;
                    continue;
                }
            }
            if (all_zero(src)) {
                if (append_int(zeros, page) < 0)
                    goto fail;
                continue;
            }
            if (prints != Py_None) {
                int r = same_print(prints, page, src);
                if (r < 0 || (r && append_int(same, page) < 0))
                    goto fail;
                if (r)
                    continue;
            }
            unsigned char *dst = buf + kept * PAGE;
            if (dst != src)
                memmove(dst, src, PAGE);
            kept++;
            if (append_int(addrs, page) < 0)
                goto fail;
        }
        i = j;
    }
    if (_PyBytes_Resize(&data, (Py_ssize_t)(kept * PAGE)) < 0) {
        data = NULL;
        goto fail;
    }
    return Py_BuildValue("(NNNNN)", addrs, data, zeros, gone, same);
fail:
    Py_XDECREF(data);
    Py_XDECREF(addrs);
    Py_XDECREF(zeros);
    Py_XDECREF(gone);
    Py_XDECREF(same);
    return NULL;
}

/* ---- install(uffd, pages, datas, wp) */

/* The runs are gathered here; only the tracer thread calls install (the
   ExCache is served from it alone), so one buffer serves every call. */
static unsigned char *gather;
static size_t gather_len;

/* UFFDIO_COPY of len bytes; returns bytes mapped (>= 0), or -errno when none */
static long long uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, int wp)
{
    struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len,
                            .mode = wp ? UFFDIO_COPY_MODE_WP : 0};
    if (ioctl(fd, UFFDIO_COPY, &c) == 0)
        return (long long)len;
    if (c.copy > 0)
        return c.copy;   /* part of it (the kernel says EAGAIN for the rest) */
    return -(long long)errno;
}

static int page_view(PyObject *d, Py_buffer *view)
{
    if (PyObject_GetBuffer(d, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len != (Py_ssize_t)PAGE) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "install: a page's data is not 4096 bytes");
        return -1;
    }
    return 0;
}

/* Where datas[i:j] lie back to back in one buffer (memoryview slices of a
   fetch reply, page after page), the start of their bytes: UFFDIO_COPY then
   reads them in place, with no gather. NULL otherwise (or on error, with
   the exception set). The pointer stays valid while `datas` holds the
   views: each keeps its reply alive. */
static const unsigned char *contiguous(PyObject *datas, Py_ssize_t i, Py_ssize_t j)
{
    const unsigned char *first = NULL;
    for (Py_ssize_t k = i; k < j; k++) {
        PyObject *d = PyList_GET_ITEM(datas, k);
        if (d == Py_None || !PyMemoryView_Check(d))
            return NULL;  /* zeros, or a bytes object of its own */
        Py_buffer view;
        if (page_view(d, &view) < 0)
            return NULL;
        const unsigned char *at = view.buf;
        PyBuffer_Release(&view);
        if (k == i)
            first = at;
        else if (at != first + (size_t)(k - i) * PAGE)
            return NULL;
    }
    return first;
}

static PyObject *install(PyObject *self, PyObject *args)
{
    int fd, wp;
    PyObject *pages, *datas, *prints = Py_None, *books = Py_None;
    PyObject *resident = NULL, *stored = NULL, *ahead = NULL;
    if (!PyArg_ParseTuple(args, "iO!O!p|OO", &fd, &PyList_Type, &pages, &PyList_Type, &datas, &wp,
                          &prints, &books))
        return NULL;
    if (prints != Py_None && !PyDict_Check(prints)) {
        PyErr_SetString(PyExc_TypeError, "install: prints must be a dict or None");
        return NULL;
    }
    if (books != Py_None && !(PyTuple_Check(books) && PyTuple_GET_SIZE(books) == 3
                              && PyDict_Check(PyTuple_GET_ITEM(books, 0))
                              && PyAnySet_Check(PyTuple_GET_ITEM(books, 1))
                              && PySet_Check(PyTuple_GET_ITEM(books, 2)))) {
        PyErr_SetString(PyExc_TypeError, "install: books must be (resident dict, stored set, ahead set)");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(pages);
    if (PyList_GET_SIZE(datas) != n) {
        PyErr_SetString(PyExc_ValueError, "install: as many datas as pages");
        return NULL;
    }
    PyObject *done = PyList_New(0);
    if (!done)
        return NULL;
    if (books != Py_None) {
        /* only the pages neither resident nor dropped from the mComponent's
           books meanwhile (stored): a new pair of lists */
        resident = PyTuple_GET_ITEM(books, 0);
        stored = PyTuple_GET_ITEM(books, 1);
        ahead = PyTuple_GET_ITEM(books, 2);
        PyObject *fp = PyList_New(0), *fd_ = PyList_New(0);
        if (!fp || !fd_) {
            Py_XDECREF(fp);
            Py_XDECREF(fd_);
            goto fail;
        }
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *page = PyList_GET_ITEM(pages, k);
            int in_res = PyDict_Contains(resident, page), in_sto = PySet_Contains(stored, page);
            if (in_res < 0 || in_sto < 0 || (!in_res && in_sto &&
                    (PyList_Append(fp, page) < 0 || PyList_Append(fd_, PyList_GET_ITEM(datas, k)) < 0))) {
                Py_DECREF(fp);
                Py_DECREF(fd_);
                goto fail;
            }
        }
        pages = fp;   /* (references owned from here: released at the end) */
        datas = fd_;
        n = PyList_GET_SIZE(pages);
    } else {
        Py_INCREF(pages);
        Py_INCREF(datas);
    }
    int again = 0;
    Py_ssize_t i = 0;
    while (i < n && !again) {
        uint64_t start;
        Py_ssize_t j = run_end(pages, i, &start);
        if (j < 0)
            goto fail_books;
        size_t len = (size_t)(j - i) * PAGE;
        const unsigned char *src = contiguous(datas, i, j);
        if (src == NULL && PyErr_Occurred())
            goto fail_books;
        if (src == NULL) {  /* the run's bytes gathered, zeros for None */
            if (len > gather_len) {
                unsigned char *g = PyMem_Realloc(gather, len);
                if (!g) {
                    PyErr_NoMemory();
                    goto fail_books;
                }
                gather = g;
                gather_len = len;
            }
            for (Py_ssize_t k = i; k < j; k++) {
                PyObject *d = PyList_GET_ITEM(datas, k);
                unsigned char *to = gather + (size_t)(k - i) * PAGE;
                if (d == Py_None) {
                    memset(to, 0, PAGE);
                    continue;
                }
                Py_buffer view;
                if (page_view(d, &view) < 0)
                    goto fail_books;
                memcpy(to, view.buf, PAGE);
                PyBuffer_Release(&view);
            }
            src = gather;
        }
        size_t at = 0;
        while (at < len) {
            long long r = uffd_copy(fd, start + at, src + at, len - at, wp);
            if (r == -ENOENT && len - at > PAGE)
                /* the run spans mappings (the kernel checks the whole range
                   first): this page alone */
                r = uffd_copy(fd, start + at, src + at, PAGE, wp);
            if (r == -EEXIST || r == -ENOENT) {
                /* there already (a raced fault), or not registered: skipped */
                at += PAGE;
                continue;
            }
            if (r < 0) {  /* EAGAIN: the layout is changing; the rest later */
                again = 1;
                break;
            }
            for (uint64_t p = start + at; p < start + at + (uint64_t)r; p += PAGE) {
                size_t off = (size_t)(p - start);
                PyObject *page = PyList_GET_ITEM(pages, i + (Py_ssize_t)(off / PAGE));
                if (PyList_Append(done, page) < 0)
                    goto fail_books;
                if (prints != Py_None && PyList_GET_ITEM(datas, i + (Py_ssize_t)(off / PAGE)) != Py_None
                        && set_print(prints, p, src + off) < 0)
                    goto fail_books;
                /* (an OrderedDict: through its own setitem, which keeps the order) */
                if (resident && (PyObject_SetItem(resident, page, Py_None) < 0
                                 || PySet_Add(ahead, page) < 0))
                    goto fail_books;
            }
            at += (size_t)r;
        }
        i = j;
    }
    Py_DECREF(pages);
    Py_DECREF(datas);
    return Py_BuildValue("(NO)", done, again ? Py_True : Py_False);
fail_books:
    Py_DECREF(pages);
    Py_DECREF(datas);
fail:
    Py_DECREF(done);
    return NULL;
}

/* ---- views(reply, at, n) and take(reply, at, pages, ticket, inflight,
   resident, page): a fetch reply's pages as memoryviews of the reply (each
   keeps it alive), without a Python loop over its statuses.
   The reply: n status bytes at `at`, then the bytes of each page whose
   status is 0, back to back. */

/* The reply's bytes, checked to hold n statuses at `at` and the pages they
   announce; its memoryview in *mv. -1 with an exception set otherwise. */
static int reply_open(PyObject *reply, Py_ssize_t at, Py_ssize_t n, Py_buffer *b, PyObject **mv)
{
    if (PyObject_GetBuffer(reply, b, PyBUF_SIMPLE) < 0)
        return -1;
    Py_ssize_t present = 0;
    if (at >= 0 && n >= 0 && at + n <= b->len) {
        const unsigned char *st = (const unsigned char *)b->buf + at;
        for (Py_ssize_t k = 0; k < n; k++)
            present += st[k] == 0;
    }
    if (at < 0 || n < 0 || at + n > b->len || at + n + present * (Py_ssize_t)PAGE > b->len) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "page reply shorter than its statuses say");
        return -1;
    }
    *mv = PyMemoryView_FromObject(reply);
    if (!*mv) {
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* the k-th page's data: a view of the reply at *off (advanced), or None */
static PyObject *reply_page(PyObject *mv, const unsigned char *st, Py_ssize_t k, Py_ssize_t *off)
{
    if (st[k] != 0)
        Py_RETURN_NONE;
    PyObject *v = PySequence_GetSlice(mv, *off, *off + (Py_ssize_t)PAGE);
    *off += (Py_ssize_t)PAGE;
    return v;
}

static PyObject *views(PyObject *self, PyObject *args)
{
    PyObject *reply, *mv;
    Py_ssize_t at, n;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "Onn", &reply, &at, &n) || reply_open(reply, at, n, &b, &mv) < 0)
        return NULL;
    const unsigned char *st = (const unsigned char *)b.buf + at;
    Py_ssize_t off = at + n;
    PyObject *out = PyList_New(n);
    for (Py_ssize_t k = 0; out && k < n; k++) {
        PyObject *v = reply_page(mv, st, k, &off);
        if (!v)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, k, v);
    }
    Py_DECREF(mv);
    PyBuffer_Release(&b);
    return out;
}

static PyObject *take(PyObject *self, PyObject *args)
{
    PyObject *reply, *pages, *ticket, *inflight, *resident, *page, *mv;
    Py_ssize_t at;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "OnO!OO!OO", &reply, &at, &PyList_Type, &pages, &ticket,
                          &PyDict_Type, &inflight, &resident, &page))
        return NULL;
    if (!PyDict_Check(resident)) {
        PyErr_SetString(PyExc_TypeError, "take: resident must be a dict");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(pages);
    if (reply_open(reply, at, n, &b, &mv) < 0)
        return NULL;
    const unsigned char *st = (const unsigned char *)b.buf + at;
    Py_ssize_t off = at + n;
    PyObject *group = PyList_New(0), *datas = PyList_New(0), *first = NULL, *result = NULL;
    if (!group || !datas)
        goto done;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *p = PyList_GET_ITEM(pages, k);
        PyObject *v = reply_page(mv, st, k, &off);
        if (!v)
            goto done;
        PyObject *t = PyDict_GetItemWithError(inflight, p);   /* borrowed */
        int ours = t ? PyObject_RichCompareBool(t, ticket, Py_EQ) : 0;
        if (ours < 0 || (!t && PyErr_Occurred())) {
            Py_DECREF(v);
            goto done;
        }
        if (!ours) {  /* faulted in, dropped or moved since it was asked for */
            Py_DECREF(v);
            continue;
        }
        Py_INCREF(p);  /* (the dict may hold the list's only other reference) */
        int r = PyDict_DelItem(inflight, p), same = r < 0 ? -1 : PyObject_RichCompareBool(p, page, Py_EQ);
        int res = same == 0 ? PyDict_Contains(resident, p) : 0;
        if (same < 0 || res < 0) {
            Py_DECREF(p);
            Py_DECREF(v);
            goto done;
        }
        if (same) {
            Py_XSETREF(first, v);
        } else if (!res) {
            if (PyList_Append(group, p) < 0 || PyList_Append(datas, v) < 0) {
                Py_DECREF(p);
                Py_DECREF(v);
                goto done;
            }
            Py_DECREF(v);
        } else {
            Py_DECREF(v);
        }
        Py_DECREF(p);
    }
    result = Py_BuildValue("(OOOO)", first ? Py_True : Py_False, first ? first : Py_None, group, datas);
done:
    Py_XDECREF(first);
    Py_XDECREF(group);
    Py_XDECREF(datas);
    Py_DECREF(mv);
    PyBuffer_Release(&b);
    return result;
}

/* ---- messages(uffd_fd): every message waiting on a (non-blocking)
   userfaultfd now, as (event, a, b, c) tuples (the union as three u64) */

static PyObject *messages(PyObject *self, PyObject *arg)
{
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    unsigned char buf[64 * 32];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN && errno != EINTR) {
                PyErr_SetFromErrnoWithFilename(PyExc_OSError, "read of the userfaultfd");
                Py_DECREF(out);
                return NULL;
            }
            return out;
        }
        for (ssize_t off = 0; off + 32 <= n; off += 32) {
            uint64_t a, b, c;
            memcpy(&a, buf + off + 8, 8);
            memcpy(&b, buf + off + 16, 8);
            memcpy(&c, buf + off + 24, 8);
            PyObject *t = Py_BuildValue("(BKKK)", buf[off], (unsigned long long)a,
                                        (unsigned long long)b, (unsigned long long)c);
            if (!t || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(t);
        }
    }
}

/* ---- within(pages, start, end): the page addresses of the set or dict
   `pages` in [start, end), by whichever is shorter to walk, the range or
   the collection (an unmap forgets a range from each of the books) */

static PyObject *within(PyObject *self, PyObject *args)
{
    PyObject *pages;
    unsigned long long start, end;
    if (!PyArg_ParseTuple(args, "OKK", &pages, &start, &end))
        return NULL;
    int is_dict = PyDict_Check(pages);
    if (!is_dict && !PyAnySet_Check(pages)) {
        PyErr_SetString(PyExc_TypeError, "within: pages must be a set or a dict");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    Py_ssize_t size = is_dict ? PyDict_GET_SIZE(pages) : PySet_GET_SIZE(pages);
    if (end <= start)
        return out;
    if ((end - start) / PAGE <= (unsigned long long)size) {
        for (unsigned long long p = start; p < end; p += PAGE) {
            PyObject *key = PyLong_FromUnsignedLongLong(p);
            if (!key)
                goto fail;
            int in = is_dict ? PyDict_Contains(pages, key) : PySet_Contains(pages, key);
            if (in < 0 || (in && PyList_Append(out, key) < 0)) {
                Py_DECREF(key);
                goto fail;
            }
            Py_DECREF(key);
        }
        return out;
    }
    PyObject *it = PyObject_GetIter(pages), *key;
    if (!it)
        goto fail;
    while ((key = PyIter_Next(it)) != NULL) {
        unsigned long long p = PyLong_AsUnsignedLongLong(key);
        if (p == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();  /* (not a page address: not in the range) */
        } else if (start <= p && p < end && PyList_Append(out, key) < 0) {
            Py_DECREF(key);
            Py_DECREF(it);
            goto fail;
        }
        Py_DECREF(key);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* ---- choose(resident, count, pinned, scratch, hot): 2Q's victims, the
   oldest `count` resident pages in neither set and not hot, and the hot
   ones passed over on the way (they go to the young end) */

static int has(PyObject *books, PyObject *key)
{
    if (PyDict_Check(books))
        return PyDict_Contains(books, key);
    if (PyAnySet_Check(books))
        return PySet_Contains(books, key);
    return PySequence_Contains(books, key);
}

static PyObject *choose(PyObject *self, PyObject *args)
{
    PyObject *resident, *pinned, *scratch, *hot;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "OnOOO", &resident, &count, &pinned, &scratch, &hot))
        return NULL;
    PyObject *victims = PyList_New(0), *passed = PyList_New(0), *it = NULL, *key = NULL;
    if (!victims || !passed)
        goto fail;
    if (count > 0) {
        it = PyObject_GetIter(resident);
        if (!it)
            goto fail;
        while ((key = PyIter_Next(it)) != NULL) {
            int skip = has(pinned, key);
            if (skip == 0)
                skip = has(scratch, key);
            if (skip < 0)
                goto fail;
            if (!skip) {
                int is_hot = has(hot, key);
                if (is_hot < 0 || PyList_Append(is_hot ? passed : victims, key) < 0)
                    goto fail;
                if (!is_hot && PyList_GET_SIZE(victims) == count) {
                    Py_CLEAR(key);
                    break;
                }
            }
            Py_CLEAR(key);
        }
        if (PyErr_Occurred())
            goto fail;
        Py_CLEAR(it);
    }
    PyObject *out = PyTuple_Pack(2, victims, passed);
    Py_DECREF(victims);
    Py_DECREF(passed);
    return out;
fail:
    Py_XDECREF(key);
    Py_XDECREF(it);
    Py_XDECREF(victims);
    Py_XDECREF(passed);
    return NULL;
}

static PyMethodDef methods[] = {
    {"runs", runs, METH_O,
     "runs(pages) -> [(start, length)] of the contiguous runs of the sorted page addresses"},
    {"absent", absent, METH_VARARGS,
     "absent(lo, hi, stored, resident, inflight) -> the pages of [lo, hi) in stored and in neither dict"},
    {"classify", classify, METH_VARARGS,
     "classify(pagemap_fd, victims, stored, dirty, ahead) -> (need, zeros, gone, clean, used, unused)"},
    {"read_pages", read_pages, METH_VARARGS,
     "read_pages(pid, mem_fd, pages, prints=None) -> (addrs, data, zeros, gone, same)"},
    {"install", install, METH_VARARGS,
     "install(uffd_fd, pages, datas, wp, prints=None, books=None) -> (pages mapped, stopped by EAGAIN)"},
    {"views", views, METH_VARARGS,
     "views(reply, at, n) -> for each of the n statuses at `at`, a memoryview of its page or None"},
    {"take", take, METH_VARARGS,
     "take(reply, at, pages, ticket, inflight, resident, page) -> (found, page's data, others, their data)"},
    {"messages", messages, METH_O,
     "messages(uffd_fd) -> [(event, a, b, c)]: every message waiting on the userfaultfd now"},
    {"choose", choose, METH_VARARGS,
     "choose(resident, count, pinned, scratch, hot) -> (victims, hot pages passed over): 2Q's choice"},
    {"within", within, METH_VARARGS,
     "within(pages, start, end) -> the page addresses of the set or dict in [start, end)"},
    {"fingerprint", fingerprint, METH_O,
     "fingerprint(page) -> 32 bytes: NH of the 4096 bytes under this process's random key"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "pagecore", NULL, -1, methods};

PyMODINIT_FUNC PyInit_pagecore(void)
{
    unsigned char *k = (unsigned char *)nh_key;
    size_t got = 0;
    while (got < sizeof nh_key) {
        ssize_t r = getrandom(k + got, sizeof nh_key - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
        got += (size_t)r;
    }
    return PyModule_Create(&module);
}
