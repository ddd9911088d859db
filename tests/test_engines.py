"""The engines on the tiny model: continuous feeding (vLLM) and out-of-memory back-off (transformers)."""

import os

import pytest

from conftest import CPU_ENV
from shardinfer.config import ModelConfig, SamplingConfig
from shardinfer.engines import Completion
from shardinfer.engines.base import Refused
from shardinfer.requests.prompts import Prompt

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def cpu_env(engine_env):
    old = dict(os.environ)
    os.environ.update({**CPU_ENV, "VLLM_CACHE_ROOT": engine_env["VLLM_CACHE_ROOT"]})
    yield
    os.environ.clear()
    os.environ.update(old)


def _poll_all(engine, expected):
    got = {}
    while len(got) < expected:
        for batch, index, result in engine.poll():
            assert (batch, index) not in got
            got[(batch, index)] = result
    return got


def test_vllm_engine_is_fed_batch_after_batch_and_a_refused_row_fails_alone(tiny_model, tokenizer, cpu_env):
    from shardinfer.engines.vllm_engine import VllmEngine

    model = ModelConfig(path=str(tiny_model), dtype="float32",
                        engine_args={"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20})
    engine = VllmEngine(model, SamplingConfig(max_tokens=8, ignore_eos=True), 512, attempts=1)
    engine.load()
    texts = ["The os module provides", "Lists are mutable sequences", "A dictionary maps keys",
             "Threads run concurrently", "The re module matches"]
    prompts = [Prompt(tokenizer(t)["input_ids"]) for t in texts]
    out_of_vocab = Prompt([len(tokenizer) + 1000])
    engine.submit("a", prompts[:3])
    assert len(engine._in_flight) == 3  # all three requests are with the engine
    engine.submit("b", [prompts[3], out_of_vocab, prompts[4]])  # queued while "a" runs
    got = _poll_all(engine, 6)
    assert not engine._in_flight and engine.poll() == []
    assert isinstance(got[("b", 1)], Refused)
    completions = {k: v for k, v in got.items() if k != ("b", 1)}
    assert all(isinstance(c, Completion) and len(c.token_ids) == 8 for c in completions.values())
    # each row's result is its own: the same prompts in one blocking call give the same tokens
    alone = engine.generate(prompts)
    order = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 2)]
    assert [completions[k].token_ids for k in order] == [c.token_ids for c in alone]


