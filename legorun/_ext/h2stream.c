/*
 * One gRPC bidi stream over HTTP/2, in C: the mComponent's page path
 * (Memory/Pages, raw frames) without grpcio's Python layer.
 *
 * Through grpcio a page frame crosses a Python queue, a Python thread of
 * gRPC's that hands it to the core, and on the way back a Python iterator
 * fed by another: each hop takes the GIL, and those threads copy megabytes
 * of frames while they hold it, which is exactly when the fault path wants
 * it back (profiled: ~1.4 s of CPU in gRPC's Python threads on records at
 * ExCache 25%). Here the caller's thread writes each message to the socket
 * itself (send), or hands it to a writer thread of this module that writes
 * it beside the caller (post: a write-back's megabyte leaves the fault path),
 * and one reader thread, which never takes the GIL, reads the socket,
 * answers PING and SETTINGS, opens flow-control windows and assembles the
 * replies into buffers the caller gets without a copy.
 *
 * What it implements of HTTP/2 (RFC 9113) and gRPC's framing: the client
 * preface and SETTINGS (large windows and frames: the server may send a
 * 1 MiB reply as one DATA frame), one stream (id 1) opened by a HEADERS
 * block the caller encodes, DATA frames split to the peer's frame size and
 * windows, WINDOW_UPDATE, PING (answered; sent after 10 s of silence while
 * a reply is awaited, and the stream fails if 5 s more pass), RST_STREAM,
 * GOAWAY, CONTINUATION. Header blocks received (response headers,
 * trailers) are kept as bytes for the caller to decode (HPACK): they only
 * matter when the stream ends. No TLS (the caller uses grpcio for TLS).
 *
 * The stream ends at the first of: trailers or END_STREAM, RST_STREAM,
 * GOAWAY, a protocol error, EOF, a socket error, the keepalive timeout, or
 * close(). recv() then returns None once the messages received before are
 * taken, send() returns False, and why() says what happened.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { F_DATA = 0, F_HEADERS = 1, F_RST = 3, F_SETTINGS = 4, F_PUSH = 5, F_PING = 6,
       F_GOAWAY = 7, F_WINDOW = 8, F_CONT = 9 };
#define FL_END_STREAM 0x1
#define FL_ACK 0x1
#define FL_END_HEADERS 0x4
#define FL_PADDED 0x8
#define FL_PRIORITY 0x20

#define SID 1
#define WINDOW_MAX 0x7fffffffLL
#define OUR_MAX_FRAME 16777215u
#define CTL_MAX_FRAME (1u << 20)     /* the largest non-DATA frame accepted */
#define MSG_MAX (64u << 20)          /* the largest gRPC message accepted */
#define REOPEN_AT (1LL << 30)        /* received bytes before windows reopen */
#define STAGE (256u << 10)
#define KEEPALIVE_MS 10000
#define KEEPALIVE_TIMEOUT_MS 5000

/* why the stream ended */
enum { E_NONE = 0, E_TRAILERS, E_RESET, E_GOAWAY, E_EOF, E_ERRNO, E_PROTOCOL, E_TIMEOUT, E_CLOSED };
static const char *end_names[] = {"", "trailers", "reset", "goaway", "eof", "errno", "protocol",
                                  "timeout", "closed"};

/* ---- a received message: a buffer the caller reads in place */

typedef struct {
    PyObject_HEAD
    unsigned char *data;
    Py_ssize_t len;
} Message;

static void message_dealloc(Message *m)
{
    free(m->data);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int message_getbuffer(Message *m, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)m, m->data ? m->data : (unsigned char *)"", m->len,
                             1, flags);
}

static Py_ssize_t message_length(Message *m) { return m->len; }

static PyBufferProcs message_as_buffer = {(getbufferproc)message_getbuffer, NULL};
static PySequenceMethods message_as_sequence = {(lenfunc)message_length};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "legorun._ext.h2stream.Message",
    .tp_basicsize = sizeof(Message),
    .tp_dealloc = (destructor)message_dealloc,
    .tp_as_buffer = &message_as_buffer,
    .tp_as_sequence = &message_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A received gRPC message (read it through memoryview()).",
};

/* ---- the stream */

struct msg {                      /* a complete message, queued for recv() */
    struct msg *next;
    unsigned char *data;
    size_t len;
};

#define MAX_BUFS 64
struct out {                      /* a message posted: its buffers, held */
    struct out *next;
    int nb;
    size_t total;
    Py_buffer bufs[MAX_BUFS];
};

struct block {                    /* a header block received, for why() */
    struct block *next;
    unsigned char *data;
    size_t len;
};

