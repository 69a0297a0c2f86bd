/*
 * h2ws.c -- the benchmark's WebSocket-over-HTTP/2 load generator (RFC 8441):
 * one thread, epoll, non-blocking sockets, TLS by OpenSSL, HTTP/2 by
 * libnghttp2.
 *
 * It opens --conns TLS connections to the proxy, insists on `h2` by ALPN,
 * waits for the server's SETTINGS and, when they carry
 * SETTINGS_ENABLE_CONNECT_PROTOCOL = 1, keeps --streams extended CONNECT
 * streams (`:method CONNECT`, `:protocol websocket`, `:path --path`) going on
 * each. A tunnel is open when its stream gets `:status 200`; after that its
 * DATA frames are raw tunnel bytes (no WebSocket frames: a proxy never looks
 * inside a tunnel). A server that does not advertise extended CONNECT gets no
 * stream: the JSON says so in "unsupported".
 *
 * Modes (the first argument):
 *
 *   handshake  each stream slot loops: CONNECT, `:status 200`, END_STREAM
 *              (the proxy half-closes toward the backend, which closes, and
 *              the proxy ends the stream), then the next CONNECT. Handshakes
 *              per second (a `:status 200` in the window) and their latency.
 *   rtt        the streams open once; each then sends one --size-byte message,
 *              waits until all of it has come back (checking every byte),
 *              and sends the next. The warm-up starts once every tunnel is
 *              open (or --timeout has passed). Round trips per second and
 *              their latency.
 *
 * With --h1, the same load goes through the HTTP/1.1 door over TLS instead,
 * as a browser without HTTP/2 would send it: one TLS connection per tunnel
 * (ALPN `http/1.1`), an upgrade request with a fresh Sec-WebSocket-Key, and
 * a 101 checked like loadgen checks it. --conns is then the number of
 * tunnels (--streams is ignored), and a handshake loop opens a new TLS
 * connection (a full TLS handshake, no resumption) for every handshake.
 *
 * Output: one JSON object on stdout, with the field names of loadgen's.
 * Exit status 0 when the run happened (failures are counted in the JSON),
 * 2 on a usage error.
 */
#include "common.h"

#include <arpa/inet.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <sys/epoll.h>

#define MAX_EVENTS 256
#define OUT_CHUNK (64 * 1024) /* frames gathered into one SSL_write */
#define MAX_FRAME (16384 + 9)  /* the largest frame h2ws sends: a DATA frame of the default size */

static struct {
    const char *mode, *host, *authority, *path;
    int port, conns, streams, size;
    double warmup, duration, timeout;
    bool h1;
} opt = {
    .host = "127.0.0.1",
    .authority = "localhost",
    .path = "/echo",
    .conns = 4,
    .streams = 25,
    .size = 64,
    .warmup = 1,
    .duration = 5,
    .timeout = 10,
};

enum stream_state { ST_IDLE, ST_OPENING, ST_OPEN, ST_CLOSING };
enum conn_state { C_CONNECTING, C_TLS, C_SETTINGS, C_READY, C_H1_REQUEST, C_H1_HEAD, C_H1_OPEN, C_DEAD };

struct conn;

struct stream {
    struct conn *c;
    int32_t id;
    enum stream_state st;
    int status;        /* :status of the response, 0 until it came */
    uint64_t t_start;  /* when the CONNECT, or the current message, was sent */
    uint8_t *msg;      /* rtt: the message in flight */
    size_t msg_sent, msg_got;
    uint32_t seq;      /* rtt: message number, seeds its payload */
};

struct conn {
    int fd;
    enum conn_state st;
    SSL *ssl;
    nghttp2_session *session;
    uint32_t events;
    uint8_t out[OUT_CHUNK + MAX_FRAME];
    size_t out_len, out_off;
    struct stream *streams; /* opt.streams slots (one with --h1) */
    /* --h1: the upgrade request, the 101 as it arrives, the accept key it must carry */
    char req[512];
    size_t req_len, req_off;
    char head[4096];
    size_t head_len;
    char accept[29];
};

