"""MoEfication (notebook 07): ``ffnlib.related.moefication``.

Tiny random Llama and Gemma 3 models with a word-level tokenizer for the machinery (splits, hooks, routers,
evaluation, caching and resuming); constructed inputs for the pure pieces (balanced assignment, the authors'
graph threshold and equalising, the routers' choice, the verdict rules); the real SmolLM2 once, for the
expert-sparse forward against the masked dense FFN.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ffnlib import FFNLibError, ParameterError  # noqa: E402
from ffnlib import evaluate as heldout_evaluation  # noqa: E402
from ffnlib.adapters import get_adapter  # noqa: E402
from ffnlib.capture import capture  # noqa: E402
from ffnlib.models import LoadedModel  # noqa: E402
from ffnlib.findings import findings_rows  # noqa: E402
from ffnlib.related import moefication as moe  # noqa: E402

VOCAB, D_MODEL, D_FF, EXPERT = 48, 16, 32, 4  # 8 experts of 4 memories


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>",
                                      eos_token="</s>", pad_token="</s>")


def _tiny(kind: str = "llama", seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
        bos = []
    elif kind == "gpt2":  # a plain FFN with biases: act(k·x + b)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_inner=D_FF, n_layer=3, n_head=2,
                                                 n_positions=128, bos_token_id=1, eos_token_id=2))
        bos = []
    else:
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=4))
        bos = [1]
    model = model.eval().requires_grad_(False)
    with torch.no_grad():  # a random init is nearly flat; widen it so that routing choices matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.4)
    return LoadedModel(f"tiny-{kind}", model, _tokenizer(), get_adapter(model), "random init", f"tiny-{kind}-{seed}",
                       False, bos)


def _sentences(n: int, seed: int, start: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    texts = [" ".join(f"w{w}" for w in rng.integers(3, VOCAB, size=rng.integers(5, 14))) for _ in range(n)]
    topics = rng.choice(["A", "B", "C"], size=n)
    return pd.DataFrame({"sentence_id": np.arange(start, start + n), "text": texts, "title": "t", "topic": topics,
                         "heldout": False})


@pytest.fixture(scope="module")
def llama():
    torch.set_num_threads(1)
    return _tiny("llama")


@pytest.fixture(scope="module")
def prepared(llama, tmp_path_factory):
    """Splits, thresholds and routers of the tiny Llama, cached in a module folder."""
    out = tmp_path_factory.mktemp("moe")
    train = _sentences(40, seed=1)
    splits = moe.make_splits(llama, train, expert_size=EXPERT, kmeans_iter=3, out_dir=out, progress=False,
                             random_splits=2)
    thresholds = moe.calibrate_thresholds(llama, train, None, [0.25, 0.5, 1.0], out_dir=out, progress=False)
    routers = moe.train_routers(llama, train, splits, epochs=3, out_dir=out, progress=False)
    return SimpleNamespace(out=out, train=train, splits=splits, thresholds=thresholds, routers=routers,
                           plan=moe.Plan(llama, splits, routers, thresholds))


def _close(out: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to float32 rounding: within 1e-5 of max(1, the largest |output|) (another order of summation)."""
    return bool((out - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item()))


def _n_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---- experts --------------------------------------------------------------------------------------------
def test_every_split_partitions_the_memories_exactly_into_equal_experts(prepared):
    splits = prepared.splits
    assert splits.splits == ["random", "random.1", "kmeans", "coactivation"] and splits.layers == [0, 1, 2]
    for split in splits.splits:
        for layer in splits.layers:
            labels = splits.labels(split, layer)
            assert sorted(np.bincount(labels, minlength=splits.n_experts)) == [EXPERT] * (D_FF // EXPERT)
            assert len(labels) == D_FF and labels.min() == 0 and labels.max() == D_FF // EXPERT - 1
    # the splits are not all the same partition
    assert not np.array_equal(splits.labels("random", 0), splits.labels("kmeans", 0))
    with pytest.raises(FFNLibError, match="Not a partition into 2 experts of 2"):
        moe.check_partition([0, 0, 0, 1], 2, 2)


def test_balanced_kmeans_recovers_planted_equal_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 12)) * 5
    truth = rng.permutation(np.repeat(np.arange(6), 5))
    points = centres[truth] + rng.normal(scale=0.05, size=(30, 12))
    labels = moe.balanced_kmeans(points, 6, seed=0, max_iter=5)
    # the same partition up to renaming
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 6 and np.bincount(labels).tolist() == [5] * 6


