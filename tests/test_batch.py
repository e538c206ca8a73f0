"""Batched forward passes (sinkstream.batch): a stream decodes the same batched as alone; streams join, leave,
get cancelled and fail without disturbing the others; prompts are chunked under the step budget."""
import threading
import time

import pytest
import torch

from sinkstream import CacheConfig, SamplingConfig
from sinkstream.cache import StreamCache
from sinkstream.batch import DIRECT, Batcher, BadTokenError, map_batched, new_feed, step, using
from sinkstream.errors import ContextOverflowError
from sinkstream.generate import stream_tokens
from sinkstream.sampling import make_logits_processors, make_sampler

POLICIES = [CacheConfig("sink", 4, 28), CacheConfig("window", window=24), CacheConfig("dense"),
            CacheConfig("memory", 4, 24, block_size=8, top_k=2), CacheConfig("recompute", window=20),
            CacheConfig("sink", 2, 200)]  # the last one is still filling after 64 steps


def prompt(seed: int, n: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g)


def decode(model, config: CacheConfig, ids, steps: int, sampling=SamplingConfig()) -> list[int]:
    """`steps` tokens after `ids` through whatever runner the context has (no stop ids)."""
    cache = model.make_cache(config)
    return list(stream_tokens(model, cache, ids, sampler=make_sampler(sampling), max_tokens=steps,
                              logits_processors=make_logits_processors(sampling)))


def vocab_of(model) -> int:
    return model.get_submodule(model.embedding_module).num_embeddings


def test_packed_step_gives_each_cache_its_own_logits(tiny):
    """One pass over a prefill chunk, a decode token and a still-filling cache = each fed on its own."""
    V = vocab_of(tiny)
    configs = [CacheConfig("sink", 4, 28), CacheConfig("dense"), CacheConfig("window", window=16)]
    prompts = [prompt(1, 40, V), prompt(2, 7, V), prompt(3, 30, V)]
    alone, packed = [], [tiny.make_cache(c) for c in configs]
    for c, p in zip(configs, prompts):
        cache = tiny.make_cache(c)
        alone.append([DIRECT.run(tiny, cache, p[:-1], logits="all"), DIRECT.run(tiny, cache, p[-1:])])
    feeds = [new_feed(tiny, cache, p[:-1], logits="all") for cache, p in zip(packed, prompts)]
    while not all(f.finished for f in feeds):
        step(tiny, feeds)
    for f, (want, _) in zip(feeds, alone):
        torch.testing.assert_close(f.outcome(), want, atol=2e-5, rtol=1e-4)
    feeds = [new_feed(tiny, cache, p[-1:]) for cache, p in zip(packed, prompts)]
    step(tiny, feeds)
    for f, (_, want) in zip(feeds, alone):
        torch.testing.assert_close(f.outcome(), want, atol=2e-5, rtol=1e-4)


def test_greedy_batched_equals_alone_for_64_steps_every_policy(tiny):
    V = vocab_of(tiny)
    jobs = [(c, prompt(10 + i, 5 + 9 * i, V)) for i, c in enumerate(POLICIES)]
    alone = [decode(tiny, c, p, 64) for c, p in jobs]
    sizes = []
    batched = map_batched(tiny, lambda job: decode(tiny, job[0], job[1], 64), jobs, max_batch=len(jobs),
                          on_step=lambda st: sizes.append(st.feeds))
    assert batched == alone
    assert max(sizes) == len(jobs)  # every stream advanced in one step (recompute beside the packed pass)


def test_seeded_sampling_batched_equals_alone(tiny):
    V = vocab_of(tiny)
    sampling = [SamplingConfig(temperature=0.9, top_p=0.9, seed=s, repetition_penalty=1.2) for s in range(4)]
    jobs = [(s, prompt(20 + i, 6 + i, V)) for i, s in enumerate(sampling)]
    alone = [decode(tiny, CacheConfig("sink", 4, 28), p, 40, s) for s, p in jobs]
    batched = map_batched(tiny, lambda j: decode(tiny, CacheConfig("sink", 4, 28), j[1], 40, j[0]), jobs)
    assert batched == alone


