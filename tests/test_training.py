"""Small LMs trained here (ffnlib.training): every FFN variant round-trips through save_pretrained /
load_model with identical logits and is read by the adapters; an interrupted training resumes to identical
weights; the data order and the tokenizer are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffnlib.errors import ParameterError
from ffnlib.ffn_variants import apply_ffn_variant
from ffnlib.models import load_model
from ffnlib import training as tr

TINY = dict(slots=48, d_model=32, n_layers=2, n_heads=2, context=64, vocab_size=400, batch=4, max_sentences=300,
            heldout_sentences=40)
TEXT = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tr.cached_tokenizer(tr.TrainSpec(**TINY), tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("variant", tr.VARIANTS)
def test_every_variant_round_trips_with_identical_logits_and_its_coefficients_are_read(variant, tokenizer, tmp_path):
    from ffnlib.capture import capture

    spec = tr.TrainSpec(variant=variant, **TINY)
    model = tr.build_model(spec, tokenizer).eval()
    for p in model.parameters():  # move every weight off its initial value (norms included)
        p.data += 0.05 * torch.randn_like(p)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.tensor([loaded.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    adapter = loaded.adapter
    assert adapter.d_ff == spec.slots and adapter.gated == (variant == "swiglu")
    with torch.no_grad(), capture(loaded, 1, what=("coefficients",)) as acts:
        loaded.model(ids)
    m = acts.coefficients[1][0]
    if variant == "relu":
        assert (m >= 0).all() and (m == 0).any()
    if variant.startswith("softmax"):  # a distribution over the slots at every position
        assert (m > 0).all() and torch.allclose(m.sum(-1), torch.ones(len(m)), atol=1e-5)
    mlp = loaded.model.model.layers[1].mlp if variant == "swiglu" else loaded.model.transformer.h[1].mlp
    out = {}
    handle = mlp.register_forward_hook(lambda mod, args, o: out.__setitem__("ffn", o))
    with torch.no_grad():
        loaded.model(ids)
    handle.remove()
    memories = m @ adapter.values(1) + (adapter.value_bias(1) if adapter.value_bias(1) is not None else 0)
    if variant == "softmax_ln":  # what the residual receives is LN(sum_i m_i v_i)
        memories = mlp.ffn_norm(memories)
    assert torch.allclose(memories, out["ffn"][0], atol=1e-5)


def test_an_unknown_variant_in_a_config_is_refused(tokenizer):
    model = tr.build_model(tr.TrainSpec(variant="relu", **TINY), tokenizer)
    model.config.ffnlib_ffn = "sparsemax"
    with pytest.raises(ParameterError, match="not a known FFN variant"):
        apply_ffn_variant(model)


def test_an_interrupted_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    spec = tr.TrainSpec(variant="softmax_ln", tokens=12 * 4 * 64, warmup=0.25, **TINY)
    assert spec.steps == 12
    whole = tr.train_lm(spec, tmp_path / "whole", progress=False, checkpoint_every=4)

    class Stop(Exception):
        pass

    def stop_at_6(step):
        if step == 6:
            raise Stop

    monkeypatch.setattr(tr, "after_step", stop_at_6)
    with pytest.raises(Stop):
        tr.train_lm(spec, tmp_path / "cut", progress=False, checkpoint_every=4)
    assert not (tmp_path / "cut" / spec.name()).exists()  # nothing half-saved
    assert (tmp_path / "cut" / f".{spec.name()}.checkpoint.pt").exists()  # the step-4 checkpoint
    plain = torch.load(tmp_path / "cut" / f".{spec.name()}.checkpoint.pt", weights_only=True)  # plain types only
    assert plain["step"] == 4 and set(plain) == set(tr.CHECKPOINT_KEYS)
    steps: list[int] = []
    monkeypatch.setattr(tr, "after_step", steps.append)
    resumed = tr.train_lm(spec, tmp_path / "cut", progress=False, checkpoint_every=4)
    assert steps == list(range(5, 13))  # it resumed after step 4, it did not start again
    a, b = (load_file(r.folder / "model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history["loss"].tolist() == whole.history["loss"].tolist()
    assert resumed.heldout_loss == whole.heldout_loss
    assert len(whole.history) == 12 and whole.history["lr"].iloc[0] < whole.history["lr"].max()  # warm-up
    # cached: a second call loads the finished run
    again = tr.train_lm(spec, tmp_path / "whole", progress=False)
    assert again.folder == whole.folder and again.heldout_loss == whole.heldout_loss


class _Crafted:
    """Unpickling this runs a shell command (it creates ``marker``): what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        import shlex

        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path, how):
    """A checkpoint replaced by a file whose unpickling would run code is refused with a CheckpointError that
    names the file and says how to recover; the code does not run, and the file is left for the user to delete."""
    import pickle

    from ffnlib.errors import CheckpointError, ResultsError

    spec = tr.TrainSpec(variant="relu", tokens=4 * 4 * 64, **TINY)
    out = tmp_path / "runs"
    out.mkdir()
    checkpoint = out / f".{spec.name()}.checkpoint.pt"
    marker = tmp_path / "the-crafted-code-ran"
    state = {"key": spec.key(), "model": _Crafted(marker), "optimizer": {}, "schedule": {}, "step": 4,
             "history": [], "seconds": 0.0}
    if how == "torch.save":
        torch.save(state, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(state, protocol=2))  # torch.load reads protocol 2 without a warning
    with pytest.raises(CheckpointError, match=r"is not a plain checkpoint") as refused:
        tr.train_lm(spec, out, progress=False)
    message = str(refused.value)
    assert str(checkpoint) in message and "Delete it" in message and "starts over from step 0" in message
    assert "weights_only" not in message  # torch's advice to load it unsafely is not passed on
    assert isinstance(refused.value, ResultsError)
    assert not marker.exists(), "the crafted checkpoint's code ran"
    assert checkpoint.exists() and not (out / spec.name()).exists()  # refused: nothing trained, nothing deleted
    with pytest.raises(CheckpointError, match="lacks"):  # a plain file that is not a checkpoint
        torch.save({"model": {}}, checkpoint)
        tr.load_checkpoint(checkpoint)