@pytest.mark.parametrize("rows", ["gate", "up", "both"])
def test_key_features_are_the_chosen_unit_rows(llama, rows):
    feats = moe.key_features(llama.adapter, 0, rows)
    assert feats.shape == (D_FF, D_MODEL * (2 if rows == "both" else 1))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    gate = torch.nn.functional.normalize(llama.adapter.gates(0), dim=-1).numpy()
    np.testing.assert_allclose(feats[:, :D_MODEL] * (np.sqrt(2) if rows == "both" else 1),
                               gate if rows != "up" else torch.nn.functional.normalize(llama.adapter.keys(0),
                                                                                        dim=-1).numpy(), rtol=1e-5)


def test_balanced_assignment_is_the_cheapest_equal_size_assignment():
    from itertools import permutations

    rng = np.random.default_rng(1)
    points, centroids = rng.normal(size=(6, 3)), rng.normal(size=(3, 3))
    labels = moe.balanced_assignment(points, centroids, 2)
    cost = lambda lab: float(((points - centroids[lab]) ** 2).sum())  # noqa: E731
    best = min(cost(np.array(p)) for p in set(permutations([0, 0, 1, 1, 2, 2])))
    assert np.bincount(labels).tolist() == [2, 2, 2] and cost(labels) == pytest.approx(best)


def test_the_graph_uses_the_authors_percentile_unit():
    counts = np.zeros((10, 10))
    counts[0, 1] = counts[1, 0] = 30
    counts[2, 3] = counts[3, 2] = 3
    # 96% of the entries are zero: the 10..90th percentiles are 0; the 100th (30) is the unit
    graph = moe.coactivation_graph(counts).toarray()
    assert graph[0, 1] == graph[1, 0] == 1 and graph[2, 3] == 0 and np.trace(graph) == 0
    with pytest.raises(ParameterError, match="all zero"):
        moe.coactivation_graph(np.zeros((4, 4)))


def test_equalising_keeps_the_members_of_parts_that_were_not_too_big():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 2 + [3] * 4)
    out = moe.equalise(labels, 4, seed=0)
    assert np.bincount(out).tolist() == [4, 4, 4, 4]
    assert (out[labels == 3] == 3).all()  # the right size already: untouched
    assert (out[labels == 1] == 1).all() and (out[labels == 2] == 2).all()  # only filled up
    assert (out[labels == 0] == 0).sum() == 4  # kept a random 4 of its 7


def test_metis_split_gives_equal_experts_that_follow_the_graph():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 8)
    counts = (groups[:, None] == groups[None, :]) * 50.0 + rng.integers(0, 3, size=(32, 32))
    counts = (counts + counts.T) / 2
    labels, info = moe.metis_split(counts, 4, seed=0)
    assert np.bincount(labels).tolist() == [8] * 4 and info["edges"] > 0
    assert len(set(zip(groups.tolist(), labels.tolist()))) == 4  # the planted communities


# ---- keeping everything changes nothing -----------------------------------------------------------------
def test_keeping_every_expert_reproduces_the_dense_model_bit_for_bit(llama, prepared):
    ids = torch.tensor([llama.encode("w5 w9 w11 w3 w20 w7 w40 w12")])
    with torch.inference_mode():
        dense = llama.model(ids).logits
        configs = [moe.Config("experts", s, r, 1.0) for s in prepared.splits.splits for r in moe.ROUTERS]
        configs += [moe.Config("cats", share=1.0), moe.Config("teal", share=1.0)]
        before = _n_hooks(llama.model)
        for config in configs:
            with prepared.plan.applied(config):
                assert _n_hooks(llama.model) > before  # the hooks run; they must change nothing
                assert torch.equal(llama.model(ids).logits, dense), config.name
        assert _n_hooks(llama.model) == before
        with prepared.plan.applied(moe.Config("experts", "kmeans", "ground_truth", 0.25)):
            assert not torch.equal(llama.model(ids).logits, dense)


def test_hooks_are_removed_on_error(llama, prepared):
    before = _n_hooks(llama.model)
    with pytest.raises(RuntimeError, match="boom"):
        with prepared.plan.applied(moe.Config("teal", share=0.5)):
            raise RuntimeError("boom")
    assert _n_hooks(llama.model) == before