def test_streams_join_and_leave_mid_batch(tiny):
    """Different lengths (leave at different steps) and staggered starts (join while others decode)."""
    V = vocab_of(tiny)
    jobs = [(i, prompt(30 + i, 4 + 3 * i, V), 8 + 11 * i) for i in range(6)]
    alone = [decode(tiny, CacheConfig("sink", 4, 28), p, n) for _, p, n in jobs]
    sizes = []

    def run(job):
        i, p, n = job
        time.sleep(0.03 * i)
        return decode(tiny, CacheConfig("sink", 4, 28), p, n)

    assert map_batched(tiny, run, jobs, on_step=lambda st: sizes.append(st.feeds)) == alone
    assert max(sizes) > 1 and sizes[-1] == 1  # streams shared steps; the longest one ends alone


def test_cancelled_and_failing_streams_leave_without_disturbing_the_others(tiny):
    V = vocab_of(tiny)
    healthy = [prompt(40 + i, 6, V) for i in range(3)]
    want = [decode(tiny, CacheConfig("sink", 4, 28), p, 48) for p in healthy]
    errors = {}

    class Stop(Exception):
        pass

    def cancel_in_prefill(done, n):
        if done >= 8:
            raise Stop()

    def job(k):
        try:
            if k == "cancel":  # a long prompt whose client leaves after its first chunk
                cache = tiny.make_cache(CacheConfig("sink", 4, 28, prefill_chunk=8))
                return list(stream_tokens(tiny, cache, prompt(50, 40, V), sampler=make_sampler(SamplingConfig()),
                                          progress=cancel_in_prefill))
            if k == "overflow":  # a dense cache that fills up mid-generation
                cache = StreamCache(CacheConfig("dense"), tiny.layer_specs(), max_context=20)
                return decode_with(cache, prompt(51, 10, V), 30)
            if k == "bad":
                return decode(tiny, CacheConfig("sink", 4, 28), torch.tensor([5, V + 7]), 5)
            if k == "early":  # a client that stops reading after 3 tokens
                gen = stream_tokens(tiny, tiny.make_cache(CacheConfig("sink", 4, 28)), prompt(52, 5, V),
                                    sampler=make_sampler(SamplingConfig()), max_tokens=100)
                out = [next(gen) for _ in range(3)]
                gen.close()
                return out
            return decode(tiny, CacheConfig("sink", 4, 28), healthy[k], 48)
        except Exception as e:  # noqa: BLE001
            errors[k] = e
            return None

    def decode_with(cache, ids, steps):
        return list(stream_tokens(tiny, cache, ids, sampler=make_sampler(SamplingConfig()), max_tokens=steps))

    out = map_batched(tiny, job, [0, "cancel", 1, "overflow", "bad", "early", 2], max_batch=7)
    assert [out[0], out[2], out[6]] == want
    assert isinstance(errors["cancel"], Stop)
    assert isinstance(errors["overflow"], ContextOverflowError)
    assert isinstance(errors["bad"], BadTokenError)
    assert len(out[5]) == 3


def test_bad_tokens_are_refused_before_the_cache_changes(tiny):
    cache = tiny.make_cache(CacheConfig("sink", 4, 28))
    with pytest.raises(BadTokenError):
        DIRECT.run(tiny, cache, torch.tensor([1, -1]))
    assert cache.seen == 0


