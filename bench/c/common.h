/*
 * common.h -- what the benchmark's backend and load generator share.
 *
 * It owns: clocks, error exits, non-blocking socket set-up, scanning an
 * HTTP/1.1 head (finding its end, reading a header, looking for a token in a
 * comma-separated list), and the WebSocket accept key of RFC 6455 section
 * 4.2.2 (a small SHA-1 and base64, so that the programs need nothing but libc);
 * and the load generators' latency samples and JSON strings.
 *
 * Header-only on purpose: each program is one .c file compiled with one
 * command. Everything here is `static inline` so an unused helper costs
 * nothing and draws no warning.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* The GUID every WebSocket server appends to the client's key (RFC 6455). */
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

/* ---- time and errors ------------------------------------------------------ */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

__attribute__((noreturn, format(printf, 1, 2))) static inline void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (p == NULL)
        die("out of memory (%zu bytes)", n);
    return p;
}

static inline void *xrealloc(void *old, size_t n)
{
    void *p = realloc(old, n);
    if (p == NULL)
        die("out of memory (%zu bytes)", n);
    return p;
}

/* ---- sockets ------------------------------------------------------------- */

static inline void set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        die("fcntl(O_NONBLOCK): %s", strerror(errno));
}

/* Small messages must not wait for Nagle: every socket here sends at once. */
static inline void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ---- HTTP/1.1 head scanning ---------------------------------------------- */

/* Offset just past the blank line that ends a head, or 0 if it is not complete. */
static inline size_t head_end(const char *buf, size_t len)
{
    const char *p = memmem(buf, len, "\r\n\r\n", 4);
    return p == NULL ? 0 : (size_t)(p - buf) + 4;
}

static inline bool ascii_ieq(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    if (alen != blen)
        return false;
    for (size_t i = 0; i < alen; i++)
        if (tolower((unsigned char)a[i]) != tolower((unsigned char)b[i]))
            return false;
    return true;
}

/*
 * Walk the header fields of a head (`head` .. `head + len`, request or status
 * line first). `*pos` starts at 0; each call returns true with the next field's
 * name and value (optional whitespace trimmed), false after the last one.
 */
static inline bool next_header(const char *head, size_t len, size_t *pos, const char **name,
                               size_t *name_len, const char **value, size_t *value_len)
{
    if (*pos == 0) { /* skip the request or status line */
        const char *eol = memmem(head, len, "\r\n", 2);
        if (eol == NULL)
            return false;
        *pos = (size_t)(eol - head) + 2;
    }
    while (*pos < len) {
        const char *line = head + *pos;
        const char *eol = memmem(line, len - *pos, "\r\n", 2);
        if (eol == NULL || eol == line)
            return false; /* the blank line: end of the head */
        *pos = (size_t)(eol - head) + 2;
        const char *colon = memchr(line, ':', (size_t)(eol - line));
        if (colon == NULL)
            continue; /* not a field; the programs here only read their own peers */
        const char *v = colon + 1, *end = eol;
        while (v < end && (*v == ' ' || *v == '\t'))
            v++;
        while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        *name = line;
        *name_len = (size_t)(colon - line);
        *value = v;
        *value_len = (size_t)(end - v);
        return true;
    }
    return false;
}

/* The value of the first field called `name`, or NULL. */
static inline const char *header_value(const char *head, size_t len, const char *name,
                                       size_t *value_len)
{
    size_t pos = 0, nlen, vlen;
    const char *n, *v;
    while (next_header(head, len, &pos, &n, &nlen, &v, &vlen))
        if (ascii_ieq(n, nlen, name)) {
            *value_len = vlen;
            return v;
        }
    return NULL;
}

/* Does the comma-separated list `value` hold `token` (case-insensitive)? */
static inline bool list_has_token(const char *value, size_t len, const char *token)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && (value[i] == ' ' || value[i] == '\t' || value[i] == ','))
            i++;
        size_t start = i;
        while (i < len && value[i] != ',')
            i++;
        size_t end = i;
        while (end > start && (value[end - 1] == ' ' || value[end - 1] == '\t'))
            end--;
        if (end > start && ascii_ieq(value + start, end - start, token))
            return true;
    }
    return false;
}