# ---- routers ----------------------------------------------------------------------------------------------
def test_ground_truth_router_is_never_worse_than_random_on_a_constructed_case():
    """On coefficients with known expert sizes the ground truth keeps, for every token and every number of
    experts kept, at least the size a random choice keeps (it keeps the k largest)."""
    gen = torch.Generator().manual_seed(0)
    n_experts, size, tokens = 8, 4, 200
    labels = moe.random_split(n_experts * size, size, seed=3)
    norms = torch.rand(n_experts * size, generator=gen) + 0.5
    m = torch.randn(tokens, n_experts * size, generator=gen) * torch.rand(tokens, 1, generator=gen) * 3
    sizes = moe.memory_sizes(m, norms)
    for k in range(1, n_experts + 1):
        gt = moe.ExpertRule(labels, n_experts, k, "ground_truth", norms).mask(None, m, None)
        rnd = moe.ExpertRule(labels, n_experts, k, "random", norms, generator=gen).mask(None, m, None)
        kept_gt, kept_rnd = (sizes * gt).sum(-1), (sizes * rnd).sum(-1)
        assert (kept_gt >= kept_rnd - 1e-5).all(), k
        assert gt.sum(-1).eq(k * size).all() and rnd.sum(-1).eq(k * size).all()
    assert (kept_gt == sizes.sum(-1)).all()  # k = E keeps everything


def test_ground_truth_keeps_more_of_the_first_layer_than_random_experts(llama, prepared):
    """In a real forward pass the first sparsified layer sees the same inputs under every router."""
    evaluation = moe.evaluate(prepared.plan, _sentences(6, seed=9, start=1000),
                              [moe.Config("experts", "random", r, 0.25) for r in ("ground_truth", "random")],
                              progress=False)
    first = evaluation.layers[evaluation.layers["layer"] == 0].set_index("router")
    assert first.loc["ground_truth", "size_kept"] >= first.loc["random", "size_kept"]
    assert first.loc["random", "kept_memories"] == pytest.approx(0.25)


def test_mlp_routers_are_trained_per_split_and_layer_and_reload_exactly(llama, prepared):
    frame = prepared.routers.frame
    assert len(frame) == 12 and (frame["val_mass"] <= frame["val_mass_ground_truth"] + 1e-6).all()
    router = prepared.routers.router("kmeans", 1)
    x = torch.randn(5, D_MODEL)
    row = frame[(frame["split"] == "kmeans") & (frame["layer"] == 1)].iloc[0]
    first = torch.as_tensor(np.asarray(row["first"], dtype=np.float32)).view(-1, D_MODEL)
    second = torch.as_tensor(np.asarray(row["second"], dtype=np.float32)).view(first.shape[0], -1)
    torch.testing.assert_close(router(x), torch.tanh(x @ first.T) @ second.T)