static struct {
    uint64_t connect, tls, closed, status, invalid, timeout, mismatch, goaway;
} err;
static char first_error[300];
static char unsupported[300];

static int epfd;
static SSL_CTX *ssl_ctx;
static struct sockaddr_in target;
static uint8_t scratch[64 * 1024];
static struct samples samples;
static uint64_t window_start, window_end;
static uint64_t counted, total; /* handshakes or round trips: in the window, and all */
static uint64_t opened;         /* streams that got their :status 200 (--h1: their 101) */
static uint64_t rng_state;
static bool stopping;           /* handshake mode: no new CONNECT after the window */

__attribute__((format(printf, 2, 3))) static void failure(uint64_t *counter, const char *fmt, ...)
{
    (*counter)++;
    if (first_error[0] == '\0') {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_error, sizeof first_error, fmt, ap);
        va_end(ap);
    }
}

static uint64_t failures(void)
{
    return err.connect + err.tls + err.closed + err.status + err.invalid + err.timeout +
           err.mismatch + err.goaway;
}

static void print_errors(void)
{
    printf("\"failures\": %llu, \"errors\": {\"connect\": %llu, \"tls\": %llu, \"closed\": %llu, "
           "\"status\": %llu, \"invalid\": %llu, \"timeout\": %llu, \"mismatch\": %llu, "
           "\"goaway\": %llu}, \"first_error\": ",
           (unsigned long long)failures(), (unsigned long long)err.connect,
           (unsigned long long)err.tls, (unsigned long long)err.closed,
           (unsigned long long)err.status, (unsigned long long)err.invalid,
           (unsigned long long)err.timeout, (unsigned long long)err.mismatch,
           (unsigned long long)err.goaway);
    if (first_error[0])
        print_json_string(first_error);
    else
        printf("null");
    printf(", \"unsupported\": ");
    if (unsupported[0])
        print_json_string(unsupported);
    else
        printf("null");
}

static uint8_t payload_byte(const struct stream *s, size_t i)
{
    return (uint8_t)(s->seq * 131u + (uint32_t)i * 7u + (uint32_t)(s - s->c->streams));
}

static void count(uint64_t started)
{
    uint64_t end = now_ns();
    total++;
    if (end >= window_start && end < window_end) {
        counted++;
        samples_add(&samples, end - started);
    }
}

/* ---- the connection ------------------------------------------------------ */

static void set_events(struct conn *c, uint32_t events)
{
    if (c->events != events) {
        struct epoll_event ev = {.events = events, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
            die("epoll_ctl: %s", strerror(errno));
        c->events = events;
    }
}

static void conn_close(struct conn *c)
{
    if (c->st == C_DEAD)
        return;
    c->st = C_DEAD;
    if (c->session != NULL)
        nghttp2_session_del(c->session);
    c->session = NULL;
    if (c->ssl != NULL)
        SSL_free(c->ssl);
    c->ssl = NULL;
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    for (int i = 0; i < opt.streams; i++)
        c->streams[i].st = ST_IDLE;
}

static void conn_fail(struct conn *c, uint64_t *counter, const char *what)
{
    unsigned long e = ERR_get_error();
    char detail[160] = "";
    if (e)
        ERR_error_string_n(e, detail, sizeof detail);
    else if (errno)
        snprintf(detail, sizeof detail, "%s", strerror(errno));
    failure(counter, "%s%s%s", what, detail[0] ? ": " : "", detail);
    conn_close(c);
}

/* Send what nghttp2 has to send. Returns -1 if the connection broke. */
static int flush(struct conn *c)
{
    for (;;) {
        if (c->out_off == c->out_len) {
            c->out_off = c->out_len = 0;
            while (c->out_len < OUT_CHUNK) {
                const uint8_t *data;
                ssize_t n = nghttp2_session_mem_send(c->session, &data);
                if (n < 0) {
                    failure(&err.invalid, "nghttp2: %s", nghttp2_strerror((int)n));
                    return -1;
                }
                if (n == 0)
                    break;
                if (c->out_len + (size_t)n > sizeof c->out) /* (nghttp2 sends no larger frame) */
                    die("h2ws: a frame of %zd bytes does not fit the output buffer", n);
                memcpy(c->out + c->out_len, data, (size_t)n);
                c->out_len += (size_t)n;
            }
            if (c->out_len == 0)
                break;
        }
        ERR_clear_error();
        int r = SSL_write(c->ssl, c->out + c->out_off, (int)(c->out_len - c->out_off));
        if (r > 0) {
            c->out_off += (size_t)r;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_WRITE) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return 0;
        }
        if (e == SSL_ERROR_WANT_READ)
            return 0;
        conn_fail(c, &err.closed, "TLS write failed");
        return -1;
    }
    set_events(c, EPOLLIN);
    return 0;
}

