"""gRPC clients (grpcio) for the http probe tests. Prints one JSON document on stdout.

  timing PORT N           N server-streaming Generate calls on one channel, timed here
  concurrent PORT S T     S Generate streams at once on one channel, T messages each
  infer PORT MODEL N      N unary ModelInfer calls naming MODEL (KServe v2 ModelInferRequest)
  status PORT CODE        one Generate call ending with grpc-status CODE
  preopen PORT N          a channel with one call made, then (after a line on stdin) N timed calls
  sglang PORT PROMPT N    one SGLang scheduler Generate call answering N tokens
  shard SOCKET N          as TGI's router to a shard (tgi_shard/) on its Unix socket:
                          each method once (untimed), then ServiceDiscovery, Info, Health, a
                          Prefill and N Decodes of growing batches, each timed
  shard-warm SOCKET       every method of the shard once
  shard-preopen SOCKET N  a channel to the shard with one Decode made, then (after a line on
                          stdin) a ClearCache (untimed), N Decodes and a ClearCache, timed
"""

import json
import sys
import threading
import time

import grpc

# The server's protobuf writer (its script sits beside this one, on sys.path).
from grpc_server import varint

GENERATE = "/llm.Generator/Generate"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def channel(port):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    return ch


def timed_call(gen, tokens, gap_ms, first_ms):
    start = time.monotonic()
    arrivals = []
    for _ in gen(f"{tokens} {gap_ms} {first_ms}".encode()):
        arrivals.append(time.monotonic())
    end = time.monotonic()
    ms = lambda t: t * 1000
    return {
        "ttft_ms": ms(arrivals[0] - start),
        "gaps_ms": [ms(b - a) for a, b in zip(arrivals, arrivals[1:])],
        "latency_ms": ms(end - start),
    }


def timing(port, n, ch=None):
    ch = ch or channel(port)
    gen = ch.unary_stream(GENERATE)
    return [timed_call(gen, 6, 15 + 5 * i, 25) for i in range(n)]


def concurrent(port, streams, tokens):
    ch = channel(port)
    gen = ch.unary_stream(GENERATE)
    got = [0] * streams
    barrier = threading.Barrier(streams)

    def run(i):
        barrier.wait()
        got[i] = sum(1 for _ in gen(f"{tokens} 30 50".encode()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"messages": sum(got), "streams": streams}


def infer(port, model, n):
    ch = channel(port)
    call = ch.unary_unary(INFER)
    # ModelInferRequest { model_name = 1; model_version = 2; id = 3; ... }
    request = bytes([0x0A, len(model)]) + model.encode() + bytes([0x1A, 2]) + b"r1"
    for _ in range(n):
        answer = call(request)
        assert answer[2 : 2 + answer[1]] == model.encode(), answer
    return {"calls": n}


def status(port, code):
    ch = channel(port)
    try:
        for _ in ch.unary_stream(GENERATE)(f"2 5 5 {code}".encode()):
            pass
    except grpc.RpcError as e:
        return {"code": e.code().value[0]}
    return {"code": 0}


def sglang(port, prompt, tokens):
    ch = channel(port)
    call = ch.unary_stream("/sglang.grpc.scheduler.SglangScheduler/Generate")
    return {"messages": sum(1 for _ in call(f"{prompt} {tokens}".encode()))}


def preopen(port, n):
    ch = channel(port)
    timing(port, 1, ch)
    print("open", flush=True)
    sys.stdin.readline()
    return timing(port, n, ch)


SHARD = "/generate.v3.TextGenerationService/"


def shard_channel(socket):
    ch = grpc.insecure_channel(f"unix:{socket}")
    grpc.channel_ready_future(ch).result(timeout=10)
    return ch


def shard_call(ch, method, request=b""):
    start = time.monotonic()
    ch.unary_unary(SHARD + method)(request)
    return {"method": method, "ms": (time.monotonic() - start) * 1000}


# DecodeRequest { batches = 1 (CachedBatch { id = 1; request_ids = 2 packed; size = 3 }) }
def decode_request(size):
    ids = b"".join(varint(i + 1) for i in range(size))
    batch = bytes([0x08, 0x00]) + bytes([0x12]) + varint(len(ids)) + ids + bytes([0x18]) + varint(size)
    return bytes([0x0A]) + varint(len(batch)) + batch


# PrefillRequest { batch = 1 (Batch { id = 1; requests = 2 (Request { id = 1 }); size = 3 }) }
PREFILL = bytes([0x0A, 0x08, 0x08, 0x00, 0x12, 0x02, 0x08, 0x01, 0x18, 0x01])


def decode(ch, size):
    call = shard_call(ch, "Decode", decode_request(size))
    call["batch"] = size
    return call


def shard(socket, n):
    ch = shard_channel(socket)
    # The first call of each method on a channel can take the Python client milliseconds
    # more than the wire did: each is made once first, and not timed.
    calls = [untimed(ch, m) for m in ("Health", "ServiceDiscovery", "Info", "Prefill")]
    calls.append(untimed(ch, "Decode", 1))
    calls += [shard_call(ch, m) for m in ("ServiceDiscovery", "Info", "Health")]
    calls.append(shard_call(ch, "Prefill", PREFILL))
    # Growing batches, one of 300 requests (its message past 512 bytes).
    calls += [decode(ch, 300 if i == 3 else i + 1) for i in range(n)]
    return calls


def untimed(ch, method, batch=None):
    request = {"Prefill": PREFILL, "Decode": decode_request(batch or 1)}.get(method, b"")
    ch.unary_unary(SHARD + method)(request)
    call = {"method": method, "ms": None}
    if batch is not None:
        call["batch"] = batch
    return call


def shard_warm(socket):
    """Every method once: a fresh grpcio server is slow to read its first calls of each
    method (milliseconds in its socket's queue, before the server reads them)."""
    ch = shard_channel(socket)
    for m in ("Health", "ServiceDiscovery", "Info", "ClearCache", "FilterBatch", "Warmup"):
        ch.unary_unary(SHARD + m)(b"")
    ch.unary_unary(SHARD + "Prefill")(PREFILL)
    ch.unary_unary(SHARD + "Decode")(decode_request(1))
    return {"warm": True}


def shard_preopen(socket, n):
    ch = shard_channel(socket)
    decode(ch, 1)
    print("open", flush=True)
    sys.stdin.readline()
    # ClearCache's first call (untimed, as in `shard`) is also its path's first since the agent.
    calls = [untimed(ch, "ClearCache")]
    calls += [decode(ch, 2) for _ in range(n)]
    calls.append(shard_call(ch, "ClearCache"))
    return calls


def main():
    mode = sys.argv[1]
    if mode == "shard":
        print(json.dumps(shard(sys.argv[2], int(sys.argv[3]))), flush=True)
        return
    if mode == "shard-warm":
        print(json.dumps(shard_warm(sys.argv[2])), flush=True)
        return
    if mode == "shard-preopen":
        print(json.dumps(shard_preopen(sys.argv[2], int(sys.argv[3]))), flush=True)
        return
    port = int(sys.argv[2])
    if mode == "timing":
        out = timing(port, int(sys.argv[3]))
    elif mode == "concurrent":
        out = concurrent(port, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "infer":
        out = infer(port, sys.argv[3], int(sys.argv[4]))
    elif mode == "status":
        out = status(port, int(sys.argv[3]))
    elif mode == "sglang":
        out = sglang(port, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "preopen":
        out = preopen(port, int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
