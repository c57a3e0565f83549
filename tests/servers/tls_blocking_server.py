"""The standard library's `http.server` wrapped in Python's blocking `ssl` (OpenSSL's socket BIO:
the socket reads and writes happen inside SSL_read and SSL_write), a thread per connection
accepted by a blocking accept,
answering streamed chat completions as SSE in chunked HTTP/1.1.

  tls_blocking_server.py PORT CERT KEY

It listens at once, but loads OpenSSL only after a line on stdin (`http.server` imports
`http.client`, which imports `ssl`: both are imported late), then prints "tls" and serves: a
test can have the agent watch it first, so the library arrives through the loader, as in a
server that imports ssl late.
"""

import json
import socket
import sys
import time

port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
print("listening", flush=True)
sys.stdin.readline()

import http.server  # noqa: E402  (late on purpose: see above)
import ssl  # noqa: E402

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = json.loads(self.rfile.read(length)) if length else {}
        n = int(body.get("max_tokens", 8))
        model = body.get("model", "stand-in")
        ttft = float(self.headers.get("x-ttft-ms", "20")) / 1000
        gap = float(self.headers.get("x-token-ms", "5")) / 1000
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        time.sleep(ttft)
        for i in range(n):
            if i:
                time.sleep(gap)
            ev = {"id": "c", "object": "chat.completion.chunk", "model": model,
                  "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}
            self.chunk(f"data: {json.dumps(ev)}\n\n".encode())
        self.chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
server.socket.close()
server.socket = ctx.wrap_socket(listener, server_side=True)
server.daemon_threads = True
print("tls", flush=True)
# Blocking in accept, as thread-per-connection servers do (serve_forever would poll first).
while True:
    try:
        conn, addr = server.socket.accept()
    except (ssl.SSLError, OSError):
        continue
    server.process_request(conn, addr)