/* ---- streams --------------------------------------------------------------- */

static ssize_t read_message(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *flags, nghttp2_data_source *source,
                            void *user_data)
{
    (void)session, (void)stream_id, (void)user_data;
    struct stream *s = source->ptr;
    size_t left = (size_t)opt.size - s->msg_sent;
    size_t n = left < length ? left : length;
    memcpy(buf, s->msg + s->msg_sent, n);
    s->msg_sent += n;
    if (s->msg_sent == (size_t)opt.size)
        *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    return (ssize_t)n;
}

static ssize_t read_nothing(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *flags, nghttp2_data_source *source,
                            void *user_data)
{
    (void)session, (void)stream_id, (void)buf, (void)length, (void)source, (void)user_data;
    *flags |= NGHTTP2_DATA_FLAG_EOF; /* END_STREAM: the client's half-close */
    return 0;
}

static void send_message(struct stream *s)
{
    s->seq++;
    for (size_t i = 0; i < (size_t)opt.size; i++)
        s->msg[i] = payload_byte(s, i);
    s->msg_sent = s->msg_got = 0;
    s->t_start = now_ns();
    nghttp2_data_provider provider = {.source.ptr = s, .read_callback = read_message};
    int r = nghttp2_submit_data(s->c->session, NGHTTP2_FLAG_NONE, s->id, &provider);
    if (r != 0)
        failure(&err.invalid, "nghttp2_submit_data: %s", nghttp2_strerror(r));
}

static void half_close(struct stream *s)
{
    nghttp2_data_provider provider = {.source.ptr = s, .read_callback = read_nothing};
    int r = nghttp2_submit_data(s->c->session, NGHTTP2_FLAG_END_STREAM, s->id, &provider);
    if (r != 0)
        failure(&err.invalid, "nghttp2_submit_data (END_STREAM): %s", nghttp2_strerror(r));
    s->st = ST_CLOSING;
}

#define NV(name, value)                                                                         \
    {                                                                                           \
        (uint8_t *)(name), (uint8_t *)(value), sizeof(name) - 1, strlen(value),                 \
            NGHTTP2_NV_FLAG_NO_COPY_NAME                                                        \
    }

static void open_stream(struct stream *s)
{
    nghttp2_nv headers[] = {
        NV(":method", "CONNECT"),     NV(":protocol", "websocket"), NV(":scheme", "https"),
        NV(":path", opt.path),        NV(":authority", opt.authority),
        NV("sec-websocket-version", "13"),
    };
    s->status = 0;
    s->t_start = now_ns();
    /* Not nghttp2_submit_request: without a body it would end the stream at once. */
    s->id = nghttp2_submit_headers(s->c->session, NGHTTP2_FLAG_NONE, -1, NULL, headers,
                                   sizeof headers / sizeof *headers, s);
    if (s->id < 0) {
        failure(&err.invalid, "nghttp2_submit_headers: %s", nghttp2_strerror(s->id));
        s->st = ST_IDLE;
        return;
    }
    s->st = ST_OPENING;
}

