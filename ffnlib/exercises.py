"""Checks and hints for the exercise notebooks (``exercises/``): the student writes a function, a check runs it
on the real model and compares it with ffnlib's own result.

Each ``check_*`` takes the student's function (and the loaded model), and either prints what passed or raises
:class:`CheckFailed` with a message in a student's words: a wrong shape, a forgotten norm gain, an off-by-one.
Where a mistake is common, the check computes that mistake's result too and names it when the student's answer
matches it. A stub that still raises ``NotImplementedError`` fails with :class:`NotDoneYet`.
``hint("memory_coefficients")`` prints the exercise's next hint, one more each call.

The exercises, by notebook (``exercises/source/<set>/<set>.ipynb``; the student copies are generated from them
by nbgrader):

- 01 keys (Sec. 3): :func:`check_memory_coefficients`, :func:`check_trigger_prefix`;
- 02 values (Sec. 4): :func:`check_value_distribution`, :func:`check_agrees`;
- 03 aggregation (Sec. 5): :func:`check_top_tokens`, :func:`check_fig11_case`;
- 06 knowledge neurons (Dai et al.): :func:`check_integrated_gradients`, :func:`check_coarse_neurons`;
- 07 MoEfication (Zhang et al.): :func:`check_expert_scores`, :func:`check_expert_ffn`;
- 08 ReLU vs softmax (Shen et al.): :func:`check_softmax_memory`, :func:`check_top_mass`;
- 09 FF attention maps (Kobayashi et al.): :func:`check_norm_split`, :func:`check_activation_shares`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .capture import capture, hook_coefficients

__all__ = ["CheckFailed", "NotDoneYet", "hint", "HINTS", "answer_probability",
           "check_memory_coefficients", "check_trigger_prefix", "check_value_distribution", "check_agrees",
           "check_top_tokens", "check_fig11_case", "check_integrated_gradients", "check_coarse_neurons",
           "check_expert_scores", "check_expert_ffn", "check_norm_split", "check_activation_shares",
           "check_softmax_memory", "check_top_mass"]


class CheckFailed(AssertionError):
    """The student's answer differs from ffnlib's; the message says how, in words."""


class NotDoneYet(CheckFailed):
    """The student's function still raises ``NotImplementedError``."""


HINTS: dict[str, list[str]] = {
    "memory_coefficients": [
        "Each row k_i of `keys` is a key: x · k_i for every i at once is a matrix product of x (tokens, d_model) "
        "with keys transposed (d_model, d_ff).",
        "Plain FFN (GPT-2, OPT, the paper): m = f(x · Kᵀ). Gated FFN (SwiGLU/GeGLU): the activation goes on the "
        "gate half only, m = f(x · Gᵀ) ⊙ (x · Kᵀ).",
        "`activation(x @ gates.T) * (x @ keys.T)` when `gates` is not None, else `activation(x @ keys.T)`.",
    ],
    "trigger_prefix": [
        "The key fires most at the position j where coefficients[:, memory] is largest (argmax).",
        "The trigger example is the prefix x_1 … x_j: it ends WITH the token where the key fires.",
        "`token_ids[: j + 1]` with `j = int(coefficients[:, memory].argmax())`.",
    ],
    "value_distribution": [
        "The model never projects a raw residual vector: it normalises it first. For an RMSNorm the direction "
        "only changes by the gain g: read v as g ⊙ v.",
        "The head's weight is (vocab, d_model): logits = (g ⊙ v) · Eᵀ, then a softmax over the vocabulary.",
        "`torch.softmax((value * norm_gain) @ head_weight.T, dim=-1)`.",
    ],
    "agrees": [
        "The trigger prefix ends at token_ids[position]; the value should predict what comes NEXT.",
        "The next token is token_ids[position + 1]. When the prefix is the whole sentence nothing follows: "
        "count it as disagreeing (the authors' choice).",
        "`position + 1 < len(token_ids) and token_ids[position + 1] == value_top_token`.",
    ],
    "top_tokens": [
        "Project each vector the way the model projects its last residual: final norm first, then the head.",
        "The layer's output is the residual plus what the FFN adds: residual_before + ffn_output.",
        "`top = lambda h: head(final_norm(h)).argmax(-1)`, then the three tops of residual_before, ffn_output "
        "and residual_before + ffn_output.",
    ],
    "fig11_case": [
        "There are four cases. Test the one where all three tokens agree first.",
        "agreement: output == residual == ffn; residual: output == residual != ffn; ffn: output == ffn != residual; "
        "composition: the output is neither.",
    ],
    "integrated_gradients": [
        "IG from the zero baseline: score_i = m_i · ∫₀¹ ∂F(α·m)/∂m_i dα. Approximate the integral with a left "
        "Riemann sum (as Dai et al.'s code): α = 0, 1/steps, …, (steps-1)/steps.",
        "Build all scaled copies at once, `alphas[:, None] * coefficients` (steps, d_ff), with requires_grad; "
        "F of them is (steps,); the gradient of its sum gives every point's gradient.",
        "`grads = torch.autograd.grad(target(points).sum(), points)[0]`, then "
        "`coefficients * grads.mean(dim=0)`. Do not forget the factor m_i.",
    ],
    "coarse_neurons": [
        "Dai et al.'s threshold is relative: a neuron is kept when its score is at least t times the prompt's "
        "largest score.",
        "`{i for i, s in enumerate(scores.tolist()) if s >= threshold * max_score}` with `max_score = scores.max()`.",
    ],
    "expert_scores": [
        "A memory's size is what it writes: |m_i| · ‖v_i‖ (gated coefficients can be negative).",
        "An expert's score is the sum of its members' sizes; labels[i] is the expert of memory i. A one-hot "
        "matrix of labels (d_ff, n_experts) turns that sum into a matrix product.",
        "`(coefficients.abs() * value_norms) @ torch.nn.functional.one_hot(labels, n_experts).float()`.",
    ],
    "expert_ffn": [
        "Keep memory i for token t when labels[i] is one of chosen[t]; zero the other coefficients.",
        "A (tokens, n_experts) boolean table of chosen experts, indexed by labels, gives the (tokens, d_ff) mask.",
        "`chosen_experts = torch.zeros(len(chosen), int(labels.max()) + 1, dtype=torch.bool).scatter_(1, chosen, "
        "True)`, then `(coefficients * chosen_experts[:, labels]) @ values`.",
    ],
    "norm_split": [
        "An RMSNorm is g ⊙ v / s(v) with s(v) = sqrt(mean(v²) + eps): linear in v once s is fixed.",
        "Compute s once, for the whole vector v = Σ_j y_j, and use it for every summand.",
        "`v = summands.sum(0); s = (v.pow(2).mean() + eps).sqrt(); return gain * summands / s`.",
    ],
    "activation_shares": [
        "From a zero baseline, along the straight path every summand is scaled by the same α.",
        "For an element-wise activation g, integrated gradients gives summand j the share p_j · g(p) / p, where "
        "p = Σ_j p_j: the shares add up to g(p).",
        "`p = summands.sum(0); return summands * activation(p) / p`.",
    ],
    "softmax_memory": [
        "The scores are x · Kᵀ, (tokens, d_ff); the softmax turns each token's row into a distribution over the slots.",
        "Then read the values with those weights, · V, and apply `norm` to the result when it is not None.",
        "`out = torch.softmax(x @ keys.T, dim=-1) @ values; return out if norm is None else norm(out)`.",
    ],
    "top_mass": [
        "Work with |m|: the mass of a slot is the size of its coefficient, whatever its sign.",
        "Keep k = max(1, round(share · d_ff)) slots per token: the largest |m_i|, summed, over Σ|m_i|.",
        "`a = coefficients.abs(); k = max(1, round(share * a.shape[-1])); "
        "return a.topk(k, dim=-1).values.sum(-1) / a.sum(-1)`.",
    ],
}
_hints_given: dict[str, int] = {}


