import hashlib
import json

import torch

from dynamo_rl.models import build_tiny_model, ensure_tiny_model, load_model, load_tokenizer, splice_required_prefix
from dynamo_rl.models.chat import PrefixSpliceError
from dynamo_rl.models.tiny import TinyModelSpec


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_and_loads_through_hf(tmp_path, tiny_model_dir):
    again = ensure_tiny_model(tmp_path / "again")
    assert _sha(again / "model.safetensors") == _sha(tiny_model_dir / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(tiny_model_dir / "tokenizer.json")
    model = load_model(tiny_model_dir)
    ref = build_tiny_model()
    for name, t in ref.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    assert sum(p.numel() for p in model.parameters()) == 400_768
    other = build_tiny_model(TinyModelSpec(seed=1))
    assert not torch.equal(other.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_tokenizer_is_character_level_chatml(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert tok("rev 472", add_special_tokens=False).input_ids == [31, 18, 35, 40, 8, 11, 6]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert ids == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg  # the Dynamo frontend reads it from here


def test_splice_required_prefix_replaces_rerendered_history():
    eos = 2
    # actual history: prompt [1,5,2,9] + generation [7,7,2]; the template re-rendered the
    # assistant turn as [8,2] (e.g. a dropped <think> block), then a new user message [1,6,2,1].
    rendered = [1, 5, 2, 9, 8, 2, 1, 6, 2, 1]
    prefix = [1, 5, 2, 9, 7, 7, 2]
    assert splice_required_prefix(rendered, prefix, eos) == [1, 5, 2, 9, 7, 7, 2, 1, 6, 2, 1]
    # a generation cut by max_tokens (no eos): its ids stay, then the eos the template closes
    # the message with (a prompt token), then the new messages
    assert splice_required_prefix([1, 5, 2, 9, 8, 2, 3, 1], [1, 5, 2, 9, 7], eos) == [1, 5, 2, 9, 7, 2, 3, 1]
    try:
        splice_required_prefix([1, 5, 2], prefix, eos)
    except PrefixSpliceError as e:
        assert "end-of-message" in str(e)
    else:
        raise AssertionError("expected PrefixSpliceError")
