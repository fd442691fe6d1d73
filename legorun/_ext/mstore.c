/*
 * The mComponent's per-page loops in C: applying a frame's stores and
 * gathering its fetches (components/mcomponent.py holds the same two
 * functions in Python, _store_py and _fetch_py, the reference for what
 * these do; LEGORUN_NO_FASTPATH=1 selects them).
 *
 * In Python, a 256-page store frame cost ~0.7 ms of the server's one thread
 * (a slice, a compare and a Page per page, and the interpreter around
 * them), about as long as gRPC takes to carry the frame: write-back
 * waited on it. The books stay Python objects (a dict of Page, Region
 * objects); only the walk over them is here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096

static PyObject *s_start, *s_end, *s_floor, *s_data, *s_version, *s_refs;

static int all_zero(const unsigned char *p)
{
    const uint64_t *w = (const uint64_t *)p;
    if (w[0])
        return 0;  /* (most pages: decided by their first word) */
    for (int i = 0; i < PAGE / 8; i += 8)
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
            return 0;
    return 1;
}

/* obj.name as an unsigned 64-bit integer; -1 with an exception set on failure */
static int get_u64(PyObject *obj, PyObject *name, unsigned long long *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsUnsignedLongLongMask(v);
    Py_DECREF(v);
    return PyErr_Occurred() ? -1 : 0;
}

static int set_attr_u64(PyObject *obj, PyObject *name, unsigned long long value)
{
    PyObject *v = PyLong_FromUnsignedLongLong(value);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return r;
}

/* A Page(data, seq), made without running its __init__ (the interpreter
   for three assignments), and left out of the cyclic GC: it refers to a
   bytes object or None and two ints, so it is never part of a cycle, and
   the millions of them a server holds made each GC pass walk them all */
static PyObject *new_page(PyObject *page_type, PyObject *data, unsigned long long seq)
{
    if (!PyType_Check(page_type)) {
        PyErr_SetString(PyExc_TypeError, "page_type must be a type");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)page_type;
    PyObject *p = type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    PyObject *one = PyLong_FromLong(1);
    if (one == NULL || PyObject_SetAttr(p, s_data, data) < 0 || set_attr_u64(p, s_version, seq) < 0
            || PyObject_SetAttr(p, s_refs, one) < 0) {
        Py_XDECREF(one);
        Py_DECREF(p);
        return NULL;
    }
    Py_DECREF(one);
    if (PyObject_IS_GC(p))
        PyObject_GC_UnTrack(p);
    return p;
}

/* store(pages, frame, addrs, data_off, seq, region_at, held, capacity,
         page_type, status) -> (held, stored, nomem, npages_delta) */
