"""Interventions on real memories change the model as the key-value reading predicts."""

import pytest
import torch

import ffnlib
from ffnlib.capture import capture
from ffnlib.interventions import intervene
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
