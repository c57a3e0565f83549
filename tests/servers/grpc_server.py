"""A gRPC inference server on grpcio (the C-core stack Triton's and vLLM's Python clients and
servers use), with generic handlers on raw bytes, for the http probe tests:

  inference.GRPCInferenceService/ModelInfer   unary: answers a ModelInferResponse naming the
                                              request's model_name (KServe v2 field 1)
  llm.Generator/Generate                      server-streaming: the request is
                                              "TOKENS GAP_MS FIRST_MS [STATUS]"; it waits
                                              FIRST_MS, then sends TOKENS messages GAP_MS apart,
                                              then ends with grpc-status STATUS (default 0)

Usage: grpc_server.py PORT
"""

import sys
import time
from concurrent import futures

import grpc


def field(number, value):
    """A length-delimited protobuf field (wire type 2) of fewer than 128 bytes."""
    return bytes([(number << 3) | 2, len(value)]) + value


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
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
