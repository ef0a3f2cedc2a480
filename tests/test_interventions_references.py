"""The causal tools' command-line inputs and their refusal to divide by zero, against hand-made cases
(test_interventions.py checks ablation, attribution and patching against edits made by hand)."""

import pytest
import torch

from model import GPT, GPTConfig
from nanoforge import interventions as iv
from nanoforge.tokenizer import CharTokenizer


def test_patching_refuses_prompts_that_leave_the_answer_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8)).eval()
    clean = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(iv.InterventionError, match="the answer has the same logit after both prompts"):
        iv.patch(model, clean, clean.clone(), answer=3)


def test_one_token_and_positions_from_either_end():
    chars = CharTokenizer.train("abc")
    assert iv.one_token(chars, "c", "--answer") == 2
    with pytest.raises(iv.InterventionError, match="--answer 'ab' is 2 tokens for this model's char tokenizer"):
        iv.one_token(chars, "ab", "--answer")
    assert [iv.position_in(p, 4) for p in (0, 3, -1, -4)] == [0, 3, 3, 0]
    for bad in (4, -5):
        with pytest.raises(iv.InterventionError, match=f"--position {bad} is outside the prompt's 4 tokens"):
            iv.position_in(bad, 4)


def test_attribution_sums_to_the_logit_where_the_norms_epsilon_matters():
    """A residual stream of variance ~1e-9, far below LayerNorm's eps (1e-5): the parts still sum to the logit
    only if the frozen norm scale is 1 / sqrt(variance + eps), as F.layer_norm computes it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e-3)
        model.transformer.wpe.weight.mul_(1e-3)
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    idx = torch.tensor([[1, 2, 3, 4]])
    logits, _ = model(idx)
    result = iv.attribute(model, idx, 3, 5)
    assert sum(v for _, v in result.parts) == pytest.approx(logits[0, 3, 5].item(), rel=1e-4, abs=1e-6)
