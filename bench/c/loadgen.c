/*
 * loadgen.c -- the benchmark's load generator: one thread, epoll,
 * non-blocking sockets. It opens WebSocket upgrades (a random
 * Sec-WebSocket-Key each time), checks every 101 it gets (status, `Upgrade:
 * websocket`, `upgrade` in `Connection`, the right `Sec-WebSocket-Accept`, no
 * body framing), and then drives the tunnels with raw bytes (no WebSocket
 * frames: a proxy never looks inside a tunnel).
 *
 * Modes (the first argument):
 *
 *   throughput  --conns N tunnels to /duplex (the backend sinks what arrives
 *               and sources bytes at the same time). Each tunnel writes
 *               --size-byte chunks as fast as it can and reads and discards
 *               whatever comes. After --warmup seconds, counts bytes for
 *               --duration seconds, each way at the receiving end:
 *               backend->client here, client->backend from the backend's
 *               `GET /stats` counter (--stats-port, asked directly).
 *   rtt         --conns N tunnels to /echo; each sends one --size-byte
 *               message, waits until all of it has come back (checking every
 *               byte), and sends the next. Round trips per second and the
 *               latency distribution of those completed in the window.
 *   handshake   --conns N loops, each: new TCP connection, upgrade request,
 *               complete 101, close; then again. Handshakes per second and
 *               their latency; at the end, the handshakes under way finish. --src-ips K spreads the connections over
 *               127.0.0.1..127.0.0.K so that TIME_WAIT never runs out of ports
 *               (--src-ip-first F starts at 127.0.0.F instead: two load
 *               generators side by side use separate addresses).
 *   idle        Opens --conns N tunnels to /echo (at most --concurrency
 *               handshakes at a time), does one round trip on each, prints a
 *               "ready" line, waits for a line (or EOF) on stdin, checks that
 *               every tunnel is still open, prints a "done" line and closes.
 *
 * Output: JSON objects, one per line, on stdout. Exit status 0 when the run
 * happened (failures are counted in the JSON), 2 on a usage error.
 */
#include "common.h"

#include <arpa/inet.h>
#include <math.h>
#include <signal.h>
#include <sys/epoll.h>

#define MAX_EVENTS 1024
#define IO_BUDGET (256 * 1024) /* bytes moved per socket per event, for fairness */

static struct {
    const char *mode, *host, *path;
    int port, conns, size, stats_port, concurrency, src_ips, src_ip_first;
    double warmup, duration, timeout;
} opt = {
    .host = "127.0.0.1",
    .conns = 1,
    .size = 64,
    .concurrency = 64,
    .src_ips = 1,
    .src_ip_first = 1,
    .warmup = 1,
    .duration = 5,
    .timeout = 10,
};

enum state { S_IDLE, S_CONNECTING, S_REQUEST, S_HEAD, S_OPEN };

struct tun {
    int fd;
    enum state st;
    uint32_t events;   /* epoll interest currently registered */
    uint64_t t_start;  /* when the handshake, or the current message, started */
    char req[512];
    size_t req_len, req_off;
    char head[4096];   /* the response head as it arrives */
    size_t head_len;
    char accept[29];   /* the Sec-WebSocket-Accept we expect */
    uint64_t rx, tx;   /* tunnel bytes received and sent */
    uint64_t rx_mark;  /* rx when the measured window began */
    size_t msg_sent, msg_got; /* rtt: progress of the current message */
    uint32_t seq;             /* rtt: message number, seeds its payload */
};

/* Failures, by kind, and the words of the first one. */
static struct {
    uint64_t connect, closed, status, invalid, timeout, mismatch;
} err;
static char first_error[300];

static int epfd;
static struct sockaddr_in target;
static char scratch[256 * 1024];
static char *wbuf; /* throughput: what each write sends */
static uint64_t rng_state;
static uint64_t connections_started;

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
    return err.connect + err.closed + err.status + err.invalid + err.timeout + err.mismatch;
}