typedef struct {
    PyObject_HEAD
    int fd;
    pthread_t reader;
    int reader_started;
    pthread_mutex_t mu;           /* everything below but the reader's own state */
    pthread_cond_t cv;            /* a message queued, a window opened, the end */
    pthread_mutex_t wmu;          /* one writer of frames at a time */
    /* sending */
    long long conn_window, stream_window, peer_initial;
    unsigned peer_max_frame;
    /* received, complete */
    struct msg *head, *tail;
    struct block *blocks, *blocks_tail;
    /* the end */
    int end, end_errno;
    unsigned end_code;
    unsigned char *debug;
    size_t debug_len;
    int waiting;                  /* a recv() or send() waits: the reader checks the peer */
    /* the reader's state (its thread alone touches it) */
    unsigned char *stage;
    size_t s_off, s_len;
    unsigned char fh[9];
    size_t fh_have;
    int in_frame;
    unsigned f_len, f_type, f_flags, f_sid;
    size_t f_done;                /* payload bytes of the current frame consumed */
    unsigned f_pad;               /* DATA: padding at the end of the frame */
    int f_pad_known;
    unsigned char *pl;            /* non-DATA payload */
    size_t pl_cap;
    unsigned char mh[5];
    size_t mh_have;
    unsigned char *m_data;
    size_t m_len, m_have;
    unsigned char *hb;            /* a header block across CONTINUATION frames */
    size_t hb_len, hb_cap;
    int hb_end_stream;
    long long unacked;
    unsigned long long pings_sent;
    /* posting: messages the writer thread sends while the caller goes on */
    pthread_t writer;
    int writer_started;
    pthread_cond_t wcv;           /* (mu) a message posted, or close() */
    struct out *oq_head, *oq_tail;  /* (mu) posted, not written yet */
    struct out *written;          /* (mu) written or dropped: buffers to release */
    int writing;                  /* (mu) the writer has a message out of the queue */
    int stopping;                 /* (mu) close(): the writer ends */
    int have_cpus;
    cpu_set_t cpus;               /* reader_cpus(): the writer's too */
} Stream;

static void put_u24(unsigned char *p, unsigned v) { p[0] = v >> 16; p[1] = v >> 8; p[2] = v; }
static void put_u32(unsigned char *p, unsigned v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static unsigned get_u32(const unsigned char *p)
{
    return ((unsigned)p[0] << 24) | ((unsigned)p[1] << 16) | ((unsigned)p[2] << 8) | p[3];
}

static void frame_header(unsigned char *h, unsigned len, unsigned type, unsigned flags, unsigned sid)
{
    put_u24(h, len);
    h[3] = type;
    h[4] = flags;
    put_u32(h + 5, sid & 0x7fffffff);
}

/* Write all of iov (blocking; wmu held). 0 or an errno. */
static int write_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr mh = {0};
        mh.msg_iov = iov;
        mh.msg_iovlen = n;
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= w;
        }
    }
    return 0;
}

/* mu held */
static void end_stream(Stream *s, int why, int err, unsigned code)
{
    if (s->end == E_NONE) {
        s->end = why;
        s->end_errno = err;
        s->end_code = code;
    }
    pthread_cond_broadcast(&s->cv);
}

static void fail(Stream *s, int why, int err, unsigned code)
{
    pthread_mutex_lock(&s->mu);
    end_stream(s, why, err, code);
    pthread_mutex_unlock(&s->mu);
    shutdown(s->fd, SHUT_RDWR);
}

/* A control frame from the reader (PING/SETTINGS ack, WINDOW_UPDATE). */
static int send_ctl(Stream *s, unsigned type, unsigned flags, unsigned sid,
                    const unsigned char *payload, unsigned len)
{
    unsigned char h[9];
    frame_header(h, len, type, flags, sid);
    struct iovec iov[2] = {{h, 9}, {(void *)payload, len}};
    pthread_mutex_lock(&s->wmu);
    int err = write_all(s->fd, iov, len ? 2 : 1);
    pthread_mutex_unlock(&s->wmu);
    return err;
}

static int window_update(Stream *s, unsigned sid, unsigned inc)
{
    unsigned char p[4];
    put_u32(p, inc & 0x7fffffff);
    return send_ctl(s, F_WINDOW, 0, sid, p, 4);
}

static void keep_block(Stream *s, const unsigned char *data, size_t len)
{
    struct block *b = malloc(sizeof *b);
    if (!b)
        return;
    b->data = malloc(len ? len : 1);
    if (!b->data) {
        free(b);
        return;
    }
    memcpy(b->data, data, len);
    b->len = len;
    b->next = NULL;
    pthread_mutex_lock(&s->mu);
    if (s->blocks_tail)
        s->blocks_tail->next = b;
    else
        s->blocks = b;
    s->blocks_tail = b;
    pthread_mutex_unlock(&s->mu);
}

