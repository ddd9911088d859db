"""vLLM engine: one in-process ``vllm.LLM`` per worker, fed a whole unit per ``generate`` call."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any

from shardinfer.config import ModelConfig, SamplingConfig
from shardinfer.engines import Completion
from shardinfer.errors import ConfigError, missing_dependency

log = logging.getLogger(__name__)


class VllmEngine:
    name = "vllm"

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, max_model_len: int):
        self.model = model
        self.sampling = sampling
        self.max_model_len = max_model_len
        self.llm: Any = None
        self.params: Any = None

    def load(self) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise missing_dependency("vllm", "vllm") from exc
        check_engine_args(self.model.vllm_args, vllm.EngineArgs)
        kwargs: dict[str, Any] = {
            "model": self.model.path,
            "tokenizer": self.model.tokenizer or self.model.path,
            "dtype": self.model.dtype,
            "max_model_len": self.max_model_len,
            **({"seed": self.sampling.seed} if self.sampling.seed is not None else {}),
            **self.model.vllm_args,
        }
        log.info("loading vLLM %s: %s", vllm.__version__, kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.params = vllm.SamplingParams(**sampling_kwargs(self.sampling))

    def generate(self, prompts: list[list[int]]) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [_completion(o) for o in outputs]

    def versions(self) -> dict[str, str]:
        import torch
        import vllm

        return {"vllm": vllm.__version__, "torch": torch.__version__}


def sampling_kwargs(s: SamplingConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
        "ignore_eos": s.ignore_eos,
    }
    if s.top_k is not None:
        kwargs["top_k"] = s.top_k
    if s.seed is not None:
        kwargs["seed"] = s.seed
    if s.stop:
        kwargs["stop"] = list(s.stop)
    return kwargs


def check_engine_args(engine_args: dict[str, Any], engine_args_cls: type) -> None:
    """Unknown vLLM engine arguments fail before loading, with the closest valid names."""
    valid = {f.name for f in dataclasses.fields(engine_args_cls)}
    for key in engine_args:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=3)
            raise ConfigError(
                f"model.vllm_args.{key}: not an argument of this vLLM version"
                + (f". Did you mean {', '.join(close)}?" if close else ". See vllm.EngineArgs for the list.")
            )


def _completion(output: Any) -> Completion:
    best = output.outputs[0]
    return Completion(token_ids=list(best.token_ids), text=best.text, finish_reason=best.finish_reason or "length")
