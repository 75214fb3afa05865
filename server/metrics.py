"""Prometheus metrics (prefix loraplex_, base units) on their own registry, served over HTTP."""
from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, start_http_server

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80,
                160, 640, 2560)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5,
               10, 20, 40, 80)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960,
                   1920, 7680)
# Neither is a valid adapter id (ids start with a letter or digit): no adapter's series is ever mixed with them.
OTHER = "__other__"
BASE = "__base__"


class Metrics:
    def __init__(self, max_batch_size: int, max_adapter_labels: int = 100) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "loraplex_"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to last token.", buckets=REQUEST_BUCKETS,
                             registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Arrival to admission into the batch.",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests holding a row: running, or prefilling.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting for admission.", registry=r)
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < max_batch_size] + [max_batch_size]
        self.batch_size = Histogram(p + "batch_size",
                                    "Rows per decode step, or per prefill (once, when its rows join).",
                                    ["phase"], buckets=sizes, registry=r)
        self.step_time = Histogram(p + "step_duration_seconds",
                                   "A decode step, or one chunk of a prefill (its last with sampling and the join).",
                                   ["phase"], buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of the requests prefilled (each "
                                     "request's: a prompt that requests prefilled together share counts for each).",
                                     registry=r)
        self.prompt_tokens_copied = Counter(p + "prompt_tokens_copied", "Prompt tokens prefilled by copying keys "
                                            "and values computed before (the prefix cache's, or a running request's "
                                            "with the same prompt), not by running them (a prompt that requests "
                                            "prefilled together share counts once).", registry=r)
        self.prefix_cache_tokens = Gauge(p + "prefix_cache_tokens", "Tokens whose keys and values the prefix cache "
                                         "holds (--prefix-cache-tokens).", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", registry=r)
        self.preempted = Counter(p + "requests_preempted", "Running requests that gave their row to a request of an "
                                 "adapter below its share of a full batch (--scheduling fair), per adapter (bounded "
                                 "label set); each resumes where it stopped.", ["adapter"], registry=r)
        self.resumed_tokens = Counter(p + "resumed_tokens", "Prompt and generated tokens of preempted requests "
                                      "prefilled again when they resumed (run, or copied from the prefix cache).",
                                      registry=r)
        self.success = Counter(p + "request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.failure = Counter(p + "request_failure", "Requests ended by an error, by the status their client got.",
                               ["code"], registry=r)
        self.adapter_requests = Counter(p + "adapter_requests", "Requests per adapter (bounded label set).",
                                        ["adapter"], registry=r)
        self.adapter_prompt_tokens = Counter(p + "adapter_prompt_tokens", "Prompt tokens prefilled per adapter "
                                             "(bounded label set).", ["adapter"], registry=r)
        self.adapter_generation_tokens = Counter(p + "adapter_generation_tokens", "Tokens generated per adapter "
                                                 "(bounded label set).", ["adapter"], registry=r)
        # a Summary without quantiles: its _sum over its _count is an adapter's mean wait, two series per label
        self.adapter_queue_time = Summary(p + "adapter_queue_time_seconds", "Arrival to admission into the batch, per "
                                          "adapter (bounded label set): request_queue_time_seconds by adapter.",
                                          ["adapter"], registry=r)
        self.adapters_loaded = Gauge(p + "adapters_loaded", "Registered adapters: in host memory (cpu) or evicted "
                                     "(disk).", ["tier"], registry=r)
        self.kv_slots = Gauge(p + "kv_cache_token_slots", "KV-cache token slots (rows x positions) allocated.",
                              registry=r)
        self.kv_reserved = Gauge(p + "kv_cache_token_slots_reserved", "Token slots the running batch may grow to "
                                 "(checked against --max-kv-tokens).", registry=r)
        self.kv_bytes = Gauge(p + "kv_cache_bytes", "KV-cache memory allocated.", registry=r)
        self.adapter_slots_used = Gauge(p + "adapter_slots_used", "Device slots holding an adapter in use.",
                                        registry=r)
        self.adapter_load = Histogram(p + "adapter_load_seconds", "Reading an adapter from disk.", ["result"],
                                      buckets=TTFT_BUCKETS, registry=r)
        self.formatted = Counter(p + "response_format_requests", "Requests with a response_format, by its kind "
                                 "(json_schema, json_object, regex, choice, grammar).", ["format"], registry=r)
        self.format_compile = Histogram(p + "response_format_compile_seconds", "A request's response_format compiled "
                                        "and its first mask computed (a source refused before is not compiled "
                                        "again; the tokenizer read too, at the first).", ["format"],
                                        buckets=TTFT_BUCKETS, registry=r)
        self._labels: set[str] = set()
        self._max_labels = max_adapter_labels
        self._certificate_expiry: Gauge | None = None  # made by the first certificate: a server without TLS has none

    def certificate_expires(self, not_after: float) -> None:
        """The --tls-cert certificate now in force expires at `not_after` (Unix time)."""
        if self._certificate_expiry is None:
            self._certificate_expiry = Gauge(
                "loraplex_tls_certificate_expiry_timestamp_seconds", "When the --tls-cert certificate in force for "
                "new connections expires (Unix time); it changes when a renewed certificate is read.",
                registry=self.registry)
        self._certificate_expiry.set(not_after)

    def adapter_label(self, adapter_id: str) -> str:
        """The adapter's own label for the first N ids seen, OTHER after that: cardinality stays bounded."""
        if not adapter_id:
            return BASE
        if adapter_id in self._labels or len(self._labels) < self._max_labels:
            self._labels.add(adapter_id)
            return adapter_id
        return OTHER

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


def count_by_adapter(counter: Counter, amounts) -> None:
    """One increment per adapter label of the (label, amount) pairs: a step's rows share a few labels."""
    totals = collections.Counter()
    for label, amount in amounts:
        totals[label] += amount
    for label, total in totals.items():
        counter.labels(label).inc(total)