def test_vllm_engine_keeps_each_rows_adapter_when_rows_of_several_adapters_are_fed_together(
        tiny_model, tokenizer, cpu_env, tmp_path):
    from dataclasses import replace

    from shardinfer.engines.vllm_engine import VllmEngine
    from shardinfer.models.tiny import build_tiny_lora
    from shardinfer.requests.row_options import base_options

    adapter = build_tiny_lora(tiny_model, tmp_path / "lora")
    model = ModelConfig(path=str(tiny_model), dtype="float32", lora={"a": str(adapter)},
                        engine_args={"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20})
    sampling = SamplingConfig(max_tokens=8, ignore_eos=True)
    engine = VllmEngine(model, sampling, 512, attempts=1)
    engine.load()
    with_adapter = replace(base_options(sampling), lora="a")
    texts = ["The os module provides", "Lists are mutable sequences", "A dictionary maps keys"]
    base = [Prompt(tokenizer(t)["input_ids"]) for t in texts]
    tuned = [Prompt(p.token_ids, options=with_adapter) for p in base]
    alone = [c.token_ids for c in engine.generate(base)] + [c.token_ids for c in engine.generate(tuned)]
    assert alone[:3] != alone[3:]  # the adapter changes what is generated
    mixed = [base[0], tuned[0], base[1], tuned[1], base[2], tuned[2]]
    engine.submit("mixed", mixed)
    got = _poll_all(engine, 6)
    assert [got[("mixed", i)].token_ids for i in (0, 2, 4, 1, 3, 5)] == alone
    assert [c.token_ids for c in engine.generate(mixed)] == [alone[i] for i in (0, 3, 1, 4, 2, 5)]


def test_vllm_engine_wants_more_work_until_it_holds_one_and_a_half_times_what_it_runs(tiny_model, tokenizer, cpu_env):
    from shardinfer.engines.vllm_engine import VllmEngine

    model = ModelConfig(path=str(tiny_model), dtype="float32",
                        engine_args={"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 4})
    engine = VllmEngine(model, SamplingConfig(max_tokens=4, ignore_eos=True), 512, attempts=1)
    engine.load()
    assert engine.max_requests == 6 and engine.max_tokens_queued
    prompt = Prompt(tokenizer("Sets hold unique elements")["input_ids"])
    engine.submit(0, [prompt] * 5)
    assert engine.wants_more()
    engine.submit(1, [prompt])
    assert not engine.wants_more()
    _poll_all(engine, 6)
    assert engine.wants_more()
    engine.submit(2, [prompt] * 2)
    engine.cancel(2)  # a draining worker gives the unit back
    assert not engine._in_flight and engine.poll() == [] and engine.wants_more()


class _OutOfMemoryAbove:
    """A forward pre-hook that fails like a GPU out of memory on batches wider than ``rows``."""

    def __init__(self, rows):
        self.rows = rows
        self.widths = []

    def __call__(self, module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.widths.append(ids.shape[0])
        if ids.shape[0] > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_hf_engine_backs_off_on_out_of_memory_and_finishes_every_row(tiny_model, tokenizer, cpu_env):
    from shardinfer.engines.hf_engine import HfEngine

    model = ModelConfig(path=str(tiny_model), engine="hf", dtype="float32", hf_batch_tokens=4096)
    engine = HfEngine(model, SamplingConfig(max_tokens=6, ignore_eos=True), 512, attempts=1)
    engine.load()
    prompts = [Prompt(tokenizer(f"Document number {i} is about modules and packages")["input_ids"]) for i in range(12)]
    reference = engine.generate(prompts)  # budget 4096: all 12 rows in one batch
    hook = _OutOfMemoryAbove(rows=3)
    engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    engine.submit("unit", prompts)
    got = _poll_all(engine, 12)
    assert all(isinstance(got[("unit", i)], Completion) for i in range(12))
    assert [len(got[("unit", i)].token_ids) for i in range(12)] == [6] * 12
    assert engine.out_of_memory >= 2 and engine.batch_tokens < 4096
    assert max(w for w in hook.widths if w <= 3) == 3  # it settled on the widest batch that fits
    assert sum(1 for w in hook.widths if w > 3) == engine.out_of_memory
    assert [got[("unit", i)].token_ids for i in range(12)] == [c.token_ids for c in reference]


def test_hf_engine_gives_n_outputs_per_row_and_groups_rows_by_their_options(tiny_model, tokenizer, cpu_env):
    from dataclasses import replace

    from shardinfer.engines.hf_engine import HfEngine
    from shardinfer.requests.row_options import base_options

    sampling = SamplingConfig(max_tokens=6, ignore_eos=True, n=2)
    engine = HfEngine(ModelConfig(path=str(tiny_model), engine="hf", dtype="float32"), sampling, 512, attempts=1)
    engine.load()
    ids = tokenizer("Lists are mutable sequences")["input_ids"]
    sampled = replace(base_options(sampling), temperature=1.0, seed=5, n=3)
    greedy, hot, short = engine.generate([Prompt(ids), Prompt(ids, options=sampled),
                                          Prompt(ids, options=replace(base_options(sampling), max_tokens=2))])
    assert len(greedy.samples) == 2 and greedy.samples[0].token_ids == greedy.samples[1].token_ids
    assert len(hot.samples) == 3 and len({tuple(s.token_ids) for s in hot.samples}) > 1
    assert hot.output_tokens == 18 and [len(s.token_ids) for s in short.samples] == [2, 2]
