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


def check_device(device: str, key: str = "device") -> torch.device:
    """``"cpu" | "cuda" | "cuda:1" | ...`` → ``torch.device``, checked against this machine.

    Args:
        device: a ``torch.device`` string.
        key: the setting it came from, named in the error (``"policy.device"``, ``"--device"``).
    Raises:
        ValueError: not a device string, CUDA asked for on a machine (or torch build) without
            it, or a CUDA index past the last device.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{key}: {device!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"{key}: {device!r} but no CUDA device is usable here (torch {torch.__version__}, "
                             f"{build}); use cpu, or run on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{key}: {device!r} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"{key}: {device!r} is not supported; use cpu, cuda or cuda:<index>")
    return dev


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
    Dynamo frontend and the workers may read them from another process. The tokenizer's
    chat template is written into ``tokenizer_config.json`` too: transformers 5 keeps it in
    ``chat_template.jinja``, and Dynamo 1.6.1's frontend reads it from the config.
    """
    import json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        template = getattr(tokenizer, "chat_template", None)
        tc_path = path / "tokenizer_config.json"
        if isinstance(template, str) and tc_path.is_file():
            tc = json.loads(tc_path.read_text())
            if tc.get("chat_template") != template:
                tc["chat_template"] = template
                tc_path.write_text(json.dumps(tc, indent=2))
    for f in path.iterdir():
        f.chmod(0o644)
    return path
