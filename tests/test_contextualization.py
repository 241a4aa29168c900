"""Contribution maps through the FFN (Kobayashi et al., ICLR 2024): ``ffnlib.related.contextualization``.

1. Completeness on a tiny random model of every family (the cases of tests/test_adapters.py): for every stage,
   ``Σ_j y_{i←j} + bias`` equals the model's own vector, recorded here by capture() and this test's own hooks
   (relative error ≤ 1e-4), for two sentences of different lengths in one padded batch; the maps are the
   vectors' norms, causal and zero beyond each sentence; parallel blocks give a diagonal FFN map.
2. The same on the real SmolLM2, every layer, through the module's own ``check=True``.
3. Integrated gradients: the closed forms (element-wise and gated) against a brute-force Riemann sum and
   captum's IntegratedGradients; the quadrature and its table against a fine Riemann sum.
4. Norm splits for every norm kind; the two routes through the FFN's first matrices (per head, and through
   W_O·W1) and the chunking give the same maps.
The measures, errors, caching and the explorer's panel are in tests/test_contextualization_measures.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.activations import ACT2FN

import ffnlib.related.contextualization as ctx
from ffnlib import UnsupportedModelError
from ffnlib.adapters import FAMILIES, VALUE_LAYOUTS, Adapter, submodule
from ffnlib.capture import capture
from test_adapters import assert_rel_close
from tiny_models import CASE_IDS, CASES, VOCAB, perturbed_model

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, above all on a busy machine
    yield
    torch.set_num_threads(threads)


def _ids(lengths=(7, 5), seed=1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB - 4, (n,), generator=generator).tolist() for n in lengths]


def _real_vectors(model, adapter: Adapter, ids: list[list[int]]) -> dict[int, dict[str, torch.Tensor]]:
    """Each stage's real vector per layer, recorded independently of the decomposition (padded batch)."""
    width = max(map(len, ids))
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, seq in enumerate(ids):
        batch[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    down = {}
    handles = [adapter.down(layer).register_forward_hook(
        lambda mod, args, out, layer=layer: down.__setitem__(layer, out)) for layer in range(adapter.n_layers)]
    try:
        with torch.no_grad(), capture(adapter, what=("ffn_input", "ffn_output", "residual_before",
                                                     "residual_after")) as acts:
            model(input_ids=batch, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    attention_norm = adapter.family.attention_norm
    real = {}
    for layer in range(adapter.n_layers):
        after = acts.residual_after[layer]
        if layer == adapter.n_layers - 1:
            nxt = adapter.final_norm
        else:
            nxt = submodule(adapter.layer(layer + 1), attention_norm) if attention_norm else None
        with torch.no_grad():
            real[layer] = {"ATB": acts.residual_before[layer], "ATBLN": acts.ffn_input[layer],
                           "ATBFF": down[layer].reshape(after.shape), "ATBFFLN": acts.ffn_output[layer],
                           "ATBFFRES": after, "ATBFFRESLN": None if nxt is None else nxt(after)}
    return real


# ---- 1. completeness on every family --------------------------------------------------------------------------
def test_every_family_declares_its_attention_layout_in_its_familyspec():
    for family in FAMILIES:
        assert family.attention_value and family.attention_out and family.activation, family.name
        assert family.value_layout in VALUE_LAYOUTS and ctx.VALUE_LAYOUTS == VALUE_LAYOUTS
        assert (family.attention_norm is None) == (family.name == "olmo2"), family.name
        assert (family.attention_post_norm is not None) == (family.name in ("olmo2", "gemma2", "gemma3"))
    # LAYOUTS and LayerLayout are a view of the FamilySpecs
    assert set(ctx.LAYOUTS) == {family.name for family in FAMILIES}
    gpt2 = ctx.LAYOUTS["gpt2"]
    assert (gpt2.value, gpt2.out, gpt2.attention_norm, gpt2.value_layout) == ("attn.c_attn", "attn.c_proj", "ln_1",
                                                                             "qkv_blocks")


@pytest.mark.parametrize("case", [CASES[CASE_IDS.index(c)] for c in ("gpt2", "llama")], ids=["gpt2", "llama"])
def test_a_family_without_an_attention_layout_is_refused_clearly(case):
    model = perturbed_model(case)
    family = Adapter(model).family
    bare = Adapter(model, family=dataclasses.replace(family, attention_value=None))
    with pytest.raises(UnsupportedModelError, match="set attention_value, attention_out"):
        ctx.decompose(bare, _ids())
    wrong = Adapter(model, family=dataclasses.replace(family, attention_out="attn.nowhere"))
    with pytest.raises(UnsupportedModelError, match="attention layout of the .* family .*nowhere"):
        ctx.stages_of(wrong, 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_stage_sums_to_the_models_own_vector(case):
    model = perturbed_model(case)
    adapter = Adapter(model)
    ids = _ids()
    result = ctx.decompose(model, ids, keep_vectors=True, check=True)
    real = _real_vectors(model, adapter, ids)
    family = adapter.family
    for layer in result.layers:
        stages = result.stages[layer]
        assert ("ATBLN" in stages) == (not adapter.parallel and family.ffn_norm is not None)
        assert ("ATBFFLN" in stages) == (family.post_ffn_norm is not None)
        assert ("ATBFFRESLN" in stages) == (real[layer]["ATBFFRESLN"] is not None)
        for stage in stages:
            vectors, bias = result.vectors[layer][stage], result.bias[layer][stage]
            for row, seq in enumerate(ids):
                n = len(seq)
                rebuilt = vectors[row, :n, :n].sum(1) + bias[row, :n]
                assert_rel_close(rebuilt, real[layer][stage][row, :n].float(), tol=TOL,
                                 what=f"{case.id} layer {layer} {stage} sentence {row}")
            maps = result.maps[layer][stage]
            torch.testing.assert_close(maps, vectors.norm(dim=-1))
            assert torch.all(maps.triu(1) == 0), "a causal map has nothing above the diagonal"
            assert torch.all(maps[1, 5:] == 0) and torch.all(maps[1, :, 5:] == 0), "nothing beyond the sentence"
        if adapter.parallel:  # the FFN reads norm(x_i), token i alone: its map is diagonal
            ff = result.maps[layer]["ATBFF"][0]
            assert torch.all(ff - torch.diag(torch.diagonal(ff)) == 0)
        else:
            assert result.maps[layer]["ATBFF"][0].tril(-1).abs().sum() > 0
    assert (result.checks["relative_error"] <= TOL).all(), result.checks


@pytest.mark.parametrize("case", [CASES[CASE_IDS.index(c)] for c in ("gpt2", "llama", "gemma2", "olmo2", "gpt-j")],
                         ids=["gpt2", "llama", "gemma2", "olmo2", "gpt-j"])
def test_routes_batches_and_chunks_give_the_same_maps(case):
    """A 7-token sentence alone goes per head (n·H < d); in a batch with a 12-token one it goes through
    W_O·L·W1; tiny chunks split the pairs. The maps agree, and padding changes nothing."""
    model = perturbed_model(case)
    short, long_ = _ids((7, 12), seed=3)
    alone = ctx.decompose(model, [short])
    batched = ctx.decompose(model, [long_, short], chunk_elements=1000)
    for layer in alone.layers:
        for stage in alone.stages[layer]:
            assert_rel_close(batched.maps[layer][stage][1, :7, :7], alone.maps[layer][stage][0], tol=1e-5,
                             what=f"{case.id} layer {layer} {stage}")
    assert alone.map(0, "ATB").shape == (7, 7)


# ---- 2. the real model ------------------------------------------------------------------------------------------
def test_smollm2_every_layer_and_stage_is_complete(smollm):
    texts = ["The Eiffel Tower was designed by Gustave Eiffel's company in Paris.", "Water boils at 100 degrees."]
    result = ctx.decompose(smollm, texts, check=True)
    checks = result.checks
    assert sorted(checks["layer"].unique()) == list(range(smollm.adapter.n_layers))
    assert set(checks["stage"]) == {"ATB", "ATBLN", "preactivation", "hidden", "ATBFF", "ATBFFRES", "ATBFFRESLN"}
    assert (checks["relative_error"] <= TOL).all(), checks.sort_values("relative_error").tail()
    assert result.stages[0] == ("ATB", "ATBLN", "ATBFF", "ATBFFRES", "ATBFFRESLN")
    n = result.lengths[1]
    row_mass = result.map(29, "ATBFFRES", 1).sum(1)
    assert row_mass.shape == (n,) and (row_mass > 0).all()


# ---- 3. integrated gradients ---------------------------------------------------------------------------------
def _captum_shares(per_unit, summands: torch.Tensor, width: int) -> torch.Tensor:
    """captum's IG of ``per_unit(Σ_j summands_j)`` per summand, with the hidden units as captum's batch dimension:
    ``summands`` (n, width·units) holds ``width`` blocks of ``units`` (``[a | u]`` for a gated unit)."""
    from captum.attr import IntegratedGradients

    n = summands.shape[0]
    units = summands.shape[1] // width
    inputs = tuple(summands[j].reshape(width, units).T.clone() for j in range(n))  # each (units, width)

    def forward(*parts):  # each part (batch, width): one unit per row
        return per_unit(torch.stack(parts).sum(0))

    attributions = IntegratedGradients(forward).attribute(inputs, baselines=tuple(torch.zeros_like(p) for p in inputs),
                                                          method="gausslegendre", n_steps=256)
    return torch.stack([a.sum(-1) for a in attributions])  # (n, units)


@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_ig_closed_form_against_riemann_and_captum(name):
    act = ACT2FN[name]
    torch.manual_seed(0)
    n, units = 5, 6
    summands = torch.randn(n, 2 * units, dtype=torch.float64) * 2  # [a | u] per summand
    summands[:, 0] *= 30  # one gate far beyond the tails' cut-off

    def gated(total):
        return act(total[..., :units]) * total[..., units:]

    a, u = summands[:, :units].sum(0), summands[:, units:].sum(0)
    for exact in (True, False):
        coef_a, coef_u = ctx.gated_ig_coefficients(act, a, u, exact=exact)
        shares = summands[:, :units] * coef_a + summands[:, units:] * coef_u
        torch.testing.assert_close(shares.sum(0), gated(summands.sum(0)), rtol=1e-10, atol=1e-10)
        riemann = ctx.ig_shares_by_riemann(gated, summands)
        riemann = riemann[:, :units] + riemann[:, units:]
        torch.testing.assert_close(shares, riemann, rtol=1e-5, atol=1e-5 * float(riemann.abs().max()))
    captum = _captum_shares(lambda total: act(total[:, 0]) * total[:, 1], summands, width=2)
    torch.testing.assert_close(shares, captum, rtol=1e-5, atol=1e-5 * float(captum.abs().max()))


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_new", "silu"])
def test_elementwise_ig_closed_form_against_riemann_and_captum(name):
    act = ACT2FN[name]
    torch.manual_seed(1)
    summands = torch.randn(4, 7, dtype=torch.float64)

    def plain(total):
        return act(total)

    p = summands.sum(0)
    shares = summands * ctx.elementwise_ig_ratio(act(p), p)
    torch.testing.assert_close(shares.sum(0), act(p))
    riemann = ctx.ig_shares_by_riemann(plain, summands)
    torch.testing.assert_close(shares, riemann, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(shares, _captum_shares(lambda total: act(total[:, 0]), summands, width=1),
                               rtol=1e-4, atol=1e-6)


def test_path_average_and_its_table_against_a_fine_riemann_sum():
    act = ACT2FN["silu"]
    a = torch.tensor([-60.0, -20.5, -3.0, -1e-6, 0.0, 0.4, 7.0, 19.99, 20.01, 45.0], dtype=torch.float64)
    alphas = (torch.arange(400000, dtype=torch.float64) + 0.5) / 400000
    brute = torch.stack([act(alphas * value).mean() for value in a])
    torch.testing.assert_close(ctx.path_average(act, a), brute, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(ctx.path_average_table(act, a), brute, rtol=1e-6, atol=1e-7)
    with pytest.raises(ffnlib_unsupported()):
        ctx.check_activation(torch.nn.Tanh())


def ffnlib_unsupported():
    from ffnlib import UnsupportedModelError

    return UnsupportedModelError


# ---- 4. norms ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["layernorm", "olmo", "llama", "gemma"])
def test_norm_split_with_the_statistic_of_the_whole_sum_is_exact(kind):
    torch.manual_seed(2)
    d = 16
    if kind == "layernorm":
        module, plus_one = torch.nn.LayerNorm(d), False
        with torch.no_grad():
            module.weight.normal_(), module.bias.normal_()
    elif kind == "olmo":
        from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

        module, plus_one = OlmoLayerNorm(d), False
    elif kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        module, plus_one = LlamaRMSNorm(d), False
        with torch.no_grad():
            module.weight.normal_()
    else:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

        module, plus_one = GemmaRMSNorm(d), True
        with torch.no_grad():
            module.weight.normal_()
    parts, bias = torch.randn(5, d), torch.randn(d)
    whole = parts.sum(0) + bias
    split = ctx.NormSplit.of(module, plus_one)
    scale = split.statistic(whole)
    rebuilt = (split.linear(parts) / scale).sum(0) + split.linear(bias) / scale + split.constant(whole)
    torch.testing.assert_close(rebuilt, module(whole), rtol=1e-5, atol=1e-5)
    with pytest.raises(ffnlib_unsupported(), match="Cannot split"):
        ctx.NormSplit.of(torch.nn.BatchNorm1d(d))
