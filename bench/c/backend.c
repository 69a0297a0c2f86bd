/*
 * backend.c -- the benchmark's backend: a tiny HTTP/1.1 server on one thread,
 * epoll and non-blocking sockets, meant to cost far less than any proxy put in
 * front of it.
 *
 * What it answers:
 *
 *   - An upgrade request (an `Upgrade` field and `upgrade` in `Connection`)
 *     gets a valid `101 Switching Protocols`: `Upgrade` naming the first
 *     protocol offered, `Connection: Upgrade`, and for `websocket` the
 *     `Sec-WebSocket-Accept` that the key calls for (a websocket offer
 *     without a key gets 400). From then on the connection carries raw bytes,
 *     chosen by the request path:
 *         /echo     every byte is sent back (the default for other paths)
 *         /sink     bytes are read and discarded
 *         /source   bytes are written continuously; what arrives is discarded
 *         /duplex   /sink and /source at once
 *     Bytes that arrived behind the request head belong to the tunnel.
 *   - `GET /stats`: counters as JSON. `sunk` is what the sink side has
 *     received, which is how the load generator measures the client->backend
 *     direction at the receiving end.
 *   - Anything else: `200 OK` with a 14-byte body and Content-Length, keeping
 *     the connection alive (pipelining works); request bodies with
 *     Content-Length are read and discarded; chunked bodies get 501.
 *
 * Usage: backend [--host 127.0.0.1] [--port 0]
 * Prints "listening PORT" on stdout once it accepts connections, and runs
 * until it is killed.
 */
#include "common.h"

#include <arpa/inet.h>
#include <signal.h>
#include <sys/epoll.h>

#define MAX_HEAD (64 * 1024)    /* larger request heads get 431 */
#define CHUNK (64 * 1024)       /* one write in /source mode */
#define EVENT_BUDGET (4 * CHUNK) /* bytes moved per socket per event: keeps it fair */

enum mode { M_HTTP, M_ECHO, M_SINK, M_SOURCE, M_DUPLEX };

struct conn {
    int fd;
    enum mode mode;
    uint32_t events;  /* the epoll interest currently registered */
    char *in;         /* M_HTTP: request bytes not yet parsed */
    size_t in_len, in_cap;
    char *out;        /* bytes accepted for writing but not yet written */
    size_t out_off, out_len, out_cap;
    uint64_t skip_body; /* M_HTTP: request body bytes still to discard */
    bool close_after;   /* close once `out` is flushed */
    bool read_eof;
};

static struct {
    uint64_t sunk, sourced, echoed, upgrades, requests;
    long open;
} stats;

static int epfd;
static char scratch[256 * 1024]; /* every read lands here first */
static char pattern[CHUNK];      /* what /source writes */

static void update_interest(struct conn *c);

/* ---- output -------------------------------------------------------------- */

static void queue(struct conn *c, const char *data, size_t len)
{
    if (c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    if (c->out_len + len > c->out_cap) {
        if (c->out_off > 0) { /* compact before growing */
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + len > c->out_cap) {
            c->out_cap = c->out_len + len > 4096 ? c->out_len + len : 4096;
            c->out = xrealloc(c->out, c->out_cap);
        }
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

/* Write what is queued. Returns -1 if the connection is broken. */
static int flush_out(struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        c->out_off += (size_t)n;
    }
    return 0;
}

/* Send `data` now if possible; queue the rest. Returns -1 if broken. */
static int send_or_queue(struct conn *c, const char *data, size_t len)
{
    if (c->out_off == c->out_len) {
        while (len > 0) {
            ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    break;
                return -1;
            }
            data += n;
            len -= (size_t)n;
        }
    }
    if (len > 0)
        queue(c, data, len);
    return 0;
}

static bool out_pending(const struct conn *c) { return c->out_off < c->out_len; }

/* /source: write pattern chunks until the socket is full or the budget is spent. */
static int pump_source(struct conn *c)
{
    for (size_t moved = 0; moved < EVENT_BUDGET;) {
        ssize_t n = send(c->fd, pattern, CHUNK, MSG_NOSIGNAL);
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        stats.sourced += (uint64_t)n;
        moved += (size_t)n;
    }
    return 0;
}

/* ---- tunnel bytes -------------------------------------------------------- */

static int tunnel_data(struct conn *c, const char *data, size_t len)
{
    if (c->mode == M_ECHO) {
        stats.echoed += len;
        return send_or_queue(c, data, len);
    }
    stats.sunk += len; /* sink, source and duplex all discard what arrives */
    return 0;
}

/* ---- HTTP ---------------------------------------------------------------- */

static void respond(struct conn *c, const char *status, const char *body, bool keep_alive)
{
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                     status, strlen(body), keep_alive ? "" : "Connection: close\r\n");
    queue(c, head, (size_t)n);
    queue(c, body, strlen(body));
    if (!keep_alive)
        c->close_after = true;
}

