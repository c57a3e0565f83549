"""OpenAI-compatible stand-in on vLLM's stack (uvicorn + FastAPI) for the http probe tests.

Streamed and non-streamed /v1/completions and /v1/chat/completions. Timing and errors are set
per server (flags) or per request (headers):
  x-ttft-ms     delay before the first token (default --ttft-ms)
  x-token-ms    delay between tokens (default --token-ms)
  x-error       400 | 429 | 500 | context  (answer with that error instead)
  x-cuda-alloc  bytes to allocate on GPU 0 through --cuda-lib for this request, as a server's
                forward pass does for activations and KV cache; when the driver says
                CUDA_ERROR_OUT_OF_MEMORY the request is answered 500, as vLLM does
Output tokens = max_tokens (default 8); prompt tokens = whitespace-separated words of the prompt.
Any model name is served, unless --strict-models: then a model that is neither --model nor in
--also-serve is answered 404 with vLLM's error body.

With --metrics it also serves the server's own Prometheus /metrics on the same port, as vLLM
and TGI do, written by the official prometheus_client package with the real names, types and
labels of vLLM (current names; vllm-old: the older gpu_cache_usage_perc and
time_per_output_token_seconds), TGI (tgi_*) or SGLang (sglang:*). Values come from
POST /control/metrics (JSON): gauges and counters by short name (running, waiting, kv,
preemptions, queries, hits, prompt_tokens, generation_tokens, cache_hit_rate), histogram
observations as lists (ttft, itl, e2e, queue, prefill, decode), and "break": "garbage" |
"oversized" | null to make /metrics answer junk or a huge body; --metrics-values sets the
same at start. GET /control/metrics-clients lists the addresses /metrics was fetched from.
"""

import argparse
import asyncio
import json
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all, as in a pod)")
parser.add_argument("--model", default="stand-in")
parser.add_argument("--strict-models", action="store_true",
                    help="answer 404, as vLLM does, for a model that is not --model or --also-serve")
parser.add_argument("--also-serve", default="", help="further model names served (comma-separated)")
parser.add_argument("--ttft-ms", type=float, default=20.0)
parser.add_argument("--token-ms", type=float, default=5.0)
parser.add_argument("--metrics", choices=["vllm", "vllm-old", "tgi", "sglang"])
parser.add_argument("--metrics-values", default="{}", help="initial values, as for /control/metrics")
parser.add_argument("--cuda-lib", help="CUDA driver (the test double) to hold GPU memory through")
parser.add_argument("--ssl-keyfile", help="terminate TLS in this process (uvicorn's option, as vLLM passes it)")
parser.add_argument("--ssl-certfile")
parser.add_argument("--server", choices=["uvicorn", "hypercorn"], default="uvicorn",
                    help="hypercorn also speaks HTTP/2 in clear text (h2c, prior knowledge)")
parser.add_argument("--cuda-mem", type=int, default=0,
                    help="bytes to allocate on each of --cuda-devices at start and hold, as a server's weights")
parser.add_argument("--cuda-devices", default="0",
                    help="GPUs (comma-separated ordinals) to hold --cuda-mem on, as a tensor-parallel server")
args = parser.parse_args()


def hold_gpu_memory(lib, size, devices):
    """Allocates through the driver API like a server loading its weights: the process then
    holds GPU memory on each device, which NVML (the double) reports for its pid."""
    import ctypes

    cuda = ctypes.CDLL(lib)
    rc = cuda.cuInit(0)
    if rc != 0:
        raise SystemExit(f"cuInit failed: CUresult {rc}")
    for ordinal in devices:
        dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
        for call, rc in [
            ("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(dev), ordinal)),
            ("cuCtxCreate_v2", cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev)),
            ("cuMemAlloc_v2", cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size))),
        ]:
            if rc != 0:
                raise SystemExit(f"{call} on GPU {ordinal} failed: CUresult {rc}")
    return cuda


_cuda = None
if args.cuda_lib and args.cuda_mem:
    _cuda = hold_gpu_memory(args.cuda_lib, args.cuda_mem,
                            [int(d) for d in args.cuda_devices.split(",")])


