"""A tiny Qwen3-architecture causal LM and a character-level tokenizer, built offline.

Everything here is deterministic: the same :class:`TinyModelSpec` (seed included) gives
byte-identical ``model.safetensors`` and identical tokenizer files, and nothing is
downloaded. The output directory is an ordinary Hugging Face checkpoint
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``
with a ChatML chat template, ``generation_config.json``), so every consumer loads it
through the same code path as a real checkpoint (:mod:`dynamo_rl.models.loading`) and the
Dynamo frontend's Rust tokenizer reads it too.

Sizes follow ``shared/notes/tiny-grpo.md``: hidden 128, 2 layers, 4 query / 2 KV heads,
head_dim 32, tied embeddings, 50-token vocabulary → 400,384 parameters (1.6 MB fp32).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from dynamo_rl.config.schema import TinyModel

#: Special tokens, in id order. ``<|im_end|>`` ends every chat message and is the EOS id.
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
#: Ordinary tokens: one per character.
CHARACTERS = list(string.digits) + list(string.ascii_lowercase) + list(" \n+-*=?:,.<>/")
#: ChatML, the convention of Qwen models: ``<|im_start|>{role}\n{content}<|im_end|>\n``.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: Shapes and seed of the tiny model: the recipe's ``policy.tiny`` section.
TinyModelSpec = TinyModel


def build_tokenizer():
    """Return the character-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    One token per character (``Split(Regex("."))``), ``<|pad|>``=0, ``<|im_start|>``=1,
    ``<|im_end|>``=2 (eos), ``<|unk|>``=3; left padding; ChatML chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=256,
    )


def build_tiny_model(spec: TinyModelSpec | None = None, vocab_size: int | None = None):
    """Build the seeded tiny ``Qwen3ForCausalLM`` (fp32, CPU, eval mode).

    Args:
        spec: shapes and seed; defaults to :class:`TinyModelSpec()`.
        vocab_size: defaults to the character tokenizer's size (50).
    Returns:
        ``transformers.Qwen3ForCausalLM``; the same spec always gives identical weights.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = spec or TinyModelSpec()
    vocab_size = vocab_size or len(SPECIAL_TOKENS) + len(CHARACTERS)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|pad|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(config)
    return model.float().eval()


def ensure_tiny_model(path: str | os.PathLike, spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny model + tokenizer checkpoint to ``path`` unless an identical one is there.

    A ``dynamo_rl_tiny.json`` stamp records the spec; a directory with a different stamp
    is rebuilt. Files are written to a temporary sibling and renamed into place, so a
    reader (the Dynamo frontend refuses a model directory whose files keep growing)
    never sees a half-written checkpoint.

    Returns:
        ``Path`` of the checkpoint directory.
    """
    from dynamo_rl.models.loading import save_checkpoint

    spec = spec or TinyModelSpec()
    path = Path(path)
    stamp = path / "dynamo_rl_tiny.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec.model_dump():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model = build_tiny_model(spec)
    save_checkpoint(model, tmp, tokenizer=build_tokenizer())
    # transformers 5 keeps the template in chat_template.jinja; Dynamo's frontend reads it
    # from tokenizer_config.json, so write it there too.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2))
    (tmp / "dynamo_rl_tiny.json").write_text(json.dumps(spec.model_dump(), indent=2))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path
