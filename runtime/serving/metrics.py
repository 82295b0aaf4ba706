"""What someone running the server wants to watch: /metrics in Prometheus' text format."""

from __future__ import annotations




def prometheus_text(scheduler) -> str:
    """/metrics in Prometheus' text format: what someone running this on a LAN wants to graph."""
    s, sched = scheduler.stats, scheduler
    rows = [
        ("bundle_requests_total", "counter", "generation requests received", s.requests),
        ("bundle_requests_finished_total", "counter", "generations finished (any reason)", s.finished),
        ("bundle_requests_cancelled_total", "counter", "generations stopped by their client", s.cancelled),
        ("bundle_prompt_tokens_total", "counter", "prompt tokens decoded (after prefix reuse)", s.prompt_tokens),
        ("bundle_shifted_tokens_total", "counter", "cached prompt tokens moved down (context shift), not decoded",
         s.shifted_tokens),
        ("bundle_reused_prompt_tokens_total", "counter",
         "prompt tokens found computed (a slot's KV cache or the prompt cache), not decoded", s.reused_tokens),
        ("bundle_generated_tokens_total", "counter", "tokens generated", s.generated_tokens),
        ("bundle_prompt_seconds_total", "counter", "seconds spent decoding prompts", s.prompt_seconds),
        ("bundle_decode_seconds_total", "counter", "seconds spent generating", s.decode_seconds),
        ("bundle_queue_length", "gauge", "requests waiting for a slot", sched.pending()),
        ("bundle_slots_busy", "gauge", "slots generating now", sched.busy_slots()),
        ("bundle_slots_total", "gauge", "slots (--parallel)", sched.n_parallel),
        ("bundle_prompt_tokens_per_second", "gauge", "prompt tokens per second of prompt work",
         s.prompt_tokens / s.prompt_seconds if s.prompt_seconds else 0.0),
        ("bundle_generated_tokens_per_second", "gauge", "generated tokens per second of generation work",
         s.generated_tokens / s.decode_seconds if s.decode_seconds else 0.0),
    ]
    cache = getattr(sched, "cache", None)
    if cache is not None:
        c = cache.stats
        rows += [
            ("bundle_prompt_cache_bytes", "gauge", "bytes of computed prompts kept in memory (--cache-ram)", cache.size),
            ("bundle_prompt_cache_limit_bytes", "gauge", "their limit (-1: none)",
             -1 if cache.limit is None else cache.limit),
            ("bundle_prompt_cache_entries", "gauge", "computed prompts kept in memory", len(cache)),
            ("bundle_prompt_cache_saved_total", "counter", "prompt states copied into the cache", c.saved),
            ("bundle_prompt_cache_hits_total", "counter", "requests started from a cached prompt state", c.hits),
            ("bundle_prompt_cache_reused_tokens_total", "counter", "prompt tokens those requests did not decode",
             c.reused_tokens),
            ("bundle_prompt_cache_evicted_total", "counter", "states dropped for room, least recently used first",
             c.evicted),
        ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(out) + "\n"
