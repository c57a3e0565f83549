"""Clients for the http probe tests. Prints one JSON document (the client's truth) on stdout.

  openai PORT MODEL [CA]  scenario through the official openai package (streamed and not,
                        errors); over TLS trusting the CA certificate file CA, when given
  timing PORT N [CA]    N streamed chat requests on one keep-alive raw socket, timed here
                        (over TLS, trusting the CA certificate file CA, when given)
  concurrent PORT C R   C keep-alive connections at once, R streamed requests each
  bad PORT              garbage, non-HTTP, oversized header, slow header, reset mid-stream
"""

import json
import socket
import sys
import threading
import time


def openai_scenario(port, model, ca=None):
    import openai

    if ca:
        import ssl

        c = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                          http_client=openai.DefaultHttpxClient(
                              verify=ssl.create_default_context(cafile=ca)))
    else:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    truth = {"requests": {}, "errors": {}, "input": 0, "output": 0}

    def count(status, error=None, inp=0, out=0):
        key = f"{model}|{status}"
        truth["requests"][key] = truth["requests"].get(key, 0) + 1
        if error:
            k = f"{model}|{error}"
            truth["errors"][k] = truth["errors"].get(k, 0) + 1
        truth["input"] += inp
        truth["output"] += out

    msgs = [{"role": "user", "content": "one two three four"}]
    # Streamed chat without usage: output = content events, input unknown.
    for n in (3, 5):
        s = c.chat.completions.create(model=model, messages=msgs, max_tokens=n, stream=True)
        got = sum(1 for ch in s if ch.choices and ch.choices[0].delta.content)
        assert got == n, got
        count(200, out=n)
    # Streamed chat with include_usage.
    s = c.chat.completions.create(model=model, messages=msgs, max_tokens=4, stream=True,
                                  stream_options={"include_usage": True})
    usage = [ch.usage for ch in s if ch.usage][0]
    count(200, inp=usage.prompt_tokens, out=usage.completion_tokens)
    # Non-streamed chat and completion: usage.
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=6)
    count(200, inp=r.usage.prompt_tokens, out=r.usage.completion_tokens)
    r = c.completions.create(model=model, prompt="a b c d e f g", max_tokens=2)
    count(200, inp=r.usage.prompt_tokens, out=r.usage.completion_tokens)
    # Streamed completion.
    s = c.completions.create(model=model, prompt="x y", max_tokens=7, stream=True)
    assert sum(1 for ch in s if ch.choices and ch.choices[0].text) == 7
    count(200, out=7)
    # Errors.
    for kind, status, err in (("400", 400, "http_4xx"), ("429", 429, "rate_limited"),
                              ("500", 500, "http_5xx"), ("context", 400, "context_length")):
        try:
            c.chat.completions.create(model=model, messages=msgs, max_tokens=2,
                                      extra_headers={"x-error": kind})
            raise SystemExit(f"error {kind} not raised")
        except openai.APIStatusError as e:
            assert e.status_code == status
        count(status, error=err)
    return truth


# Linux's SO_TIMESTAMPNS (asm-generic/socket.h; also its SCM_ type), which Python does not name.
SO_TIMESTAMPNS = 35


