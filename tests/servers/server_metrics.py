"""An inference server's own Prometheus metrics, written by the official prometheus_client
package with the names, types and labels the real servers export (see openai_server.py).

vLLM: `vllm:*` with labels model_name and engine (vLLM v1). `vllm-old`: the same with the
older names gpu_cache_usage_perc and time_per_output_token_seconds. TGI: `tgi_*`, unlabelled
(TGI's metrics-exporter-prometheus writes counters without `_total`, which prometheus_client
cannot: those few lines are written in TGI's form). SGLang: `sglang:*` with model_name.
"""

from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
           7.5, 10.0, 20.0, 40.0, 80.0]


class ServerMetrics:
    def __init__(self, flavour, model):
        self.flavour = flavour
        self.model = model
        self.registry = CollectorRegistry()
        self.broken = None
        self.tgi_counters = {"tgi_request_count": 0, "tgi_request_success": 0}
        r = self.registry
        if flavour in ("vllm", "vllm-old"):
            self.labels = {"model_name": model, "engine": "0"}
            names = list(self.labels)
            kv = "vllm:kv_cache_usage_perc" if flavour == "vllm" else "vllm:gpu_cache_usage_perc"
            itl = ("vllm:inter_token_latency_seconds" if flavour == "vllm"
                   else "vllm:time_per_output_token_seconds")
            self.gauges = {
                "running": Gauge("vllm:num_requests_running",
                                 "Number of requests in model execution batches.", names, registry=r),
                "waiting": Gauge("vllm:num_requests_waiting",
                                 "Number of requests waiting to be processed.", names, registry=r),
                "kv": Gauge(kv, "KV-cache usage. 1 means 100 percent usage.", names, registry=r),
            }
            self.counters = {
                "preemptions": Counter("vllm:num_preemptions",
                                       "Cumulative number of preemption from the engine.", names,
                                       registry=r),
                "queries": Counter("vllm:prefix_cache_queries",
                                   "Prefix cache queries, in terms of number of queried tokens.",
                                   names, registry=r),
                "hits": Counter("vllm:prefix_cache_hits",
                                "Prefix cache hits, in terms of number of cached tokens.", names,
                                registry=r),
                "prompt_tokens": Counter("vllm:prompt_tokens",
                                         "Number of prefill tokens processed.", names, registry=r),
                "generation_tokens": Counter("vllm:generation_tokens",
                                             "Number of generation tokens processed.", names,
                                             registry=r),
            }
            h = lambda name, doc: Histogram(name, doc, names, buckets=LATENCY, registry=r)
            self.histograms = {
                "ttft": h("vllm:time_to_first_token_seconds",
                          "Histogram of time to first token in seconds."),
                "itl": h(itl, "Histogram of inter-token latency in seconds."),
                "e2e": h("vllm:e2e_request_latency_seconds",
                         "Histogram of e2e request latency in seconds."),
                "queue": h("vllm:request_queue_time_seconds",
                           "Histogram of time spent in WAITING phase for request."),
                "prefill": h("vllm:request_prefill_time_seconds",
                             "Histogram of time spent in PREFILL phase for request."),
                "decode": h("vllm:request_decode_time_seconds",
                            "Histogram of time spent in DECODE phase for request."),
            }
        elif flavour == "tgi":
            self.labels = {}
            self.gauges = {
                "waiting": Gauge("tgi_queue_size", "tgi_queue_size", registry=r),
                "running": Gauge("tgi_batch_current_size", "tgi_batch_current_size", registry=r),
            }
            self.counters = {}
            h = lambda name, labels=(): Histogram(name, name, labels, buckets=LATENCY, registry=r)
            self.histograms = {
                "e2e": h("tgi_request_duration"),
                "queue": h("tgi_request_queue_duration"),
                "itl": h("tgi_request_mean_time_per_token_duration"),
                "prefill": h("tgi_batch_inference_duration", ["method"]),
            }
        else:
            self.labels = {"model_name": model}
            names = list(self.labels)
            self.gauges = {
                "running": Gauge("sglang:num_running_reqs", "The number of running requests.",
                                 names, registry=r),
                "waiting": Gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.",
                                 names, registry=r),
                "kv": Gauge("sglang:token_usage", "The token usage.", names, registry=r),
                "cache_hit_rate": Gauge("sglang:cache_hit_rate", "The prefix cache hit rate.",
                                        names, registry=r),
            }
            self.counters = {
                "prompt_tokens": Counter("sglang:prompt_tokens", "Number of prefill tokens processed.",
                                         names, registry=r),
                "generation_tokens": Counter("sglang:generation_tokens",
                                             "Number of generation tokens processed.", names,
                                             registry=r),
            }
            self.histograms = {
                "ttft": Histogram("sglang:time_to_first_token_seconds",
                                  "Histogram of time to first token in seconds.", names,
                                  buckets=LATENCY, registry=r),
            }

    def _child(self, metric, extra=None):
        labels = dict(self.labels, **(extra or {}))
        return metric.labels(**labels) if labels else metric

    def apply(self, values):
        if "break" in values:
            self.broken = values["break"]
        for key, metric in self.gauges.items():
            if key in values:
                self._child(metric).set(values[key])
        for key, metric in self.counters.items():
            if key in values:
                # Counters only go up: the control gives the total.
                child = self._child(metric)
                child.inc(values[key] - child._value.get())
        for key, metric in self.histograms.items():
            extra = {"method": "prefill"} if metric._name == "tgi_batch_inference_duration" else None
            for v in values.get(key, []):
                self._child(metric, extra).observe(v)
        for key in self.tgi_counters:
            if key in values:
                self.tgi_counters[key] = values[key]

    def response(self):
        if self.broken == "garbage":
            return Response("<html><body>502 Bad Gateway {{{ \"\n\x00</body>",
                            media_type="text/plain")
        if self.broken == "oversized":
            line = "# HELP padding x\n# TYPE padding gauge\n" + "".join(
                f'padding{{i="{i}"}} {i}\n' for i in range(200_000))
            return Response(line, media_type=CONTENT_TYPE_LATEST)
        body = generate_latest(self.registry).decode()
        if self.flavour == "tgi":
            for name, v in self.tgi_counters.items():
                body += f"# TYPE {name} counter\n{name} {v}\n"
        return Response(body, media_type=CONTENT_TYPE_LATEST)