static PyObject *store(PyObject *self, PyObject *args)
{
    PyObject *pages, *addrs, *region_at, *page_type, *status_obj;
    Py_buffer frame, status;
    Py_ssize_t data_off;
    unsigned long long seq;
    long long held, capacity;
    if (!PyArg_ParseTuple(args, "O!y*OnKOLLOO", &PyDict_Type, &pages, &frame, &addrs, &data_off,
                          &seq, &region_at, &held, &capacity, &page_type, &status_obj))
        return NULL;
    PyObject *result = NULL, *fast = NULL, *region = NULL;
    if (PyObject_GetBuffer(status_obj, &status, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&frame);
        return NULL;
    }
    fast = PySequence_Fast(addrs, "addresses must be a sequence");
    if (fast == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > status.len || data_off < 0 || data_off + n * (Py_ssize_t)PAGE > frame.len) {
        PyErr_SetString(PyExc_ValueError, "frame or status shorter than the stores");
        goto done;
    }
    unsigned char *st = status.buf;
    const unsigned char *data_at = (const unsigned char *)frame.buf + data_off;
    unsigned long long r_start = 0, r_end = 0, r_floor = 0;
    long long stored = 0, nomem = 0, npages = 0;
    for (Py_ssize_t k = 0; k < n; k++, data_at += PAGE) {
        unsigned long long addr = PyLong_AsUnsignedLongLongMask(PySequence_Fast_GET_ITEM(fast, k));
        if (addr == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
        if (region == NULL || !(r_start <= addr && addr < r_end)) {
            Py_CLEAR(region);
            PyObject *key = PySequence_Fast_GET_ITEM(fast, k);
            PyObject *r = PyObject_CallOneArg(region_at, key);
            if (r == NULL)
                goto done;
            if (r == Py_None) {
                Py_DECREF(r);
            } else {
                region = r;
                if (get_u64(r, s_start, &r_start) < 0 || get_u64(r, s_end, &r_end) < 0
                        || get_u64(r, s_floor, &r_floor) < 0)
                    goto done;
            }
        }
        if (region == NULL) {
            st[k] = EFAULT;
            continue;
        }
        if (seq && seq <= r_floor) {
            st[k] = ESTALE;
            continue;
        }
        PyObject *key = PySequence_Fast_GET_ITEM(fast, k);
        PyObject *p = PyDict_GetItemWithError(pages, key);  /* borrowed */
        if (p == NULL && PyErr_Occurred())
            goto done;
        unsigned long long version = 0, refs = 0;
        PyObject *old = NULL;
        if (p != NULL) {
            Py_INCREF(p);
            if (get_u64(p, s_version, &version) < 0 || get_u64(p, s_refs, &refs) < 0) {
                Py_DECREF(p);
                goto done;
            }
            if (seq && seq <= version) {
                st[k] = ESTALE;
                Py_DECREF(p);
                continue;
            }
            old = PyObject_GetAttr(p, s_data);
            if (old == NULL) {
                Py_DECREF(p);
                goto done;
            }
        }
        int had = old != NULL && old != Py_None;
        int zero = all_zero(data_at);
        if (!zero && (p == NULL || refs > 1 || !had)) {
            if (held + PAGE > capacity) {
                st[k] = ENOMEM;
                nomem++;
                Py_XDECREF(old);
                Py_XDECREF(p);
                continue;
            }
            held += PAGE;
        }
        PyObject *data = zero ? Py_NewRef(Py_None)
                              : PyBytes_FromStringAndSize((const char *)data_at, PAGE);
        Py_XDECREF(old);
        if (data == NULL) {
            Py_XDECREF(p);
            goto done;
        }
        int failed;
        if (p != NULL && refs == 1) {
            if (had && zero)
                held -= PAGE;
            failed = PyObject_SetAttr(p, s_data, data) < 0 || set_attr_u64(p, s_version, seq) < 0;
        } else {
            if (p != NULL)  /* shared with a fork: copy on store */
                failed = set_attr_u64(p, s_refs, refs - 1) < 0;
            else
                failed = 0;
            PyObject *fresh = failed ? NULL : new_page(page_type, data, seq);
            failed = fresh == NULL || PyDict_SetItem(pages, key, fresh) < 0;
            Py_XDECREF(fresh);
        }
        Py_DECREF(data);
        Py_XDECREF(p);
        if (failed)
            goto done;
        npages += !zero - had;
        stored++;
    }
    result = Py_BuildValue("LLLL", held, stored, nomem, npages);
done:
    Py_XDECREF(region);
    Py_XDECREF(fast);
    PyBuffer_Release(&status);
    PyBuffer_Release(&frame);
    return result;
}

/* fetch(pages, addrs, status, k, out) -> fetched: the data of each present
   page appended to the list `out`, in order; status[k + i] = ENOENT for
   the others (never stored, or stored as zeros) */
static PyObject *fetch(PyObject *self, PyObject *args)
{
    PyObject *pages, *addrs, *status_obj, *out;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "O!OOnO!", &PyDict_Type, &pages, &addrs, &status_obj, &k,
                          &PyList_Type, &out))
        return NULL;
    Py_buffer status;
    if (PyObject_GetBuffer(status_obj, &status, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *result = NULL;
    PyObject *fast = PySequence_Fast(addrs, "addresses must be a sequence");
    if (fast == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (k < 0 || k + n > status.len) {
        PyErr_SetString(PyExc_ValueError, "status shorter than the fetches");
        goto done;
    }
    unsigned char *st = status.buf;
    Py_ssize_t fetched = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyDict_GetItemWithError(pages, PySequence_Fast_GET_ITEM(fast, i));
        if (p == NULL && PyErr_Occurred())
            goto done;
        PyObject *data = p == NULL ? NULL : PyObject_GetAttr(p, s_data);
        if (p != NULL && data == NULL)
            goto done;
        if (data == NULL || data == Py_None) {
            Py_XDECREF(data);
            st[k + i] = ENOENT;
            continue;
        }
        int failed = PyList_Append(out, data);
        Py_DECREF(data);
        if (failed < 0)
            goto done;
        fetched++;
    }
    result = PyLong_FromSsize_t(fetched);
done:
    Py_XDECREF(fast);
    PyBuffer_Release(&status);
    return result;
}

static PyMethodDef methods[] = {
    {"store", store, METH_VARARGS,
     "store(pages, frame, addrs, data_off, seq, region_at, held, capacity, page_type, status)"
     " -> (held, stored, nomem, npages_delta): a frame's stores applied (mcomponent._store_py)"},
    {"fetch", fetch, METH_VARARGS,
     "fetch(pages, addrs, status, k, out) -> fetched: a frame's fetches (mcomponent._fetch_py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mstore", "The mComponent's per-page loops.", -1, methods,
};

PyMODINIT_FUNC PyInit_mstore(void)
{
    if (!(s_start = PyUnicode_InternFromString("start")) || !(s_end = PyUnicode_InternFromString("end"))
            || !(s_floor = PyUnicode_InternFromString("floor"))
            || !(s_data = PyUnicode_InternFromString("data"))
            || !(s_version = PyUnicode_InternFromString("version"))
            || !(s_refs = PyUnicode_InternFromString("refs")))
        return NULL;
    return PyModule_Create(&module);
}