/* The message being assembled is whole: queue it for recv(). */
static int finish_message(Stream *s)
{
    struct msg *m = malloc(sizeof *m);
    if (!m)
        return -1;
    m->data = s->m_data;
    m->len = s->m_len;
    m->next = NULL;
    s->m_data = NULL;
    s->mh_have = 0;
    pthread_mutex_lock(&s->mu);
    if (s->tail)
        s->tail->next = m;
    else
        s->head = m;
    s->tail = m;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* A DATA payload's bytes, in order: gRPC's 5-byte prefix, then the body. */
static int take_data(Stream *s, const unsigned char *p, size_t n)
{
    while (n > 0) {
        if (s->mh_have < 5) {
            size_t k = 5 - s->mh_have < n ? 5 - s->mh_have : n;
            memcpy(s->mh + s->mh_have, p, k);
            s->mh_have += k;
            p += k;
            n -= k;
            if (s->mh_have < 5)
                return 0;
            if (s->mh[0] != 0)
                return -1;        /* a compressed message: never asked for */
            s->m_len = get_u32(s->mh + 1);
            if (s->m_len > MSG_MAX)
                return -1;
            s->m_data = malloc(s->m_len ? s->m_len : 1);
            if (!s->m_data)
                return -1;
            s->m_have = 0;
        }
        size_t k = s->m_len - s->m_have < n ? s->m_len - s->m_have : n;
        memcpy(s->m_data + s->m_have, p, k);
        s->m_have += k;
        p += k;
        n -= k;
        if (s->m_have == s->m_len && finish_message(s) < 0)
            return -1;
    }
    return 0;
}

/* A whole non-DATA frame (payload in s->pl). 0, or -1 to end the stream. */
static int on_frame(Stream *s)
{
    unsigned len = s->f_len, flags = s->f_flags;
    unsigned char *p = s->pl;
    switch (s->f_type) {
    case F_SETTINGS:
        if (flags & FL_ACK)
            return 0;
        if (len % 6) {
            fail(s, E_PROTOCOL, 0, 6);
            return -1;
        }
        /* The peer enforces its new values once it has our ACK: the ACK goes
           out first, and only the frames written after it use them (a 4 MiB
           DATA frame sent before the ACK is a protocol error to gRPC). */
        if (send_ctl(s, F_SETTINGS, FL_ACK, 0, NULL, 0))
            return -1;
        pthread_mutex_lock(&s->mu);
        for (unsigned i = 0; i < len; i += 6) {
            unsigned id = (p[i] << 8) | p[i + 1];
            unsigned v = get_u32(p + i + 2);
            if (id == 4) {        /* INITIAL_WINDOW_SIZE */
                s->stream_window += (long long)v - s->peer_initial;
                s->peer_initial = v;
            } else if (id == 5 && v >= 16384 && v <= OUR_MAX_FRAME) {   /* MAX_FRAME_SIZE */
                s->peer_max_frame = v;
            }
        }
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        return 0;
    case F_PING:
        if (len != 8) {
            fail(s, E_PROTOCOL, 0, 6);
            return -1;
        }
        if (flags & FL_ACK)
            return 0;
        return send_ctl(s, F_PING, FL_ACK, 0, p, 8) ? -1 : 0;
    case F_WINDOW: {
        if (len != 4)
            return 0;
        long long inc = get_u32(p) & 0x7fffffff;
        pthread_mutex_lock(&s->mu);
        if (s->f_sid == 0)
            s->conn_window += inc;
        else if (s->f_sid == SID)
            s->stream_window += inc;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        return 0;
    }
    case F_HEADERS:
    case F_CONT: {
        if (s->f_sid != SID)
            return 0;
        size_t off = 0, end = len;
        if (s->f_type == F_HEADERS) {
            s->hb_len = 0;
            s->hb_end_stream = flags & FL_END_STREAM;
            if (flags & FL_PADDED) {
                if (len < 1 || p[0] >= len) {
                    fail(s, E_PROTOCOL, 0, 1);
                    return -1;
                }
                end -= p[0];
                off = 1;
            }
            if (flags & FL_PRIORITY)
                off += 5;
            if (off > end) {
                fail(s, E_PROTOCOL, 0, 1);
                return -1;
            }
        }
        size_t k = end - off;
        if (s->hb_len + k > s->hb_cap) {
            size_t cap = (s->hb_len + k) * 2;
            unsigned char *nb = realloc(s->hb, cap);
            if (!nb) {
                fail(s, E_PROTOCOL, ENOMEM, 0);
                return -1;
            }
            s->hb = nb;
            s->hb_cap = cap;
        }
        memcpy(s->hb + s->hb_len, p + off, k);
        s->hb_len += k;
        if (flags & FL_END_HEADERS) {
            keep_block(s, s->hb, s->hb_len);
            if (s->hb_end_stream) {
                fail(s, E_TRAILERS, 0, 0);
                return -1;
            }
        }
        return 0;
    }
    case F_RST:
        if (s->f_sid == SID) {
            fail(s, E_RESET, 0, len >= 4 ? get_u32(p) : 0);
            return -1;
        }
        return 0;
    case F_GOAWAY: {
        /* the stream may still run if it is at or below the last id */
        unsigned last = len >= 4 ? get_u32(p) & 0x7fffffff : 0;
        unsigned code = len >= 8 ? get_u32(p + 4) : 0;
        if (len > 8) {
            pthread_mutex_lock(&s->mu);
            free(s->debug);
            s->debug = malloc(len - 8);
            if (s->debug) {
                memcpy(s->debug, p + 8, len - 8);
                s->debug_len = len - 8;
            }
            pthread_mutex_unlock(&s->mu);
        }
        if (last < SID || code != 0) {
            fail(s, E_GOAWAY, 0, code);
            return -1;
        }
        return 0;
    }
    case F_PUSH:                  /* disabled in our SETTINGS */
        fail(s, E_PROTOCOL, 0, 1);
        return -1;
    default:
        return 0;                 /* PRIORITY, unknown types: ignored */
    }
}

/* Consume staged bytes: frame headers, DATA payloads, whole other frames.
   Returns 0, or -1 when the stream ended. */
static int consume(Stream *s)
{
    for (;;) {
        size_t avail = s->s_len - s->s_off;
        unsigned char *p = s->stage + s->s_off;
        if (!s->in_frame) {
            if (avail < 9 - s->fh_have) {
                memcpy(s->fh + s->fh_have, p, avail);
                s->fh_have += avail;
                s->s_off += avail;
                return 0;
            }
            size_t k = 9 - s->fh_have;
            memcpy(s->fh + s->fh_have, p, k);
            s->s_off += k;
            s->fh_have = 0;
            s->f_len = (s->fh[0] << 16) | (s->fh[1] << 8) | s->fh[2];
            s->f_type = s->fh[3];
            s->f_flags = s->fh[4];
            s->f_sid = get_u32(s->fh + 5) & 0x7fffffff;
            s->f_done = 0;
            s->f_pad = 0;
            s->f_pad_known = !(s->f_type == F_DATA && (s->f_flags & FL_PADDED));
            s->in_frame = 1;
            if (s->f_len > OUR_MAX_FRAME || (s->f_type != F_DATA && s->f_len > CTL_MAX_FRAME)) {
                fail(s, E_PROTOCOL, 0, 6);
                return -1;
            }
            if (s->f_type == F_DATA) {
                /* flow control: every DATA byte counts, padding included */
                s->unacked += s->f_len;
                if (s->unacked >= REOPEN_AT) {
                    unsigned inc = (unsigned)s->unacked;
                    s->unacked = 0;
                    if (window_update(s, 0, inc) || window_update(s, SID, inc)) {
                        fail(s, E_ERRNO, errno, 0);
                        return -1;
                    }
                }
            } else if (s->f_len > s->pl_cap) {
                unsigned char *np = realloc(s->pl, s->f_len);
                if (!np) {
                    fail(s, E_PROTOCOL, ENOMEM, 0);
                    return -1;
                }
                s->pl = np;
                s->pl_cap = s->f_len;
            }
            continue;
        }
        if (s->f_type == F_DATA) {
            if (!s->f_pad_known) {
                if (avail < 1)
                    return 0;
                s->f_pad = *p;
                s->s_off++;
                s->f_done = 1;
                s->f_pad_known = 1;
                if (s->f_pad + 1 > s->f_len) {
                    fail(s, E_PROTOCOL, 0, 1);
                    return -1;
                }
                continue;
            }
            size_t left = s->f_len - s->f_done;
            size_t k = left < avail ? left : avail;
            if (k == 0 && left)
                return 0;
            /* the data part, then the padding */
            size_t data_left = left > s->f_pad ? left - s->f_pad : 0;
            size_t kd = k < data_left ? k : data_left;
            if (s->f_sid == SID && kd && take_data(s, p, kd) < 0) {
                fail(s, E_PROTOCOL, 0, 1);
                return -1;
            }
            s->s_off += k;
            s->f_done += k;
            if (s->f_done < s->f_len)
                return 0;
            s->in_frame = 0;
            if ((s->f_flags & FL_END_STREAM) && s->f_sid == SID) {
                fail(s, E_TRAILERS, 0, 0);
                return -1;
            }
            continue;
        }
        size_t left = s->f_len - s->f_done;
        size_t k = left < avail ? left : avail;
        memcpy(s->pl + s->f_done, p, k);
        s->s_off += k;
        s->f_done += k;
        if (s->f_done < s->f_len)
            return 0;
        s->in_frame = 0;
        if (on_frame(s) < 0)
            return -1;
    }
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* The socket gave EOF (n == 0) or an error: the end, unless one is known
   already (close(), or the frame that ended the stream). */
static void gone(Stream *s, ssize_t n)
{
    int err = n < 0 ? errno : 0;
    pthread_mutex_lock(&s->mu);
    end_stream(s, n < 0 ? E_ERRNO : E_EOF, err, 0);
    pthread_mutex_unlock(&s->mu);
}

static void *reader_main(void *arg)
{
    Stream *s = arg;
    long long heard = now_ms(), pinged = 0;
    for (;;) {
        /* a large body is read straight into its message, past the stage
           (consume() takes every staged byte, so the stage starts empty) */
        unsigned char *into = s->stage;
        size_t room = STAGE;
        int direct = 0;
        if (s->in_frame && s->f_type == F_DATA && s->f_sid == SID && s->f_pad_known
                && s->mh_have == 5) {
            size_t data_left = s->f_len - s->f_done;
            data_left = data_left > s->f_pad ? data_left - s->f_pad : 0;
            size_t want = s->m_len - s->m_have;
            if (want > data_left)
                want = data_left;
            if (want >= 65536) {
                into = s->m_data + s->m_have;
                room = want;
                direct = 1;
            }
        }
        struct pollfd pf = {s->fd, POLLIN, 0};
        int r = poll(&pf, 1, KEEPALIVE_MS / 2);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0)
            goto quiet;
        ssize_t n = recv(s->fd, into, room, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            gone(s, n);
            return NULL;
        }
        heard = now_ms();
        pinged = 0;
        if (!direct) {
            s->s_off = 0;
            s->s_len = n;
            if (consume(s) < 0)
                return NULL;
            continue;
        }
        s->m_have += n;
        s->f_done += n;
        if (s->m_have == s->m_len && finish_message(s) < 0) {
            fail(s, E_PROTOCOL, ENOMEM, 0);
            return NULL;
        }
        if (s->f_done == s->f_len) {
            s->in_frame = 0;
            if (s->f_flags & FL_END_STREAM) {
                fail(s, E_TRAILERS, 0, 0);
                return NULL;
            }
        }
        continue;
    quiet:
        /* silence: while a reply is awaited or a send is held up (no
           window, a full socket), ping the peer; no answer in
           KEEPALIVE_TIMEOUT_MS ends the stream (a vanished or stopped host).
           A send blocked on the socket holds the write lock: then no ping
           can go out, and the silence alone counts. */
        pthread_mutex_lock(&s->mu);
        int waiting = s->waiting, ended = s->end != E_NONE;
        pthread_mutex_unlock(&s->mu);
        if (ended)
            return NULL;
        long long t = now_ms();
        if (pinged && t - pinged >= KEEPALIVE_TIMEOUT_MS) {
            fail(s, E_TIMEOUT, 0, 0);
            return NULL;
        }
        if (!pinged && waiting && t - heard >= KEEPALIVE_MS) {
            if (pthread_mutex_trylock(&s->wmu) == 0) {
                unsigned char h[9 + 8];
                unsigned long long k = ++s->pings_sent;
                frame_header(h, 8, F_PING, 0, 0);
                memcpy(h + 9, &k, 8);
                struct iovec iov = {h, sizeof h};
                int err = write_all(s->fd, &iov, 1);
                pthread_mutex_unlock(&s->wmu);
                if (err) {
                    fail(s, E_ERRNO, err, 0);
                    return NULL;
                }
            }
            pinged = t;
        }
        continue;
    }
}

static int stream_init(Stream *s, PyObject *args, PyObject *kw)
{
    int fd;
    Py_buffer headers;
    if (!PyArg_ParseTuple(args, "iy*", &fd, &headers))
        return -1;
    s->fd = -1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->wcv, NULL);
    pthread_mutex_init(&s->wmu, NULL);
    s->conn_window = 65535;
    s->stream_window = 65535;
    s->peer_initial = 65535;
    s->peer_max_frame = 16384;
    s->stage = malloc(STAGE);
    if (!s->stage) {
        PyBuffer_Release(&headers);
        PyErr_NoMemory();
        return -1;
    }
    if (headers.len > 16384 - 9) {
        PyBuffer_Release(&headers);
        PyErr_SetString(PyExc_ValueError, "header block too large");
        return -1;
    }
    /* preface, SETTINGS (no push, windows and frames as large as allowed),
       the connection's window opened, then the stream's HEADERS */
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    unsigned char out[24 + 9 + 18 + 13 + 9];
    size_t n = 0;
    memcpy(out, preface, 24);
    n = 24;
    frame_header(out + n, 18, F_SETTINGS, 0, 0);
    n += 9;
    unsigned char *st = out + n;
    st[0] = 0; st[1] = 2; put_u32(st + 2, 0);                     /* ENABLE_PUSH */
    st[6] = 0; st[7] = 4; put_u32(st + 8, (unsigned)WINDOW_MAX);  /* INITIAL_WINDOW_SIZE */
    st[12] = 0; st[13] = 5; put_u32(st + 14, OUR_MAX_FRAME);      /* MAX_FRAME_SIZE */
    n += 18;
    frame_header(out + n, 4, F_WINDOW, 0, 0);
    put_u32(out + n + 9, (unsigned)(WINDOW_MAX - 65535));
    n += 13;
    frame_header(out + n, headers.len, F_HEADERS, FL_END_HEADERS, SID);
    n += 9;
    struct iovec iov[2] = {{out, n}, {headers.buf, headers.len}};
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = write_all(fd, iov, 2);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&headers);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->fd = fd;
    if (pthread_create(&s->reader, NULL, reader_main, s) != 0) {
        s->fd = -1;
        PyErr_SetString(PyExc_OSError, "cannot start the stream's reader thread");
        return -1;
    }
    s->reader_started = 1;
    return 0;
}

