"""The exercises' hints: ``hint("<function name>")`` prints the next one, the last close to the answer."""

from __future__ import annotations

__all__ = ["HINTS", "hints_given", "hint"]

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
    "trigger_pattern": [
        "Keep the rows of `sign` first: `rows = triggers[triggers.sign == sign]`. The pattern is in the triggers "
        "themselves: the last_token column (where the key fires), not next_token.",
        "`rows.last_token.value_counts()` sorts the tokens by count, the most common first; its share is its "
        "count over len(rows). For the topic, drop the rows without a label and those labelled 'Uncategorized' "
        "first, and count over what is left.",
        "`topics = rows.topic[rows.topic.notna() & (rows.topic != 'Uncategorized')].value_counts()`; with "
        "`topics.sum() >= 5` the topic is `topics.index[0]` and its share `topics.iloc[0] / topics.sum()`, else "
        "None and None.",
    ],
    "value_reading": [
        "A memory adds m_i·v_i. Its triggers of sign +1 have positive coefficients, so it writes +v_i; those of "
        "sign -1 have negative ones, so it writes -v_i, whose tokens are the value_tokens rows of sign -1.",
        "The promoted token is the value_tokens row of `sign` with rank 0. It agrees when it is the token AFTER "
        "the key's top trigger of the same sign (rank 0): that row's next_token, not its last_token.",
        "`top = value_tokens[value_tokens.sign == sign].sort_values('rank').token.iloc[0]`; "
        "`first = triggers[triggers.sign == sign].sort_values('rank').iloc[0]`; then "
        "`{'promotes': top, 'agrees': first.next_token == top}`.",
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
hints_given: dict[str, int] = {}  # exercise -> hints printed so far (this kernel)


def hint(exercise: str) -> str:
    """Print (and return) the next hint of ``exercise``; the last one is close to the answer."""
    if exercise not in HINTS:
        raise KeyError(f"No exercise {exercise!r}; the exercises are {sorted(HINTS)}.")
    given = hints_given.get(exercise, 0)
    hints = HINTS[exercise]
    if given >= len(hints):
        text = (f"That was the last hint for `{exercise}`. Hint {len(hints)}: {hints[-1]}")
    else:
        text = f"Hint {given + 1} of {len(hints)} for `{exercise}`: {hints[given]}"
        hints_given[exercise] = given + 1
    print(text)
    return text

