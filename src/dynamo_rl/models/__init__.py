"""Model and tokenizer construction and loading (HF format, safetensors).

Owns: the tiny Qwen3-architecture model and character tokenizer built locally for the
embedded default and the tests, and the ordinary HF loading path used for any checkpoint
directory. Imports only ``dynamo_rl.config`` (the tiny model's spec is the recipe's ``policy.tiny``).
"""

from dynamo_rl.models.chat import splice_required_prefix
from dynamo_rl.models.loading import check_device, load_model, load_tokenizer, parse_dtype, save_checkpoint
from dynamo_rl.models.tiny import TinyModelSpec, build_tiny_model, ensure_tiny_model

__all__ = [
    "TinyModelSpec",
    "build_tiny_model",
    "check_device",
    "ensure_tiny_model",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "save_checkpoint",
    "splice_required_prefix",
]