static enum mode mode_for_path(const char *path, size_t len)
{
    const char *q = memchr(path, '?', len);
    if (q != NULL)
        len = (size_t)(q - path);
    if (len == 5 && memcmp(path, "/sink", 5) == 0)
        return M_SINK;
    if (len == 7 && memcmp(path, "/source", 7) == 0)
        return M_SOURCE;
    if (len == 7 && memcmp(path, "/duplex", 7) == 0)
        return M_DUPLEX;
    return M_ECHO;
}

/*
 * Answer one request head (`head`, `len` bytes, blank line included).
 * Returns true if the connection switched protocols.
 */
static bool handle_request(struct conn *c, const char *head, size_t len)
{
    /* Request line: METHOD SP TARGET SP HTTP/x.y CRLF */
    const char *eol = memmem(head, len, "\r\n", 2);
    const char *sp1 = eol ? memchr(head, ' ', (size_t)(eol - head)) : NULL;
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
    if (sp2 == NULL || eol - sp2 - 1 != 8 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        respond(c, "400 Bad Request", "bad request line\n", false);
        return false;
    }
    const char *target = sp1 + 1;
    size_t target_len = (size_t)(sp2 - target);
    bool http11 = sp2[8] == '1';

    size_t vlen;
    if (header_value(head, len, "transfer-encoding", &vlen) != NULL) {
        respond(c, "501 Not Implemented", "chunked request bodies are not supported\n", false);
        return false;
    }
    const char *cl = header_value(head, len, "content-length", &vlen);
    if (cl != NULL)
        c->skip_body = strtoull(cl, NULL, 10);

    size_t up_len;
    const char *upgrade = header_value(head, len, "upgrade", &up_len);
    if (upgrade != NULL && header_has_token(head, len, "connection", "upgrade")) {
        /* Select the first protocol offered. */
        size_t tok_len = 0;
        while (tok_len < up_len && upgrade[tok_len] != ',' && upgrade[tok_len] != ' ')
            tok_len++;
        char accept_line[64] = "";
        if (ascii_ieq(upgrade, tok_len, "websocket")) {
            size_t key_len;
            const char *key = header_value(head, len, "sec-websocket-key", &key_len);
            if (key == NULL) {
                respond(c, "400 Bad Request", "websocket upgrade without Sec-WebSocket-Key\n",
                        false);
                return false;
            }
            char accept[29];
            websocket_accept(key, key_len, accept);
            snprintf(accept_line, sizeof accept_line, "Sec-WebSocket-Accept: %s\r\n", accept);
        }
        char response[512];
        int n = snprintf(response, sizeof response,
                         "HTTP/1.1 101 Switching Protocols\r\nUpgrade: %.*s\r\n"
                         "Connection: Upgrade\r\n%s\r\n",
                         (int)(tok_len > 128 ? 128 : tok_len), upgrade, accept_line);
        queue(c, response, (size_t)n);
        c->mode = mode_for_path(target, target_len);
        stats.upgrades++;
        return true;
    }

    bool keep_alive = http11 ? !header_has_token(head, len, "connection", "close")
                             : header_has_token(head, len, "connection", "keep-alive");
    if (target_len == 6 && memcmp(target, "/stats", 6) == 0) {
        char body[256];
        snprintf(body, sizeof body,
                 "{\"sunk\": %llu, \"sourced\": %llu, \"echoed\": %llu, \"upgrades\": %llu, "
                 "\"requests\": %llu, \"open\": %ld}\n",
                 (unsigned long long)stats.sunk, (unsigned long long)stats.sourced,
                 (unsigned long long)stats.echoed, (unsigned long long)stats.upgrades,
                 (unsigned long long)stats.requests, stats.open);
        respond(c, "200 OK", body, keep_alive);
    } else {
        stats.requests++;
        respond(c, "200 OK", "Hello, world!\n", keep_alive);
    }
    return false;
}

