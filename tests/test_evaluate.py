"""Held-out evaluation (ffnlib.evaluate): per-sentence NLL, tokens and top-1 against a plain loop over the model's
own logits on several families, batching and padding that change nothing, an intervention that does nothing giving
the dense numbers (and one that does something giving the same numbers per batch as around the whole call), the
pad-id rule, perplexity's NaN and overflow, float32 numbers from a bf16 model; and notebook 08's held-out blocks
(ffnlib.nll) against the model's own loss."""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ffnlib import evaluate as ev
from ffnlib.adapters import get_adapter
from ffnlib.interventions import intervene
from ffnlib.models import LoadedModel
from tiny_models import CASE_IDS, CASES, VOCAB, build_config

LENGTHS = [1, 2, 5, 9, 9, 13, 20, 3, 7, 16]  # a one-token sentence predicts nothing


def _loaded(case_id: str = "llama", pad: int | None = 0, dtype=torch.float32) -> LoadedModel:
    case = CASES[CASE_IDS.index(case_id)]
    torch.manual_seed(0)
    model = case.model_cls(build_config(case)).eval().requires_grad_(False)
    with torch.no_grad():  # a random init predicts nearly uniformly: widen it so that the NLLs differ
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    model.to(dtype)
    return LoadedModel(case_id, model, SimpleNamespace(pad_token_id=pad), get_adapter(model), "random", case_id,
                       False, [1])


def _sentences(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, VOCAB, n - 1).tolist() for n in LENGTHS]


@torch.no_grad()
def _plain(loaded, token_lists):
    """Each sentence alone through the model's own forward: (summed NLL in float64, tokens, top-1 per position)."""
    out = []
    for ids in token_lists:
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        nll = -logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)]
        out.append((float(nll.sum()), len(ids) - 1, logits.argmax(-1).numpy()))
    return out


@pytest.mark.parametrize("case_id", ["llama", "gpt2", "opt", "gemma2"])  # gemma2: a soft-capped head
def test_nll_tokens_and_top1_match_a_plain_loop_over_the_models_logits(case_id):
    loaded, sentences = _loaded(case_id), _sentences()
    frame = ev.heldout_nll(loaded, sentences)
    plain = _plain(loaded, sentences)
    assert list(frame.columns) == ["nll", "tokens"] and len(frame) == len(sentences)
    assert frame["tokens"].tolist() == [n - 1 for n in LENGTHS]  # input order, one-token sentence included
    np.testing.assert_allclose(frame["nll"], [p[0] for p in plain], rtol=1e-5, atol=1e-5)
    assert frame["nll"].iloc[0] == 0.0 and frame["nll"].iloc[1:].gt(0.5).all()  # not a trivial model
    total = sum(p[0] for p in plain) / sum(p[1] for p in plain)
    assert ev.perplexity_of(frame) == pytest.approx(math.exp(total), rel=1e-5)
    predicted = ev.heldout_predictions(loaded, ev.sentence_batches(loaded, sentences))
    for row in predicted.itertuples():
        np.testing.assert_array_equal(row.top1, plain[row.sentence][2])


def test_batching_and_padding_do_not_change_the_numbers():
    loaded, sentences = _loaded(), _sentences(1)
    alone = ev.sentence_batches(loaded, sentences, batch_tokens=1)  # over budget: every sentence a batch of its own
    packed = ev.sentence_batches(loaded, sentences, batch_tokens=4096, max_padding=0.9)
    assert len(alone) == len(sentences) and len(packed) < 3  # the two plans really differ
    assert sorted(np.concatenate([b.rows for b in packed]).tolist()) == list(range(len(sentences)))
    assert all(b.ids.shape == (len(b.rows), int(b.lengths.max())) for b in packed)
    one = ev.heldout_nll(loaded, sentences, batch_tokens=1)
    many = ev.heldout_nll(loaded, sentences, batch_tokens=4096, max_padding=0.9)
    assert one["tokens"].tolist() == many["tokens"].tolist()
    np.testing.assert_allclose(one["nll"], many["nll"], rtol=1e-5)
    other_pad = _loaded(pad=None)  # no pad token: padding with 0; the same model otherwise
    other_pad.tokenizer.pad_token_id = 57
    assert other_pad.pad_id == 57 and packed[0].ids[-1, -1] == 0
    np.testing.assert_allclose(ev.heldout_nll(other_pad, sentences, batch_tokens=4096, max_padding=0.9)["nll"],
                               many["nll"], rtol=1e-6)
    shuffled = [sentences[i] for i in np.random.default_rng(0).permutation(len(sentences))]
    assert sorted(ev.heldout_nll(loaded, shuffled)["nll"].round(4)) == sorted(many["nll"].round(4))