class Conn:
    """A keep-alive connection whose clock is its socket's: each read's bytes carry the time
    the kernel received them (`SO_TIMESTAMPNS`, CLOCK_REALTIME), so a client that Python or the
    machine schedules late still times a message when it reached it. TLS runs through memory
    BIOs over the plain socket, for the same timestamps."""

    def __init__(self, port, ca=None):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.tls = None
        self.buf = b""
        # (offset just past a read's last byte, counted from the first byte ever read; the
        # kernel's time for that read), oldest first; `taken` bytes have left `buf`.
        self.marks = []
        self.taken = 0
        self.stamp = 0
        if ca:
            import ssl

            ctx = ssl.create_default_context(cafile=ca)
            self.rx, self.tx = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self.rx, self.tx, server_hostname="127.0.0.1")
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.flush()
                    self.raw()
            self.flush()

    def flush(self):
        out = self.tx.read()
        if out:
            self.s.sendall(out)

    def sendall(self, data):
        if self.tls:
            self.tls.write(data)
            self.flush()
        else:
            self.s.sendall(data)

    def raw(self):
        """One read of the socket: its bytes and the kernel's time of receipt in ns."""
        data, anc, _, _ = self.s.recvmsg(65536, socket.CMSG_SPACE(16))
        if not data:
            raise EOFError
        # The kernel turns its receive timestamps on a moment after the first socket asks
        # (a deferred static key): a read without one is timed here, as it is read.
        stamp = next((int.from_bytes(d[:8], "little") * 1_000_000_000
                      + int.from_bytes(d[8:16], "little")
                      for level, kind, d in anc
                      if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
        if stamp is None:
            stamp = time.time_ns()
        if self.tls:
            self.rx.write(data)
        return data, stamp

    def fill(self):
        import ssl

        while True:
            data, stamp = self.raw()
            if self.tls:
                data = b""
                while True:
                    try:
                        data += self.tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        break
                if not data:
                    continue  # a record not yet whole, or one without application data
            self.buf += data
            self.marks.append((self.taken + len(self.buf), stamp))
            return

    def take(self, n):
        """The first `n` bytes of `buf`; `stamp` becomes the receipt time of the last of them."""
        d, self.buf = self.buf[:n], self.buf[n:]
        self.taken += n
        while self.marks[0][0] < self.taken:
            self.marks.pop(0)
        self.stamp = self.marks[0][1]
        return d

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        l = self.take(self.buf.index(b"\r\n") + 2)
        return l[:-2]

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        return self.take(n)

    def stream(self, model, n, ttft_ms=30, token_ms=10, path="/v1/chat/completions"):
        body = json.dumps({"model": model, "stream": True, "max_tokens": n,
                           "messages": [{"role": "user", "content": "hello there"}]}).encode()
        req = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"x-ttft-ms: {ttft_ms}\r\nx-token-ms: {token_ms}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        t0 = time.time_ns()
        self.sendall(req)
        status = self.line()
        assert b" 200 " in status, status
        while self.line():
            pass
        tokens = []
        pending = b""
        while True:
            size = int(self.line().split(b";")[0], 16)
            if size == 0:
                self.line()
                end = self.stamp
                break
            data = self.exact(size)
            self.exact(2)
            now = self.stamp
            pending += data
            while b"\n\n" in pending:
                ev, pending = pending.split(b"\n\n", 1)
                if ev.startswith(b"data: {"):
                    d = json.loads(ev[6:])
                    ch = d.get("choices") or []
                    if ch and (ch[0].get("delta", {}).get("content") or ch[0].get("text")):
                        tokens.append(now)
        ms = lambda ns: ns / 1e6
        return {
            "ttft_ms": ms(tokens[0] - t0),
            "gaps_ms": [ms(b - a) for a, b in zip(tokens, tokens[1:])],
            "latency_ms": ms(end - t0),
            "tokens": len(tokens),
        }


def timing(port, n, ca=None):
    c = Conn(port, ca)
    return [c.stream("timed", 5 + i % 3) for i in range(n)]


def concurrent(port, conns, reqs):
    results, errors = [], []

    def worker(i):
        try:
            c = Conn(port)
            for _ in range(reqs):
                results.append(c.stream(f"m{i % 4}", 3, ttft_ms=5, token_ms=2))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return {"requests": len(results), "tokens": sum(r["tokens"] for r in results)}


def bad(port):
    def raw(data, wait=0.2):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(data)
        time.sleep(wait)
        s.close()

    raw(bytes(range(256)) * 4)                          # garbage
    raw(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64)  # a TLS hello
    raw(b"SSH-2.0-OpenSSH_9.2\r\n")                     # another protocol
    raw(b"POST /v1/completions HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 0.5)  # header > capture
    s = socket.create_connection(("127.0.0.1", port))   # slow partial header, then gone
    for piece in (b"POST /v1/comp", b"letions HTTP/1.1\r\nHo", b"st: x\r\n"):
        s.sendall(piece)
        time.sleep(0.05)
    s.close()
    # Client reset mid-stream: RST while tokens are still coming.
    c = Conn(port)
    body = json.dumps({"model": "reset", "stream": True, "max_tokens": 50,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    c.s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-token-ms: 20\r\nx-ttft-ms: 5\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    c.line()
    time.sleep(0.1)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.s.close()
    time.sleep(1.5)  # the server notices on its next write and closes its side
    # A good request afterwards is still seen.
    good = Conn(port).stream("after", 2, ttft_ms=1, token_ms=1)
    return {"good_tokens": good["tokens"]}


if __name__ == "__main__":
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "openai":
        out = openai_scenario(port, sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    elif mode == "timing":
        out = timing(port, int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    elif mode == "concurrent":
        out = concurrent(port, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "bad":
        out = bad(port)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))
