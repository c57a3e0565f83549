"""A server that terminates TLS with blocking sockets (Python's ssl over OpenSSL's socket BIO:
the socket reads and writes happen inside SSL_read and SSL_write), one thread per connection,
answering streamed chat completions as SSE in chunked HTTP/1.1.

  tls_blocking_server.py PORT CERT KEY

It listens at once, but loads OpenSSL (imports ssl) only after a line on stdin, then prints
"tls" and serves: a test can have the agent watch it first, so the library arrives through the
loader, as a server that imports ssl late does. Only the standard library's socket layer is
imported before that (http.server would load ssl with http.client).
"""

import json
import socket
import sys
import threading
import time

port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
print("listening", flush=True)
sys.stdin.readline()

import ssl  # noqa: E402  (late on purpose: see above)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
print("tls", flush=True)


def read_request(f):
    head = f.readline()
    if not head:
        return None
    length = 0
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = json.loads(f.read(length)) if length else {}
    return body, headers


def serve(conn):
    with conn:
        f = conn.makefile("rb")
        while True:
            got = read_request(f)
            if got is None:
                return
            body, headers = got
            n = int(body.get("max_tokens", 8))
            model = body.get("model", "stand-in")
            ttft = float(headers.get("x-ttft-ms", "20")) / 1000
            gap = float(headers.get("x-token-ms", "5")) / 1000
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            time.sleep(ttft)
            for i in range(n):
                if i:
                    time.sleep(gap)
                ev = {"id": "c", "object": "chat.completion.chunk", "model": model,
                      "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}
                data = f"data: {json.dumps(ev)}\n\n".encode()
                conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            done = b"data: [DONE]\n\n"
            conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


while True:
    raw, _ = listener.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        conn = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError):
        raw.close()
        continue
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