/* The GIL let go around a wait, if the caller holds it (the writer
   thread never does). */
#define LET_GO(gil) PyThreadState *_ts = (gil) ? PyEval_SaveThread() : NULL
#define TAKE_BACK(gil) do { if (gil) PyEval_RestoreThread(_ts); } while (0)

/* Write one message made of these buffers as DATA frames, within the
   peer's windows and frame size. 1 if written; 0 if the stream ended first
   or the socket failed (*err: its errno). With `gil`, the caller holds
   the GIL: what the socket takes at once is written with it held, the
   rest (and any wait for a window) without it. */
static int write_message(Stream *s, Py_buffer *bufs, int nb, size_t total, int gil, int *err)
{
    unsigned char prefix[5] = {0};
    put_u32(prefix + 1, (unsigned)total);
    /* the message's bytes as a list of pieces: prefix, then the buffers */
    size_t piece = 0, piece_off = 0;    /* piece 0 is the prefix */
    size_t left = total + 5;
    *err = 0;
    while (left > 0) {
        /* as much as the windows and the frame size allow (waiting for a
           WINDOW_UPDATE without the GIL, nor the write lock: the reader
           may need it to answer the peer meanwhile) */
        pthread_mutex_lock(&s->mu);
        if (s->end == E_NONE && (s->conn_window <= 0 || s->stream_window <= 0)) {
            s->waiting++;
            pthread_mutex_unlock(&s->mu);
            LET_GO(gil);
            pthread_mutex_lock(&s->mu);
            while (s->end == E_NONE && (s->conn_window <= 0 || s->stream_window <= 0))
                pthread_cond_wait(&s->cv, &s->mu);
            s->waiting--;
            pthread_mutex_unlock(&s->mu);
            TAKE_BACK(gil);
            pthread_mutex_lock(&s->mu);
        }
        if (s->end != E_NONE) {
            pthread_mutex_unlock(&s->mu);
            return 0;
        }
        long long room = s->conn_window < s->stream_window ? s->conn_window : s->stream_window;
        if (room > s->peer_max_frame)
            room = s->peer_max_frame;
        size_t len = left < (size_t)room ? left : (size_t)room;
        s->conn_window -= len;
        s->stream_window -= len;
        pthread_mutex_unlock(&s->mu);
        unsigned char h[9];
        frame_header(h, len, F_DATA, 0, SID);
        struct iovec iov[MAX_BUFS + 3];
        int n = 0;
        iov[n].iov_base = h;
        iov[n++].iov_len = 9;
        size_t need = len;
        while (need > 0) {
            const unsigned char *base = piece == 0 ? prefix : bufs[piece - 1].buf;
            size_t plen = piece == 0 ? 5 : (size_t)bufs[piece - 1].len;
            size_t k = plen - piece_off < need ? plen - piece_off : need;
            if (k) {
                iov[n].iov_base = (void *)(base + piece_off);
                iov[n++].iov_len = k;
            }
            piece_off += k;
            need -= k;
            if (piece_off == plen) {
                piece++;
                piece_off = 0;
            }
        }
        struct msghdr mh = {0};
        mh.msg_iov = iov;
        mh.msg_iovlen = n;
        pthread_mutex_lock(&s->wmu);
        ssize_t w = gil ? sendmsg(s->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) : 0;
        if (w < 0 && errno != EAGAIN && errno != EINTR) {
            *err = errno;
        } else {
            int i = 0;
            size_t done = w > 0 ? (size_t)w : 0;
            while (i < n && done >= iov[i].iov_len)
                done -= iov[i++].iov_len;
            if (i < n) {
                iov[i].iov_base = (char *)iov[i].iov_base + done;
                iov[i].iov_len -= done;
                LET_GO(gil);
                pthread_mutex_lock(&s->mu);
                s->waiting++;
                pthread_mutex_unlock(&s->mu);
                *err = write_all(s->fd, iov + i, n - i);
                pthread_mutex_lock(&s->mu);
                s->waiting--;
                pthread_mutex_unlock(&s->mu);
                TAKE_BACK(gil);
            }
        }
        pthread_mutex_unlock(&s->wmu);
        if (*err)
            return 0;
        left -= len;
    }
    return 1;
}

