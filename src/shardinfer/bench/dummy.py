"""Random weights for a model directory that holds only ``config.json`` and tokenizer files.

vLLM loads such a directory with ``load_format=dummy``; transformers needs weights on disk, so for
the ``hf`` engine the benchmark writes a random-weight copy once (same architecture, same tokenizer)
and both the naive loop and the pipeline load it with the normal loading code.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from shardinfer.errors import missing_dependency

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def random_weights_copy(model_dir: str, out: Path, dtype: str) -> Path:
    """``out`` holding ``model_dir``'s architecture with random weights (reused when present)."""
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise missing_dependency("torch and transformers", "hf") from exc
    start = time.time()
    config = AutoConfig.from_pretrained(model_dir)
    torch_dtype = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in _TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file() and not (tmp / name).exists():
            shutil.copy(Path(model_dir) / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    del model
    log.info("random weights for %s written to %s in %.1f s", model_dir, out, time.time() - start)
    return out
