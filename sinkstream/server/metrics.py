"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges and histograms."""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for b, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{b}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Everything /metrics shows. `gauges` is a callable returning live values (sessions, cache, queue)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)   # (path, method, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cancelled = 0
        self.rejected = 0
        self.ttft = Histogram()
        self.itl = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.queue_wait = Histogram()
        self.batch_size = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self.step_seconds = Histogram()

    def request(self, path: str, method: str, status: int) -> None:
        with self.lock:
            self.requests[(path, method, status)] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def cancel(self) -> None:
        with self.lock:
            self.cancelled += 1

    def reject(self) -> None:
        with self.lock:
            self.rejected += 1

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self.lock:
            self.itl.observe(seconds)

    def started(self, waited: float) -> None:
        """A request left the queue for a request thread after `waited` seconds."""
        with self.lock:
            self.queue_wait.observe(waited)

    def step(self, streams: int, seconds: float) -> None:
        """One batched forward pass advanced `streams` requests in `seconds`."""
        with self.lock:
            self.batch_size.observe(streams)
            self.step_seconds.observe(seconds)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Text for /metrics; `gauges`: name -> (help, value)."""
        with self.lock:
            out = ["# HELP sinkstream_requests_total HTTP requests answered, by path, method and status.",
                   "# TYPE sinkstream_requests_total counter"]
            for (path, method, status), n in sorted(self.requests.items()):
                labels = _labels({"path": path, "method": method, "status": status})
                out.append(f"sinkstream_requests_total{labels} {n}")
            for name, help_, value in (
                    ("sinkstream_prompt_tokens_total", "Tokens fed to the model (new turn text only for sessions).",
                     self.prompt_tokens),
                    ("sinkstream_generated_tokens_total", "Tokens generated.", self.generated_tokens),
                    ("sinkstream_cancelled_total", "Generations cancelled because the client went away.",
                     self.cancelled),
                    ("sinkstream_rejected_total", "Requests refused because the queue was full.", self.rejected)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
            out += ["# HELP sinkstream_time_to_first_token_seconds From accepting a request to its first token.",
                    "# TYPE sinkstream_time_to_first_token_seconds histogram"]
            out += self.ttft.lines("sinkstream_time_to_first_token_seconds")
            out += ["# HELP sinkstream_inter_token_latency_seconds Time between consecutive generated tokens.",
                    "# TYPE sinkstream_inter_token_latency_seconds histogram"]
            out += self.itl.lines("sinkstream_inter_token_latency_seconds")
            for name, help_, hist in (
                    ("sinkstream_queue_wait_seconds", "From accepting a request to a request thread taking it.",
                     self.queue_wait),
                    ("sinkstream_batch_size", "Requests advanced by one batched forward pass.", self.batch_size),
                    ("sinkstream_batch_step_seconds", "Duration of one batched forward pass.", self.step_seconds)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + hist.lines(name)
        for name, (help_, value) in sorted(gauges.items()):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"