/* ---- nghttp2 callbacks ------------------------------------------------------ */

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user_data)
{
    (void)flags, (void)user_data;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_RESPONSE)
        return 0;
    struct stream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (s != NULL && namelen == 7 && memcmp(name, ":status", 7) == 0) {
        char text[8] = "";
        memcpy(text, value, valuelen < 7 ? valuelen : 7);
        s->status = atoi(text);
    }
    return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    struct conn *c = user_data;
    if (frame->hd.type == NGHTTP2_SETTINGS && !(frame->hd.flags & NGHTTP2_FLAG_ACK) &&
        c->st == C_SETTINGS) {
        if (nghttp2_session_get_remote_settings(session,
                                                NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL) != 1) {
            snprintf(unsupported, sizeof unsupported,
                     "the server's SETTINGS do not enable extended CONNECT "
                     "(SETTINGS_ENABLE_CONNECT_PROTOCOL, RFC 8441): no WebSocket over HTTP/2");
            return 0;
        }
        c->st = C_READY;
        return 0;
    }
    if (frame->hd.type == NGHTTP2_GOAWAY) {
        failure(&err.goaway, "GOAWAY from the server (error code %u)",
                frame->goaway.error_code);
        return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_RESPONSE)
        return 0;
    struct stream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (s == NULL || s->st != ST_OPENING)
        return 0;
    if (s->status != 200) {
        failure(&err.status, "CONNECT %s answered with :status %d, not 200", opt.path, s->status);
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_CANCEL);
        s->st = ST_CLOSING;
        return 0;
    }
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
        failure(&err.invalid, "the 200 to CONNECT %s ended the stream", opt.path);
        s->st = ST_CLOSING;
        return 0;
    }
    s->st = ST_OPEN;
    opened++;
    if (opt.mode[0] == 'h') { /* handshake */
        count(s->t_start);
        half_close(s);
    } else {
        send_message(s);
    }
    return 0;
}

static int on_data(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                   const uint8_t *data, size_t len, void *user_data)
{
    (void)flags, (void)user_data;
    struct stream *s = nghttp2_session_get_stream_user_data(session, stream_id);
    if (s == NULL || s->st != ST_OPEN || opt.mode[0] == 'h')
        return 0; /* handshake mode: whatever the backend sends before its FIN */
    for (size_t i = 0; i < len; i++, s->msg_got++) {
        if (s->msg_got >= (size_t)opt.size || data[i] != payload_byte(s, s->msg_got)) {
            failure(&err.mismatch, "stream %d: byte %zu of message %u came back wrong",
                    stream_id, s->msg_got, s->seq);
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL);
            s->st = ST_CLOSING;
            return 0;
        }
    }
    if (s->msg_got == (size_t)opt.size && s->msg_sent == (size_t)opt.size) {
        count(s->t_start);
        if (!stopping)
            send_message(s);
    }
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                           void *user_data)
{
    (void)user_data;
    struct stream *s = nghttp2_session_get_stream_user_data(session, stream_id);
    if (s == NULL)
        return 0;
    if (s->st != ST_CLOSING && !stopping)
        failure(&err.closed, "stream %d (%s) closed by the server (error code %u)", stream_id,
                s->st == ST_OPENING ? "opening" : "open", error_code);
    else if (s->st == ST_CLOSING && error_code != NGHTTP2_NO_ERROR && s->status == 200)
        failure(&err.closed, "stream %d reset after END_STREAM (error code %u)", stream_id,
                error_code);
    s->st = ST_IDLE;
    s->id = -1;
    return 0;
}

static nghttp2_session_callbacks *callbacks;
static void h1_start(struct conn *c);
static void h1_io(struct conn *c, uint32_t events);

/* ---- connecting ------------------------------------------------------------ */