def test_centroid_similarity_is_the_negative_squared_distance(llama, prepared):
    labels = prepared.splits.labels("kmeans", 2)
    for rows in ("gate", "both"):
        w, c2 = moe.centroid_keys(llama.adapter, 2, labels, D_FF // EXPERT, rows)
        features = torch.as_tensor(moe.key_features(llama.adapter, 2, rows))
        centres = moe.membership(labels, D_FF // EXPERT).T @ features / EXPERT
        x = torch.nn.functional.normalize(torch.randn(4, D_MODEL), dim=-1)
        xf = x if rows == "gate" else torch.cat([x, x], -1) / np.sqrt(2)
        torch.testing.assert_close(2 * x @ w.T - c2 - 1, -torch.cdist(xf, centres) ** 2, atol=1e-5, rtol=1e-5)


# ---- the expert-sparse forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_sparse_forward_equals_the_masked_dense_ffn(kind):
    loaded = _tiny(kind, seed=2)
    adapter = loaded.adapter
    ids = torch.tensor([loaded.encode("w4 w8 w15 w16 w23 w42 w5 w6")])
    with torch.inference_mode(), capture(loaded, None, what=("ffn_input", "coefficients")) as acts:
        loaded.model(ids)
    for layer in range(adapter.n_layers):
        x = acts.ffn_input[layer][0]
        # our reading of the FFN is the model's own
        torch.testing.assert_close(moe.ffn_coefficients(adapter, layer, x), acts.coefficients[layer][0])
        labels = moe.random_split(D_FF, EXPERT, seed=layer)
        ffn = moe.ExpertFFN.from_layer(adapter, layer, labels)
        chosen = moe.route_random(x.shape[0], ffn.n_experts, 2, seed=layer)
        mask = ffn.memory_mask(chosen)
        assert mask.sum(-1).eq(2 * EXPERT).all()
        reference = moe.dense_ffn(adapter, layer, x, mask)
        assert _close(ffn.forward(x, chosen), reference)
        for t in range(x.shape[0]):
            assert _close(ffn.forward(x[t:t + 1], chosen[t:t + 1]), reference[t:t + 1])
        everything = torch.arange(ffn.n_experts).expand(x.shape[0], -1)
        assert _close(ffn.forward(x, everything), adapter.down(layer)(acts.coefficients[layer][0]))
        assert _close(ffn.forward(x[:1], everything[:1]), adapter.down(layer)(acts.coefficients[layer][0][:1]))


def test_sparse_forward_on_smollm2_equals_the_masked_dense_ffn(smollm):
    adapter = smollm.adapter
    x = torch.randn(6, adapter.d_model, generator=torch.Generator().manual_seed(0))
    labels = moe.random_split(adapter.d_ff, 32, seed=0)
    ffn = moe.ExpertFFN.from_layer(adapter, 5, labels)
    chosen = moe.route_random(6, ffn.n_experts, moe.experts_kept(0.25, ffn.n_experts), seed=1)
    reference = moe.dense_ffn(adapter, 5, x, ffn.memory_mask(chosen))
    assert reference.abs().max() > 10  # large outputs: the tolerance is relative to them
    assert _close(ffn.forward(x, chosen), reference)
    assert _close(ffn.forward(x[:1], chosen[:1]), reference[:1])
    assert not _close(ffn.forward(x, chosen.roll(1, dims=1).roll(1, dims=0)), reference)  # other experts differ


# ---- bad input --------------------------------------------------------------------------------------------------
def test_an_expert_size_that_does_not_divide_d_ff_is_a_clear_error(llama):
    with pytest.raises(ParameterError, match=r"expert_size=5 does not divide this model's 32 memories.*e\.g\."):
        moe.make_splits(llama, None, splits=("random",), expert_size=5, progress=False)
    for bad in (0, -4, 2.5, True, D_FF):
        with pytest.raises(ParameterError, match="expert_size"):
            moe.check_expert_size(D_FF, bad)
    assert moe.check_expert_size(1536, 32) == 48 and moe.check_expert_size(2048, 32) == 64
    # the default: the authors' 32 where it divides, else the nearest divisor (a model of any width runs)
    assert moe.default_expert_size(1536) == 32 and moe.default_expert_size(2048) == 32
    assert moe.default_expert_size(88) == 22 and moe.default_expert_size(32) == 16
    assert moe.check_expert_size(88, moe.default_expert_size(88)) == 4


@pytest.mark.parametrize("share", [0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_a_share_outside_zero_one_is_a_clear_error(share):
    with pytest.raises(ParameterError, match=r"share"):
        moe.check_share(share)
    with pytest.raises(ParameterError, match=r"share"):
        moe.Config("experts", "kmeans", "mlp", share)


def test_a_share_that_keeps_no_expert_and_unknown_names_are_clear_errors(llama, prepared):
    with pytest.raises(ParameterError, match="keeps no expert"):
        moe.experts_kept(0.01, 48)
    assert moe.experts_kept(0.25, 48) == 12 and moe.experts_kept(1.0, 48) == 48
    with pytest.raises(ParameterError, match="split must be one of"):
        moe.Config("experts", "spectral", "mlp", 0.5)
    with pytest.raises(ParameterError, match="router must be one of"):
        moe.Config("experts", "kmeans", "oracle", 0.5)
    with pytest.raises(ParameterError, match="cluster_rows"):
        moe.make_splits(llama, None, splits=("kmeans",), expert_size=EXPERT, cluster_rows="down", progress=False)
    with pytest.raises(ParameterError, match="needs training sentences"):
        moe.make_splits(llama, None, splits=("coactivation",), expert_size=EXPERT, progress=False)
    with pytest.raises(ParameterError, match="No cats threshold .* keep=0.3"):
        prepared.plan.rules(moe.Config("cats", share=0.3))


# ---- caching and resuming ---------------------------------------------------------------------------------------
def test_cached_splits_thresholds_and_routers_are_reused(llama, prepared, capsys):
    again = moe.make_splits(llama, prepared.train, expert_size=EXPERT, kmeans_iter=3, out_dir=prepared.out,
                            random_splits=2)
    thresholds = moe.calibrate_thresholds(llama, prepared.train, None, [0.25, 0.5, 1.0], out_dir=prepared.out)
    routers = moe.train_routers(llama, prepared.train, again, epochs=3, out_dir=prepared.out)
    text = capsys.readouterr().out
    assert text.count("Reusing the cached") == 3
    pd.testing.assert_frame_equal(again.frame, prepared.splits.frame)
    pd.testing.assert_frame_equal(thresholds, prepared.thresholds)
    pd.testing.assert_frame_equal(routers.frame, prepared.routers.frame)


def test_splits_and_routers_resume_after_an_interruption(llama, prepared, tmp_path, monkeypatch):
    real_kmeans, calls = moe.balanced_kmeans, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_kmeans(*args, **kwargs)

    splits_module = sys.modules[moe.make_splits.__module__]  # where make_splits finds balanced_kmeans
    monkeypatch.setattr(splits_module, "balanced_kmeans", flaky)
    with pytest.raises(KeyboardInterrupt):
        moe.make_splits(llama, prepared.train, expert_size=EXPERT, kmeans_iter=3, out_dir=tmp_path, progress=False,
                        random_splits=2)
    assert list(tmp_path.glob("moe-splits-*.partial/kmeans-000.parquet"))
    monkeypatch.setattr(splits_module, "balanced_kmeans", real_kmeans)
    resumed = moe.make_splits(llama, prepared.train, expert_size=EXPERT, kmeans_iter=3, out_dir=tmp_path,
                              progress=False, random_splits=2)
    pd.testing.assert_frame_equal(resumed.frame, prepared.splits.frame)
    assert not list(tmp_path.glob("*.partial"))

    real_train, calls["n"] = moe.train_router, 0

    def flaky_train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the second split
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    routers_module = sys.modules[moe.train_routers.__module__]  # where train_routers finds train_router
    monkeypatch.setattr(routers_module, "train_router", flaky_train)
    with pytest.raises(KeyboardInterrupt):
        moe.train_routers(llama, prepared.train, resumed, epochs=3, out_dir=tmp_path, progress=False)
    monkeypatch.setattr(routers_module, "train_router", real_train)
    routers = moe.train_routers(llama, prepared.train, resumed, epochs=3, out_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(routers.frame, prepared.routers.frame)


def test_evaluation_resumes_after_an_interruption_with_identical_results(llama, prepared, tmp_path, monkeypatch):
    heldout = _sentences(8, seed=5, start=500)
    configs = moe.default_configs([0.25, 0.5], splits=prepared.splits.splits)  # both random splits
    full = moe.evaluate(prepared.plan, heldout, configs, out_dir=None, progress=False)
    real, calls = heldout_evaluation.next_token_predictions, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    # moe.evaluate reads each batch's predictions through ffnlib.evaluate (the library's one held-out evaluation)
    monkeypatch.setattr(heldout_evaluation, "next_token_predictions", flaky)
    with pytest.raises(KeyboardInterrupt):
        moe.evaluate(prepared.plan, heldout, configs, out_dir=tmp_path, progress=False)
    monkeypatch.setattr(heldout_evaluation, "next_token_predictions", real)
    resumed = moe.evaluate(prepared.plan, heldout, configs, out_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(resumed.sentences, full.sentences)
    pd.testing.assert_frame_equal(resumed.layers, full.layers)
    pd.testing.assert_frame_equal(resumed.sparsity, full.sparsity)
    pd.testing.assert_frame_equal(resumed.picks, full.picks)
    # the trained router's picks: every token picks exactly experts_kept experts, and an expert's memories share it
    picks = moe.router_picks(full, prepared.splits)
    assert set(picks["split"]) == {s for s in prepared.splits.splits} and (picks["picked_rate"].between(0, 1)).all()
    totals = picks.groupby(["split", "share", "layer"]).agg(total=("picked_rate", "sum"), k=("experts_kept", "first"))
    np.testing.assert_allclose(totals["total"], totals["k"], rtol=1e-9)
    per_expert = full.picks.merge(prepared.splits.frame.astype({"layer": np.int16}), on=["split", "layer", "memory"])
    assert (per_expert.groupby(["config", "layer", "expert"])["kept_rate"].nunique() == 1).all()
    assert (picks["uniform_rate"] == picks["experts_kept"] / picks["n_experts"]).all()
    dense = full.sentences[full.sentences["config"] == "dense"]
    assert (dense["agree"] == dense["tokens"]).all()
    quality = moe.quality_table(prepared.plan, full, n_boot=100)
    assert quality.loc[quality["method"] == "dense", "perplexity_ratio"].iloc[0] == 1.0
    experts = quality[quality["method"] == "experts"]
    assert np.allclose(experts["ffn_share"], experts["share"])  # 8 experts: 0.25 and 0.5 are exact
    assert (quality["agreement_low"] <= quality["agreement"]).all()
    assert (quality["agreement"] <= quality["agreement_high"]).all()
    pooled = quality[quality["split"] == "random"]  # random experts: one row per router and share, both draws
    assert len(pooled) == 8 and (pooled["draws"] == 2).all() and not quality["split"].eq("random.1").any()
    each = moe.random_draws_table(full).groupby(["router", "share"])["perplexity"].mean()
    for _, row in pooled.iterrows():
        assert row["perplexity"] == pytest.approx(each[(row["router"], row["share"])])  # the mean over the draws
    sparsity = moe.sparsity_table(full, 3, n_boot=100)
    for a, b in zip(moe.SPARSITY_TOPS, moe.SPARSITY_TOPS[1:]):
        assert (sparsity[f"top_{a:g}"] <= sparsity[f"top_{b:g}"] + 1e-9).all()
    assert (sparsity["top_0.5"] >= 0.5 - 1e-6).all()  # the top half of memories carries at least half the mass
    ours, _ = moe.measures(quality, full, None, n_boot=100)
    pooled = full.sparsity["concentrated"].sum() / full.sparsity["tokens"].sum()
    assert ours["sparse_activation"].value == pytest.approx(pooled)  # pooled over sentences and layers
    assert ours["sparse_activation"].low <= pooled <= ours["sparse_activation"].high


# ---- the key-value view and the verdicts ------------------------------------------------------------------------
def test_expert_coherence_sees_planted_groups():
    n_experts, size, layer = 4, 5, 0
    labels = np.repeat(np.arange(n_experts), size)
    splits = moe.ExpertSplits(pd.concat([moe.labels_frame("random", layer, moe.random_split(20, size, seed=0)),
                                         moe.labels_frame("random.1", layer, moe.random_split(20, size, seed=1)),
                                         moe.labels_frame("kmeans", layer, labels)]), size, n_experts, {})
    # the memories of planted expert e trigger on topic e, and their values share token 100 + e
    rows, tokens = [], []
    for memory in range(20):
        e = memory // size
        for rank in range(6):
            rows.append({"layer": layer, "memory": memory, "sign": 1, "rank": rank, "sentence_id": e * 10 + rank})
        tokens += [{"layer": layer, "memory": memory, "sign": 1, "rank": r, "token": (100 + e) if r == 0 else
                    1000 + memory * 10 + r} for r in range(10)]
    sentences = pd.DataFrame({"sentence_id": np.arange(40), "topic": [f"T{i // 10}" for i in range(40)]})
    examples = SimpleNamespace(triggers=pd.DataFrame(rows), sentences=sentences)
    projection = SimpleNamespace(tokens=pd.DataFrame(tokens))
    coherence = moe.expert_coherence(splits, examples, projection, n_boot=100).set_index(["view", "split"])
    assert coherence.loc[("trigger_topic", "kmeans"), "share"] == 1.0
    assert coherence.loc[("value_tokens", "kmeans"), "share"] == 1.0
    assert coherence.loc[("trigger_topic", "random"), "share"] < 0.5
    assert coherence.loc[("trigger_topic", "random"), "draws"] == 2  # one row: the mean of both random splits
    ours, _ = moe.measures(pd.DataFrame(columns=["method", "share"]), None, coherence.reset_index())
    verdicts = {r["key"].split(".")[1]: r["verdict"] for r in findings_rows("07_moefication", ours, None)}
    assert verdicts["trigger_topics_kmeans"] == verdicts["value_tokens_kmeans"] == "holds"
    assert verdicts["trigger_topics_coactivation"] == "not measured"  # no co-activation split here
    assert verdicts["keep_95"] == "not measured"


def _quality_row(method, share, split, router, agreement, low, high, ratio=1.0):
    config = moe.Config(method, split, router, share).name
    return {"config": config, "method": method, "share": share, "split": split, "router": router,
            "agreement": agreement, "agreement_low": low, "agreement_high": high, "perplexity_ratio": ratio,
            "perplexity_ratio_low": ratio, "perplexity_ratio_high": ratio, "ffn_share": share}


def _evaluation(agree: dict[str, np.ndarray], concentrated: float) -> moe.Evaluation:
    """Held-out sentences of 10 tokens: per configuration, the tokens agreeing with the dense model."""
    n = len(next(iter(agree.values())))
    rows = [{"config": c, "sentence_id": i, "tokens": 10, "nll": 1.0, "agree": float(a)}
            for c, values in {"dense": np.full(n, 10), **agree}.items() for i, a in enumerate(values)]
    sparsity = pd.DataFrame({"sentence_id": np.arange(n), "layer": 0, "tokens": 10,
                             "concentrated": concentrated * 10, "top_0.03": 5.0})
    return moe.Evaluation(pd.DataFrame(rows), pd.DataFrame(), sparsity, {})


def test_verdicts_follow_the_stated_rules():
    rows = [_quality_row("experts", 0.2, "kmeans", "mlp", 0.95, 0.94, 0.96),
            _quality_row("experts", 0.2, "random", "mlp", 0.80, 0.78, 0.82),
            _quality_row("experts", 0.2, "coactivation", "mlp", 0.805, 0.79, 0.83),
            _quality_row("experts", 0.2, "coactivation", "similarity", 0.70, 0.69, 0.71),
            _quality_row("experts", 0.5, "random", "random", 0.3, 0.28, 0.32, ratio=20.0),
            _quality_row("cats", 0.5, "", "", 0.9, 0.88, 0.92, ratio=1.03),
            _quality_row("teal", 0.5, "", "", 0.9, 0.88, 0.92, ratio=1.5)]
    quality = pd.DataFrame(rows)
    quality.attrs["sentences"] = 40
    random_mlp = np.full(40, 7)
    coactivation_mlp = random_mlp + np.tile([1, -1], 20)  # no better than random experts, paired
    similarity = coactivation_mlp - (np.arange(40) % 5 == 0)  # 2 points below the MLP router: significant, small
    evaluation = _evaluation({"experts-kmeans-mlp-0.2": np.full(40, 9), "experts-random-mlp-0.2": random_mlp,
                              "experts-coactivation-mlp-0.2": coactivation_mlp,
                              "experts-coactivation-similarity-0.2": similarity}, concentrated=0.3)
    ours, details = moe.measures(quality, evaluation, n_boot=500)
    assert ours["kmeans_beats_random"].value == pytest.approx(0.2)  # paired: every sentence gains 2 of 10 tokens
    assert ours["mlp_beats_similarity"].value == pytest.approx(0.02)
    verdicts = {r["key"].split(".")[1]: r["verdict"] for r in findings_rows("07_moefication", ours, None, details)}
    assert verdicts["kmeans_beats_random"] == "holds"  # +20 points, at least half the paper's +3.4
    assert verdicts["coactivation_beats_random"] == "does not hold"  # the paired interval straddles 0
    assert verdicts["mlp_beats_similarity"] == "partly"  # significant, below half the paper's +7.4 points
    assert verdicts["keep_95"] == "holds"  # k-means + MLP at 20%: [94%, 96%] >= 90%, above random experts
    assert verdicts["cats"] == "holds"  # +3% perplexity <= +4%, below random memories' x20
    assert verdicts["teal"] == "partly"  # +50% > twice TEAL's +13.6%, but far below random memories
    assert verdicts["sparse_activation"] == "partly"  # 30% of the pairs concentrated: above 0, below half of 80%
    assert ours["cats"].value == pytest.approx(0.03) and ours["cats/baseline"].value == pytest.approx(19.0)


# ---- random experts: several random splits ----------------------------------------------------------------------
def test_make_splits_draws_the_requested_number_of_distinct_random_splits(llama, tmp_path):
    splits = moe.make_splits(llama, None, splits=("random",), expert_size=EXPERT, random_splits=5, seed=3,
                             out_dir=tmp_path, progress=False)
    assert splits.random_splits == ["random", "random.1", "random.2", "random.3", "random.4"]
    for layer in splits.layers:
        labels = [splits.labels(s, layer) for s in splits.random_splits]
        assert len({tuple(x) for x in labels}) == 5  # five different partitions
        # draw 0 is the split the project always used: seed + 7919 * layer
        assert np.array_equal(labels[0], moe.random_split(D_FF, EXPERT, 3 + 7919 * layer))
    seeds = splits.info.set_index(["split", "layer"])["seed"]
    assert seeds.is_unique and seeds[("random.2", 1)] == moe.random_split_seed(3, 1, 2)
    configs = moe.default_configs([0.25], splits=splits.splits, routers=("ground_truth",))
    assert [c.name for c in configs if c.method == "experts"] == [
        f"experts-{s}-{r}-0.25" for r in ("ground_truth", "random") for s in splits.random_splits]
    plan = moe.Plan(llama, splits)
    keys = {tuple(plan.split_seeds(c)) for c in configs if c.method == "experts" and c.router == "ground_truth"}
    assert len(keys) == 5  # the evaluation cache's key holds each draw's seeds
    assert plan.split_seeds(moe.Config("teal", share=0.25)) is None
    # another number of draws is another cached result, with the first draws unchanged
    three = moe.make_splits(llama, None, splits=("random",), expert_size=EXPERT, random_splits=3, seed=3,
                            out_dir=tmp_path, progress=False)
    assert three.manifest != splits.manifest and three.random_splits == splits.random_splits[:3]
    pd.testing.assert_frame_equal(three.frame, splits.frame[splits.frame["split"].isin(three.random_splits)]
                                  .reset_index(drop=True))
    with pytest.raises(ParameterError, match="random_splits must be a positive int"):
        moe.make_splits(llama, None, splits=("random",), expert_size=EXPERT, random_splits=0, progress=False)
    with pytest.raises(ParameterError, match="split must be one of"):
        moe.Config("experts", "random.0", "mlp", 0.5)
    assert moe.split_kind("random.7") == "random" and moe.split_draw("random.7") == 7 and moe.split_draw("kmeans") == 0


def _draws_evaluation(offsets: Sequence[float], n: int = 40) -> moe.Evaluation:
    """40 held-out sentences of 10 tokens: the dense model, k-means experts and 5 random splits (MLP router,
    20%), each split's summed loss per sentence shifted by its offset; agreement likewise."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1.0, n)
    base = {"dense": (20 + noise, np.full(n, 10.0)), "experts-kmeans-mlp-0.2": (40 + noise, np.full(n, 8.0))}
    for d, offset in enumerate(offsets):
        name = moe.Config("experts", moe.random_split_names(len(offsets))[d], "mlp", 0.2).name
        base[name] = (45 + offset + noise + rng.normal(0, 0.5, n), np.clip(5 - offset / 2 + rng.normal(0, 1, n), 0, 10))
    rows = [{"config": c, "sentence_id": i, "tokens": 10, "nll": float(nll[i]), "agree": float(agree[i])}
            for c, (nll, agree) in base.items() for i in range(n)]
    configs = [moe.Config("dense"), moe.Config("experts", "kmeans", "mlp", 0.2)] + [
        moe.Config("experts", s, "mlp", 0.2) for s in moe.random_split_names(len(offsets))]
    layers = pd.DataFrame([{"config": c.name, "layer": 0, "tokens": 10 * n, "kept_memories": 0.2, "kept_inputs": 1.0,
                            "size_kept": 0.3} for c in configs])
    return moe.Evaluation(pd.DataFrame(rows), layers, pd.DataFrame(), {}, configs)


def test_the_random_experts_interval_widens_when_the_random_splits_differ():
    """Five random splits with the same mean loss per sentence against five whose means differ (the mean over
    splits kept): random experts' interval, and that of the gap k-means minus random, is wider when they differ,
    and reaches the splits next to the middle one, where an interval over one split's sentences would not."""
    plan = SimpleNamespace(ffn_share=lambda config, kept, inputs: config.share)
    out = {}
    for case, offsets in (("same", [0.0] * 5), ("differ", [-6.0, -3.0, 0.0, 3.0, 6.0])):
        evaluation = _draws_evaluation(offsets)
        quality = moe.quality_table(plan, evaluation, n_boot=400)
        row = quality[quality["split"] == "random"].iloc[0]
        draws = moe.random_draws_table(evaluation)
        assert row["draws"] == 5 and row["config"] == "experts-random-mlp-0.2" and len(quality) == 3
        assert row["perplexity"] == pytest.approx(draws["perplexity"].mean())  # the mean over the splits
        assert row["agreement"] == pytest.approx(draws["agreement"].mean())
        ours, details = moe.measures(quality, evaluation, n_boot=400)
        gap = ours["kmeans_beats_random"]
        assert gap.unit == "sentences x 5 random splits" and "mean of 5 random splits" in details["kmeans_beats_random"]
        assert gap.value == pytest.approx(0.8 - draws["agreement"].mean())
        out[case] = row, gap, draws
    (same, gap_same, _), (differ, gap_differ, draws) = out["same"], out["differ"]
    width = lambda r, c: r[f"{c}_high"] - r[f"{c}_low"]  # noqa: E731
    assert width(differ, "perplexity") > 3 * width(same, "perplexity")
    assert width(differ, "agreement") > 2 * width(same, "agreement")
    assert gap_differ.high - gap_differ.low > 2 * (gap_same.high - gap_same.low)
    # the interval over splits and sentences reaches the middle splits, which one split's interval cannot
    assert differ["perplexity_low"] <= draws["perplexity"].iloc[1] and draws["perplexity"].iloc[3] <= \
        differ["perplexity_high"]