def hint(exercise: str) -> str:
    """Print (and return) the next hint of ``exercise``; the last one is close to the answer."""
    if exercise not in HINTS:
        raise KeyError(f"No exercise {exercise!r}; the exercises are {sorted(HINTS)}.")
    given = _hints_given.get(exercise, 0)
    hints = HINTS[exercise]
    if given >= len(hints):
        text = (f"That was the last hint for `{exercise}`. Hint {len(hints)}: {hints[-1]}")
    else:
        text = f"Hint {given + 1} of {len(hints)} for `{exercise}`: {hints[given]}"
        _hints_given[exercise] = given + 1
    print(text)
    return text


# ---- the machinery every check shares -----------------------------------------------------------------
def _name(fn) -> str:
    return getattr(fn, "__name__", "your function")


def _call(fn, *args):
    """Run the student's function, turning a stub or a crash into a message that says so."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise NotDoneYet(f"`{_name(fn)}` is not written yet: replace `raise NotImplementedError()` in its cell "
                         f"with your code, run that cell, then this one. `hint({_name(fn)!r})` gives a hint.") from None
    except CheckFailed:
        raise
    except Exception as exc:  # the student's code crashed: say where, keep the traceback chained
        raise CheckFailed(f"`{_name(fn)}` raised {type(exc).__name__}: {exc}. It was called with "
                          f"{_describe_args(args)}.") from exc


def _describe_args(args) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"a tensor of shape {tuple(a.shape)}")
        elif isinstance(a, (list, tuple)):
            parts.append(f"a {type(a).__name__} of {len(a)} items")
        elif callable(a):
            parts.append(f"the function `{_name(a)}`")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def _tensor(fn, got, expected: torch.Tensor, meaning: str) -> torch.Tensor:
    """The student's result as a tensor of the expected shape, or a message about its type or shape."""
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"`{_name(fn)}` returned {type(got).__name__}; it should return a torch tensor "
                          f"({meaning}).")
    if tuple(got.shape) != tuple(expected.shape):
        transposed = got.ndim == 2 and tuple(got.shape) == tuple(expected.shape)[::-1]
        raise CheckFailed(f"`{_name(fn)}` returned shape {tuple(got.shape)}; it should be {tuple(expected.shape)} "
                          f"({meaning})." + (" It looks transposed: which matrix did you put first in the product?"
                                             if transposed else ""))
    return got.detach().to(expected.dtype).cpu()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol))