def test_each_epoch_reads_every_block_once_in_a_seeded_order():
    n, batch = 10, 4
    steps = [tr.batch_indices(s, n, batch, seed=3) for s in range(5)]  # 20 blocks read: two epochs
    flat = np.concatenate(steps)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # another order each epoch
    assert np.array_equal(tr.batch_indices(2, n, batch, seed=3), steps[2])
    assert not np.array_equal(tr.batch_indices(0, n, batch, seed=4), steps[0])


def test_the_tokenizer_is_deterministic_and_ends_each_sentence(tmp_path):
    texts = ["The tower is tall.", "Paris is in France.", "The tower is in Paris."] * 20
    a = tr.train_tokenizer(texts, 300, tmp_path / "a")
    b = tr.train_tokenizer(texts, 300, tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
    data = tr.blocks(a, texts[:3], context=4)
    eot = a.convert_tokens_to_ids(tr.EOT)
    assert data.shape[1] == 4 and (data == eot).sum() >= 2


def test_a_bad_spec_says_what_is_wrong():
    with pytest.raises(ParameterError, match="variant must be one of"):
        tr.TrainSpec(variant="tanh")
    with pytest.raises(ParameterError, match="multiple of n_heads"):
        tr.TrainSpec(d_model=30, n_heads=4)
    with pytest.raises(ParameterError, match="slots must be a positive int"):
        tr.TrainSpec(slots=0)
    with pytest.raises(ParameterError, match="canary"):  # BIG-bench's data is not trained on
        tr.TrainSpec(corpus="wiki+")


def test_the_embedded_relu_lm_is_trained_on_first_use_then_loaded_from_the_cache(tmp_path, monkeypatch):
    """``load_model("wiki-relu-lm")`` trains the model once under the user cache, then loads it; here with a tiny
    spec in place of the real one (about 30 minutes on 2 cores)."""
    monkeypatch.setenv("FFNLIB_CACHE", str(tmp_path))
    monkeypatch.setitem(tr.TRAINED_MODELS, "wiki-relu-lm", tr.TrainSpec(variant="relu", tokens=4 * 4 * 64, **TINY))
    first = load_model("wiki-relu-lm")
    assert first.name == "wiki-relu-lm" and first.adapter.family.name == "gpt2" and not first.adapter.gated
    assert first.adapter.d_ff == TINY["slots"] and len(list((tmp_path / "trained").glob("relu-*"))) == 1
    monkeypatch.setattr(tr, "after_step", lambda step: pytest.fail("trained again"))
    again = load_model("wiki-relu-lm")
    ids = torch.tensor([again.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, again.model(ids).logits)
    assert tr.WIKI_RELU_LM.variant == "relu"  # the real spec: the paper's FFN


def test_the_sweep_measures_give_known_answers_on_a_made_up_sweep():
    """measures() on hand-made held-out losses: softmax worse by 0.1 nats at 64 slots and 0.3 at 256 (a slope of
    0.1 per doubling over two doublings), softmax + LN 0.005 above ReLU, and the top-mass shares as given."""
    import pandas as pd

    from ffnlib.related import relu_softmax as rs

    blocks = 50
    rng = np.random.default_rng(0)
    base = 5 + rng.normal(0, 0.2, blocks)  # per-block difficulty, shared by every model (paired)
    add = {("relu", 64): 0.0, ("softmax", 64): 0.1, ("softmax_ln", 64): 0.005,
           ("relu", 256): -0.05, ("softmax", 256): 0.25, ("softmax_ln", 256): -0.045}
    rows, losses, memory = [], {}, []
    for (variant, slots), shift in add.items():
        folder = f"{variant}-{slots}"
        losses[folder] = base + shift
        rows.append({"variant": variant, "slots": slots, "seed": 0, "heldout_loss": float((base + shift).mean()),
                     "perplexity": float(np.exp((base + shift).mean())), "folder": folder})
        memory += [{"variant": variant, "slots": slots, "seed": 0, "block": b,
                    "top_mass": {"relu": 0.1, "softmax": 0.9, "softmax_ln": 0.5}[variant]} for b in range(blocks)]
    ours, details = rs.measures(pd.DataFrame(rows), losses, pd.DataFrame(memory), n_boot=200)
    assert ours["softmax_worse"].value == pytest.approx((0.1 + 0.3) / 2)
    assert ours["softmax_worse"].low == pytest.approx(0.2) and ours["softmax_worse"].high == pytest.approx(0.2)
    assert ours["ln_matches_relu"].value == pytest.approx(0.005)
    assert ours["relu_lead_grows"].value == pytest.approx(0.1)  # 0.2 more lead over log2(256/64) = 2 doublings
    assert ours["softmax_concentrated"].value == pytest.approx(0.9)
    assert ours["softmax_concentrated/baseline"].value == pytest.approx(0.1)
    assert "256 slots: +0.300" in details["softmax_worse"]


def test_the_ffn_to_residual_ratio_is_read_per_layer_from_the_model_s_own_modules(tokenizer, tmp_path):
    """memory_measures' ‖FFN output‖² / ‖residual‖², against forward hooks on the GPT-2 modules themselves: the
    residual the FFN is added to is ln_2's input, the FFN output the MLP's. ``variance_ratio`` averages every
    layer, ``variance_ratio_upper`` the layers after the first (three layers, so that differs from the last one)."""
    from ffnlib.corpus import load_corpus
    from ffnlib.related import relu_softmax as rs

    spec = tr.TrainSpec(variant="relu", **dict(TINY, n_layers=3))
    model = tr.build_model(spec, tokenizer).eval()
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    got = rs.memory_measures(tmp_path, n_blocks=1, heldout_sentences=spec.heldout_sentences)
    texts = load_corpus("wiki", split="heldout", seed=0, max_sentences=spec.heldout_sentences)["text"].tolist()
    ids = tr.blocks(tokenizer, texts, spec.context)[0][None]
    seen, hooks = {}, []
    for i, block in enumerate(model.transformer.h):
        hooks.append(block.ln_2.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(("r", i), args[0])))
        hooks.append(block.mlp.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(("f", i), out)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    ratio = [float((seen["f", i].pow(2).sum(-1) / seen["r", i].pow(2).sum(-1)).mean())
             for i in range(len(model.transformer.h))]
    assert len(ratio) == 3 and abs(ratio[1] - ratio[2]) > 1e-3 * ratio[2]  # the mean over 1..2 is not layer 2's
    assert got.loc[0, "variance_ratio"] == pytest.approx(np.mean(ratio), rel=1e-5)
    assert got.loc[0, "variance_ratio_upper"] == pytest.approx(np.mean(ratio[1:]), rel=1e-5)


def test_top_mass_on_a_hand_worked_row():
    from ffnlib.related.relu_softmax import top_mass

    m = torch.tensor([[4.0, -3.0, 2.0, 1.0] + [0.0] * 996, [0.0] * 1000])
    top = top_mass(m, share=0.002)  # 2 slots of 1,000
    assert top[0].item() == pytest.approx(7 / 10) and torch.isnan(top[1])  # |4| + |-3| of 10; an all-zero row: NaN
