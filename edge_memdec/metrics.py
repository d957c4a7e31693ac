"""The server's counters and their Prometheus text (`GET /metrics`, text format 0.0.4).

Generation figures use llama-server's metric names where they mean the same, so its dashboards read them:
prompt tokens are those llama.cpp evaluated (a prefix found in the KV cache is not counted again), seconds are
wall time in the decode loop. Requests are counted per route and HTTP status.
"""

from __future__ import annotations

import threading
from collections import Counter

from edge_memdec.decode import Generation

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Thread-safe totals, updated by the HTTP threads (requests) and the decode loop (generations)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.prompt_seconds = 0.0
        self.predicted_tokens = 0
        self.predicted_seconds = 0.0
        self.generations = 0

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[(route, status)] += 1

    def count_generation(self, generation: Generation) -> None:
        with self._lock:
            self.generations += 1
            self.prompt_tokens += len(generation.prompt_tokens) - generation.n_cached
            self.prompt_seconds += generation.prompt_seconds
            self.predicted_tokens += len(generation.tokens)
            self.predicted_seconds += generation.decode_seconds

    def render(self, processing: int, deferred: int) -> str:
        """Prometheus text; `processing` and `deferred`: generations running and waiting now."""
        with self._lock:
            requests = sorted(self._requests.items())
            prompt_rate = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
            predicted_rate = self.predicted_tokens / self.predicted_seconds if self.predicted_seconds else 0.0
            rows = [
                ("llamacpp:prompt_tokens_total", "counter", "Prompt tokens evaluated.", self.prompt_tokens),
                ("llamacpp:prompt_seconds_total", "counter", "Prompt evaluation time.", self.prompt_seconds),
                ("llamacpp:tokens_predicted_total", "counter", "Tokens generated.", self.predicted_tokens),
                ("llamacpp:tokens_predicted_seconds_total", "counter", "Generation time.", self.predicted_seconds),
                ("llamacpp:prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.", prompt_rate),
                ("llamacpp:predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
                 predicted_rate),
                ("llamacpp:requests_processing", "gauge", "Generations running.", processing),
                ("llamacpp:requests_deferred", "gauge", "Generations waiting in the queue.", deferred),
                ("edge_memdec:generations_total", "counter", "Generations finished.", self.generations),
            ]  # fmt: skip
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        name = "edge_memdec:requests_total"
        lines += [f"# HELP {name} HTTP requests answered, by route and status.", f"# TYPE {name} counter"]
        lines += [f'{name}{{route="{route}",status="{status}"}} {n}' for (route, status), n in requests]
        return "\n".join(lines) + "\n"