def _compare(fn, got, expected: torch.Tensor, meaning: str, mistakes: Sequence[tuple[torch.Tensor, str]] = (),
             rtol: float = 1e-3, atol: float = 1e-5) -> torch.Tensor:
    """Pass when ``got`` equals ``expected`` within tolerance; else name the first known mistake it matches,
    or say how far off it is."""
    expected = expected.detach().cpu()
    if isinstance(got, (torch.Tensor, np.ndarray)) and tuple(got.shape) != tuple(expected.shape):
        got_t = torch.as_tensor(got).detach().cpu()
        for wrong, message in mistakes:  # a known mistake of another shape says more than the shape alone
            if tuple(wrong.shape) == tuple(got_t.shape) and _close(got_t, wrong.detach().cpu(), rtol, atol):
                raise CheckFailed(f"`{_name(fn)}`: {message}")
    got = _tensor(fn, got, expected, meaning)
    if _close(got, expected, rtol, atol):
        return got
    for wrong, message in mistakes:
        if tuple(wrong.shape) == tuple(expected.shape) and _close(got, wrong.detach().cpu(), rtol, atol):
            raise CheckFailed(f"`{_name(fn)}`: {message}")
    off = ~torch.isclose(got.float(), expected.float(), rtol=rtol, atol=atol)
    worst = (got.float() - expected.float()).abs().max().item()
    raise CheckFailed(f"`{_name(fn)}`: {off.float().mean().item():.1%} of the values differ from ffnlib's "
                      f"(largest difference {worst:.3g}). Compare a few entries by hand, or ask for "
                      f"`hint({_name(fn)!r})`.")


def _passed(fn, what: str) -> None:
    print(f"✔ `{_name(fn)}` passed: {what}")


# ---- helpers the notebooks use ---------------------------------------------------------------------------
def answer_probability(loaded, prompt_ids: Sequence[int], answer_id: int, layer: int
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """F(m'): the probability of ``answer_id`` after the prompt, with ``layer``'s coefficients at the last
    prompt position replaced by m'. Takes (n, d_ff) and returns (n,), differentiable with respect to m'."""
    ids = torch.tensor([list(prompt_ids)], device=loaded.device)
    adapter = loaded.adapter

    def target(coefficients: torch.Tensor) -> torch.Tensor:
        rows = coefficients.to(loaded.device)

        def replace(_, m):
            m = m.expand(rows.shape[0], -1, -1).clone()
            m[:, -1] = rows.to(m.dtype)
            return m

        with hook_coefficients(adapter, layer, replace):
            logits = loaded.model(ids.expand(rows.shape[0], -1)).logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)[:, answer_id]

    target.__name__ = "answer_probability"
    return target


