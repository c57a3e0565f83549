/*
 * tls_sse: a streaming HTTP/1.1 server over TLS with OpenSSL's blocking socket BIO, and the load
 * client that drives it, for the bench's wire-timing section (`bench/src/http.rs`). The server
 * answers TGI's `POST /generate_stream` with one server-sent event per token in chunked
 * encoding, as TGI does; written in C so that the server itself adds as little CPU and noise
 * as possible to what the agent's TLS probes cost it.
 *
 *   tls_sse serve PORT TTFT_MS TOKEN_MS
 *   tls_sse load PORT REQUESTS CONCURRENCY TOKENS
 *
 * `serve` makes a key and a self-signed certificate in memory and serves each connection on a
 * thread of its own. `load` sends REQUESTS requests of TOKENS tokens over CONCURRENCY
 * keep-alive connections (not verifying the certificate: a bench, not a client to copy) and
 * prints one JSON object: latency_ms and ttft_ms per request, wall_ms.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long ttft_us, token_us;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "tls_sse: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static SSL_CTX *server_ctx(void) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    if (!key || !x)
        die("cannot make a key");
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, key);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1,
                               -1, 0);
    X509_set_issuer_name(x, name);
    if (!X509_sign(x, key, EVP_sha256()))
        die("cannot sign the certificate");
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate(ctx, x) != 1 || SSL_CTX_use_PrivateKey(ctx, key) != 1)
        die("cannot set up the server context");
    return ctx;
}

/* Reads until `buf` holds `want` bytes; 0 at the end of the connection. */
static int fill(SSL *ssl, char *buf, size_t *have, size_t cap, size_t want) {
    while (*have < want) {
        if (*have >= cap)
            return 0;
        int n = SSL_read(ssl, buf + *have, (int)(cap - *have));
        if (n <= 0)
            return 0;
        *have += (size_t)n;
    }
    return 1;
}

/* Reads until the buffer holds "\r\n\r\n" (or "\r\n" with `line`); returns the offset past it. */
static size_t until(SSL *ssl, char *buf, size_t *have, size_t cap, const char *mark) {
    size_t m = strlen(mark);
    for (;;) {
        char *end = memmem(buf, *have, mark, m);
        if (end)
            return (size_t)(end - buf) + m;
        if (!fill(ssl, buf, have, cap, *have + 1))
            return 0;
    }
}

static void consume(char *buf, size_t *have, size_t n) {
    memmove(buf, buf + n, *have - n);
    *have -= n;
}

static int write_all(SSL *ssl, const char *p, size_t n) {
    return SSL_write(ssl, p, (int)n) == (int)n;
}

struct conn {
    SSL_CTX *ctx;
    int fd;
};

static void *serve_conn(void *arg) {
    struct conn *c = arg;
    SSL *ssl = SSL_new(c->ctx);
    char buf[16384];
    size_t have = 0;
    SSL_set_fd(ssl, c->fd);
    if (SSL_accept(ssl) != 1)
        goto out;
    for (;;) {
        size_t head = until(ssl, buf, &have, sizeof buf, "\r\n\r\n");
        if (!head)
            goto out;
        buf[head - 1] = 0;
        char *cl = strcasestr(buf, "content-length:");
        size_t body = cl ? strtoul(cl + 15, NULL, 10) : 0;
        if (head + body >= sizeof buf || !fill(ssl, buf, &have, sizeof buf, head + body))
            goto out;
        char saved = buf[head + body];
        buf[head + body] = 0;
        char *mt = strstr(buf + head, "\"max_new_tokens\":");
        long tokens = mt ? strtol(mt + 17, NULL, 10) : 8;
        buf[head + body] = saved;
        consume(buf, &have, head + body);

        static const char start[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                    "Transfer-Encoding: chunked\r\n\r\n";
        if (!write_all(ssl, start, sizeof start - 1))
            goto out;
        usleep((useconds_t)ttft_us);
        for (long i = 0; i < tokens; i++) {
            char ev[256], chunk[300];
            if (i)
                usleep((useconds_t)token_us);
            int n = snprintf(ev, sizeof ev,
                             "data:{\"index\":%ld,\"token\":{\"id\":%ld,\"text\":\" tok\","
                             "\"logprob\":-0.5,\"special\":false},\"generated_text\":%s,"
                             "\"details\":null}\n\n",
                             i, 1000 + i, i + 1 == tokens ? "\"done\"" : "null");
            int m = snprintf(chunk, sizeof chunk, "%x\r\n%s\r\n", n, ev);
            if (!write_all(ssl, chunk, (size_t)m))
                goto out;
        }
        if (!write_all(ssl, "0\r\n\r\n", 5))
            goto out;
    }
out:
    SSL_free(ssl);
    close(c->fd);
    free(c);
    return NULL;
}

static void serve(int port) __attribute__((noreturn));

static void serve(int port) {
    SSL_CTX *ctx = server_ctx();
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 256))
        die("cannot listen");
    for (;;) {
        int fd = accept(l, NULL, NULL);
        if (fd < 0)
            continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = malloc(sizeof *c);
        c->ctx = ctx;
        c->fd = fd;
        pthread_t t;
        if (pthread_create(&t, NULL, serve_conn, c)) {
            close(fd);
            free(c);
            continue;
        }
        pthread_detach(t);
    }
}