static uint64_t rng(void)
{
    /* xorshift64*: plenty for WebSocket keys. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static void set_events(struct tun *t, uint32_t events)
{
    if (t->events != events) {
        struct epoll_event ev = {.events = events, .data.ptr = t};
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, t->fd, &ev) < 0)
            die("epoll_ctl: %s", strerror(errno));
        t->events = events;
    }
}

static void tun_close(struct tun *t)
{
    if (t->st != S_IDLE) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, t->fd, NULL);
        close(t->fd);
    }
    t->st = S_IDLE;
    t->fd = -1;
}

/* Start a connection and its upgrade request. Returns -1 (counted) if it failed at once. */
static int tun_start(struct tun *t)
{
    memset(t, 0, sizeof *t);
    t->fd = -1;
    t->t_start = now_ns();
    uint8_t raw_key[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = rng();
        memcpy(raw_key + i, &r, 8);
    }
    char key[25];
    base64_encode(raw_key, sizeof raw_key, key);
    websocket_accept(key, strlen(key), t->accept);
    t->req_len = (size_t)snprintf(t->req, sizeof t->req,
                                  "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                                  "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                                  "Sec-WebSocket-Version: 13\r\n\r\n",
                                  opt.path, opt.host, opt.port, key);

    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        failure(&err.connect, "socket: %s", strerror(errno));
        return -1;
    }
    set_nodelay(fd);
    if (opt.src_ips > 1 || opt.src_ip_first > 1) {
        /* 127.0.0.F .. 127.0.0.F+K-1; the port is chosen at connect() time. */
        int one = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000000u + (uint32_t)opt.src_ip_first +
                                    (uint32_t)(connections_started % (uint64_t)opt.src_ips));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            failure(&err.connect, "bind: %s", strerror(errno));
            close(fd);
            return -1;
        }
    }
    connections_started++;
    t->fd = fd;
    t->st = S_CONNECTING;
    t->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = t};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        failure(&err.connect, "connect: %s", strerror(errno));
        tun_close(t);
        return -1;
    }
    return 0;
}

/* Is this complete head a valid 101 for our request? Counts and describes what is wrong. */
static bool valid_101(struct tun *t, size_t end)
{
    const char *h = t->head;
    const char *eol = memmem(h, end, "\r\n", 2);
    int line_len = (int)(eol - h);
    if (line_len < 13 || memcmp(h, "HTTP/1.1 101 ", 13) != 0) {
        failure(&err.status, "expected a 101, got \"%.*s\"", line_len > 100 ? 100 : line_len, h);
        return false;
    }
    size_t vlen;
    const char *accept = header_value(h, end, "sec-websocket-accept", &vlen);
    if (!header_has_token(h, end, "upgrade", "websocket"))
        failure(&err.invalid, "101 without \"Upgrade: websocket\"");
    else if (!header_has_token(h, end, "connection", "upgrade"))
        failure(&err.invalid, "101 without \"upgrade\" in Connection");
    else if (accept == NULL)
        failure(&err.invalid, "101 without Sec-WebSocket-Accept");
    else if (vlen != 28 || memcmp(accept, t->accept, 28) != 0)
        failure(&err.invalid, "101 with Sec-WebSocket-Accept \"%.*s\", expected \"%s\"",
                (int)(vlen > 60 ? 60 : vlen), accept, t->accept);
    else if (header_value(h, end, "content-length", &vlen) != NULL ||
             header_value(h, end, "transfer-encoding", &vlen) != NULL)
        failure(&err.invalid, "101 with body framing (Content-Length or Transfer-Encoding)");
    else
        return true;
    return false;
}

/*
 * Move a handshake forward after `events`. Returns 1 once a valid 101 has
 * arrived (bytes behind it count as tunnel bytes), 0 while it is under way,
 * -1 on failure (counted; the caller closes).
 */
