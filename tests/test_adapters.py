"""Adapters and capture on a tiny random model of every family in ``ffnlib.adapters.FAMILIES``.

For each family (and each model type that maps to it in a different way) the test builds a 2-layer
model from its config class, runs one forward pass on random ids (batch 2, 7 tokens) with
``capture(what=all five)`` plus the test's own hooks, and checks against quantities the adapter does
not compute itself:

1. ``coefficients @ values + bias`` equals the output of ``down`` (and ``ffn_output`` is what the
   block adds to the residual: ``down``'s output, or the post-FFN norm of it for Gemma 2/3, OLMo 2);
2. the coefficients follow from the weights: ``act(x·Kᵀ + b)`` or ``act(x·Gᵀ) * (x·Kᵀ)``, with the
   activation named by the model's own config;
3. keys/values are (d_ff, d_model) in every orientation (GPT-2's Conv1D included);
4. ``residual_before`` is the residual the block really adds the FFN to (input of the FFN's pre-norm,
   or layer input + attention output for parallel blocks), and ``residual_after`` feeds the next layer;
5. ``logits_from_residual(residual_after[last])`` reproduces the model's logits; ``activation(layer)`` (the
   family's declared module) recomputes the FFN's output;
6. ``logits_from_values`` is ``head(g ⊙ v)`` (RMSNorm) or ``head(g ⊙ (v - mean v))`` (LayerNorm), and
   relates to the full projection through the norm's scale and bias;
7. ``ffnlib.models.load_model`` loads the model back from a ``save_pretrained`` folder;
8. unsupported models, bad layers and bad ``what`` raise ffnlib's errors, and hooks never leak.

Adding a family: add a ``Case`` to ``CASES`` in tests/tiny_models.py (see docs/adding-a-family.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from ffnlib import ParameterError, UnsupportedModelError
from ffnlib.adapters import FAMILIES, Adapter, get_adapter, submodule
from ffnlib.capture import WHAT, capture
from ffnlib.models import load_model
from tiny_models import BATCH, CASE_IDS, CASES, D_MODEL, TOKENS, VOCAB, Case, make_tokenizer


@dataclass
class Tiny:
    """One case's model, its adapter and one recorded forward pass."""

    case: Case
    model: nn.Module
    adapter: Adapter
    ids: torch.Tensor
    logits: torch.Tensor
    acts: object  # ffnlib.capture.Activations
    down_out: dict  # layer -> output of adapter.down(layer), recorded by the test's own hook
    ffn_norm_in: dict  # layer -> input of the FFN's pre-norm
    layer_in: dict  # layer -> hidden_states the block received
    attn_out: dict  # layer -> attention output (parallel blocks)
    folder: Path | None = None


