"""The pooling kinds of the tiny model: classifier, embed, cross-encoder and reward.

Built once per session from the bundled corpus; transformers loads each of them; the build is
deterministic and the causal model and its stamp are what they were before there were kinds. One
engine test runs vLLM once per kind in a subprocess and checks its embed / classify / score outputs
against transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import DEMO_CORPUS, run_cli

POOLING_KINDS = ("classifier", "embed", "cross-encoder", "reward")
TEXTS = ["I love this.", "The os module provides a portable way of using operating system functionality.",
         "def f(x): return x"]
QUERY, DOCS = "import o", ["s", "The re module provides regular expression matching."]
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# Building the four kinds takes a few seconds of CPU each: these tests run with the engine tests.
pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def kinds(pooling_models: dict[str, Path]) -> dict[str, Path]:
    """The four kinds, built once per session (shared with the pooling tests)."""
    return pooling_models


@pytest.fixture(scope="module")
def tok(kinds: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(kinds["embed"])


def _config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def test_each_kind_says_what_it_is_in_its_config(kinds):
    classifier = _config(kinds["classifier"])
    assert classifier["architectures"] == ["Qwen3ForSequenceClassification"]
    assert classifier["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert classifier["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert classifier["pad_token_id"] == 0
    assert _config(kinds["embed"])["architectures"] == ["Qwen3Model"]
    for kind in ("cross-encoder", "reward"):
        config = _config(kinds[kind])
        assert config["architectures"] == ["Qwen3ForSequenceClassification"] and len(config["id2label"]) == 1
    assert _config(kinds["cross-encoder"])["sentence_transformers"] == {
        "activation_fn": "torch.nn.modules.activation.Sigmoid"}
    assert "sentence_transformers" not in _config(kinds["reward"])  # read raw
    for kind, directory in kinds.items():
        stamp = json.loads((directory / "shardinfer-tiny-model.json").read_text())
        assert stamp["kind"] == kind
        assert not (directory / "generation_config.json").exists()
        assert (directory / "tokenizer.json").read_bytes() == (kinds["embed"] / "tokenizer.json").read_bytes()


def test_the_embedding_model_describes_its_pooling_the_sentence_transformers_way(kinds):
    directory = kinds["embed"]
    modules = json.loads((directory / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((directory / modules[1]["path"] / "config.json").read_text())
    assert {key for key, on in pooling.items() if on is True} == {"pooling_mode_lasttoken", "include_prompt"}
    assert pooling["word_embedding_dimension"] == _config(directory)["hidden_size"]


def test_kinds_share_the_causal_models_trunk_and_its_stamp_is_unchanged(kinds, tiny_model):
    from safetensors.torch import load_file

    from shardinfer.models.tiny import _stamp, is_complete

    causal = load_file(tiny_model / "model.safetensors")
    classifier = load_file(kinds["classifier"] / "model.safetensors")
    embed = load_file(kinds["embed"] / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert causal[name].equal(classifier[name]) and causal[name].equal(embed[name.removeprefix("model.")])
    assert classifier["score.weight"].shape == (3, 128)
    stamp = _stamp(DEMO_CORPUS, architecture="qwen3", seed=0, vocab_size=4096)
    assert "kind" not in stamp and is_complete(tiny_model, stamp)
    assert not is_complete(kinds["classifier"], stamp)


def test_transformers_loads_each_kind_and_padded_batches_match_single_inputs(kinds, tok):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        embedder = AutoModel.from_pretrained(kinds["embed"]).eval()
        hidden = embedder(**batch).last_hidden_state
        assert hidden.shape == (3, batch["input_ids"].shape[1], 128)
        for kind, labels in (("classifier", 3), ("cross-encoder", 1), ("reward", 1)):
            model = AutoModelForSequenceClassification.from_pretrained(kinds[kind]).eval()
            logits = model(**batch).logits
            assert logits.shape == (3, labels)
            for row, text in enumerate(TEXTS):  # left padding and pad_token_id: the batch gives what one input does
                alone = model(**tok([text], return_tensors="pt")).logits[0]
                assert torch.allclose(logits[row], alone, atol=1e-4)
            if kind == "classifier":
                probs = logits.softmax(-1)
                assert probs.max().item() > 0.5 and (probs.max(0).values - probs.min(0).values).min().item() > 0.1
            else:
                assert logits.std().item() > 0.1


def test_the_build_of_every_kind_is_deterministic(kinds, tmp_path):
    from shardinfer.models.tiny import build_tiny_model

    for kind in ("embed", "reward"):  # the one with sentence-transformers files, and a classification head
        again = build_tiny_model(tmp_path / kind, corpus_path=DEMO_CORPUS, kind=kind)
        directory = kinds[kind]
        assert _files(again) == _files(directory), kind


def test_cli_builds_a_kind_and_refuses_a_lora_adapter_for_it(kinds, engine_env, tmp_path):
    proc = run_cli(["tiny-model", str(tmp_path / "embed"), "--kind", "embed"], engine_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == tmp_path / "embed"
    assert _files(tmp_path / "embed") == _files(kinds["embed"])
    proc = run_cli(["tiny-model", str(tmp_path / "reward"), "--kind", "reward", "--lora", str(tmp_path / "lora")],
                   engine_env)
    assert proc.returncode == 2 and "--lora needs --kind causal" in proc.stderr
    proc = run_cli(["tiny-model", str(tmp_path / "x"), "--kind", "ranker"], engine_env)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# Runs in its own process (vLLM changes the process it runs in): one engine per kind, its outputs
# written as JSON for the test to compare with transformers.
VLLM_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    from vllm import LLM, PoolingParams, TokensPrompt

    dirs, texts, query, docs, chat_ids, out = json.loads(sys.argv[1])
    args = dict(runner="pooling", dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                max_model_len=512, seed=0)

    def through_engine(llm, prompts, params):
        engine = llm.llm_engine
        for i, ids in enumerate(prompts):
            engine.add_request(f"row-{i}", TokensPrompt(prompt_token_ids=ids), params)
        done = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                assert output.finished and type(output).__name__ == "PoolingRequestOutput"
                done[output.request_id] = output.outputs.data.tolist()
        return [done[f"row-{i}"] for i in range(len(prompts))]

    got = {}
    llm = LLM(model=dirs["embed"], **args)
    outs = llm.embed(texts, use_tqdm=False)
    ids = [o.prompt_token_ids for o in outs]
    got["embed"] = {"ids": ids, "embedding": [o.outputs.embedding for o in outs],
                    "engine": through_engine(llm, ids, PoolingParams(task="embed"))}
    del llm; gc.collect()

    llm = LLM(model=dirs["classifier"], **args)
    outs = llm.classify(texts, use_tqdm=False)
    ids = [o.prompt_token_ids for o in outs]
    got["classifier"] = {"ids": ids, "probs": [o.outputs.probs for o in outs],
                         "engine": through_engine(llm, ids, PoolingParams(task="classify"))}
    del llm; gc.collect()

    llm = LLM(model=dirs["cross-encoder"], **args)
    outs = llm.score(query, docs, use_tqdm=False)
    got["cross-encoder"] = {"ids": [o.prompt_token_ids for o in outs], "score": [o.outputs.score for o in outs]}
    del llm; gc.collect()

    llm = LLM(model=dirs["reward"], **args)
    prompt = [TokensPrompt(prompt_token_ids=chat_ids)]
    raw = llm.classify(prompt, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    default = llm.classify(prompt, use_tqdm=False)
    got["reward"] = {"raw": raw[0].outputs.probs, "default": default[0].outputs.probs,
                     "engine": through_engine(llm, [chat_ids], PoolingParams(task="classify", use_activation=False))}
    del llm; gc.collect()
    with open(out, "w") as fh:
        json.dump(got, fh)
""")