static int handshake_io(struct tun *t, uint32_t events)
{
    if (t->st == S_CONNECTING) {
        int e = 0;
        socklen_t len = sizeof e;
        getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &e, &len);
        if (e != 0) {
            failure(&err.connect, "connect: %s", strerror(e));
            return -1;
        }
        if (!(events & EPOLLOUT))
            return 0;
        t->st = S_REQUEST;
    }
    if (t->st == S_REQUEST) {
        while (t->req_off < t->req_len) {
            ssize_t n = send(t->fd, t->req + t->req_off, t->req_len - t->req_off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR)
                    return 0;
                failure(&err.connect, "sending the upgrade request: %s", strerror(errno));
                return -1;
            }
            t->req_off += (size_t)n;
        }
        t->st = S_HEAD;
        set_events(t, EPOLLIN);
        return 0;
    }
    if (t->st != S_HEAD)
        return 0;
    for (;;) {
        ssize_t n = recv(t->fd, t->head + t->head_len, sizeof t->head - t->head_len, 0);
        if (n == 0) {
            failure(&err.closed, "closed before a complete response head (%zu bytes of it came)",
                    t->head_len);
            return -1;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            failure(&err.closed, "reading the response head: %s", strerror(errno));
            return -1;
        }
        t->head_len += (size_t)n;
        size_t end = head_end(t->head, t->head_len);
        if (end > 0) {
            if (!valid_101(t, end))
                return -1;
            t->rx += t->head_len - end;
            t->st = S_OPEN;
            return 1;
        }
        if (t->head_len == sizeof t->head) {
            failure(&err.invalid, "response head larger than %zu bytes", sizeof t->head);
            return -1;
        }
    }
}

/*
 * Open `n` tunnels, at most `concurrency` handshakes at a time. Tunnels that
 * failed are left S_IDLE. Returns how many are open.
 */
static int open_tunnels(struct tun *tuns, int n, int concurrency, double limit_s)
{
    struct epoll_event evs[MAX_EVENTS];
    int next = 0, in_flight = 0, open = 0;
    uint64_t deadline = now_ns() + (uint64_t)(limit_s * 1e9);
    while (next < n || in_flight > 0) {
        while (in_flight < concurrency && next < n)
            if (tun_start(&tuns[next++]) == 0)
                in_flight++;
        if (now_ns() > deadline) {
            for (int i = 0; i < n; i++)
                if (tuns[i].st != S_IDLE && tuns[i].st != S_OPEN) {
                    failure(&err.timeout, "handshake not finished after %.0f s", limit_s);
                    tun_close(&tuns[i]);
                }
            break;
        }
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 100);
        for (int i = 0; i < k; i++) {
            struct tun *t = evs[i].data.ptr;
            int r = handshake_io(t, evs[i].events);
            if (r != 0)
                in_flight--;
            if (r > 0) {
                open++;
                set_events(t, 0); /* quiet until the mode decides what to do */
            } else if (r < 0) {
                tun_close(t);
            }
        }
    }
    return open;
}

/* ---- JSON output --------------------------------------------------------- */

static void print_errors(void)
{
    printf("\"failures\": %llu, \"errors\": {\"connect\": %llu, \"closed\": %llu, "
           "\"status\": %llu, \"invalid\": %llu, \"timeout\": %llu, \"mismatch\": %llu}, "
           "\"first_error\": ",
           (unsigned long long)failures(), (unsigned long long)err.connect,
           (unsigned long long)err.closed, (unsigned long long)err.status,
           (unsigned long long)err.invalid, (unsigned long long)err.timeout,
           (unsigned long long)err.mismatch);
    if (first_error[0])
        print_json_string(first_error);
    else
        printf("null");
}

static struct samples samples; /* latencies of the measured window */

/* ---- throughput ---------------------------------------------------------- */

/* The backend's "sunk" counter, from GET /stats on a fresh blocking connection; -1 on failure. */
static long long fetch_sunk(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in addr = target;
    addr.sin_port = htons((uint16_t)opt.stats_port);
    char buf[2048];
    size_t len = 0;
    const char req[] = "GET /stats HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n";
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        send(fd, req, sizeof req - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof req - 1)) {
        close(fd);
        return -1;
    }
    for (ssize_t n; len < sizeof buf - 1 && (n = recv(fd, buf + len, sizeof buf - 1 - len, 0)) > 0;)
        len += (size_t)n;
    close(fd);
    buf[len] = '\0';
    const char *p = strstr(buf, "\"sunk\": ");
    return p ? atoll(p + 8) : -1;
}