static void conn_start(struct conn *c)
{
    c->st = C_CONNECTING;
    c->out_len = c->out_off = 0;
    c->streams[0].t_start = now_ns(); /* --h1: the handshake starts with the connection */
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket: %s", strerror(errno));
    set_nodelay(c->fd);
    c->events = EPOLLOUT;
    struct epoll_event ev = {.events = c->events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    if (connect(c->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS)
        conn_fail(c, &err.connect, "connect failed");
}

static void tls_start(struct conn *c)
{
    c->ssl = SSL_new(ssl_ctx);
    if (c->ssl == NULL)
        die("SSL_new failed");
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_connect_state(c->ssl);
    c->st = C_TLS;
}

static void h2_start(struct conn *c)
{
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
    if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) {
        snprintf(unsupported, sizeof unsupported, "the server did not choose h2 by ALPN (%.*s)",
                 (int)alpn_len, alpn_len ? (const char *)alpn : "none");
        conn_close(c);
        return;
    }
    if (nghttp2_session_client_new(&c->session, callbacks, c) != 0)
        die("nghttp2_session_client_new failed");
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
    };
    nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, settings, 2);
    c->st = C_SETTINGS;
}

/* Handle readiness on one connection. */
static void conn_io(struct conn *c, uint32_t events)
{
    if (c->st == C_CONNECTING) {
        int so_error = 0;
        socklen_t len = sizeof so_error;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
        if (so_error != 0) {
            errno = so_error;
            conn_fail(c, &err.connect, "connect failed");
            return;
        }
        tls_start(c);
    }
    if (c->st == C_TLS) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ)
                set_events(c, EPOLLIN);
            else if (e == SSL_ERROR_WANT_WRITE)
                set_events(c, EPOLLIN | EPOLLOUT);
            else
                conn_fail(c, &err.tls, "TLS handshake failed");
            return;
        }
        if (opt.h1) {
            h1_start(c);
            h1_io(c, events);
            return;
        }
        h2_start(c);
        if (c->st == C_DEAD || flush(c) < 0)
            return;
    }
    if (opt.h1) {
        h1_io(c, events);
        return;
    }
    if (events & EPOLLOUT && flush(c) < 0)
        return;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (;;) {
            ERR_clear_error();
            int r = SSL_read(c->ssl, scratch, sizeof scratch);
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                    break;
                if (!stopping)
                    conn_fail(c, &err.closed, "the server closed the connection");
                else
                    conn_close(c);
                return;
            }
            ssize_t n = nghttp2_session_mem_recv(c->session, scratch, (size_t)r);
            if (n < 0) {
                failure(&err.invalid, "nghttp2: %s", nghttp2_strerror((int)n));
                conn_close(c);
                return;
            }
        }
    }
    if (c->st == C_READY && !stopping)
        for (int i = 0; i < opt.streams; i++)
            if (c->streams[i].st == ST_IDLE)
                open_stream(&c->streams[i]);
    flush(c);
}

/* ---- --h1: WebSocket upgrades over TLS HTTP/1.1 ---------------------------------- */

static uint64_t rng(void)
{
    /* xorshift64*: plenty for WebSocket keys. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static void h1_start(struct conn *c)
{
    uint8_t raw[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = rng();
        memcpy(raw + i, &r, 8);
    }
    char key[25];
    base64_encode(raw, 16, key);
    websocket_accept(key, 24, c->accept);
    int n = snprintf(c->req, sizeof c->req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     opt.path, opt.authority, key);
    c->req_len = (size_t)n;
    c->req_off = c->head_len = 0;
    c->st = C_H1_REQUEST;
}

/* SSL_write of buf[*off..len); 1 when all is written, 0 to wait, -1 when broken. */
static int h1_write(struct conn *c, const void *buf, size_t len, size_t *off)
{
    while (*off < len) {
        ERR_clear_error();
        int r = SSL_write(c->ssl, (const char *)buf + *off, (int)(len - *off));
        if (r > 0) {
            *off += (size_t)r;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_WRITE) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return 0;
        }
        if (e == SSL_ERROR_WANT_READ)
            return 0;
        conn_fail(c, &err.closed, "TLS write failed");
        return -1;
    }
    set_events(c, EPOLLIN);
    return 1;
}