def test_a_long_prompt_goes_in_budget_sized_chunks_beside_decoding_streams(tiny):
    V = vocab_of(tiny)
    steps = []
    with Batcher(tiny, prefill_budget=16, on_step=steps.append) as b:
        def decoder(i):
            with using(b):
                return decode(tiny, CacheConfig("sink", 4, 28), prompt(60 + i, 5, V), 400)

        threads = [threading.Thread(target=decoder, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        with using(b):  # a 300-token prompt while three streams decode
            cache = tiny.make_cache(CacheConfig("sink", 4, 28))
            b.run(tiny, cache, prompt(70, 300, V))
        for t in threads:
            t.join()
    assert cache.seen == 300
    shared = [st for st in steps if st.prompt_tokens and st.feeds > 1]
    assert shared  # the prompt shared passes with the decoders
    assert all(st.prompt_tokens <= 16 for st in shared)  # never more than the budget beside decode tokens


def test_sessions_chat_batched_equal_alone(real):
    from sinkstream import Session
    model, tok = real
    questions = ["What is the capital of France?", "Name three colours.", "Count to five."]
    alone = ["".join(r.text for r in Session(model, tok).chat(q, max_tokens=24)) for q in questions]
    batched = map_batched(model, lambda q: "".join(r.text for r in Session(model, tok).chat(q, max_tokens=24)),
                          questions)
    assert batched == alone


def test_smollm2_greedy_batched_equals_alone_for_64_steps(real):
    """float32: the packed pass multiplies [n_streams, hidden] rows where alone it multiplies one row; the
    kernels may round differently per row count (a few 1e-6 in the logits), which could flip a near-tie
    argmax. These prompts have none within 64 steps."""
    model, tok = real
    prompts = [torch.tensor(tok.encode(t)) for t in ("The history of the Roman Empire", "def fibonacci(n):",
                                                     "Once upon a time, in a small village,", "1, 2, 3, 4,")]
    cfg = CacheConfig("sink", 4, 60)  # full after a few steps: positions re-indexed while batched
    alone = [decode(model, cfg, p, 64) for p in prompts]
    assert map_batched(model, lambda p: decode(model, cfg, p, 64), prompts) == alone


def test_int4_streams_decode_the_same_beside_a_long_prompt():
    """Quantized layers compute a stream's rows by that stream's own pass size (our int8-activation kernel
    below QUANT_MANY_TOKENS tokens, a bfloat16 matrix multiply from there), so decoding beside a prompt chunk
    changes nothing."""
    from conftest import hf_tiny, ours_from_hf
    from sinkstream import kernels, quant
    from sinkstream.passrows import QUANT_MANY_TOKENS
    from sinkstream.quant import QuantLinear, quantize
    if not kernels.available():
        pytest.skip("our CPU kernels are not built here (no compiler)")
    model = ours_from_hf(hf_tiny("llama", seed=3))
    quantize(model, "int4")
    V = vocab_of(model)
    jobs = [(i, prompt(80 + i, 5 if i < 3 else QUANT_MANY_TOKENS + 36, V), 0.04 * (i == 3)) for i in range(4)]

    def run(job):
        _, p, delay = job
        time.sleep(delay)  # the long prompt arrives while the others decode
        return decode(model, CacheConfig("sink", 4, 28), p, 40)

    alone = [run((i, p, 0)) for i, p, _ in jobs]
    sizes, kept = [], []
    real_dequant = QuantLinear._dequant

    def dequant(self, r0, r1):  # count full de-quantizations
        kept.append(r1 - r0 == self.out_features)
        return real_dequant(self, r0, r1)

    QuantLinear._dequant = dequant
    try:
        assert map_batched(model, run, jobs, prefill_budget=20, on_step=sizes.append) == alone
    finally:
        QuantLinear._dequant = real_dequant
    assert any(st.tokens > st.feeds for st in sizes if st.feeds > 1)  # a prompt chunk shared a pass
    n_layers = sum(isinstance(m, QuantLinear) and m.backend == "qmm" for m in model.modules())
    assert 0 < len(kept) <= 2 * n_layers  # its chunks reused the weights de-quantized once (fused views: 2x)
    assert not quant._kept  # and they were dropped once the prompt was in


def test_generate_batch_equals_generate(real):
    import sinkstream
    model, tok = real
    prompts = ["The capital of Italy is", "Water boils at", "My favourite book"]
    want = [sinkstream.generate(model, tok, p, max_tokens=12) for p in prompts]
    assert sinkstream.generate_batch(model, tok, prompts, max_tokens=12) == want
    with pytest.raises(ValueError):
        sinkstream.generate_batch(model, tok, prompts, cache=model.make_cache())


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_narrow_kv_batched_equals_alone(tiny, kv_dtype):
    V = vocab_of(tiny)
    cfg = CacheConfig("sink", 4, 28, kv_dtype=kv_dtype)
    prompts = [prompt(90 + i, 5 + 4 * i, V) for i in range(4)]
    alone = [decode(tiny, cfg, p, 48) for p in prompts]
    assert map_batched(tiny, lambda p: decode(tiny, cfg, p, 48), prompts) == alone


def test_prompt_budget_follows_the_timed_cost_of_a_decode_step(tiny):
    """Beside decoding streams a step takes the prompt tokens that cost about `prefill_share` decode steps."""
    from sinkstream.batch import StepStats
    with Batcher(tiny, prefill_budget=256, prefill_share=1.0) as b:
        assert b.budget() == 256  # nothing timed yet
        for _ in range(30):
            b._timed(StepStats(feeds=4, tokens=4, seconds=0.040))                      # decode only: 40 ms
            b._timed(StepStats(feeds=5, tokens=4 + 32, seconds=0.040 + 32 * 0.002, prompt_tokens=32))  # 2 ms/token
        assert b.budget() == 20  # 40 ms of prompt tokens at 2 ms each
        b.prefill_share = 0.25
        assert b.budget() == 5
        b.prefill_budget = 3
        assert b.budget() == 3


def test_short_prompts_go_whole_and_long_ones_in_budget_chunks(tiny):
    from sinkstream.batch import _plan_chunks
    cache = lambda: tiny.make_cache(CacheConfig("sink", 4, 28, prefill_chunk=64))
    decoders = [new_feed(tiny, cache(), torch.tensor([5])) for _ in range(3)]
    long, short1, short2 = (new_feed(tiny, cache(), torch.full((n,), 7)) for n in (300, 40, 50))
    parts = dict((id(f), n) for f, n in _plan_chunks(decoders + [long, short1, short2], budget=8, whole=100))
    assert [parts[id(f)] for f in decoders] == [1, 1, 1]
    assert parts[id(long)] == 8  # first come: a chunk of the budget
    assert parts[id(short1)] == 40 and parts[id(short2)] == 50  # whole: 90 of the 100
    parts = dict((id(f), n) for f, n in _plan_chunks(decoders + [short1, long], budget=8, whole=100))
    assert parts[id(short1)] == 40 and id(long) not in parts  # the short one used the step's budget
    parts = dict((id(f), n) for f, n in _plan_chunks([long, short1], budget=8, whole=100))
    assert parts[id(long)] == 64 and parts[id(short1)] == 40  # nobody decoding: chunks of the chunk size


def test_in_fresh_thread_returns_raises_and_ends_its_thread():
    from sinkstream.batch import in_fresh_thread
    seen = []
    assert in_fresh_thread(lambda a, b=0: (seen.append(threading.current_thread()), a + b)[1], 2, b=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError):
        in_fresh_thread(lambda: {}["missing"])


def test_in_fresh_thread_keeps_the_callers_runner(tiny):
    """A session made on a short-lived thread of a server request feeds its system prompt through the
    request's Batcher, not beside it."""
    from sinkstream.batch import DIRECT, Batcher, in_fresh_thread, runner_for, using
    b = Batcher(tiny, start=False)
    try:
        with using(b):
            assert in_fresh_thread(runner_for, tiny) is b
        assert in_fresh_thread(runner_for, tiny) is DIRECT
    finally:
        b.close()