static void run_throughput(struct tun *tuns)
{
    int open = open_tunnels(tuns, opt.conns, opt.conns, opt.timeout);
    for (int i = 0; i < opt.conns; i++)
        if (tuns[i].st == S_OPEN)
            set_events(&tuns[i], EPOLLIN | EPOLLOUT);
    wbuf = xmalloc((size_t)opt.size);
    for (int i = 0; i < opt.size; i++)
        wbuf[i] = (char)('A' + i % 26);

    struct epoll_event evs[MAX_EVENTS];
    uint64_t t0 = now_ns();
    uint64_t window_start = t0 + (uint64_t)(opt.warmup * 1e9);
    uint64_t window_end = window_start + (uint64_t)(opt.duration * 1e9);
    uint64_t ta = 0, tb = 0, rx_a = 0, rx_b = 0, tx_a = 0, tx_b = 0;
    long long sunk_a = -1, sunk_b = -1;
    bool measuring = false;
    int alive = open;
    for (;;) {
        uint64_t now = now_ns();
        if (!measuring && now >= window_start) {
            for (int i = 0; i < opt.conns; i++) {
                tuns[i].rx_mark = tuns[i].rx;
                rx_a += tuns[i].rx;
                tx_a += tuns[i].tx;
            }
            ta = now_ns();
            sunk_a = fetch_sunk();
            measuring = true;
        }
        if (measuring && now >= window_end)
            break;
        if (alive == 0 && measuring)
            break;
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 10);
        for (int e = 0; e < k; e++) {
            struct tun *t = evs[e].data.ptr;
            uint32_t ev = evs[e].events;
            if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                for (size_t moved = 0; moved < IO_BUDGET;) {
                    ssize_t n = recv(t->fd, scratch, sizeof scratch, 0);
                    if (n > 0) {
                        t->rx += (uint64_t)n;
                        moved += (size_t)n;
                        continue;
                    }
                    if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        break;
                    failure(&err.closed, "tunnel %s during the run",
                            n == 0 ? "closed by the other side" : strerror(errno));
                    ev = 0;
                    tun_close(t);
                    alive--;
                    break;
                }
            }
            if (ev & EPOLLOUT) {
                for (size_t moved = 0; moved < IO_BUDGET;) {
                    ssize_t n = send(t->fd, wbuf, (size_t)opt.size, MSG_NOSIGNAL);
                    if (n > 0) {
                        t->tx += (uint64_t)n;
                        moved += (size_t)n;
                        continue;
                    }
                    if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        break;
                    failure(&err.closed, "writing into the tunnel: %s", strerror(errno));
                    tun_close(t);
                    alive--;
                    break;
                }
            }
        }
    }
    uint64_t min_rx = UINT64_MAX, max_rx = 0;
    for (int i = 0; i < opt.conns; i++) {
        rx_b += tuns[i].rx;
        tx_b += tuns[i].tx;
        uint64_t got = tuns[i].rx - tuns[i].rx_mark;
        if (got < min_rx)
            min_rx = got;
        if (got > max_rx)
            max_rx = got;
    }
    tb = now_ns();
    sunk_b = fetch_sunk();
    double secs = (double)(tb - ta) / 1e9;
    printf("{\"mode\": \"throughput\", \"tunnels\": %d, \"open\": %d, \"window_s\": %.3f, "
           "\"down_bytes\": %llu, \"down_MBps\": %.2f, \"client_sent_bytes\": %llu, "
           "\"down_min_tunnel_MBps\": %.2f, \"down_max_tunnel_MBps\": %.2f, ",
           opt.conns, open, secs, (unsigned long long)(rx_b - rx_a),
           (double)(rx_b - rx_a) / secs / 1e6, (unsigned long long)(tx_b - tx_a),
           open ? (double)min_rx / secs / 1e6 : 0.0, (double)max_rx / secs / 1e6);
    if (sunk_a >= 0 && sunk_b >= sunk_a)
        printf("\"up_bytes\": %lld, \"up_MBps\": %.2f, ", sunk_b - sunk_a,
               (double)(sunk_b - sunk_a) / secs / 1e6);
    else
        printf("\"up_bytes\": null, \"up_MBps\": null, ");
    print_errors();
    printf("}\n");
}

/* ---- rtt ----------------------------------------------------------------- */

static inline char payload_byte(uint32_t seq, size_t i) { return (char)((seq * 31u + i) & 0xff); }