static void h1_send_message(struct conn *c)
{
    struct stream *s = &c->streams[0];
    s->seq++;
    for (size_t i = 0; i < (size_t)opt.size; i++)
        s->msg[i] = payload_byte(s, i);
    s->msg_sent = s->msg_got = 0;
    s->t_start = now_ns();
    h1_write(c, s->msg, (size_t)opt.size, &s->msg_sent);
}

/* Check the 101 in c->head (complete, `end` bytes long); 0 if valid, else -1 (counted). */
static int h1_check_101(struct conn *c, size_t end)
{
    const char *h = c->head;
    if (end < 12 || memcmp(h, "HTTP/1.1 101", 12) != 0) {
        int line = (int)(strchr(h, '\r') ? strchr(h, '\r') - h : 40);
        failure(&err.status, "expected 101, got: %.*s", line < 80 ? line : 80, h);
        return -1;
    }
    size_t alen = 0;
    const char *accept = header_value(h, end, "sec-websocket-accept", &alen);
    if (!header_has_token(h, end, "upgrade", "websocket") ||
        !header_has_token(h, end, "connection", "upgrade")) {
        failure(&err.invalid, "a 101 without Upgrade: websocket and Connection: upgrade");
        return -1;
    }
    if (accept == NULL || alen != 28 || memcmp(accept, c->accept, 28) != 0) {
        failure(&err.invalid, "a 101 with the wrong Sec-WebSocket-Accept");
        return -1;
    }
    return 0;
}

static void h1_io(struct conn *c, uint32_t events)
{
    (void)events;
    struct stream *s = &c->streams[0];
    if (c->st == C_H1_REQUEST) {
        int r = h1_write(c, c->req, c->req_len, &c->req_off);
        if (r <= 0)
            return;
        c->st = C_H1_HEAD;
    }
    if (c->st == C_H1_OPEN && s->msg_sent < (size_t)opt.size &&
        h1_write(c, s->msg, (size_t)opt.size, &s->msg_sent) < 0)
        return;
    for (;;) {
        ERR_clear_error();
        int r = SSL_read(c->ssl, scratch, sizeof scratch);
        if (r <= 0) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                return;
            if (!stopping)
                conn_fail(c, &err.closed, "the server closed the connection");
            else
                conn_close(c);
            return;
        }
        size_t n = (size_t)r, pos = 0;
        if (c->st == C_H1_HEAD) {
            size_t room = sizeof c->head - 1 - c->head_len;
            size_t take = n < room ? n : room;
            memcpy(c->head + c->head_len, scratch, take);
            c->head_len += take;
            c->head[c->head_len] = '\0';
            size_t end = head_end(c->head, c->head_len);
            if (end == 0) {
                if (c->head_len == sizeof c->head - 1) {
                    failure(&err.invalid, "a response head over %zu bytes", sizeof c->head);
                    conn_close(c);
                    return;
                }
                continue;
            }
            if (h1_check_101(c, end) < 0) {
                conn_close(c);
                return;
            }
            opened++;
            pos = n - (c->head_len - end); /* bytes behind the head: tunnel bytes */
            if (opt.mode[0] == 'h') {
                count(s->t_start);
                conn_close(c); /* the next handshake takes a new connection */
                return;
            }
            c->st = C_H1_OPEN;
            h1_send_message(c);
            if (c->st == C_DEAD)
                return;
        }
        for (; pos < n; pos++, s->msg_got++) {
            if (s->msg_got >= (size_t)opt.size || (uint8_t)scratch[pos] != payload_byte(s, s->msg_got)) {
                failure(&err.mismatch, "tunnel %d: byte %zu of message %u came back wrong",
                        (int)(s - s->c->streams), s->msg_got, s->seq);
                conn_close(c);
                return;
            }
        }
        if (s->msg_got == (size_t)opt.size && s->msg_sent == (size_t)opt.size) {
            count(s->t_start);
            if (!stopping)
                h1_send_message(c);
            if (c->st == C_DEAD)
                return;
        }
    }
}

/* ---- the run ----------------------------------------------------------------- */

