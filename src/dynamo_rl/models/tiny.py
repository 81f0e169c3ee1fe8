"""A tiny Qwen3-architecture causal LM and a character-level tokenizer, built offline.

Everything here is deterministic: the same :class:`TinyModelSpec` (seed included) gives
byte-identical ``model.safetensors`` and identical tokenizer files, and nothing is
downloaded. The output directory is an ordinary Hugging Face checkpoint
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``
with a ChatML chat template, ``generation_config.json``), so every consumer loads it
through the same code path as a real checkpoint (:mod:`dynamo_rl.models.loading`) and the
Dynamo frontend's Rust tokenizer reads it too.

Sizes follow ``shared/notes/tiny-grpo.md``: hidden 128, 2 layers, 4 query / 2 KV heads,
head_dim 32, tied embeddings, 53-token vocabulary.

Two vocabularies (``policy.tiny.vocab``):

- ``chars`` (default): the four ChatML specials and one token per character of
  :data:`CHARACTERS` (53 tokens); ChatML template (:data:`CHAT_TEMPLATE`).
- ``tools``: the same 53 ids, then the characters of JSON (``{}"_[]``) and, as Qwen3 has
  them, the added tokens ``<tool_call>``, ``</tool_call>``, ``<tool_response>``,
  ``</tool_response>``, ``<think>``, ``</think>`` (ids 59-64; not special, so detokenized
  text keeps them and Dynamo's ``hermes`` tool-call parser and ``qwen3`` reasoning parser
  find them), and four JSON merges (ids 65-68, :data:`TOOL_TOKENS`); 69 tokens. Template
  :data:`TOOLS_CHAT_TEMPLATE`: Qwen3's conventions in a compact form.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from dynamo_rl.config.schema import TinyModel

#: Extra characters of the ``tools`` vocabulary (JSON), ids 53-58.
TOOL_CHARACTERS = list('{}"_[]')
#: Added (not special) tokens of the ``tools`` vocabulary, ids 59-68: Qwen3's tags, then four
#: merges of a tool call's JSON (as a BPE vocabulary has ``{"``, ``":"``...), so that a call
#: ``<tool_call>{"name":"get","arguments":{"k":"a"}}</tool_call>`` is 12 tokens, not 38.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
               '{"name":"', '","arguments":{"', '":"', '"}}']
#: Special tokens, in id order. ``<|im_end|>`` ends every chat message and is the EOS id.
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
#: Ordinary tokens: one per character.
CHARACTERS = list(string.digits) + list(string.ascii_lowercase) + list(" \n+-*=?:,.<>/")
#: ChatML, the convention of Qwen models: ``<|im_start|>{role}\n{content}<|im_end|>\n``.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The ``tools`` vocabulary's template: Qwen3's conventions (``tokenizer_config.json`` of the
#: Qwen3 family), compacted for a character-level model:
#:
#: - with ``tools``, a system message lists them by name (``tools: get rev``; Qwen3 prints
#:   every JSON schema, hundreds of tokens here), after the request's own system text;
#: - an assistant message renders its ``content`` with any ``<think>...</think>`` block of
#:   an earlier turn removed (Qwen3 strips the reasoning of past turns), then each of its
#:   ``tool_calls`` as ``<tool_call>{"name": N, "arguments": A}</tool_call>`` (``A`` as sent
#:   when a string, else compact JSON);
#: - a ``tool`` message renders as a user turn ``<tool_response>...</tool_response>`` (one
#:   turn per message, so every message ends with ``<|im_end|>``, which is what
#:   :func:`dynamo_rl.models.chat.new_message_start` counts).
TOOLS_CHAT_TEMPLATE = (
    "{% set ns = namespace(sys='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif %}"
    "{% if tools %}"
    "<|im_start|>system\n{% if ns.sys %}{{ ns.sys }}\n{% endif %}tools:"
    "{% for t in tools %} {{ (t['function'] if t['function'] is defined else t)['name'] }}{% endfor %}<|im_end|>\n"
    "{% elif ns.sys %}<|im_start|>system\n{{ ns.sys }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{% elif m['role'] == 'assistant' %}"
    "{% set c = m['content'] if m['content'] is string else '' %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>assistant\n{{ c }}"
    "{% if m['tool_calls'] is defined and m['tool_calls'] %}{% for tc in m['tool_calls'] %}"
    "{% set f = tc['function'] if tc['function'] is defined else tc %}"
    "<tool_call>{\"name\":\"{{ f['name'] }}\",\"arguments\":"
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}{% endif %}"
    "}</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>{{ m['content'] }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


#: Shapes and seed of the tiny model: the recipe's ``policy.tiny`` section.
TinyModelSpec = TinyModel


def vocabulary(vocab: str = "chars") -> list[str]:
    """The tokens of a tiny vocabulary (``"chars"`` or ``"tools"``), in id order."""
    if vocab not in ("chars", "tools"):
        raise ValueError(f"policy.tiny.vocab {vocab!r} unknown; use 'chars' or 'tools'")
    return SPECIAL_TOKENS + CHARACTERS + (TOOL_CHARACTERS + TOOL_TOKENS if vocab == "tools" else [])


def build_tokenizer(vocab: str = "chars"):
    """Return the character-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    One token per character (``Split(Regex("."))``), ``<|pad|>``=0, ``<|im_start|>``=1,
    ``<|im_end|>``=2 (eos), ``<|unk|>``=3; left padding. ``vocab="chars"``: 53 tokens,
    ChatML template; ``"tools"``: 69 tokens (module docstring), :data:`TOOLS_CHAT_TEMPLATE`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = vocabulary(vocab)
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab_list)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    if vocab == "tools":
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        bos_token=None,
        chat_template=TOOLS_CHAT_TEMPLATE if vocab == "tools" else CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=256,
    )


def build_tiny_model(spec: TinyModelSpec | None = None, vocab_size: int | None = None):
    """Build the seeded tiny ``Qwen3ForCausalLM`` (fp32, CPU, eval mode).

    Args:
        spec: shapes and seed; defaults to :class:`TinyModelSpec()`.
        vocab_size: defaults to the size of ``spec.vocab`` (53 or 69).
    Returns:
        ``transformers.Qwen3ForCausalLM``; the same spec always gives identical weights.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = spec or TinyModelSpec()
    vocab_size = vocab_size or len(vocabulary(spec.vocab))
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
    save_checkpoint(model, tmp, tokenizer=build_tokenizer(spec.vocab))
    # transformers 5 keeps the template in chat_template.jinja; Dynamo's frontend reads it
    # from tokenizer_config.json, so write it there too.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = TOOLS_CHAT_TEMPLATE if spec.vocab == "tools" else CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2))
    (tmp / "dynamo_rl_tiny.json").write_text(json.dumps(spec.model_dump(), indent=2))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path