/* Send (the rest of) the current message. Returns -1 if the tunnel broke. */
static int send_message(struct tun *t)
{
    char msg[4096];
    size_t size = (size_t)opt.size;
    while (t->msg_sent < size) {
        size_t len = size - t->msg_sent < sizeof msg ? size - t->msg_sent : sizeof msg;
        for (size_t i = 0; i < len; i++)
            msg[i] = payload_byte(t->seq, t->msg_sent + i);
        ssize_t n = send(t->fd, msg, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                set_events(t, EPOLLIN | EPOLLOUT);
                return 0;
            }
            failure(&err.closed, "writing into the tunnel: %s", strerror(errno));
            return -1;
        }
        t->msg_sent += (size_t)n;
        t->tx += (uint64_t)n;
    }
    set_events(t, EPOLLIN);
    return 0;
}

static int start_message(struct tun *t)
{
    t->seq++;
    t->msg_sent = t->msg_got = 0;
    t->t_start = now_ns();
    return send_message(t);
}

/*
 * Read echoed bytes and check them. Calls `done(t, latency)` for every
 * complete message. Returns -1 if the tunnel broke or sent wrong bytes.
 */
static int receive_echo(struct tun *t, void (*done)(struct tun *, uint64_t))
{
    for (;;) {
        size_t want = (size_t)opt.size - t->msg_got;
        if (want == 0)
            return 0;
        ssize_t n = recv(t->fd, scratch, want < sizeof scratch ? want : sizeof scratch, 0);
        if (n == 0) {
            failure(&err.closed, "tunnel closed by the other side during the run");
            return -1;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            failure(&err.closed, "reading from the tunnel: %s", strerror(errno));
            return -1;
        }
        for (ssize_t i = 0; i < n; i++)
            if (scratch[i] != payload_byte(t->seq, t->msg_got + (size_t)i)) {
                failure(&err.mismatch, "echoed byte %zu of message %u differs",
                        t->msg_got + (size_t)i, t->seq);
                return -1;
            }
        t->msg_got += (size_t)n;
        t->rx += (uint64_t)n;
        if (t->msg_got == (size_t)opt.size && t->msg_sent == (size_t)opt.size) {
            done(t, now_ns() - t->t_start);
            if (t->st != S_OPEN)
                return 0; /* `done` closed it (and counted why) */
        }
    }
}

static uint64_t rtt_window_start, rtt_window_end, rtt_count;

static void rtt_done(struct tun *t, uint64_t latency)
{
    uint64_t now = now_ns();
    if (now >= rtt_window_start && now < rtt_window_end) {
        rtt_count++;
        samples_add(&samples, latency);
    }
    if (start_message(t) < 0)
        tun_close(t);
}

static void run_rtt(struct tun *tuns)
{
    int open = open_tunnels(tuns, opt.conns, opt.concurrency, opt.timeout);
    for (int i = 0; i < opt.conns; i++)
        if (tuns[i].st == S_OPEN && start_message(&tuns[i]) < 0)
            tun_close(&tuns[i]);
    struct epoll_event evs[MAX_EVENTS];
    rtt_window_start = now_ns() + (uint64_t)(opt.warmup * 1e9);
    rtt_window_end = rtt_window_start + (uint64_t)(opt.duration * 1e9);
    uint64_t timeout_ns = (uint64_t)(opt.timeout * 1e9);
    uint64_t last_scan = 0;
    for (;;) {
        uint64_t now = now_ns();
        if (now >= rtt_window_end)
            break;
        if (now - last_scan > 100000000u) { /* a message stuck for too long ends its tunnel */
            last_scan = now;
            for (int i = 0; i < opt.conns; i++)
                if (tuns[i].st == S_OPEN && now > tuns[i].t_start &&
                    now - tuns[i].t_start > timeout_ns) {
                    failure(&err.timeout, "no echo after %.1f s", opt.timeout);
                    tun_close(&tuns[i]);
                }
        }
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 10);
        for (int e = 0; e < k; e++) {
            struct tun *t = evs[e].data.ptr;
            if (t->st != S_OPEN)
                continue; /* closed earlier in this batch */
            if ((evs[e].events & EPOLLOUT) && send_message(t) < 0) {
                tun_close(t);
                continue;
            }
            if ((evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && receive_echo(t, rtt_done) < 0)
                tun_close(t);
        }
    }
    double secs = (double)(rtt_window_end - rtt_window_start) / 1e9;
    printf("{\"mode\": \"rtt\", \"tunnels\": %d, \"open\": %d, \"size\": %d, \"window_s\": %.3f, "
           "\"round_trips\": %llu, \"per_s\": %.1f, ",
           opt.conns, open, opt.size, secs, (unsigned long long)rtt_count,
           (double)rtt_count / secs);
    print_latency(&samples);
    printf(", ");
    print_errors();
    printf("}\n");
}