/* Let go of the buffers hold_buffers() took (GIL held). */
static void release_buffers(Py_buffer *bufs, int nb)
{
    for (int i = 0; i < nb; i++)
        PyBuffer_Release(&bufs[i]);
}

/* The buffers of this many tuple items, held; their total length in *total.
   -1 with an exception set. */
static int hold_buffers(PyObject *args, Py_buffer *bufs, size_t *total)
{
    Py_ssize_t nb = PyTuple_GET_SIZE(args);
    if (nb > MAX_BUFS) {
        PyErr_SetString(PyExc_ValueError, "at most 64 buffers");
        return -1;
    }
    *total = 0;
    for (Py_ssize_t i = 0; i < nb; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(args, i), &bufs[i], PyBUF_SIMPLE) < 0) {
            release_buffers(bufs, (int)i);
            return -1;
        }
        *total += bufs[i].len;
    }
    if (*total > MSG_MAX) {
        release_buffers(bufs, (int)nb);
        PyErr_SetString(PyExc_ValueError, "message too large");
        return -1;
    }
    return (int)nb;
}

/* Let go of the buffers of the messages the writer is done with (GIL held). */
static void release_written(Stream *s)
{
    pthread_mutex_lock(&s->mu);
    struct out *o = s->written;
    s->written = NULL;
    pthread_mutex_unlock(&s->mu);
    while (o) {
        struct out *next = o->next;
        release_buffers(o->bufs, o->nb);
        free(o);
        o = next;
    }
}

