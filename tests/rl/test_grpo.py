import math

import pytest
import torch

from dynamo_rl.models import build_tiny_model, load_tokenizer
from dynamo_rl.rl.grpo import group_advantages, grpo_loss, logprob_mismatch, token_logprobs
from dynamo_rl.rl.tasks import Problem, Turn, supervised_example, turn_reward


def test_group_advantages_normalize_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    expected = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_clipped_loss_values_and_token_level_aggregation():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.0, math.log(1.5), 0.0], [0.0, math.log(0.5), math.log(0.9)]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    out = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    # token terms: -min(1.5*1, 1.2*1) = -1.2 ; -min(0.5*-1, 0.8*-1) = 0.8 ; -min(0.9*-1, 0.9*-1) = 0.9
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 + 0.9) / 3, abs=1e-6)
    assert out.clip_fraction == pytest.approx(2 / 3)
    out.loss.backward()
    # clipped tokens carry no gradient; the unclipped one does (d/dlogp of -A*exp(logp) = 0.9/3)
    assert logp.grad[0, 1] == 0 and logp.grad[1, 1] == 0
    assert logp.grad[1, 2].item() == pytest.approx(0.9 / 3, abs=1e-6)


def test_kl_term_is_zero_at_the_reference_and_positive_away():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    same = grpo_loss(logp, logp, torch.zeros(1), mask, 0.2, ref_logp=logp, kl_coef=1.0)
    assert same.kl == 0.0
    off = grpo_loss(logp, logp, torch.zeros(1), mask, 0.2, ref_logp=logp - 0.5, kl_coef=1.0)
    assert off.kl == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-6)


def test_token_logprobs_match_a_manual_forward_and_mismatch_is_zero_on_itself():
    model = build_tiny_model()
    ids = torch.tensor([[1, 30, 12, 2, 0], [1, 5, 6, 7, 8]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    lp = token_logprobs(model, ids, attn)
    logits = model(input_ids=ids[1:2]).logits[0].float()
    manual = torch.log_softmax(logits, -1)[torch.arange(4), ids[1, 1:]]
    assert torch.allclose(lp[1, 1:], manual, atol=1e-6)
    assert lp[:, 0].abs().sum() == 0
    m = logprob_mismatch(lp, lp.clone(), attn.float())
    assert m == {"logprob_mae": 0.0, "logprob_max_abs": 0.0, "mismatch_kl": 0.0}


def test_reward_and_supervised_example(tiny_model_dir):
    assert turn_reward("274", "274") == 1.0
    assert turn_reward("27", "274") == pytest.approx(2 / 3)
    assert turn_reward("2744", "274") == pytest.approx(3 / 4)
    assert turn_reward("", "274") == 0.0
    tok = load_tokenizer(tiny_model_dir)
    ids, mask = supervised_example(tok, Problem((Turn("rev 472", "274"), Turn("rev 105", "501"))))
    text = tok.decode(ids)
    assert text == ("<|im_start|>user\nrev 472<|im_end|>\n<|im_start|>assistant\n274<|im_end|>"
                    "\n<|im_start|>user\nrev 105<|im_end|>\n<|im_start|>assistant\n501<|im_end|>")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "274<|im_end|>501<|im_end|>"