# ---- 01 keys (Section 3) ---------------------------------------------------------------------------------
def check_memory_coefficients(fn, loaded, layer: int,
                              text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(x, keys, gates, activation)`` -> m (tokens, d_ff), on ``layer`` of the real model (gated or not)
    and on a plain ReLU FFN of random weights."""
    adapter = loaded.adapter
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("ffn_input", "coefficients")) as acts:
        loaded.model(ids)
    x, expected = acts.ffn_input[layer][0], acts.coefficients[layer][0]
    keys, act = adapter.keys(layer), adapter.activation(layer)
    gates = adapter.gates(layer) if adapter.gated else None
    meaning = "one row per token, one column per memory: (tokens, d_ff)"
    with torch.no_grad():
        got = _call(fn, x, keys, gates, act)
        mistakes = []
        if gates is not None:
            up, gate = x @ keys.T, x @ gates.T
            mistakes = [(act(up) * gate, "the activation is on the wrong half. In a gated FFN it goes on the "
                                         "gate half: m = f(x · Gᵀ) ⊙ (x · Kᵀ)."),
                        (act(up), "this is the plain FFN's formula, but this model is gated: multiply by the "
                                  "gate half, m = f(x · Gᵀ) ⊙ (x · Kᵀ)."),
                        (gate * up, "the activation f is missing: m = f(x · Gᵀ) ⊙ (x · Kᵀ).")]
        _compare(fn, got, expected, meaning, mistakes)
        # the paper's plain FFN, m = ReLU(x Kᵀ), on random weights
        gen = torch.Generator().manual_seed(0)
        x2, k2 = torch.randn(5, 16, generator=gen), torch.randn(32, 16, generator=gen)
        got = _call(fn, x2, k2, None, torch.relu)
        _compare(fn, got, torch.relu(x2 @ k2.T), "(tokens, d_ff)",
                 [(x2 @ k2.T, "with gates=None (a plain FFN) m = f(x · Kᵀ): the activation is missing.")])
    _passed(fn, f"equals the model's own coefficients at layer {layer} ({tuple(expected.shape)}), and the plain "
                "FFN's ReLU(x · Kᵀ).")


def check_trigger_prefix(fn, loaded, layer: int, sentences: pd.DataFrame, memories: Sequence[int] = (0, 1, 2, 3)
                         ) -> None:
    """``fn(token_ids, coefficients, memory)`` -> the prefix (a list of ids) where ``memory``'s key fires most,
    against ffnlib's trigger-example miner on the same sentences (one prefix per sentence, the authors' choice)."""
    from .keys import mine_trigger_examples
    from .mining import prepare_sentences

    # a model with few learned positions (wiki-relu-lm: 128) leaves longer sentences out: k counts those it reads
    sentences = prepare_sentences(loaded, sentences).drop(columns="token_ids")
    mined = mine_trigger_examples(loaded, sentences, k=len(sentences), layers=[layer], negative=False,
                                  progress=False, snapshot_floor=None)
    tokens, coefficients = mined.token_index(), {}
    for memory in memories:
        rows = mined.of(layer, memory)
        for row in rows.itertuples():
            ids = list(tokens[int(row.sentence_id)])
            if row.sentence_id not in coefficients:
                with torch.no_grad(), capture(loaded, layer, what=("coefficients",)) as acts:
                    loaded.model(torch.tensor([ids], device=loaded.device))
                coefficients[row.sentence_id] = acts.coefficients[layer][0]
            m = coefficients[row.sentence_id].clone()
            got = _call(fn, ids, m, memory)
            if isinstance(got, torch.Tensor):
                got = got.tolist()
            expected = ids[: int(row.position) + 1]
            if list(got) == expected:
                continue
            where = f"memory {memory}, sentence {int(row.sentence_id)}: the key fires most at position {int(row.position)}"
            if list(got) == ids[: int(row.position)]:
                raise CheckFailed(f"`{_name(fn)}` is off by one ({where}): your prefix stops just before the token "
                                  "where the key fires. The trigger example x_1 … x_j includes x_j.")
            if list(got) == ids[: int(row.position) + 2]:
                raise CheckFailed(f"`{_name(fn)}` is off by one ({where}): your prefix also holds the next token. "
                                  "That token is what the value should predict (Section 4), not part of the trigger.")
            raise CheckFailed(f"`{_name(fn)}` returned a prefix of {len(got)} tokens; ffnlib's miner found "
                              f"{len(expected)} ({where}).")
    _passed(fn, f"the same prefixes as ffnlib's miner for memories {list(memories)} of layer {layer} on "
                f"{len(sentences)} sentences.")


# ---- 02 values (Section 4) -------------------------------------------------------------------------------
def check_value_distribution(fn, loaded, layer: int, memories: Sequence[int] = (0, 1, 2)) -> None:
    """``fn(value, norm_gain, head_weight)`` -> p (vocab,), against ``adapter.logits_from_values``."""
    adapter = loaded.adapter
    values, gain, head = adapter.values(layer), adapter.norm_gain(), adapter.head.weight.detach()
    with torch.no_grad():
        for memory in memories:
            v = values[memory]
            expected = torch.softmax(adapter.logits_from_values(v[None]).float(), dim=-1)[0]
            got = _call(fn, v, gain, head)
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and abs(float(got.sum()) - 1) > 1e-3:
                raise CheckFailed(f"`{_name(fn)}`: your numbers sum to {float(got.sum()):.3g}, not 1. These look "
                                  "like logits: turn them into probabilities with a softmax over the vocabulary.")
            mistakes = [(torch.softmax((v @ head.T).float(), dim=-1),
                         "you projected the raw value. The model reads its residual through the final norm: "
                         "multiply by the norm's gain g first, p = softmax((g ⊙ v) · Eᵀ)."),
                        (torch.softmax(((v / gain) @ head.T).float(), dim=-1),
                         "you divided by the gain; the final norm multiplies by it: p = softmax((g ⊙ v) · Eᵀ).")]
            _compare(fn, got, expected, "one probability per vocabulary token: (vocab,)", mistakes,
                     rtol=1e-3, atol=1e-7)
    _passed(fn, f"the same distribution as ffnlib's projection for memories {list(memories)} of layer {layer}.")


def check_agrees(fn, loaded, sentences: pd.DataFrame, n_cases: int = 60, seed: int = 0) -> None:
    """``fn(value_top_token, token_ids, position)`` -> bool: does the token after the trigger prefix (which
    ends at ``position``) equal the value's top token? Against :func:`ffnlib.values.value_agreement`."""
    from .values import value_agreement

    rng = np.random.default_rng(seed)
    token_lists = [list(loaded.encode(t)) for t in sentences["text"].head(20)]
    cases = []
    for case in range(n_cases):
        ids = token_lists[case % len(token_lists)]
        position = len(ids) - 1 if case % 5 == 4 else int(rng.integers(0, len(ids) - 1))
        nxt = ids[position + 1] if position + 1 < len(ids) else -1
        kind = case % 3
        top = nxt if kind == 0 and nxt >= 0 else ids[position] if kind == 1 else int(rng.integers(0, 1000))
        cases.append((top, ids, position, nxt))
    # ffnlib's own answer: one memory per case, whose top-1 trigger ends at that position
    memories = pd.DataFrame({"layer": 0, "memory": range(n_cases), "sign": 1,
                             "top_token": [c[0] for c in cases], "max_prob": 0.5})
    triggers = pd.DataFrame({"layer": 0, "memory": range(n_cases), "sign": 1, "rank": 0,
                             "next_token": [c[3] for c in cases]})
    expected = value_agreement(memories, triggers)["agrees"].tolist()
    got, off_by_one = [], []
    for top, ids, position, _ in cases:
        try:
            answer = _call(fn, top, ids, position)
        except CheckFailed as exc:
            if position == len(ids) - 1 and isinstance(exc.__cause__, IndexError):
                raise CheckFailed(f"`{_name(fn)}` crashed with IndexError where the trigger prefix is the whole "
                                  f"sentence (position {position} of {len(ids)} tokens): nothing follows it. Check "
                                  "for that case first and answer False (the authors count it as disagreeing)."
                                  ) from exc.__cause__
            raise
        if not isinstance(answer, (bool, np.bool_)) and not (isinstance(answer, torch.Tensor) and answer.numel() == 1):
            raise CheckFailed(f"`{_name(fn)}` returned {type(answer).__name__}; it should return True or False.")
        got.append(bool(answer))
        off_by_one.append(ids[position] == top)
    # the same trap with the sentence end handled (False there, as asked)
    guarded = [o and position + 1 < len(ids) for o, (_, ids, position, _) in zip(off_by_one, cases)]
    if got == expected:
        _passed(fn, f"the same verdict as ffnlib's value_agreement on {n_cases} (value, trigger) pairs, sentence "
                    "ends included.")
        return
    if got in (off_by_one, guarded):
        raise CheckFailed(f"`{_name(fn)}` compares the value's top token with the LAST token of the trigger prefix "
                          "(token_ids[position]). The value predicts the token that FOLLOWS the prefix: "
                          "token_ids[position + 1]. This is the paper's off-by-one trap.")
    wrong = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    top, ids, position, nxt = cases[wrong]
    if nxt < 0:
        raise CheckFailed(f"`{_name(fn)}` said {got[wrong]} for a prefix that is the whole sentence (position "
                          f"{position} of {len(ids)} tokens): nothing follows it, so it cannot agree.")
    raise CheckFailed(f"`{_name(fn)}` said {got[wrong]} for value_top_token={top}, position={position} "
                      f"(the next token is {nxt}); ffnlib says {expected[wrong]}.")


