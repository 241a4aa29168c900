"""Model loading and the key-value decomposition on the real SmolLM2 weights."""

import pytest
import torch

import ffnlib
from ffnlib.capture import capture, decomposition_check
from ffnlib.models import EMBEDDED_MODELS, load_model
from ffnlib.storage import cache_dir


def test_embedded_default_is_the_real_smollm2(smollm):
    info = smollm.describe()
    assert (info["family"], info["layers"], info["d_model"], info["d_ff"], info["vocab"]) == \
        ("llama", 30, 576, 1536, 49152)
    assert info["quantized"] and len(info["file_hash"]) == 64
    ids = torch.tensor([smollm.encode("The capital of France is")])
    top = smollm.model(ids).logits[0, -1].softmax(-1).max(-1)
    assert smollm.tokenizer.decode([int(top.indices)]) == " Paris" and float(top.values) > 0.5


def test_dense_copy_is_cached_by_file_hash(smollm):
    dense = cache_dir() / "dense" / f"smollm2-135m-{smollm.file_hash[:16]}"
    assert (dense / "ffnlib-complete").exists() and (dense / "config.json").exists()
    assert not list(dense.parent.glob(".smollm2-135m-*")), "no half-written temporary folder is left"


def test_sum_of_memories_equals_ffn_output_on_every_real_layer(smollm):
    check = decomposition_check(smollm, "Marie Curie was a physicist and chemist who conducted research.")
    assert len(check) == 30
    assert check.relative_error.max() < 1e-5
    assert check.attrs["logits_max_abs_error"] < 1e-3


def test_real_keys_and_values_orientation_and_coefficients(smollm):
    adapter, layer = smollm.adapter, 7
    down = adapter.down(layer).weight  # nn.Linear: (d_model, d_ff)
    assert adapter.values(layer).shape == (1536, 576) and torch.equal(adapter.values(layer), down.T)
    assert adapter.keys(layer).shape == (1536, 576) and adapter.gates(layer).shape == (1536, 576)
    ids = torch.tensor([smollm.encode("Water boils at one hundred degrees.")])
    with capture(smollm, layer, what=("coefficients", "ffn_input")) as acts:
        smollm.model(ids)
    x = acts.ffn_input[layer]
    expected = torch.nn.functional.silu(x @ adapter.gates(layer).T) * (x @ adapter.keys(layer).T)
    torch.testing.assert_close(acts.coefficients[layer], expected, rtol=1e-4, atol=1e-5)
    assert (acts.coefficients[layer] < 0).any(), "gated coefficients can be negative"


def test_layer_output_is_residual_plus_ffn_output(smollm):
    ids = torch.tensor([smollm.encode("Rivers flow into the sea.")])
    with capture(smollm, [0, 15, 29], what=("ffn_output", "residual_after", "ffn_input")) as acts:
        smollm.model(ids)
    # independent check: the FFN reads post_attention_layernorm(residual_before)
    for layer in (0, 15, 29):
        before = acts.residual_after[layer] - acts.ffn_output[layer]
        norm = smollm.adapter.layer(layer).post_attention_layernorm
        torch.testing.assert_close(norm(before), acts.ffn_input[layer], rtol=1e-4, atol=1e-4)


def test_hooks_are_removed_even_when_the_forward_pass_fails(smollm):
    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in smollm.model.modules())

    before = count()
    with pytest.raises(ZeroDivisionError):
        with capture(smollm, what=("coefficients", "residual_before")):
            assert count() > before
            1 / 0
    assert count() == before


@pytest.mark.parametrize("name, fragment", [
    ("smollm-135m", "Did you mean 'smollm2-135m'"),
    ("EleutherAI/pythia-14m", "cannot be reached"),
    ("/nonexistent/model.gguf", "does not exist"),
])
def test_unknown_models_get_a_clear_error_naming_the_embedded_ones(name, fragment, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ffnlib.ModelNotFoundError) as err:
        load_model(name)
    assert fragment in str(err.value)
    assert all(embedded in str(err.value) for embedded in EMBEDDED_MODELS) or "does not exist" in fragment


def test_bad_device_and_bad_name_types_are_parameter_errors():
    with pytest.raises(ffnlib.ParameterError):
        load_model("smollm2-135m", device="tpu9")
    with pytest.raises(ffnlib.ParameterError):
        load_model(42)
    if not torch.cuda.is_available():
        with pytest.raises(ffnlib.ParameterError, match="no CUDA GPU"):
            load_model("smollm2-135m", device="cuda")


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ffnlib.ModelNotFoundError, match="not a .gguf file"):
        load_model(str(path))
