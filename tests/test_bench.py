"""``shardinfer bench``: the synthetic corpus, and a whole benchmark on the tiny model."""

import json

import pytest

from conftest import CPU_ENV, run_cli, write_config
from shardinfer.bench.synth import make_docs, source_texts
from shardinfer.config import PromptConfig
from shardinfer.errors import ConfigError
from shardinfer.requests.prompts import PromptBuilder


def _builder(tokenizer, max_model_len=2048, max_tokens=16):
    cfg = PromptConfig(system="Summarize.", user="Summarize this:\n\n{text}")
    return PromptBuilder(cfg, tokenizer, max_model_len=max_model_len, max_tokens=max_tokens)


def test_synthetic_prompts_hit_the_requested_token_range(tokenizer):
    builder = _builder(tokenizer)
    docs = make_docs(builder, tokenizer, source_texts(None), docs=40, lengths=(300, 700), seed=1)
    lengths = [len(d.prompt_ids) for d in docs]
    assert all(300 <= n <= 700 for n in lengths)
    assert max(lengths) - min(lengths) > 200  # spread over the range, not one size
    for doc in docs[:5]:  # the ids are exactly what the pipeline builds from the text
        assert builder.build([doc.text], [{}])[0].token_ids == doc.prompt_ids
    again = make_docs(builder, tokenizer, source_texts(None), docs=40, lengths=(300, 700), seed=1)
    assert [d.text for d in again] == [d.text for d in docs]  # same seed, same corpus
    assert len({d.text for d in docs}) == 40


def test_synthetic_corpus_rejects_ranges_it_cannot_build(tokenizer):
    builder = _builder(tokenizer, max_model_len=512, max_tokens=16)
    with pytest.raises(ConfigError, match="do not fit max_model_len 512"):
        make_docs(builder, tokenizer, source_texts(None), docs=2, lengths=(100, 600))
    with pytest.raises(ConfigError, match="the prompt template alone is"):
        make_docs(builder, tokenizer, source_texts(None), docs=2, lengths=(3, 50))
    with pytest.raises(ConfigError, match="MIN-MAX"):
        make_docs(builder, tokenizer, source_texts(None), docs=2, lengths=(50, 10))