# ---- 03 aggregation (Section 5) ----------------------------------------------------------------------------
def check_top_tokens(fn, loaded, layer: int,
                     text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(residual_before, ffn_output, final_norm, head)`` -> (residual_top, ffn_top, output_top), each
    (tokens,), against :func:`ffnlib.aggregation.project_tops` of the captured vectors."""
    from .aggregation import project_tops

    adapter = loaded.adapter
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("residual_before", "ffn_output", "residual_after")) as acts:
        loaded.model(ids)
        before, ffn, after = acts.residual_before[layer][0], acts.ffn_output[layer][0], acts.residual_after[layer][0]
        expected = [project_tops(adapter, v)[0] for v in (before, ffn, after)]
        got = _call(fn, before, ffn, adapter.final_norm, adapter.head)
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        raise CheckFailed(f"`{_name(fn)}` should return three tensors (residual_top, ffn_top, output_top); it "
                          f"returned {type(got).__name__}" + (f" of {len(got)}" if hasattr(got, '__len__') else "") + ".")
    with torch.no_grad():
        raw = [adapter.head(v).argmax(-1) for v in (before, ffn, after)]
    names = ("residual_top", "ffn_top", "output_top")
    for name, g, e, r in zip(names, got, expected, raw):
        g = _tensor(fn, g, e, f"{name}: one token id per position, (tokens,)")
        if torch.equal(g.long(), e.long().cpu()):
            continue
        if torch.equal(g.long(), r.long().cpu()) and not torch.equal(r, e):
            raise CheckFailed(f"`{_name(fn)}`: {name} skips the final norm. Project as the model does at its last "
                              "layer: head(final_norm(h)).")
        if name == "output_top" and torch.equal(g.long(), expected[0].long().cpu()):
            raise CheckFailed(f"`{_name(fn)}`: output_top is the residual's top token. The layer's output is the "
                              "residual PLUS the FFN's output.")
        if name == "output_top" and torch.equal(g.long(), expected[1].long().cpu()):
            raise CheckFailed(f"`{_name(fn)}`: output_top is the FFN's own top token. The layer's output is the "
                              "residual plus the FFN's output.")
        share = (g.long() != e.long().cpu()).float().mean().item()
        raise CheckFailed(f"`{_name(fn)}`: {name} differs from ffnlib's at {share:.0%} of the positions.")
    _passed(fn, f"the same three top tokens as ffnlib at every position of the sentence, layer {layer}.")


def check_fig11_case(fn) -> None:
    """``fn(residual_top, ffn_top, output_top)`` -> one of "agreement", "residual", "ffn", "composition";
    against :func:`ffnlib.aggregation.classify` on every pattern of equalities."""
    from .aggregation import classify

    patterns = [(7, 7, 7), (7, 9, 7), (7, 9, 9), (7, 9, 4), (7, 7, 4), (3, 3, 3), (5, 2, 5), (5, 2, 2), (1, 2, 3)]
    for residual, ffn, output in patterns:
        expected = str(classify([residual], [ffn], [output])[0])
        got = _call(fn, residual, ffn, output)
        if got == expected:
            continue
        if got not in ("agreement", "residual", "ffn", "composition"):
            raise CheckFailed(f"`{_name(fn)}` returned {got!r}; it should return one of 'agreement', 'residual', "
                              "'ffn', 'composition'.")
        raise CheckFailed(f"`{_name(fn)}`({residual}, {ffn}, {output}) returned {got!r}; the case is {expected!r}. "
                          + ("When all three agree it is 'agreement': test that case first."
                             if expected == "agreement" else
                             "When residual and FFN agree but the output is another token, neither was kept: "
                             "'composition'." if residual == ffn else ""))
    _passed(fn, "the same Fig. 11 case as ffnlib for every pattern of equal and different tokens.")


# ---- 06 knowledge neurons (Dai et al., 2022) -----------------------------------------------------------------
def check_integrated_gradients(fn, loaded, prompt: str, answer: str, layer: int, steps: int = 20) -> torch.Tensor:
    """``fn(target, coefficients, steps)`` -> scores (d_ff,), against
    :func:`ffnlib.related.knowledge_neurons.knowledge_attribution` (left Riemann sum from the zero baseline,
    P(answer's first token)). Returns ffnlib's scores."""
    from .related.knowledge_neurons import encode_answer, knowledge_attribution

    prompt_ids = loaded.encode(prompt)
    answer_ids = encode_answer(loaded.tokenizer, answer)
    reference = knowledge_attribution(loaded, prompt_ids, answer_ids[:1], layers=[layer], steps=steps)
    expected, m = reference.scores[0].float(), reference.coefficients[0].float()
    target = answer_probability(loaded, prompt_ids, answer_ids[0], layer)
    got = _call(fn, target, m.clone(), steps)
    scale = float(expected.abs().max())
    mistakes = []
    with torch.enable_grad():
        def gradients(alphas):
            points = (alphas[:, None] * m).requires_grad_(True)
            return torch.autograd.grad(target(points).sum(), points)[0]
        left = gradients(torch.arange(steps, dtype=torch.float32) / steps)
        right = gradients(torch.arange(1, steps + 1, dtype=torch.float32) / steps)
    mistakes = [(left.mean(0), "you returned the average gradient. Integrated gradients multiplies it by the "
                               "input: score_i = m_i · mean_α ∂F(α·m)/∂m_i."),
                (m * right.mean(0), "your α run from 1/steps to 1 (a right Riemann sum). Dai et al.'s code and "
                                    "ffnlib use the left sum: α = 0, 1/steps, …, (steps-1)/steps."),
                (m * gradients(torch.linspace(0, 1, steps)).mean(0),
                 "your α include both 0 and 1 (torch.linspace): the left Riemann sum stops one step before 1, "
                 "α = k/steps for k = 0 … steps-1."),
                (m * right[-1], "you took the gradient at the real coefficients only (α = 1). Integrated gradients "
                                "averages it along the path from 0 to m.")]
    _compare(fn, got, expected, "one score per memory: (d_ff,)", mistakes, rtol=1e-2, atol=1e-3 * scale)
    _passed(fn, f"the same attribution as ffnlib's knowledge_attribution for {prompt!r} → {answer!r} at layer "
                f"{layer} ({steps} steps).")
    return expected


def check_coarse_neurons(fn, scores: torch.Tensor, threshold: float = 0.2) -> None:
    """``fn(scores, threshold)`` -> the set of memory indices whose score is >= threshold x the largest score;
    against :func:`ffnlib.related.knowledge_neurons.coarse_neurons`."""
    from .related.knowledge_neurons import coarse_neurons

    scores = scores.detach().float().cpu()
    frame = pd.DataFrame({"memory": range(len(scores)), "sign": 1, "ratio": (scores / scores.max()).numpy()})
    expected = set(coarse_neurons(frame, threshold)["memory"].tolist())
    got = _call(fn, scores, threshold)
    try:
        got = {int(i) for i in got}
    except (TypeError, ValueError):
        raise CheckFailed(f"`{_name(fn)}` should return a set of memory indices (ints); it returned "
                          f"{type(got).__name__}.") from None
    if got == expected:
        _passed(fn, f"the same {len(expected)} coarse neurons as ffnlib (t = {threshold}).")
        return
    absolute = {int(i) for i in torch.nonzero(scores >= threshold).flatten().tolist()}
    if got == absolute and absolute != expected:
        raise CheckFailed(f"`{_name(fn)}` used the threshold as an absolute score. Dai et al.'s t is relative: keep "
                          f"the neurons whose score is at least t × the largest score ({float(scores.max()):.3g}).")
    raise CheckFailed(f"`{_name(fn)}` found {len(got)} neurons, ffnlib {len(expected)}; "
                      f"{len(got - expected)} of yours are not ffnlib's and {len(expected - got)} of ffnlib's are missing.")


# ---- 07 MoEfication (Zhang et al., 2022) --------------------------------------------------------------------
def _ffn_input(loaded, layer: int, text: str) -> torch.Tensor:
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("ffn_input",)) as acts:
        loaded.model(ids)
    return acts.ffn_input[layer][0]


def check_expert_scores(fn, loaded, layer: int, expert_size: int = 32, seed: int = 0,
                        text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(coefficients, value_norms, labels, n_experts)`` -> (tokens, n_experts): the ground-truth router's
    score of each expert, the summed size |m_i|·‖v_i‖ of its memories; against ffnlib.related.moefication."""
    from .related.moefication import ffn_coefficients, membership, memory_sizes, random_split

    adapter = loaded.adapter
    with torch.no_grad():  # compared on the CPU, whatever the model's device
        m = ffn_coefficients(adapter, layer, _ffn_input(loaded, layer, text)).float().cpu()
        norms = adapter.written_value_norms(layer).float().cpu()
    labels = torch.as_tensor(random_split(adapter.d_ff, expert_size, seed))
    n_experts = adapter.d_ff // expert_size
    members = membership(labels.numpy(), n_experts)
    expected = memory_sizes(m, norms) @ members
    got = _call(fn, m.clone(), norms.clone(), labels.clone(), n_experts)
    mistakes = [((m * norms) @ members, "gated coefficients can be negative: a memory's size is |m_i|·‖v_i‖, "
                                        "take the absolute value first."),
                (m.abs() @ members, "the value norms are missing: a memory writes m_i·v_i, so its size is "
                                    "|m_i|·‖v_i‖."),
                (m.abs() * norms, "these are the memories' sizes; sum them over each expert's members "
                                  "(labels[i] is memory i's expert).")]
    _compare(fn, got, expected, "one score per token and expert: (tokens, n_experts)", mistakes, rtol=1e-4, atol=1e-5)
    _passed(fn, f"the ground-truth router's scores of {n_experts} experts of {expert_size} memories at layer {layer}.")


def check_expert_ffn(fn, loaded, layer: int, expert_size: int = 32, k: int = 8, seed: int = 0,
                     text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(coefficients, values, labels, chosen)`` -> (tokens, d_model): the FFN's output from the chosen
    experts' memories only (``chosen``: (tokens, k) expert ids per token); against
    :func:`ffnlib.related.moefication.dense_ffn` with the same memories kept."""
    from .related.moefication import dense_ffn, ffn_coefficients, random_split

    adapter = loaded.adapter
    if adapter.value_bias(layer) is not None:
        raise CheckFailed("This check needs an FFN without an output bias (the default models have none).")
    with torch.no_grad():
        x = _ffn_input(loaded, layer, text)
        m = ffn_coefficients(adapter, layer, x).float().cpu()
    labels = torch.as_tensor(random_split(adapter.d_ff, expert_size, seed))
    n_experts = adapter.d_ff // expert_size
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(m.shape[0])])
    mask = torch.zeros(m.shape[0], n_experts, dtype=torch.bool).scatter_(1, chosen, True)[:, labels]
    with torch.no_grad():
        expected = dense_ffn(adapter, layer, x, mask.to(x.device)).float().cpu()
        values = adapter.values(layer).float().cpu()
        got = _call(fn, m.clone(), values, labels.clone(), chosen.clone())
        first = torch.zeros(m.shape[0], n_experts, dtype=torch.bool).scatter_(1, chosen[:, :1], True)[:, labels]
        mistakes = [(m @ values, "this is the dense FFN: keep only the memories whose expert is among the "
                                 "token's chosen experts."),
                    ((m * first) @ values, "you kept only the first chosen expert of each token; keep all k.")]
        _compare(fn, got, expected, "one vector per token: (tokens, d_model)", mistakes, rtol=1e-3, atol=1e-4)
    _passed(fn, f"the FFN restricted to {k} of {n_experts} experts per token equals ffnlib's dense_ffn with the "
                "same memories kept.")


# ---- 09 FF blocks through attention maps (Kobayashi et al., 2024) ---------------------------------------------
def _split(vector: torch.Tensor, parts: int, seed: int) -> torch.Tensor:
    """``vector`` (d,) as the sum of ``parts`` random summands (parts, d)."""
    gen = torch.Generator().manual_seed(seed)
    pieces = torch.randn(parts - 1, vector.shape[-1], generator=gen) * vector.abs().mean()
    return torch.cat([pieces, (vector - pieces.sum(0))[None]])


def check_norm_split(fn, loaded, layer: int, parts: int = 4, seed: int = 0,
                     text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(summands, gain, eps)`` -> (parts, d): the RMSNorm of the summands' sum split into one part per
    summand with the statistic of the whole vector; against ffnlib's NormSplit, and the model's own norm."""
    from .related.contextualization import NormSplit

    adapter = loaded.adapter
    ffn_norm = adapter.family.ffn_norm
    norm = getattr(adapter.layer(layer), ffn_norm, None) if ffn_norm else None
    if norm is None or "RMSNorm" not in type(norm).__name__:
        raise CheckFailed("This check needs a model whose FFN reads an RMSNorm (SmolLM2, Gemma 3).")
    split = NormSplit.of(norm, plus_one=adapter.family.gemma_norm)
    split = dataclasses.replace(split, gain=split.gain.cpu())  # compared on the CPU, whatever the model's device
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("residual_before",)) as acts:
        loaded.model(ids)
    v = acts.residual_before[layer][0, -1].float().cpu()
    summands = _split(v, parts, seed)
    expected = split.scaled(summands, 1 / split.statistic(v).expand(parts))
    got = _call(fn, summands.clone(), split.gain.clone(), split.eps)
    with torch.no_grad():
        own = torch.stack([split.linear(y) / split.statistic(y) for y in summands])
    mistakes = [(own, "each summand was normalised with its own RMS, so the parts no longer add up to norm(v). "
                      "Divide every summand by the statistic of the whole vector, s(Σ_j y_j)."),
                (summands / split.statistic(v), "the gain g is missing: each part is g ⊙ y_j / s(v).")]
    _compare(fn, got, expected, "one part per summand: (parts, d_model)", mistakes, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        weight = next(norm.parameters())
        model_norm = norm(v[None].to(weight.device, weight.dtype)).float().cpu()[0]
    if not _close(torch.as_tensor(got).float().sum(0), model_norm, 1e-3, 1e-4):
        raise CheckFailed(f"`{_name(fn)}`: your parts do not add up to the model's own norm of the vector.")
    _passed(fn, f"the same split as ffnlib's NormSplit; the {parts} parts add up to the model's norm of the vector "
                f"(layer {layer}).")


def check_activation_shares(fn, loaded, layer: int, parts: int = 3, seed: int = 0,
                            text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(summands, activation)`` -> (parts, d_ff): how much of ``activation(Σ_j p_j)`` each summand ``p_j``
    gets, by integrated gradients from zero; against ffnlib's brute-force IG (``ig_shares_by_riemann``)."""
    from .related.contextualization import ig_shares_by_riemann

    adapter = loaded.adapter
    act = adapter.activation(layer)
    with torch.no_grad():
        x = _ffn_input(loaded, layer, text)[-1].float().cpu()
        rows = (adapter.gates(layer) if adapter.gated else adapter.keys(layer)).float().cpu()[:64]
    summands = _split(x, parts, seed) @ rows.T  # each part of the input, through the first matrix: (parts, 64)
    p = summands.sum(0)
    expected = ig_shares_by_riemann(act, summands, steps=4000).float()
    got = _call(fn, summands.clone(), act)
    with torch.no_grad():
        mistakes = [(act(p).expand(parts, -1) / parts, "you split g(p) equally between the summands; IG gives "
                                                       "each a share in proportion to its p_j."),
                    (act(summands), "you applied the activation to each summand alone; those do not add up to "
                                    "g(p). From a zero baseline IG gives summand j the share p_j · g(p) / p.")]
    _compare(fn, got, expected, "one share per summand and hidden unit: (parts, units)", mistakes,
             rtol=1e-3, atol=1e-4 * float(act(p).abs().max()))
    if not _close(torch.as_tensor(got).float().sum(0), act(p), 1e-3, 1e-5):
        raise CheckFailed(f"`{_name(fn)}`: your shares do not add up to activation(Σ_j p_j).")
    _passed(fn, f"the same shares as ffnlib's integrated gradients for 64 hidden units of layer {layer}; they add "
                "up to the activation's output.")


# ---- 08 ReLU vs softmax memories (Shen et al., 2023) ---------------------------------------------------------
def check_softmax_memory(fn, seed: int = 0) -> None:
    """``fn(x, keys, values, norm)`` -> (tokens, d_model): ``softmax(x·Kᵀ)·V`` over the slots, then ``norm`` (a
    LayerNorm module, or None); against ffnlib's own softmax FFN (:class:`ffnlib.ffn_variants.SlotSoftmaxMLP`) in
    a small random GPT-2 (its biases set to zero here)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .ffn_variants import CONFIG_FIELD, apply_ffn_variant

    torch.manual_seed(seed)
    for variant in ("softmax", "softmax_ln"):
        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, n_inner=96)
        setattr(config, CONFIG_FIELD, variant)
        mlp = apply_ffn_variant(GPT2LMHeadModel(config)).transformer.h[0].mlp.eval()
        with torch.no_grad():
            for bias in (mlp.c_fc.bias, mlp.c_proj.bias):
                bias.zero_()
            if mlp.ffn_norm is not None:  # a gain and bias of its own, not (1, 0)
                mlp.ffn_norm.weight.uniform_(0.5, 1.5)
                mlp.ffn_norm.bias.normal_(0, 0.1)
            x = torch.randn(7, 32)
            keys, values = mlp.c_fc.weight.T.clone(), mlp.c_proj.weight.clone()  # Conv1D stores (in, out)
            expected = mlp(x)
            got = _call(fn, x, keys, values, mlp.ffn_norm)
            scores = x @ keys.T
            plain = torch.softmax(scores, dim=-1) @ values
            mistakes = [(torch.softmax(scores, dim=0) @ values, "the softmax runs over the tokens; it must run over "
                                                                "the slots (the last dimension of x · Kᵀ)."),
                        (torch.relu(scores) @ values, "this is the ReLU FFN; the memory normalises its scores with a "
                                                      "softmax over the slots."),
                        (plain, "the LayerNorm is missing: softmax + LN applies `norm` to softmax(x · Kᵀ) · V.")]
            _compare(fn, got, expected, "one vector per token: (tokens, d_model)", mistakes, rtol=1e-4, atol=1e-5)
    _passed(fn, "the same output as ffnlib's softmax memory, with and without the LayerNorm.")


def check_top_mass(fn, loaded, layer: int, share: float = 0.002,
                   text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(coefficients, share)`` -> (tokens,): the share of Σ|m_i| in the top ``share`` of the slots (at least
    one), on the model's real coefficients; against :func:`ffnlib.related.relu_softmax` (``top_mass``)."""
    from .related.relu_softmax import top_mass

    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("coefficients",)) as acts:
        loaded.model(ids)
    m = acts.coefficients[layer][0].float().cpu()
    expected = top_mass(m, share)
    got = _call(fn, m.clone(), share)
    k = max(1, int(round(share * m.shape[-1])))
    signed = m.topk(k, dim=-1).values.sum(-1) / m.sum(-1)
    mistakes = [(signed, "gated coefficients can be negative: measure the mass with |m_i|, in the top slots and in "
                         "the total."),
                (m.abs().max(-1).values / m.abs().sum(-1), f"you kept only the largest slot; the top {share:.1%} of "
                                                           f"{m.shape[-1]} slots is {k} slot(s)."),
                (m.abs().topk(k, dim=-1).values.sum(-1) / m.abs().max(-1).values,
                 "divide by the total mass Σ|m_i|, not by the largest one.")]
    _compare(fn, got, expected, "one share per token: (tokens,)", mistakes, rtol=1e-4, atol=1e-6)
    _passed(fn, f"the same top-{share:.1%} mass as ffnlib on the coefficients of layer {layer} "
                f"(mean {float(expected.mean()):.1%}).")