/* ---- handshake ----------------------------------------------------------- */

static void run_handshake(struct tun *slots)
{
    struct epoll_event evs[MAX_EVENTS];
    uint64_t window_start = now_ns() + (uint64_t)(opt.warmup * 1e9);
    uint64_t window_end = window_start + (uint64_t)(opt.duration * 1e9);
    uint64_t timeout_ns = (uint64_t)(opt.timeout * 1e9), last_scan = 0, done = 0, total = 0;
    for (int i = 0; i < opt.conns; i++)
        slots[i].st = S_IDLE;
    bool draining = false;
    for (;;) {
        uint64_t now = now_ns();
        if (now >= window_end) {
            /* Let the handshakes under way finish, so that ending the run does
             * not look like clients giving up halfway. */
            draining = true;
            bool busy = false;
            for (int i = 0; i < opt.conns; i++)
                busy |= slots[i].st != S_IDLE;
            if (!busy || now >= window_end + timeout_ns)
                break;
        }
        bool idle_slots = false;
        for (int i = 0; i < opt.conns && !draining; i++)
            if (slots[i].st == S_IDLE && tun_start(&slots[i]) < 0)
                idle_slots = true; /* failed at once (counted); try again shortly */
        if (now - last_scan > 100000000u) {
            last_scan = now;
            for (int i = 0; i < opt.conns; i++)
                if (slots[i].st != S_IDLE && now > slots[i].t_start &&
                    now - slots[i].t_start > timeout_ns) {
                    failure(&err.timeout, "no complete 101 after %.1f s", opt.timeout);
                    tun_close(&slots[i]);
                }
        }
        int k = epoll_wait(epfd, evs, MAX_EVENTS, idle_slots ? 1 : 10);
        for (int e = 0; e < k; e++) {
            struct tun *t = evs[e].data.ptr;
            int r = handshake_io(t, evs[e].events);
            if (r > 0) {
                uint64_t end = now_ns();
                total++;
                if (end >= window_start && end < window_end) {
                    done++;
                    samples_add(&samples, end - t->t_start);
                }
            }
            if (r != 0)
                tun_close(t); /* done or failed: the slot starts again */
        }
    }
    for (int i = 0; i < opt.conns; i++)
        tun_close(&slots[i]);
    double secs = (double)(window_end - window_start) / 1e9;
    printf("{\"mode\": \"handshake\", \"concurrency\": %d, \"window_s\": %.3f, "
           "\"handshakes\": %llu, \"handshakes_total\": %llu, \"per_s\": %.1f, ",
           opt.conns, secs, (unsigned long long)done, (unsigned long long)total,
           (double)done / secs);
    print_latency(&samples);
    printf(", ");
    print_errors();
    printf("}\n");
}

/* ---- idle ---------------------------------------------------------------- */

static uint64_t idle_verified;

static void idle_done(struct tun *t, uint64_t latency)
{
    (void)latency;
    idle_verified++;
    set_events(t, 0); /* one message each: msg_got == size, so nothing more is read */
}