/* Does any field called `name` list `token`? (Connection may be repeated.) */
static inline bool header_has_token(const char *head, size_t len, const char *name,
                                    const char *token)
{
    size_t pos = 0, nlen, vlen;
    const char *n, *v;
    while (next_header(head, len, &pos, &n, &nlen, &v, &vlen))
        if (ascii_ieq(n, nlen, name) && list_has_token(v, vlen, token))
            return true;
    return false;
}

/* ---- SHA-1 (FIPS 180-4) and base64, for Sec-WebSocket-Accept ------------- */

#define ROL32(x, n) (((x) << (n)) | ((x) >> (32 - (n))))

static inline void sha1_block(uint32_t h[5], const uint8_t *p)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = ROL32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = ROL32(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = ROL32(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

/* One-shot SHA-1 of `len` bytes. */
static inline void sha1(const uint8_t *data, size_t len, uint8_t out[20])
{
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t i = 0;
    for (; i + 64 <= len; i += 64)
        sha1_block(h, data + i);
    /* Padding: 0x80, zeros, then the length in bits, big-endian, in the last 8 bytes. */
    uint8_t block[64];
    size_t rest = len - i;
    memcpy(block, data + i, rest);
    block[rest] = 0x80;
    if (rest >= 56) {
        memset(block + rest + 1, 0, 63 - rest);
        sha1_block(h, block);
        memset(block, 0, 56);
    } else {
        memset(block + rest + 1, 0, 55 - rest);
    }
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < 8; j++)
        block[63 - j] = (uint8_t)(bits >> (8 * j));
    sha1_block(h, block);
    for (int j = 0; j < 5; j++) {
        out[4 * j] = (uint8_t)(h[j] >> 24);
        out[4 * j + 1] = (uint8_t)(h[j] >> 16);
        out[4 * j + 2] = (uint8_t)(h[j] >> 8);
        out[4 * j + 3] = (uint8_t)h[j];
    }
}

/* Standard base64 with padding; `out` needs 4 * ceil(len / 3) + 1 bytes. */
static inline void base64_encode(const uint8_t *in, size_t len, char *out)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < len)
            v |= in[i + 2];
        out[o++] = alphabet[(v >> 18) & 63];
        out[o++] = alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < len ? alphabet[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? alphabet[v & 63] : '=';
    }
    out[o] = '\0';
}

/* Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64(SHA-1(key + GUID)), 28 chars. */
static inline void websocket_accept(const char *key, size_t key_len, char out[29])
{
    uint8_t buf[128], digest[20];
    size_t guid_len = sizeof WS_GUID - 1;
    if (key_len > sizeof buf - guid_len)
        key_len = sizeof buf - guid_len; /* a key is 24 characters; anything longer is wrong anyway */
    memcpy(buf, key, key_len);
    memcpy(buf + key_len, WS_GUID, guid_len);
    sha1(buf, key_len + guid_len, digest);
    base64_encode(digest, sizeof digest, out);
}

/* ---- latency samples and JSON output -------------------------------------- */

/* Latencies in nanoseconds, in the order they were taken (sorted for printing). */
struct samples {
    uint64_t *v;
    size_t n, cap;
};

static inline void samples_add(struct samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = xrealloc(s->v, s->cap * sizeof *s->v);
    }
    s->v[s->n++] = ns;
}

static inline int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile, in microseconds. Call after sorting. */
static inline double percentile_us(const struct samples *s, double q)
{
    if (s->n == 0)
        return 0;
    size_t rank = (size_t)ceil(q * (double)s->n);
    if (rank < 1)
        rank = 1;
    return (double)s->v[rank - 1] / 1e3;
}

/* The JSON fields p50_us, p90_us, p99_us, max_us and mean_us (sorts the samples). */
static inline void print_latency(struct samples *s)
{
    qsort(s->v, s->n, sizeof *s->v, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < s->n; i++)
        sum += (double)s->v[i];
    printf("\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, "
           "\"mean_us\": %.1f",
           percentile_us(s, 0.50), percentile_us(s, 0.90), percentile_us(s, 0.99),
           percentile_us(s, 1.0), s->n ? sum / (double)s->n / 1e3 : 0.0);
}

static inline void print_json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

#endif
