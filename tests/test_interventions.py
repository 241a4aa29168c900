"""Interventions on real memories change the model as the key-value reading predicts."""

import pytest
import torch

import ffnlib
from ffnlib.capture import capture, hook_coefficients
from ffnlib.interventions import intervene, scale_at_positions
from ffnlib.values import value_logits


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_switching_off_the_top_contributing_memory_lowers_the_logit_it_promotes(smollm):
    adapter, layer = smollm.adapter, 28
    ids = torch.tensor([smollm.encode("The capital of France is")])
    with capture(smollm, layer, what=("coefficients",)) as acts:
        base = smollm.model(ids).logits[0, -1]
    m = acts.coefficients[layer][0, -1]
    contribution = m.abs() * adapter.values(layer).norm(dim=-1)
    memory = int(contribution.argmax())
    sign = 1 if m[memory] > 0 else -1
    promoted = int(value_logits(adapter, layer, [memory], sign=sign).argmax())
    with intervene(smollm, {(layer, memory): 0.0}):
        off = smollm.model(ids).logits[0, -1]
    assert off[promoted] < base[promoted]
    # the memory's own effect dominates: the promoted token drops more than the average token
    assert (base - off)[promoted] > (base - off).mean()


def test_setting_a_coefficient_promotes_its_value_top_token(smollm):
    layer, memory = 25, 100
    top = int(value_logits(smollm.adapter, layer, [memory]).argmax())
    ids = torch.tensor([smollm.encode("I like")])
    base = smollm.model(ids).logits[0, -1].log_softmax(-1)
    with intervene(smollm, {(layer, memory): 50.0}):
        boosted = smollm.model(ids).logits[0, -1].log_softmax(-1)
    assert boosted[top] > base[top] + 1.0


def test_hooks_are_removed_even_on_error(smollm):
    before = _hooks(smollm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(smollm, {(3, 5): 0.0, (4, 6): 2.0}):
            assert _hooks(smollm.model) == before + 4  # per edited layer: the edit and the token-shape recorder
            raise RuntimeError("boom")
    assert _hooks(smollm.model) == before


@pytest.mark.parametrize("edits", [{(99, 0): 0.0}, {(0, 5000): 0.0}, {(0, -1): 0.0}, {3: 0.0},
                                   {(0, 1): "off"}])
def test_bad_interventions_are_parameter_errors(smollm, edits):
    with pytest.raises(ffnlib.ParameterError):
        with intervene(smollm, edits):
            pass


def test_scaling_at_one_position_per_row_matches_each_row_alone(smollm):
    """Rows of a right-padded batch, each scaled at its own last token only, as each prompt run alone."""
    prompts = [smollm.encode("The capital of France is"), smollm.encode("I like")]
    ids = torch.full((2, max(map(len, prompts))), smollm.tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(prompt), 1
    last = torch.tensor([len(p) - 1 for p in prompts])
    edits = [(100, 0.0), (200, 3.0)]  # (memory, factor) of each row, at its last token
    factors = torch.ones(2, smollm.adapter.d_ff)
    for row, (memory, factor) in enumerate(edits):
        factors[row, memory] = factor
    before = _hooks(smollm.model)
    with torch.no_grad():
        with scale_at_positions(smollm, {25: factors}, last):
            batched = smollm.model(input_ids=ids, attention_mask=mask).logits[torch.arange(2), last]
        for row, (prompt, (memory, factor)) in enumerate(zip(prompts, edits)):
            def at_last(layer, m, memory=memory, factor=factor):
                m = m.clone()
                m[:, -1, memory] *= factor
                return m

            with hook_coefficients(smollm, 25, at_last):
                alone = smollm.model(torch.tensor([prompt])).logits[0, -1]
            assert torch.allclose(batched[row], alone, atol=1e-4)
    assert _hooks(smollm.model) == before


def test_a_coefficient_hook_can_fan_a_batch_of_one_out(smollm):
    """hook_coefficients may return more rows than it was given: the layers above run in the larger batch."""
    ids = torch.tensor([smollm.encode("The capital of France is")])
    before = _hooks(smollm.model)

    def fan_out(layer, m):
        rows = m.expand(3, -1, -1).clone()
        rows[1, :, 100] = 0.0
        rows[2, :, 100] *= 2.0
        return rows

    with torch.no_grad():
        with hook_coefficients(smollm, 20, fan_out):
            fanned = smollm.model(ids).logits[:, -1]
        plain = smollm.model(ids).logits[0, -1]
        with intervene(smollm, {(20, 100): 0.0}):
            off = smollm.model(ids).logits[0, -1]
        with intervene(smollm, {(20, 100): 2.0}, scale=True):
            doubled = smollm.model(ids).logits[0, -1]
    assert fanned.shape[0] == 3 and _hooks(smollm.model) == before
    for got, expected in zip(fanned, (plain, off, doubled)):
        assert torch.allclose(got, expected, atol=1e-4)