static void run_idle(struct tun *tuns)
{
    uint64_t t0 = now_ns();
    int open = open_tunnels(tuns, opt.conns, opt.concurrency, 60 + opt.conns / 100.0);
    double open_s = (double)(now_ns() - t0) / 1e9;

    /* One round trip on every tunnel: proof that each one carries bytes. */
    int pending = 0;
    for (int i = 0; i < opt.conns; i++)
        if (tuns[i].st == S_OPEN) {
            if (start_message(&tuns[i]) < 0)
                tun_close(&tuns[i]);
            else
                pending++;
        }
    struct epoll_event evs[MAX_EVENTS];
    uint64_t deadline = now_ns() + (uint64_t)(opt.timeout * 1e9);
    while (idle_verified < (uint64_t)pending && now_ns() < deadline) {
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 100);
        for (int e = 0; e < k; e++) {
            struct tun *t = evs[e].data.ptr;
            if (t->st != S_OPEN)
                continue;
            if ((evs[e].events & EPOLLOUT) && send_message(t) < 0) {
                tun_close(t);
                continue;
            }
            if ((evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && receive_echo(t, idle_done) < 0)
                tun_close(t);
        }
    }
    if (idle_verified < (uint64_t)pending)
        failure(&err.timeout, "%llu tunnels gave no echo within %.1f s",
                (unsigned long long)((uint64_t)pending - idle_verified), opt.timeout);
    printf("{\"phase\": \"ready\", \"tunnels\": %d, \"open\": %d, \"verified\": %llu, "
           "\"open_s\": %.3f, ",
           opt.conns, open, (unsigned long long)idle_verified, open_s);
    print_errors();
    printf("}\n");
    fflush(stdout);

    /* Hold the tunnels until told to let go. */
    char line[64];
    ssize_t n;
    while ((n = read(0, line, sizeof line)) > 0 && memchr(line, '\n', (size_t)n) == NULL)
        ;
    int alive = 0;
    for (int i = 0; i < opt.conns; i++)
        if (tuns[i].st == S_OPEN) {
            char c;
            ssize_t peeked = recv(tuns[i].fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
            if (peeked < 0 && errno == EAGAIN)
                alive++;
            tun_close(&tuns[i]);
        }
    printf("{\"phase\": \"done\", \"alive\": %d}\n", alive);
}

/* ---- main ---------------------------------------------------------------- */

static void usage(void)
{
    die("usage: loadgen throughput|rtt|handshake|idle --port PORT [--host 127.0.0.1] "
        "[--path PATH] [--conns N] [--size BYTES] [--warmup S] [--duration S] "
        "[--stats-port PORT] [--concurrency K] [--src-ips K] [--src-ip-first F] [--timeout S]");
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    opt.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (strcmp(a, "--host") == 0)
            opt.host = v;
        else if (strcmp(a, "--port") == 0)
            opt.port = atoi(v);
        else if (strcmp(a, "--path") == 0)
            opt.path = v;
        else if (strcmp(a, "--conns") == 0)
            opt.conns = atoi(v);
        else if (strcmp(a, "--size") == 0)
            opt.size = atoi(v);
        else if (strcmp(a, "--warmup") == 0)
            opt.warmup = atof(v);
        else if (strcmp(a, "--duration") == 0)
            opt.duration = atof(v);
        else if (strcmp(a, "--stats-port") == 0)
            opt.stats_port = atoi(v);
        else if (strcmp(a, "--concurrency") == 0)
            opt.concurrency = atoi(v);
        else if (strcmp(a, "--src-ips") == 0)
            opt.src_ips = atoi(v);
        else if (strcmp(a, "--src-ip-first") == 0)
            opt.src_ip_first = atoi(v);
        else if (strcmp(a, "--timeout") == 0)
            opt.timeout = atof(v);
        else
            usage();
    }
    if (opt.port <= 0 || opt.conns <= 0 || opt.size <= 0 || opt.concurrency <= 0 ||
        opt.src_ips <= 0 || opt.src_ip_first <= 0 || opt.src_ip_first + opt.src_ips > 255)
        usage();
    signal(SIGPIPE, SIG_IGN);
    rng_state = now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &target.sin_addr) != 1)
        die("loadgen: --host must be an IPv4 address, not %s", opt.host);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct tun *tuns = calloc((size_t)opt.conns, sizeof *tuns);
    if (tuns == NULL)
        die("out of memory");
    for (int i = 0; i < opt.conns; i++)
        tuns[i].fd = -1;

    if (strcmp(opt.mode, "throughput") == 0) {
        if (opt.stats_port <= 0)
            opt.stats_port = opt.port;
        opt.path = opt.path ? opt.path : "/duplex";
        run_throughput(tuns);
    } else if (strcmp(opt.mode, "rtt") == 0) {
        opt.path = opt.path ? opt.path : "/echo";
        run_rtt(tuns);
    } else if (strcmp(opt.mode, "handshake") == 0) {
        opt.path = opt.path ? opt.path : "/echo";
        run_handshake(tuns);
    } else if (strcmp(opt.mode, "idle") == 0) {
        opt.path = opt.path ? opt.path : "/echo";
        run_idle(tuns);
    } else {
        usage();
    }
    fflush(stdout);
    free(tuns);
    free(samples.v);
    free(wbuf);
    return 0;
}
