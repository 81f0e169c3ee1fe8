"""The ordinary Hugging Face loading path for any checkpoint directory.

A real checkpoint (``config.json`` + safetensors + tokenizer files) and the tiny model
of :mod:`dynamo_rl.models.tiny` go through exactly the same functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bf16" | ... | torch.dtype`` → ``torch.dtype``.

    Raises:
        ValueError: naming the accepted spellings.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _check_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {str(path)!r} is not a Hugging Face checkpoint directory (no config.json); "
            "point it at a directory written by save_pretrained, or use the tiny model spec"
        )
    return path


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained`` (eval mode).

    Raises:
        FileNotFoundError: when ``path`` holds no ``config.json``.
    """
    from transformers import AutoModelForCausalLM

    path = _check_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype))
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    """Load the tokenizer with ``AutoTokenizer.from_pretrained``.

    Raises:
        FileNotFoundError: when ``path`` holds no ``config.json``.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_check_dir(path))


def save_checkpoint(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """``save_pretrained`` the model (safetensors) and, if given, the tokenizer to ``path``.

    Files are made readable by other users (transformers writes mode 0600), since the
    Dynamo frontend and the workers may read them from another process.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    for f in path.iterdir():
        f.chmod(0o644)
    return path
