"""A gRPC inference server on grpcio (the C-core stack Triton's and vLLM's Python clients and
servers use), with generic handlers on raw bytes, for the http probe tests:

  inference.GRPCInferenceService/ModelInfer   unary: answers a ModelInferResponse naming the
                                              request's model_name (KServe v2 field 1)
  llm.Generator/Generate                      server-streaming: the request is
                                              "TOKENS GAP_MS FIRST_MS [STATUS]"; it waits
                                              FIRST_MS, then sends TOKENS messages GAP_MS apart,
                                              then ends with grpc-status STATUS (default 0)

  sglang.grpc.scheduler.SglangScheduler/Generate
                                              server-streaming, as SGLang's scheduler answers:
                                              the request is "PROMPT TOKENS"; TOKENS
                                              GenerateResponse chunks with cumulative counts,
                                              then a GenerateComplete (field numbers of its
                                              sglang_scheduler.proto)

Usage: grpc_server.py PORT
"""

import sys
import time
from concurrent import futures

import grpc


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(number, value):
    """A length-delimited protobuf field (wire type 2)."""
    return varint((number << 3) | 2) + varint(len(value)) + value


def int_field(number, value):
    """A varint protobuf field (wire type 0)."""
    return varint(number << 3) + varint(value)


def sglang_generate(request, context):
    prompt, tokens = (int(x) for x in request.decode().split())
    ids = []
    for i in range(tokens):
        ids.append(1000 + i)
        # GenerateStreamChunk { token_ids = 1 (packed); prompt_tokens = 2; completion_tokens = 3 }
        chunk = field(1, varint(1000 + i)) + int_field(2, prompt) + int_field(3, i + 1)
        yield field(1, b"req-1") + field(2, chunk)
        time.sleep(0.002)
    # GenerateComplete { output_ids = 1; finish_reason = 2; prompt_tokens = 3; completion_tokens = 4 }
    complete = (field(1, b"".join(varint(i) for i in ids)) + field(2, b"length")
                + int_field(3, prompt) + int_field(4, tokens))
    yield field(1, b"req-1") + field(3, complete)


def model_name(request):
    """Field 1 of a ModelInferRequest, read as protobuf does."""
    if len(request) >= 2 and request[0] == 0x0A:
        return request[2 : 2 + request[1]]
    return b""


def model_infer(request, context):
    return field(1, model_name(request)) + field(3, b"id-1")


def generate(request, context):
    parts = request.decode().split()
    tokens, gap_ms, first_ms = int(parts[0]), int(parts[1]), int(parts[2])
    status = int(parts[3]) if len(parts) > 3 else 0
    time.sleep(first_ms / 1000)
    for i in range(tokens):
        if i:
            time.sleep(gap_ms / 1000)
        yield field(1, f"token-{i}".encode())
    if status:
        context.abort(grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == status)), "stopped")


def main():
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)},
            ),
            grpc.method_handlers_generic_handler(
                "llm.Generator",
                {"Generate": grpc.unary_stream_rpc_method_handler(generate)},
            ),
            grpc.method_handlers_generic_handler(
                "sglang.grpc.scheduler.SglangScheduler",
                {"Generate": grpc.unary_stream_rpc_method_handler(sglang_generate)},
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