def test_the_pad_id_is_the_tokenizers_else_zero():
    assert _loaded(pad=5).pad_id == 5
    assert _loaded(pad=None).pad_id == 0


def test_an_intervention_that_does_nothing_gives_the_dense_numbers():
    loaded, sentences = _loaded(), _sentences(2)
    dense = ev.heldout_nll(loaded, sentences)
    for under in (lambda batch: nullcontext(), lambda batch: intervene(loaded, {})):
        pd.testing.assert_frame_equal(ev.heldout_nll(loaded, sentences, under=under), dense)
    off = {(0, m): 0.0 for m in range(loaded.adapter.d_ff)}  # the first FFN switched off
    seen = []

    def under(batch):
        seen.append(batch.rows.tolist())
        return intervene(loaded, off)

    per_batch = ev.heldout_nll(loaded, sentences, under=under, batch_tokens=64)
    assert sorted(sum(seen, [])) == list(range(len(sentences)))  # entered once per batch, every sentence once
    assert len(seen) == len(ev.sentence_batches(loaded, sentences, batch_tokens=64)) > 1
    with intervene(loaded, off):
        around = ev.heldout_nll(loaded, sentences, batch_tokens=64)
    pd.testing.assert_frame_equal(per_batch, around)
    assert not np.allclose(per_batch["nll"].iloc[1:], dense["nll"].iloc[1:], rtol=1e-3)  # it did change the model
    pd.testing.assert_frame_equal(ev.heldout_nll(loaded, sentences), dense)  # and the hooks are gone


def test_perplexity_is_nan_with_a_nan_sentence_and_inf_past_float_range():
    frame = pd.DataFrame({"nll": [2.0, 4.0], "tokens": [1, 2]})
    assert ev.perplexity_of(frame) == pytest.approx(math.exp(2.0))
    assert math.isnan(ev.perplexity_of(frame.assign(nll=[2.0, math.nan])))  # pandas' sum would skip the NaN
    assert ev.perplexity_of(frame.assign(nll=[2000.0, 2000.0])) == math.inf


def test_a_bf16_model_gives_float32_nlls_close_to_float32s():
    sentences = _sentences(3)
    full, half = _loaded(), _loaded(dtype=torch.bfloat16)
    batch = ev.sentence_batches(half, sentences)[0]
    with torch.no_grad():
        residual = torch.randn(*batch.ids.shape, half.adapter.d_model)
    assert all(nll.dtype == np.float32 for nll, _ in ev.next_token_predictions(half.adapter, residual, batch.ids,
                                                                               batch.lengths))
    np.testing.assert_allclose(ev.heldout_nll(half, sentences)["nll"], ev.heldout_nll(full, sentences)["nll"],
                               rtol=0.05)


@pytest.mark.parametrize("case_id", ["gpt2", "llama"])
def test_block_losses_match_the_models_own_loss_block_by_block(case_id):
    """notebook 08's held-out unit (ffnlib.nll.block_losses, in batches) against transformers' own mean
    cross-entropy of each block alone; and the one NLL formula against log_softmax in float64."""
    from ffnlib.nll import block_losses, token_nll

    loaded = _loaded(case_id)
    blocks = torch.from_numpy(np.random.default_rng(1).integers(3, VOCAB, (7, 12)))
    got = block_losses(loaded.model, blocks, batch=3)
    assert got.shape == (7,) and np.isfinite(got).all()
    with torch.no_grad():
        own = [float(loaded.model(ids[None], labels=ids[None]).loss) for ids in blocks]
    np.testing.assert_allclose(got, own, rtol=2e-6)
    assert got.std() > 1e-3  # the blocks differ, so a shuffled or repeated block would show
    logits = torch.randn(5, 11) * 4
    targets = torch.tensor([0, 3, 10, 7, 7])
    exact = -logits.double().log_softmax(-1)[torch.arange(5), targets]
    assert token_nll(logits.bfloat16(), targets).dtype == torch.float32
    np.testing.assert_allclose(token_nll(logits, targets).numpy(), exact.numpy(), rtol=1e-6)
