"""A model that makes re-tokenization drift happen for real, built in the test.

* Tokenizer: a small BPE (``tokenizers``) whose merges make ``"hello"`` one token while
  the engine may emit ``"he"`` + ``"llo"``; ``<think>`` / ``</think>`` are added tokens
  (as in Qwen3); ChatML specials at the ids of the tiny model (``<|im_end|>`` = 2 = EOS).
* Chat template: ChatML that drops a past assistant message's ``<think>...</think>``
  block (``content.split('</think>')[-1]``, what Qwen3's template does).
* Weights: the tiny Qwen3 architecture, trained for a few hundred CPU steps so that greedy
  decoding answers every user message with ``<think> h m </think> he llo <|im_end|>``.

So turn 1's generation holds ids that re-rendering the history changes twice: the think
block disappears and ``he``+``llo`` re-encodes as ``hello``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
CHARS = list("\n adehilmnorstuy")
MERGES = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo")]
THINK = ["<think>", "</think>"]
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>assistant\n{{ c }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER_WORDS = ["hi", "say hello", "hello", "do it", "more", "tell me", "ready", "yes", "no", "a story"]


def build_tokenizer():
    """The BPE tokenizer as a ``PreTrainedTokenizerFast`` (vocabulary of 26)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for t in SPECIALS + CHARS + ["".join(m) for m in MERGES]:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(MERGES), unk_token="<|unk|>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   unk_token="<|unk|>", chat_template=TEMPLATE, model_max_length=256)


def answer_ids(tok) -> list[int]:
    """The trained answer: ``<think> h m </think> he llo <|im_end|>`` (ids)."""
    ids = tok.convert_tokens_to_ids(["<think>", "h", "m", "</think>", "he", "llo", "<|im_end|>"])
    assert 3 not in ids
    return ids


def build(path: Path, steps: int = 80) -> Path:
    """Write the drift model checkpoint (HF format) to ``path``; returns ``path``."""
    from dynamo_rl.models import build_tiny_model, save_checkpoint
    from dynamo_rl.models.tiny import TinyModelSpec

    path = Path(path)
    if (path / "drift_model.json").exists():
        return path
    tok = build_tokenizer()
    vocab = len(tok)
    model = build_tiny_model(TinyModelSpec(seed=3), vocab_size=vocab)
    ans = answer_ids(tok)
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared

    def example() -> tuple[list[int], int]:
        msgs = []
        for _ in range(rng.randint(0, 2)):
            msgs += [{"role": "user", "content": rng.choice(USER_WORDS)},
                     {"role": "assistant", "content": rng.choice(["<think>hm</think>hello", "hello", "ok"])}]
        msgs.append({"role": "user", "content": rng.choice(USER_WORDS)})
        p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
        return p + ans, len(p)

    for _ in range(steps):
        batch = [example() for _ in range(8)]
        T = max(len(ids) for ids, _ in batch)
        x = torch.zeros((8, T), dtype=torch.long)
        y = torch.full((8, T), -100, dtype=torch.long)
        for b, (ids, p) in enumerate(batch):
            x[b, : len(ids)] = torch.tensor(ids)
            y[b, p: len(ids)] = torch.tensor(ids[p:])
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(model, tmp, tokenizer=tok)
    tc = json.loads((tmp / "tokenizer_config.json").read_text())
    tc["chat_template"] = TEMPLATE  # Dynamo's frontend reads the template from here
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (tmp / "drift_model.json").write_text(json.dumps({"steps": steps, "final_loss": loss.item()}))
    for f in tmp.iterdir():
        f.chmod(0o644)
    tmp.rename(path)
    return path