/* Parse and answer every complete request in `in`. Returns -1 if broken. */
static int handle_http(struct conn *c)
{
    size_t off = 0;
    while (off < c->in_len && !c->close_after) {
        if (c->skip_body > 0) {
            size_t n = c->in_len - off < c->skip_body ? c->in_len - off : (size_t)c->skip_body;
            off += n;
            c->skip_body -= n;
            continue;
        }
        size_t end = head_end(c->in + off, c->in_len - off);
        if (end == 0) {
            if (c->in_len - off > MAX_HEAD)
                respond(c, "431 Request Header Fields Too Large", "head too large\n", false);
            break;
        }
        bool switched = handle_request(c, c->in + off, end);
        off += end;
        if (switched) {
            /* Flush the 101 first, then whatever followed the head is tunnel data. */
            size_t rest = c->in_len - off;
            char *early = c->in;
            c->in = NULL;
            c->in_len = c->in_cap = 0;
            if (flush_out(c) < 0 || (rest > 0 && tunnel_data(c, early + off, rest) < 0)) {
                free(early);
                return -1;
            }
            free(early);
            return 0;
        }
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
    return flush_out(c);
}

/* ---- connections --------------------------------------------------------- */

static void close_conn(struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
    stats.open--;
}

/* Read what is there (up to a budget). Returns -1 if broken. */
static int read_some(struct conn *c)
{
    for (size_t moved = 0; moved < EVENT_BUDGET;) {
        ssize_t n = recv(c->fd, scratch, sizeof scratch, 0);
        if (n == 0) {
            c->read_eof = true;
            return 0;
        }
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        moved += (size_t)n;
        if (c->mode == M_HTTP) {
            if (c->in_len + (size_t)n > c->in_cap) {
                c->in_cap = (c->in_len + (size_t)n) * 2;
                c->in = xrealloc(c->in, c->in_cap);
            }
            memcpy(c->in + c->in_len, scratch, (size_t)n);
            c->in_len += (size_t)n;
            if (handle_http(c) < 0)
                return -1;
        } else if (tunnel_data(c, scratch, (size_t)n) < 0) {
            return -1;
        }
        /* Backpressure: while output waits, stop reading (echo and HTTP). */
        if (out_pending(c) && (c->mode == M_ECHO || c->mode == M_HTTP))
            return 0;
    }
    return 0;
}

static bool finished(const struct conn *c)
{
    if (out_pending(c))
        return false;
    if (c->close_after)
        return true;
    return c->read_eof; /* the peer closed: nothing more to do in any mode */
}

static void update_interest(struct conn *c)
{
    uint32_t want = 0;
    switch (c->mode) {
    case M_HTTP:
    case M_ECHO:
        want = out_pending(c) ? EPOLLOUT : EPOLLIN;
        break;
    case M_SINK:
        want = EPOLLIN;
        break;
    case M_SOURCE:
    case M_DUPLEX:
        want = EPOLLIN | EPOLLOUT;
        break;
    }
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->events = want;
    }
}

static void on_event(struct conn *c, uint32_t events)
{
    if (events & EPOLLERR)
        goto broken;
    if (events & EPOLLOUT) {
        if (flush_out(c) < 0)
            goto broken;
        if ((c->mode == M_SOURCE || c->mode == M_DUPLEX) && !out_pending(c) && pump_source(c) < 0)
            goto broken;
        if (c->mode == M_HTTP && !out_pending(c) && c->in_len > 0 && handle_http(c) < 0)
            goto broken; /* pipelined requests held back while output was pending */
    }
    if (events & (EPOLLIN | EPOLLHUP)) {
        if (read_some(c) < 0)
            goto broken;
    }
    if (finished(c))
        goto broken;
    update_interest(c);
    return;
broken:
    close_conn(c);
}

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                fprintf(stderr, "backend: accept: %s\n", strerror(errno));
            return;
        }
        set_nodelay(fd);
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL)
            die("out of memory");
        c->fd = fd;
        c->mode = M_HTTP;
        c->events = EPOLLIN;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            die("epoll_ctl: %s", strerror(errno));
        stats.open++;
    }
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--host") == 0 && i + 1 < argc)
            host = argv[++i];
        else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
            port = atoi(argv[++i]);
        else
            die("usage: backend [--host 127.0.0.1] [--port 0]");
    }
    signal(SIGPIPE, SIG_IGN);
    for (size_t i = 0; i < sizeof pattern; i++)
        pattern[i] = (char)('a' + i % 26);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        die("backend: bad --host %s", host);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("backend: bind %s:%d: %s", host, port, strerror(errno));
    if (listen(lfd, 4096) < 0)
        die("backend: listen: %s", strerror(errno));
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    printf("listening %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    struct epoll_event events[1024];
    for (;;) {
        int n = epoll_wait(epfd, events, 1024, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL)
                accept_all(lfd);
            else
                on_event(events[i].data.ptr, events[i].events);
        }
    }
}