@pytest.mark.engine
def test_bench_compares_raw_vllm_and_the_pipeline_and_batching_strategies(tmp_path, tiny_model, engine_env):
    config = write_config(tmp_path / "bench.yaml", corpus=tmp_path / "unused.jsonl", model_dir=tiny_model,
                          run_dir=tmp_path / "unused-run", model={"max_model_len": 1024},
                          run={"workers": 1, "env": CPU_ENV})
    out = tmp_path / "out"
    proc = run_cli(["bench", "--config", str(config), "--docs", "24", "--input-len", "150-400",
                    "--output-len", "12", "--strategies", "--strategy-docs", "8", "--static-batch", "4",
                    "--out", str(out)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    shape = result["shape"]
    assert shape["docs"] == 24 and 150 <= shape["prompt_len_min"] <= shape["prompt_len_max"] <= 400
    raw, pipe = result["runs"]["raw vLLM"], result["runs"]["pipeline"]
    for run in (raw, pipe):  # the same prompts, the same fixed output lengths
        assert run["rows"] == 24
        assert run["tokens"] == {"input": shape["prompt_tokens"], "output": 24 * 12,
                                 "total": shape["prompt_tokens"] + 24 * 12}
        points = run["timeline"]["points"]
        # raw vLLM's finish times come from its progress updates: tokens rounded to 0.1 tok/s per bin
        assert sum(v for _, v in points) * run["timeline"]["bin_s"] == pytest.approx(run["tokens"]["total"], rel=0.005)
        assert run["startup_s"] > 0 and run["generation_s"] > 0 and run["tokens_per_s"]["total"] > 0
        assert abs(run["phases"]["steady_s"] + run["phases"]["tail_s"] - run["generation_s"]) < 0.01
    assert pipe["workers"] == 1 and pipe["rows_failed"] == 0
    for run in (raw, pipe):  # what vLLM was set to and what its scheduler did, from its own stats
        settings, scheduler = run["engine"]["settings"], run["engine"]["scheduler"]
        assert settings["max_num_seqs"] > 0 and settings["kv_cache_tokens"] > 0 and settings["prefix_caching"] in (True, False)
        assert scheduler["generation_tokens"] == 24 * 12 and scheduler["prompt_tokens"] == shape["prompt_tokens"]
        assert scheduler["preemptions"] >= 0 and scheduler["decode_s"] > 0
    # raw vLLM's row finish times and tokens were read from its progress updates, none estimated
    assert result["baseline_timeline_estimated_rows"] == 0 == result["strategies_timeline_estimated_rows"]
    ratio = result["ratio"]["generation_per_replica"]
    assert ratio == pytest.approx(pipe["tokens_per_s"]["total"] / raw["tokens_per_s"]["total"], rel=1e-3)
    strategies = result["strategies"]
    assert list(strategies) == ["one at a time", "static batches of 4", "continuous batching"]
    assert all(s["rows"] == 8 and s["tokens"]["output"] == 8 * 12 for s in strategies.values())
    assert len({s["tokens"]["input"] for s in strategies.values()}) == 1  # the same documents
    for name in ("bench.png", "strategies.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    md = (out / "bench.md").read_text()
    assert "| raw vLLM | 24 |" in md and "| pipeline (1 worker) | 24 |" in md and "continuous batching" in md
    assert "Pipeline / baseline" in md and "](bench.png)" in md
    assert "Engine settings in effect and what the scheduler did" in md
    assert md in proc.stdout
    (out / "bench.png").unlink()  # measured where matplotlib was missing: redraw from bench.json
    again = run_cli(["bench", "--replot", "--out", str(out)], engine_env)
    assert again.returncode == 0 and (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "bench.md").read_text() == md


@pytest.mark.engine
def test_bench_hf_engine_against_the_naive_loop_on_random_weights(tmp_path, tiny_model, engine_env):
    config = write_config(tmp_path / "bench.yaml", corpus=tmp_path / "unused.jsonl", model_dir=tiny_model,
                          run_dir=tmp_path / "unused-run", model={"engine": "hf", "max_model_len": 1024},
                          run={"workers": 1, "env": CPU_ENV})
    out = tmp_path / "out"
    proc = run_cli(["bench", "--config", str(config), "--dummy-weights", "--docs", "10", "--input-len",
                    "100-300", "--output-len", "8", "--static-batch", "4", "--out", str(out)], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    weights = out / "random-weights" / "model.safetensors"
    assert result["model"] == str(out / "random-weights") and weights.is_file()
    assert weights.read_bytes() != (tiny_model / "model.safetensors").read_bytes()
    naive, pipe = result["runs"]["naive transformers loop, static batches of 4"], result["runs"]["pipeline"]
    assert naive["rows"] == pipe["rows"] == 10 and pipe["rows_failed"] == 0
    assert naive["tokens"] == pipe["tokens"] == {"input": result["shape"]["prompt_tokens"], "output": 80,
                                                 "total": result["shape"]["prompt_tokens"] + 80}
    assert result["ratio"]["generation_per_replica"] > 0


@pytest.mark.engine
def test_bench_raw_engine_alone_on_random_token_prompts(tmp_path, tiny_model, engine_env):
    config = write_config(tmp_path / "bench.yaml", corpus=tmp_path / "unused.jsonl", model_dir=tiny_model,
                          run_dir=tmp_path / "unused-run", model={"max_model_len": 256},
                          run={"workers": 1, "env": CPU_ENV})
    args = ["bench", "--config", str(config), "--docs", "6", "--input-len", "50-80", "--output-len", "4",
            "--prompt-kind", "random", "--out", str(tmp_path / "out")]
    refused = run_cli(args, engine_env)
    assert refused.returncode == 2 and "add --skip-pipeline" in refused.stderr
    proc = run_cli([*args, "--skip-pipeline", "--engine-arg", "max_num_seqs=2"], engine_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert list(result["runs"]) == ["raw vLLM"] and result["ratio"] is None
    assert 50 <= result["shape"]["prompt_len_min"] <= result["shape"]["prompt_len_max"] <= 80
    raw = result["runs"]["raw vLLM"]
    assert raw["engine"]["settings"]["max_num_seqs"] == 2  # the sweep's setting is in effect
    assert raw["engine"]["scheduler"]["running_max"] in (None, 0.0, 1.0, 2.0)