static int port_, requests, tokens_;
static atomic_int next_request;
static double *latency, *ttft;

static void *load_conn(void *arg) {
    SSL_CTX *ctx = arg;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a))
        die("cannot connect");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1)
        die("handshake failed");
    char body[160], req[512], buf[16384];
    size_t have = 0;
    int blen = snprintf(body, sizeof body,
                        "{\"inputs\":\"What is Deep Learning?\",\"parameters\":"
                        "{\"max_new_tokens\":%d}}",
                        tokens_);
    int rlen = snprintf(req, sizeof req,
                        "POST /generate_stream HTTP/1.1\r\nHost: bench\r\n"
                        "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                        blen, body);
    for (;;) {
        int i = atomic_fetch_add(&next_request, 1);
        if (i >= requests)
            break;
        double t0 = now_ms(), first = 0;
        if (!write_all(ssl, req, (size_t)rlen))
            die("cannot send");
        size_t head = until(ssl, buf, &have, sizeof buf, "\r\n\r\n");
        if (!head || strncmp(buf, "HTTP/1.1 200", 12))
            die("bad answer");
        consume(buf, &have, head);
        int events = 0;
        for (;;) {
            size_t line = until(ssl, buf, &have, sizeof buf, "\r\n");
            if (!line)
                die("cut answer");
            size_t size = strtoul(buf, NULL, 16);
            consume(buf, &have, line);
            if (!fill(ssl, buf, &have, sizeof buf, size + 2))
                die("cut chunk");
            consume(buf, &have, size + 2);
            if (size == 0)
                break;
            if (!first)
                first = now_ms();
            events++;
        }
        if (events != tokens_)
            die("wrong number of events");
        latency[i] = now_ms() - t0;
        ttft[i] = first - t0;
    }
    SSL_free(ssl);
    close(fd);
    return NULL;
}

static void print_list(const char *name, const double *v, int n) {
    printf("\"%s\":[", name);
    for (int i = 0; i < n; i++)
        printf("%s%.4f", i ? "," : "", v[i]);
    printf("]");
}

static int load(int concurrency) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        die("cannot set up the client context");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    latency = calloc((size_t)requests, sizeof *latency);
    ttft = calloc((size_t)requests, sizeof *ttft);
    pthread_t *t = calloc((size_t)concurrency, sizeof *t);
    double start = now_ms();
    for (int i = 0; i < concurrency; i++)
        pthread_create(&t[i], NULL, load_conn, ctx);
    for (int i = 0; i < concurrency; i++)
        pthread_join(t[i], NULL);
    double wall = now_ms() - start;
    printf("{");
    print_list("latency_ms", latency, requests);
    printf(",");
    print_list("ttft_ms", ttft, requests);
    printf(",\"wall_ms\":%.3f}\n", wall);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "serve")) {
        ttft_us = (long)(atof(argv[3]) * 1000);
        token_us = (long)(atof(argv[4]) * 1000);
        serve(atoi(argv[2]));
    }
    if (argc == 6 && !strcmp(argv[1], "load")) {
        port_ = atoi(argv[2]);
        requests = atoi(argv[3]);
        tokens_ = atoi(argv[5]);
        return load(atoi(argv[4]));
    }
    fprintf(stderr, "usage: tls_sse serve PORT TTFT_MS TOKEN_MS | load PORT REQUESTS CONCURRENCY "
                    "TOKENS\n");
    return 2;
}