def _build(case: Case) -> Tiny:
    torch.manual_seed(0)
    model = case.model_cls(case.config()).float().eval()
    with torch.no_grad():  # norms start at 1/0 and biases at 0: perturb them so gains and biases matter
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    adapter = Adapter(model)
    spec = adapter.family
    down_out, ffn_norm_in, layer_in, attn_out = {}, {}, {}, {}
    handles = []
    for layer in range(adapter.n_layers):
        block = adapter.layer(layer)
        handles.append(adapter.down(layer).register_forward_hook(
            lambda mod, args, out, layer=layer: down_out.__setitem__(layer, out)))
        handles.append(block.register_forward_pre_hook(
            lambda mod, args, kwargs, layer=layer: layer_in.__setitem__(
                layer, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        if spec.ffn_norm:
            handles.append(getattr(block, spec.ffn_norm).register_forward_pre_hook(
                lambda mod, args, layer=layer: ffn_norm_in.__setitem__(layer, args[0])))
        if case.residual not in ("ffn_norm", "raw"):
            handles.append(getattr(block, case.residual).register_forward_hook(
                lambda mod, args, out, layer=layer: attn_out.__setitem__(layer, out[0])))
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB - 4, (BATCH, TOKENS))
    try:
        with torch.no_grad(), capture(adapter, what=WHAT) as acts:
            logits = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return Tiny(case, model, adapter, ids, logits, acts, down_out, ffn_norm_in, layer_in, attn_out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(case)``: the case's model and forward pass, built once per module."""
    cache: dict[str, Tiny] = {}

    def get(case: Case, saved: bool = False) -> Tiny:
        if case.id not in cache:
            cache[case.id] = _build(case)
        entry = cache[case.id]
        if saved and entry.folder is None:
            folder = tmp_path_factory.mktemp(case.id)
            entry.model.save_pretrained(folder)
            make_tokenizer().save_pretrained(folder)
            entry.folder = folder
        return entry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster, above all on a busy machine
    try:
        yield get
    finally:
        torch.set_num_threads(threads)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (relative to the tensor's scale)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the expected tensor is all zeros, the check would be vacuous"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _layers(t: Tiny):
    return range(t.adapter.n_layers)


def _per_token(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """OPT runs its FFN on (batch * tokens, d): the test's own hooks see that shape."""
    return tensor.reshape(*like.shape[:-1], tensor.shape[-1])


# ---- per-family checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_family_is_detected(case, tiny):
    t = tiny(case)
    assert t.adapter.family.name == case.family
    assert get_adapter(t.model).family.name == case.family
    assert t.adapter.n_layers == 2
    assert t.adapter.parallel == (case.residual not in ("ffn_norm", "raw"))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_captured_tensors_are_per_token(case, tiny):
    t = tiny(case)
    widths = {"coefficients": case.d_ff, "ffn_input": D_MODEL, "ffn_output": D_MODEL,
              "residual_before": D_MODEL, "residual_after": D_MODEL}
    for name in WHAT:
        captured = getattr(t.acts, name)
        assert sorted(captured) == [0, 1], name
        for layer, tensor in captured.items():
            assert tuple(tensor.shape) == (BATCH, TOKENS, widths[name]), (name, layer)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_coefficients_times_values_give_the_ffn_output(case, tiny):
    t = tiny(case)
    for layer in _layers(t):
        bias = t.adapter.value_bias(layer)
        rebuilt = t.acts.coefficients[layer] @ t.adapter.values(layer) + (0 if bias is None else bias)
        down_out = _per_token(t.down_out[layer], rebuilt)
        assert_rel_close(rebuilt, down_out, what=f"layer {layer} m @ V + b vs down output")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ffn_output_is_what_the_block_adds(case, tiny):
    t = tiny(case)
    post = t.adapter.family.post_ffn_norm
    assert (post is not None) == (case.family in ("gemma2", "gemma3", "olmo2"))
    for layer in _layers(t):
        down_out = _per_token(t.down_out[layer], t.acts.ffn_output[layer])
        if post is None:
            assert_rel_close(t.acts.ffn_output[layer], down_out, what=f"layer {layer} ffn_output")
        else:
            with torch.no_grad():
                normed = getattr(t.adapter.layer(layer), post)(down_out)
            assert_rel_close(t.acts.ffn_output[layer], normed, what=f"layer {layer} post-FFN norm")
            assert not torch.allclose(t.acts.ffn_output[layer], down_out, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_coefficients_follow_from_keys(case, tiny):
    t = tiny(case)
    act = ACT2FN[case.activation(t.model.config)]
    for layer in _layers(t):
        x = t.acts.ffn_input[layer]
        up_bias = t.adapter.up(layer).bias
        pre = x @ t.adapter.keys(layer).T + (0 if up_bias is None else up_bias)
        if t.adapter.gated:
            assert t.adapter.gate(layer).bias is None
            expected = act(x @ t.adapter.gates(layer).T) * pre
        else:
            expected = act(pre)
        assert_rel_close(t.acts.coefficients[layer], expected, what=f"layer {layer} coefficients")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_the_activation_recomputes_the_ffn(case, tiny):
    """``Adapter.activation`` is the family's declared module (never a guessed name), and the FFN recomputed with
    it from its input (``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``) is the module's own output."""
    t = tiny(case)
    for layer in _layers(t):
        act = t.adapter.activation(layer)
        assert act is submodule(t.adapter.layer(layer), t.adapter.family.activation)
        x = t.acts.ffn_input[layer]
        with torch.no_grad():
            if t.adapter.gated:
                hidden = act(t.adapter.gate(layer)(x)) * t.adapter.up(layer)(x)
            else:
                hidden = act(t.adapter.up(layer)(x))
            rebuilt = t.adapter.down(layer)(hidden)
        assert_rel_close(rebuilt, _per_token(t.down_out[layer], rebuilt), what=f"{case.id} layer {layer} FFN via "
                                                                                f"{t.adapter.family.activation}")
        assert_rel_close(t.acts.coefficients[layer], hidden, what=f"{case.id} layer {layer} coefficients")


def test_a_missing_activation_is_a_clear_error(tiny):
    import dataclasses

    t = tiny(CASES[CASE_IDS.index("bloom")])
    assert type(t.adapter.activation(0)).__name__ == "BloomGelu"  # mlp.gelu_impl: no act/act_fn to guess
    family = t.adapter.family
    undeclared = Adapter(t.model, family=dataclasses.replace(family, activation=None))
    with pytest.raises(UnsupportedModelError, match="declares no FFN activation"):
        undeclared.activation(0)
    wrong = Adapter(t.model, family=dataclasses.replace(family, activation="mlp.act_fn"))
    with pytest.raises(UnsupportedModelError, match="no FFN activation at 'mlp.act_fn'.*gelu_impl"):
        wrong.activation(0)
    with pytest.raises(ParameterError, match="value_layout"):
        dataclasses.replace(family, value_layout="fused")


def test_submodule_names_the_missing_step_and_the_children():
    llama = tf.LlamaForCausalLM(CASES[CASE_IDS.index("llama")].config())
    assert submodule(llama, "model.layers.0.mlp.act_fn") is llama.model.layers[0].mlp.act_fn
    with pytest.raises(AttributeError, match=r"no module 'model.nowhere': LlamaModel has no 'nowhere' \(it has "
                                             r"embed_tokens, layers"):
        submodule(llama, "model.nowhere")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_keys_and_values_orientation(case, tiny):
    t = tiny(case)
    for layer in _layers(t):
        keys, values = t.adapter.keys(layer), t.adapter.values(layer)
        up, down = t.adapter.up(layer), t.adapter.down(layer)
        assert tuple(keys.shape) == (case.d_ff, D_MODEL)
        assert tuple(values.shape) == (case.d_ff, D_MODEL)
        assert (t.adapter.d_ff, t.adapter.d_model) == (case.d_ff, D_MODEL)
        if case.conv1d:  # Conv1D stores (in, out): c_proj.weight already is V, c_fc.weight is Kᵀ
            assert isinstance(down, Conv1D) and isinstance(up, Conv1D)
            assert values.data_ptr() == down.weight.data_ptr() and values.stride() == down.weight.stride()
            assert torch.equal(values, down.weight)
            assert torch.equal(keys, up.weight.T)
        else:  # nn.Linear stores (out, in)
            assert isinstance(down, nn.Linear) and isinstance(up, nn.Linear)
            assert torch.equal(values, down.weight.T)
            assert torch.equal(keys, up.weight)
        if t.adapter.gated:
            assert torch.equal(t.adapter.gates(layer), t.adapter.gate(layer).weight)
        bias = t.adapter.value_bias(layer)
        assert (bias is None) == (down.bias is None)
        if bias is not None:
            assert torch.equal(bias, down.bias)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_residual_before_is_the_residual_the_ffn_is_added_to(case, tiny):
    t = tiny(case)
    for layer in _layers(t):
        before = t.acts.residual_before[layer]
        if case.residual == "ffn_norm":
            expected = _per_token(t.ffn_norm_in[layer], before)
        elif case.residual == "raw":  # no pre-FFN norm: the FFN reads the residual itself
            expected = t.acts.ffn_input[layer]
        else:  # parallel block: input + attention output, which the model never materialises
            expected = t.layer_in[layer] + t.attn_out[layer]
        assert_rel_close(before, expected, what=f"layer {layer} residual_before")
        assert_rel_close(t.acts.residual_after[layer], before + t.acts.ffn_output[layer],
                         what=f"layer {layer} residual_after")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_residual_after_feeds_the_next_layer(case, tiny):
    t = tiny(case)
    for layer in range(t.adapter.n_layers - 1):
        assert torch.equal(t.acts.residual_after[layer], t.layer_in[layer + 1])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_from_last_residual_reproduce_the_model(case, tiny):
    t = tiny(case)
    last = t.adapter.n_layers - 1
    logits = t.adapter.logits_from_residual(t.acts.residual_after[last])
    assert_rel_close(logits, t.logits, what="logits_from_residual vs model logits")


def _softcap(t: Tiny) -> float | None:
    return getattr(t.model.config, "final_logit_softcapping", None)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_from_values_by_hand(case, tiny):
    t = tiny(case)
    values = t.adapter.values(-1)[:8]
    norm, head = t.adapter.final_norm, t.model.get_output_embeddings()
    gain = {"layernorm": lambda: norm.weight, "rmsnorm": lambda: norm.weight,
            "gemma_rmsnorm": lambda: 1.0 + norm.weight, "layernorm_no_weight": lambda: torch.ones(D_MODEL)}
    centred = values - values.mean(-1, keepdim=True) if case.norm.startswith("layernorm") else values
    with torch.no_grad():
        expected = head(gain[case.norm]() * centred)
    if _softcap(t):
        expected = torch.tanh(expected / _softcap(t)) * _softcap(t)
    assert_rel_close(t.adapter.logits_from_values(values), expected, what="logits_from_values")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_from_values_is_the_linear_part_of_the_projection(case, tiny):
    """full(v) = head(g ⊙ (v - μ)/s + β): logits_from_values drops only 1/s and β (the same for every token)."""
    t = tiny(case)
    values = t.adapter.values(0)[:8]
    norm, head = t.adapter.final_norm, t.model.get_output_embeddings()
    cap = _softcap(t)

    def uncap(logits):
        return logits if not cap else cap * torch.atanh(logits / cap)

    linear, full = uncap(t.adapter.logits_from_values(values)), uncap(t.adapter.logits_from_residual(values))
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5
    head_bias = 0 if head.bias is None else head.bias
    if case.norm.startswith("layernorm"):
        scale = (values.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        norm_bias = getattr(norm, "bias", None)
        shift = 0 if norm_bias is None else norm_bias @ head.weight.T
    else:
        scale = (values.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        shift = 0
        # RMSNorm: one positive scale per vector, so the top token is the model's own
        assert torch.equal(linear.argmax(-1), full.argmax(-1))
    assert_rel_close(full, (linear - head_bias) / scale + shift + head_bias, what="full vs linear projection")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_load_model_from_a_saved_folder(case, tiny):
    t = tiny(case, saved=True)
    loaded = load_model(str(t.folder), device="cpu")
    assert type(loaded.model) is case.model_cls
    assert loaded.adapter.family.name == case.family
    assert loaded.adapter.n_layers == 2 and loaded.adapter.d_ff == case.d_ff
    # one word: transformers swaps in Qwen2's byte-level pre-tokenizer for a qwen2 folder, whatever was saved
    assert loaded.encode("a") == [3]
    with torch.no_grad():
        logits = loaded.model(input_ids=t.ids).logits
    assert_rel_close(logits, t.logits, what="reloaded model logits")


def test_every_family_has_a_case():
    assert {case.family for case in CASES} == {family.name for family in FAMILIES}
    model_types = {case.config().model_type for case in CASES}
    assert {mt for family in FAMILIES for mt in family.model_types} <= model_types


# ---- errors and hook hygiene ---------------------------------------------------------------------
def test_encoder_only_model_is_rejected(tmp_path):
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = tf.BertModel(config)
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="encoder"):
        load_model(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="encoder"):
        get_adapter(model)


def test_unknown_causal_model_is_rejected_with_a_pointer_to_the_docs(tmp_path):
    config = tf.XGLMConfig(vocab_size=VOCAB, d_model=D_MODEL, ffn_dim=64, num_layers=1, attention_heads=4,
                           max_position_embeddings=64)
    assert all(config.model_type not in family.model_types for family in FAMILIES)
    model = tf.XGLMForCausalLM(config)
    with pytest.raises(UnsupportedModelError) as error:
        get_adapter(model)
    assert "XGLMForCausalLM" in str(error.value) and "docs/adding-a-family.md" in str(error.value)
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="docs/adding-a-family.md"):
        load_model(str(tmp_path))


def test_wrong_module_layout_is_rejected(tiny):
    gpt2 = next(family for family in FAMILIES if family.name == "gpt2")
    llama = tiny(CASES[CASE_IDS.index("llama")])
    with pytest.raises(UnsupportedModelError, match="module layout of the gpt2 family"):
        Adapter(llama.model, family=gpt2)


def test_layer_out_of_range(tiny):
    adapter = tiny(CASES[0]).adapter
    for bad in (2, -3, 100):
        with pytest.raises(ParameterError, match="out of range"):
            adapter.keys(bad)
        with pytest.raises(ParameterError, match="out of range"):
            adapter.values(bad)
        with pytest.raises(ParameterError, match="out of range"):
            with capture(adapter, layers=[0, bad]):
                pass
    with pytest.raises(ParameterError):
        adapter.check_layer(True)
    assert adapter.check_layer(-1) == 1
    with pytest.raises(ParameterError, match="not gated"):
        adapter.gate(0)


def test_capture_unknown_what(tiny):
    adapter = tiny(CASES[0]).adapter
    with pytest.raises(ParameterError, match="attention_weights"):
        with capture(adapter, what=("coefficients", "attention_weights")):
            pass


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("case", [CASES[0], CASES[CASE_IDS.index("gemma2")]], ids=["gpt2", "gemma2"])
def test_hooks_are_removed_even_when_the_body_raises(case, tiny):
    t = tiny(case)
    before = _hook_count(t.model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(t.adapter, what=WHAT) as acts:
            assert _hook_count(t.model) > before
            with torch.no_grad():
                t.model(input_ids=t.ids)
            raise RuntimeError("boom")
    assert _hook_count(t.model) == before
    assert acts.coefficients  # what was asked for is kept
    with capture(t.adapter, what="coefficients") as acts:
        with torch.no_grad():
            t.model(input_ids=t.ids)
    assert _hook_count(t.model) == before
    assert not acts.ffn_output and not acts.residual_after  # what was not asked for is not kept


def test_capture_selected_layers_and_bare_model(tiny):
    t = tiny(CASES[CASE_IDS.index("opt")])
    with torch.no_grad(), capture(t.model, layers=-1, what=("coefficients", "residual_before")) as acts:
        t.model(input_ids=t.ids)
    assert sorted(acts.coefficients) == [1] and sorted(acts.residual_before) == [1]
    assert torch.equal(acts.coefficients[1], t.acts.coefficients[1])
    assert torch.equal(acts.residual_before[1], t.acts.residual_before[1])
    assert tuple(acts.residual_before[1].shape) == (BATCH, TOKENS, D_MODEL)


def test_written_values_carry_the_post_ffn_norm_gain():
    """Gemma 2/3 add norm(Σ m_i v_i) to the residual: each memory writes along g_post ⊙ v_i."""
    config = tf.Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].post_feedforward_layernorm.weight.normal_()
    adapter = get_adapter(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with capture(adapter, what=("coefficients", "ffn_output")) as acts:
        model(ids)
    m, out = acts.coefficients[0][0, -1], acts.ffn_output[0][0, -1]
    written = (m[:, None] * adapter.written_values(0)).sum(0)
    # the FFN's contribution is the written sum up to one positive factor (the norm's 1/rms)
    scale = out.norm() / written.norm()
    torch.testing.assert_close(written * scale, out, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(adapter.written_values(0), adapter.values(0))