static void *writer_main(void *arg)
{
    Stream *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->oq_head && !s->stopping)
            pthread_cond_wait(&s->wcv, &s->mu);
        struct out *o = s->oq_head;
        if (!o)
            break;  /* (stopping, and nothing left) */
        s->oq_head = o->next;
        if (!s->oq_head)
            s->oq_tail = NULL;
        s->writing = 1;
        int ended = s->end != E_NONE;
        pthread_mutex_unlock(&s->mu);
        int err = 0;
        if (!ended && !write_message(s, o->bufs, o->nb, o->total, 0, &err) && err)
            fail(s, E_ERRNO, err, 0);
        pthread_mutex_lock(&s->mu);
        o->next = s->written;
        s->written = o;
        s->writing = 0;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* send(buffers...): one gRPC message made of these buffers, back to back,
   written by the caller's thread (after any posted before it). True, or
   False if the stream has ended (why() says why). */
static PyObject *stream_send(Stream *s, PyObject *args)
{
    Py_buffer bufs[MAX_BUFS];
    size_t total;
    int nb = hold_buffers(args, bufs, &total);
    if (nb < 0)
        return NULL;
    if (s->writer_started) {  /* in order: the posted ones go first */
        pthread_mutex_lock(&s->mu);
        if (s->oq_head || s->writing) {
            pthread_mutex_unlock(&s->mu);
            Py_BEGIN_ALLOW_THREADS
            pthread_mutex_lock(&s->mu);
            while ((s->oq_head || s->writing) && s->end == E_NONE)
                pthread_cond_wait(&s->cv, &s->mu);
            pthread_mutex_unlock(&s->mu);
            Py_END_ALLOW_THREADS
        } else {
            pthread_mutex_unlock(&s->mu);
        }
        release_written(s);
    }
    int err;
    int ok = write_message(s, bufs, nb, total, 1, &err);
    release_buffers(bufs, nb);
    if (err)
        fail(s, E_ERRNO, err, 0);
    return PyBool_FromLong(ok);
}