def allocate(size):
    """One allocation on the current context (the last device --cuda-devices named), kept as a
    request's working memory would be; returns the CUresult."""
    import ctypes

    if _cuda is None:
        raise SystemExit("x-cuda-alloc needs --cuda-lib and --cuda-mem")
    ptr = ctypes.c_uint64()
    return _cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size))

app = FastAPI()

if args.metrics:
    import server_metrics

    own_metrics = server_metrics.ServerMetrics(args.metrics, args.model)
    own_metrics.apply(json.loads(args.metrics_values))

    metrics_clients = set()

    @app.get("/metrics")
    async def metrics(request: Request):
        metrics_clients.add(request.client.host)
        return own_metrics.response()

    @app.get("/control/metrics-clients")
    async def control_metrics_clients():
        return {"clients": sorted(metrics_clients)}

    @app.post("/control/metrics")
    async def control_metrics(request: Request):
        own_metrics.apply(await request.json())
        return {"ok": True}


def prompt_tokens(body):
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"])
    else:
        p = body.get("prompt", "")
        text = " ".join(p) if isinstance(p, list) else str(p)
    return len(text.split())


served = {args.model, *filter(None, args.also_serve.split(","))}


def not_found(model):
    return JSONResponse(
        status_code=404,
        content={
            "object": "error",
            "message": f"The model `{model}` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        },
    )


def error(kind):
    if kind == "context":
        return JSONResponse(
            status_code=400,
            content={
                "object": "error",
                "message": "This model's maximum context length is 2048 tokens. However, you "
                "requested 4096 tokens in the messages. Please reduce the length.",
                "type": "BadRequestError",
                "code": 400,
            },
        )
    code = int(kind)
    return JSONResponse(
        status_code=code,
        content={"object": "error", "message": f"stand-in error {code}", "code": code},
    )


async def handle(request: Request, chat: bool):
    body = await request.json()
    h = request.headers
    if args.strict_models and body.get("model", args.model) not in served:
        return not_found(body.get("model"))
    if h.get("x-error"):
        return error(h["x-error"])
    if h.get("x-cuda-alloc"):
        rc = allocate(int(h["x-cuda-alloc"]))
        if rc != 0:
            return JSONResponse(
                status_code=500,
                content={"object": "error", "message": f"CUDA out of memory (CUresult {rc})",
                         "type": "InternalServerError", "code": 500},
            )
    ttft = float(h.get("x-ttft-ms", args.ttft_ms)) / 1000
    pace = float(h.get("x-token-ms", args.token_ms)) / 1000
    n = int(body.get("max_tokens") or 8)
    model = body.get("model", args.model)
    usage = {
        "prompt_tokens": prompt_tokens(body),
        "completion_tokens": n,
        "total_tokens": prompt_tokens(body) + n,
    }
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        await asyncio.sleep(ttft + pace * max(n - 1, 0))
        text = " ".join(f"tok{i}" for i in range(n))
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            if chat
            else {"index": 0, "text": text, "finish_reason": "length"}
        )
        return JSONResponse(
            {"id": "cmpl-1", "object": kind, "created": created, "model": model,
             "choices": [choice], "usage": usage}
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def events():
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            d = {"id": "cmpl-1", "object": obj, "created": created, "model": model,
                 "choices": choices, **extra}
            return f"data: {json.dumps(d)}\n\n"

        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        await asyncio.sleep(ttft)
        for i in range(n):
            if i:
                await asyncio.sleep(pace)
            piece = f"tok{i} "
            if chat:
                yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            else:
                yield chunk([{"index": 0, "text": piece, "finish_reason": None}])
        if include_usage:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await handle(request, True)


@app.post("/v1/completions")
async def completions(request: Request):
    return await handle(request, False)


@app.get("/health")
async def health():
    return {"ok": True}


if __name__ == "__main__":
    if args.server == "hypercorn":
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"{args.host}:{args.port}"]
        config.loglevel = "WARNING"
        asyncio.run(serve(app, config))
    else:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
