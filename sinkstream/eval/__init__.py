"""Evaluation harness: perplexity over long streams, recall (pass key, StreamEval), multi-round chat,
latency/memory benchmarks and attention-sink analysis. CLI in `sinkstream.eval.cli`; each command's
measurements in its own module (ppl, recall, chat, bench, sinks); figures in `plots` (matplotlib, lazily).
"""
