"""vLLM's pooling runner for ``task: embed | classify | score | reward``: the engine arguments that
load a model for the task, the pooling parameters of its requests, and a finished request's values.

Requests go through the same ``add_request``/``step`` loop as generation (see
:mod:`shardinfer.engines.vllm_engine`); only their parameters and outputs differ. A causal LM asked
to embed is converted by vLLM (``convert: embed``, last-token pooling); classify, score and reward run
the model's classification head: softmax over the classes, sigmoid of a cross-encoder's one logit,
and a reward model's raw logit.
"""

from __future__ import annotations

from typing import Any

from shardinfer.config import Config
from shardinfer.engines.base import Pooled
from shardinfer.models.tasks import model_kind

# The vLLM pooling task that serves each of ours.
VLLM_TASK = {"embed": "embed", "classify": "classify", "score": "classify", "reward": "classify"}


def pooling_engine_kwargs(cfg: Config) -> dict[str, Any]:
    """``vllm.LLM`` arguments that load the model for a pooling task (none for generate)."""
    if cfg.task == "generate":
        return {}
    kwargs: dict[str, Any] = {"runner": "pooling"}
    kind = model_kind(cfg.model.path)
    if cfg.task == "embed" and kind is not None and kind.causal:
        kwargs["convert"] = "embed"
    return kwargs


def pooling_params(cfg: Config) -> Any:
    """The ``vllm.PoolingParams`` of every request of the run."""
    from vllm import PoolingParams

    kwargs: dict[str, Any] = {"task": VLLM_TASK[cfg.task]}
    pooling = cfg.pooling
    if cfg.task == "embed":
        if pooling.dimensions is not None:
            kwargs["dimensions"] = pooling.dimensions
        if pooling.normalize is not None:
            kwargs[_activation_name(PoolingParams, "normalize")] = pooling.normalize
    else:
        activation = pooling.activation if pooling.activation is not None else cfg.task != "reward"
        kwargs[_activation_name(PoolingParams, "activation")] = activation
    return PoolingParams(**kwargs)


def _activation_name(params_cls: type, older: str) -> str:
    """``use_activation`` in newer vLLM; ``normalize`` (embed) or ``activation`` in older releases."""
    fields = getattr(params_cls, "__struct_fields__", ())
    return "use_activation" if "use_activation" in fields or not fields else older


def pooled(output: Any) -> Pooled:
    """A finished pooling request's values: a float32 NumPy array (a tensor's, without copying its values
    one by one into Python floats)."""
    data = output.outputs.data
    if hasattr(data, "float"):
        return Pooled(values=data.float().cpu().reshape(-1).numpy())
    return Pooled(values=list(data) if isinstance(data, (list, tuple)) else [data])