/* post(buffers...): send() without waiting: the message is queued for the
   stream's writer thread, which sends the queue in order, beside the
   caller (an eviction's 1 MiB write-back: ~0.3 ms of the caller's less).
   The buffers are held until written and must not change meanwhile. True,
   or False if the stream has ended; a failed write ends it (the reply of
   that message then never comes: recv() says so). */
static PyObject *stream_post(Stream *s, PyObject *args)
{
    release_written(s);
    struct out *o = malloc(sizeof *o);
    if (!o)
        return PyErr_NoMemory();
    int nb = hold_buffers(args, o->bufs, &o->total);
    if (nb < 0) {
        free(o);
        return NULL;
    }
    o->nb = nb;
    o->next = NULL;
    pthread_mutex_lock(&s->mu);
    int ok = s->end == E_NONE && s->fd >= 0;
    if (ok && !s->writer_started) {
        if (pthread_create(&s->writer, NULL, writer_main, s) != 0) {
            pthread_mutex_unlock(&s->mu);
            release_buffers(o->bufs, nb);
            free(o);
            PyErr_SetString(PyExc_OSError, "cannot start the stream's writer thread");
            return NULL;
        }
        s->writer_started = 1;
        if (s->have_cpus)
            pthread_setaffinity_np(s->writer, sizeof s->cpus, &s->cpus);
    }
    if (ok) {
        if (s->oq_tail)
            s->oq_tail->next = o;
        else
            s->oq_head = o;
        s->oq_tail = o;
        pthread_cond_signal(&s->wcv);
    }
    pthread_mutex_unlock(&s->mu);
    if (!ok) {
        release_buffers(o->bufs, nb);
        free(o);
    }
    return PyBool_FromLong(ok);
}

/* recv(): the next message (a Message: read it with memoryview), or None
   once the stream has ended and every message before the end was taken. */
static PyObject *stream_recv(Stream *s, PyObject *unused)
{
    struct msg *m;
    pthread_mutex_lock(&s->mu);
    m = s->head;
    if (!m && s->end == E_NONE) {
        s->waiting++;
        pthread_mutex_unlock(&s->mu);
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&s->mu);
        while (!s->head && s->end == E_NONE)
            pthread_cond_wait(&s->cv, &s->mu);
        pthread_mutex_unlock(&s->mu);
        Py_END_ALLOW_THREADS
        pthread_mutex_lock(&s->mu);
        s->waiting--;
        m = s->head;
    }
    if (m) {
        s->head = m->next;
        if (!s->head)
            s->tail = NULL;
    }
    pthread_mutex_unlock(&s->mu);
    if (!m)
        Py_RETURN_NONE;
    Message *out = PyObject_New(Message, &MessageType);
    if (!out) {
        free(m->data);
        free(m);
        return NULL;
    }
    out->data = m->data;
    out->len = m->len;
    free(m);
    return (PyObject *)out;
}

/* why(): None while the stream runs, else (kind, errno, code, header
   blocks received, GOAWAY debug data). */