static int live_streams(struct conn *conns)
{
    int n = 0;
    for (int i = 0; i < opt.conns; i++)
        n += opt.h1 && conns[i].st != C_DEAD && conns[i].st != C_H1_OPEN;
    for (int i = 0; i < opt.conns && !opt.h1; i++)
        for (int j = 0; j < opt.streams; j++)
            n += conns[i].st != C_DEAD && conns[i].streams[j].st != ST_IDLE;
    return n;
}

static void scan_timeouts(struct conn *conns, uint64_t now)
{
    uint64_t limit = (uint64_t)(opt.timeout * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        struct stream *s = &c->streams[0];
        bool waiting = c->st != C_DEAD && (c->st != C_H1_OPEN || s->msg_got < (size_t)opt.size);
        if (opt.h1 && waiting && now > s->t_start && now - s->t_start > limit) {
            failure(&err.timeout, "tunnel %d: no %s after %.1f s", i,
                    c->st == C_H1_OPEN ? "echo" : "complete 101", opt.timeout);
            conn_close(c);
        }
    }
    for (int i = 0; i < opt.conns && !opt.h1; i++) {
        struct conn *c = &conns[i];
        for (int j = 0; j < opt.streams && c->st == C_READY; j++) {
            struct stream *s = &c->streams[j];
            bool waiting = s->st == ST_OPENING || (s->st == ST_OPEN && opt.mode[0] == 'r');
            if (waiting && now > s->t_start && now - s->t_start > limit) {
                failure(&err.timeout, "stream %d: no %s after %.1f s", s->id,
                        s->st == ST_OPENING ? ":status to CONNECT" : "echo", opt.timeout);
                nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_CANCEL);
                s->st = ST_CLOSING;
                flush(c);
            }
        }
    }
}

static void start_window(uint64_t now)
{
    window_start = now + (uint64_t)(opt.warmup * 1e9);
    window_end = window_start + (uint64_t)(opt.duration * 1e9);
}

static void run(struct conn *conns)
{
    struct epoll_event evs[MAX_EVENTS];
    uint64_t started = now_ns(), last_scan = started;
    uint64_t tunnels = (uint64_t)opt.conns * (uint64_t)opt.streams;
    /* rtt: the warm-up starts once every tunnel is open (or the timeout has
     * passed), as loadgen's does; until then nothing is counted. */
    if (opt.mode[0] == 'r')
        window_start = window_end = UINT64_MAX;
    else
        start_window(started);
    for (int i = 0; i < opt.conns; i++)
        conn_start(&conns[i]);
    for (;;) {
        uint64_t now = now_ns();
        if (unsupported[0])
            break;
        if (window_start == UINT64_MAX &&
            (opened >= tunnels || now - started > (uint64_t)(opt.timeout * 1e9)))
            start_window(now);
        if (now >= window_end && !stopping) {
            stopping = true;
            if (opt.mode[0] == 'r')
                break; /* every echo under way is outside the window */
        }
        if (stopping && (live_streams(conns) == 0 || now >= window_end + (uint64_t)(opt.timeout * 1e9)))
            break;
        if (now - last_scan > 100000000u) {
            last_scan = now;
            scan_timeouts(conns, now);
        }
        if (opt.h1 && opt.mode[0] == 'h' && !stopping)
            for (int i = 0; i < opt.conns; i++)
                if (conns[i].st == C_DEAD)
                    conn_start(&conns[i]);
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 10);
        for (int e = 0; e < k; e++) {
            struct conn *c = evs[e].data.ptr;
            if (c->st != C_DEAD)
                conn_io(c, evs[e].events);
        }
    }
    for (int i = 0; i < opt.conns; i++) {
        if (conns[i].session != NULL) {
            nghttp2_session_terminate_session(conns[i].session, NGHTTP2_NO_ERROR);
            flush(&conns[i]);
        }
        conn_close(&conns[i]);
    }
}