def _max_diff(a: Any, b: Any) -> float:
    import torch

    return (torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)).abs().max().item()


@pytest.mark.engine
def test_vllm_pooling_outputs_match_transformers(kinds, tok, engine_env, tmp_path):
    chat_ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    out = tmp_path / "vllm.json"
    arguments = json.dumps([{k: str(v) for k, v in kinds.items()}, TEXTS, QUERY, DOCS, chat_ids, str(out)])
    vllm = subprocess.Popen([sys.executable, "-c", VLLM_SCRIPT, arguments], env=engine_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        want = _transformers_outputs(kinds, tok, chat_ids)  # while vLLM runs
        _, stderr = vllm.communicate(timeout=900)
    finally:
        vllm.kill()
    assert vllm.returncode == 0, stderr[-4000:]
    got = json.loads(out.read_text())
    ids = [tok(text)["input_ids"] for text in TEXTS]
    assert got["embed"]["ids"] == ids
    assert _max_diff(got["embed"]["embedding"], want["embed"]) < 1e-4
    assert _max_diff(got["embed"]["engine"], want["embed"]) < 1e-4
    assert got["classifier"]["ids"] == ids
    assert _max_diff(got["classifier"]["probs"], want["classifier"]) < 1e-4
    assert _max_diff(got["classifier"]["engine"], want["classifier"]) < 1e-4
    # the pair is the query's tokens then the document's, each tokenized alone: no separator
    pairs = [tok(QUERY)["input_ids"] + tok(doc)["input_ids"] for doc in DOCS]
    assert got["cross-encoder"]["ids"] == pairs and pairs[0] != tok(QUERY + DOCS[0])["input_ids"]
    assert _max_diff(got["cross-encoder"]["score"], want["cross-encoder"]) < 1e-4
    logit = want["reward"]
    assert _max_diff(got["reward"]["raw"], logit) < 1e-4
    assert _max_diff(got["reward"]["engine"], [logit.tolist()]) < 1e-4
    assert _max_diff(got["reward"]["default"], logit.sigmoid()) < 1e-4


def _transformers_outputs(kinds: dict[str, Any], tok: Any, chat_ids: list[int]) -> dict[str, Any]:
    """What transformers gives for each kind: the embeddings, class probabilities, pair scores, and
    the reward model's logit."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    def forward(model: Any, ids: list[int]) -> Any:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]))

    ids = [tok(text)["input_ids"] for text in TEXTS]
    embedder = AutoModel.from_pretrained(kinds["embed"]).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(kinds["classifier"]).eval()
    cross = AutoModelForSequenceClassification.from_pretrained(kinds["cross-encoder"]).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(kinds["reward"]).eval()
    pairs = [tok(QUERY)["input_ids"] + tok(doc)["input_ids"] for doc in DOCS]
    return {
        "embed": torch.stack([torch.nn.functional.normalize(forward(embedder, i).last_hidden_state[0, -1], dim=-1)
                              for i in ids]),
        "classifier": torch.stack([forward(classifier, i).logits[0].softmax(-1) for i in ids]),
        "cross-encoder": [forward(cross, pair).logits[0, 0].sigmoid().item() for pair in pairs],
        "reward": forward(reward, chat_ids).logits[0],
    }