static PyObject *stream_why(Stream *s, PyObject *unused)
{
    pthread_mutex_lock(&s->mu);
    int end = s->end, err = s->end_errno;
    unsigned code = s->end_code;
    pthread_mutex_unlock(&s->mu);
    if (end == E_NONE)
        Py_RETURN_NONE;
    PyObject *blocks = PyList_New(0);
    if (!blocks)
        return NULL;
    pthread_mutex_lock(&s->mu);
    for (struct block *b = s->blocks; b; b = b->next) {
        PyObject *x = PyBytes_FromStringAndSize((char *)b->data, b->len);
        if (!x || PyList_Append(blocks, x) < 0) {
            Py_XDECREF(x);
            pthread_mutex_unlock(&s->mu);
            Py_DECREF(blocks);
            return NULL;
        }
        Py_DECREF(x);
    }
    PyObject *debug = PyBytes_FromStringAndSize((char *)(s->debug ? s->debug : (unsigned char *)""),
                                                s->debug_len);
    pthread_mutex_unlock(&s->mu);
    if (!debug) {
        Py_DECREF(blocks);
        return NULL;
    }
    return Py_BuildValue("siINN", end_names[end], err, code, blocks, debug);
}

/* reader_cpus(cpus): run the reader and writer threads on these CPUs (legorun pins
   itself and the guest to one; the replies' copies can go beside them). */
static PyObject *stream_reader_cpus(Stream *s, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "reader_cpus takes a sequence of CPU numbers");
    if (!seq)
        return NULL;
    cpu_set_t set;
    CPU_ZERO(&set);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long cpu = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (cpu < 0 || cpu >= CPU_SETSIZE) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "no such CPU");
            return NULL;
        }
        CPU_SET(cpu, &set);
    }
    Py_DECREF(seq);
    s->cpus = set;
    s->have_cpus = 1;
    if (s->writer_started)
        pthread_setaffinity_np(s->writer, sizeof set, &set);
    if (s->reader_started) {
        int err = pthread_setaffinity_np(s->reader, sizeof set, &set);
        if (err) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_RETURN_NONE;
}

static void stream_stop(Stream *s)
{
    if (s->fd < 0)
        return;
    pthread_mutex_lock(&s->mu);
    end_stream(s, E_CLOSED, 0, 0);
    pthread_mutex_unlock(&s->mu);
    shutdown(s->fd, SHUT_RDWR);
    if (s->reader_started) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(s->reader, NULL);
        Py_END_ALLOW_THREADS
        s->reader_started = 0;
    }
    if (s->writer_started) {  /* (the stream ended: what is queued is dropped) */
        pthread_mutex_lock(&s->mu);
        s->stopping = 1;
        pthread_cond_signal(&s->wcv);
        pthread_mutex_unlock(&s->mu);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(s->writer, NULL);
        Py_END_ALLOW_THREADS
        s->writer_started = 0;
    }
    release_written(s);
    close(s->fd);
    s->fd = -1;
}

/* close(): end the stream (the server sees the connection close, as for a
   cancelled call) and the reader thread; messages not taken are dropped. */
static PyObject *stream_close(Stream *s, PyObject *unused)
{
    stream_stop(s);
    Py_RETURN_NONE;
}

static void stream_dealloc(Stream *s)
{
    stream_stop(s);
    for (struct msg *m = s->head, *n; m; m = n) {
        n = m->next;
        free(m->data);
        free(m);
    }
    for (struct block *b = s->blocks, *n; b; b = n) {
        n = b->next;
        free(b->data);
        free(b);
    }
    free(s->m_data);
    free(s->stage);
    free(s->pl);
    free(s->hb);
    free(s->debug);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->wcv);
    pthread_mutex_destroy(&s->wmu);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef stream_methods[] = {
    {"send", (PyCFunction)stream_send, METH_VARARGS,
     "send(*buffers) -> bool: one message of these buffers back to back; False once ended"},
    {"post", (PyCFunction)stream_post, METH_VARARGS,
     "post(*buffers) -> bool: send() by the stream's writer thread, without waiting"},
    {"recv", (PyCFunction)stream_recv, METH_NOARGS,
     "recv() -> Message | None: the next message; None once ended and drained"},
    {"why", (PyCFunction)stream_why, METH_NOARGS,
     "why() -> None | (kind, errno, code, header_blocks, goaway_debug)"},
    {"reader_cpus", (PyCFunction)stream_reader_cpus, METH_O,
     "reader_cpus(cpus): run the reader thread on these CPUs"},
    {"close", (PyCFunction)stream_close, METH_NOARGS, "close(): end the stream"},
    {NULL}
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "legorun._ext.h2stream.Stream",
    .tp_basicsize = sizeof(Stream),
    .tp_dealloc = (destructor)stream_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Stream(fd, header_block): one gRPC bidi stream on a connected socket "
              "(the stream owns the fd from then on).",
    .tp_methods = stream_methods,
    .tp_init = (initproc)stream_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "h2stream",
                                    "One gRPC bidi stream over HTTP/2 in C.", -1, NULL};

PyMODINIT_FUNC PyInit_h2stream(void)
{
    if (PyType_Ready(&MessageType) < 0 || PyType_Ready(&StreamType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(&StreamType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