static void report(void)
{
    double secs = window_start == UINT64_MAX ? 0 : (double)(window_end - window_start) / 1e9;
    const char *what = opt.mode[0] == 'h' ? "handshakes" : "round_trips";
    printf("{\"mode\": \"%s-%s\", \"connections\": %d, \"streams\": %d, \"tunnels\": %d, "
           "\"open\": %llu, \"size\": %d, \"window_s\": %.3f, \"%s\": %llu, "
           "\"%s_total\": %llu, \"per_s\": %.1f, ",
           opt.h1 ? "h1" : "h2", opt.mode, opt.conns, opt.streams, opt.conns * opt.streams,
           (unsigned long long)opened, opt.size, secs,
           what, (unsigned long long)counted, what, (unsigned long long)total,
           secs > 0 ? (double)counted / secs : 0.0);
    print_latency(&samples);
    printf(", ");
    print_errors();
    printf("}\n");
}

__attribute__((noreturn)) static void usage(void)
{
    fprintf(stderr,
            "usage: h2ws handshake|rtt --port PORT [--h1] [--host IPv4] [--authority NAME] "
            "[--path /echo] [--conns N] [--streams N] [--size BYTES] [--warmup S] "
            "[--duration S] [--timeout S]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    opt.mode = argv[1];
    if (strcmp(opt.mode, "handshake") != 0 && strcmp(opt.mode, "rtt") != 0)
        usage();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--h1") == 0) {
            opt.h1 = true;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (strcmp(a, "--host") == 0)
            opt.host = v;
        else if (strcmp(a, "--port") == 0)
            opt.port = atoi(v);
        else if (strcmp(a, "--authority") == 0)
            opt.authority = v;
        else if (strcmp(a, "--path") == 0)
            opt.path = v;
        else if (strcmp(a, "--conns") == 0)
            opt.conns = atoi(v);
        else if (strcmp(a, "--streams") == 0)
            opt.streams = atoi(v);
        else if (strcmp(a, "--size") == 0)
            opt.size = atoi(v);
        else if (strcmp(a, "--warmup") == 0)
            opt.warmup = atof(v);
        else if (strcmp(a, "--duration") == 0)
            opt.duration = atof(v);
        else if (strcmp(a, "--timeout") == 0)
            opt.timeout = atof(v);
        else
            usage();
    }
    if (opt.port <= 0 || opt.conns <= 0 || opt.streams <= 0 || opt.streams > 100 ||
        opt.size <= 0)
        usage();
    if (opt.h1)
        opt.streams = 1;
    signal(SIGPIPE, SIG_IGN);
    rng_state = now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &target.sin_addr) != 1)
        die("h2ws: --host must be an IPv4 address, not %s", opt.host);

    ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (ssl_ctx == NULL)
        die("SSL_CTX_new failed");
    /* The proxies under test use a throw-away self-signed certificate. */
    SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, NULL);
    /* As browsers do: h2 first, http/1.1 as the fallback (a server without HTTP/2
     * then says so by choosing it, where offering h2 alone would fail the handshake). */
    static const unsigned char h2[] = "\x02h2\x08http/1.1", h1[] = "\x08http/1.1";
    if (SSL_CTX_set_alpn_protos(ssl_ctx, opt.h1 ? h1 : h2, opt.h1 ? sizeof h1 - 1 : sizeof h2 - 1))
        die("SSL_CTX_set_alpn_protos failed");

    nghttp2_session_callbacks_new(&callbacks);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)opt.conns, sizeof *conns);
    if (conns == NULL)
        die("out of memory");
    for (int i = 0; i < opt.conns; i++) {
        conns[i].fd = -1;
        conns[i].streams = calloc((size_t)opt.streams, sizeof *conns[i].streams);
        if (conns[i].streams == NULL)
            die("out of memory");
        for (int j = 0; j < opt.streams; j++) {
            conns[i].streams[j].c = &conns[i];
            conns[i].streams[j].id = -1;
            conns[i].streams[j].msg = xmalloc((size_t)opt.size);
        }
    }

    run(conns);
    report();
    return 0;
}
