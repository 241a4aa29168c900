"""Exercises 03 · aggregation (Section 5): the top tokens of the residual, the FFN's output and the layer's
output, and the Fig. 11 cases."""

from __future__ import annotations

import torch

from ..capture import capture
from .checking import CheckFailed, as_tensor, call_student, name_of, passed

__all__ = ["check_top_tokens", "check_fig11_case"]


def check_top_tokens(fn, loaded, layer: int,
                     text: str = "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.") -> None:
    """``fn(residual_before, ffn_output, final_norm, head)`` -> (residual_top, ffn_top, output_top), each
    (tokens,), against :func:`ffnlib.aggregation.project_tops` of the captured vectors."""
    from ..aggregation import project_tops

    adapter = loaded.adapter
    ids = torch.tensor([loaded.encode(text)], device=loaded.device)
    with torch.no_grad(), capture(loaded, layer, what=("residual_before", "ffn_output", "residual_after")) as acts:
        loaded.model(ids)
        before, ffn, after = acts.residual_before[layer][0], acts.ffn_output[layer][0], acts.residual_after[layer][0]
        expected = [project_tops(adapter, v)[0] for v in (before, ffn, after)]
        got = call_student(fn, before, ffn, adapter.final_norm, adapter.head)
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        raise CheckFailed(f"`{name_of(fn)}` should return three tensors (residual_top, ffn_top, output_top); it "
                          f"returned {type(got).__name__}" + (f" of {len(got)}" if hasattr(got, '__len__') else "") + ".")
    with torch.no_grad():
        raw = [adapter.head(v).argmax(-1) for v in (before, ffn, after)]
    names = ("residual_top", "ffn_top", "output_top")
    for name, g, e, r in zip(names, got, expected, raw):
        g = as_tensor(fn, g, e, f"{name}: one token id per position, (tokens,)")
        if torch.equal(g.long(), e.long().cpu()):
            continue
        if torch.equal(g.long(), r.long().cpu()) and not torch.equal(r, e):
            raise CheckFailed(f"`{name_of(fn)}`: {name} skips the final norm. Project as the model does at its last "
                              "layer: head(final_norm(h)).")
        if name == "output_top" and torch.equal(g.long(), expected[0].long().cpu()):
            raise CheckFailed(f"`{name_of(fn)}`: output_top is the residual's top token. The layer's output is the "
                              "residual PLUS the FFN's output.")
        if name == "output_top" and torch.equal(g.long(), expected[1].long().cpu()):
            raise CheckFailed(f"`{name_of(fn)}`: output_top is the FFN's own top token. The layer's output is the "
                              "residual plus the FFN's output.")
        share = (g.long() != e.long().cpu()).float().mean().item()
        raise CheckFailed(f"`{name_of(fn)}`: {name} differs from ffnlib's at {share:.0%} of the positions.")
    passed(fn, f"the same three top tokens as ffnlib at every position of the sentence, layer {layer}.")


def check_fig11_case(fn) -> None:
    """``fn(residual_top, ffn_top, output_top)`` -> one of "agreement", "residual", "ffn", "composition";
    against :func:`ffnlib.aggregation.classify` on every pattern of equalities."""
    from ..aggregation import classify

    patterns = [(7, 7, 7), (7, 9, 7), (7, 9, 9), (7, 9, 4), (7, 7, 4), (3, 3, 3), (5, 2, 5), (5, 2, 2), (1, 2, 3)]
    for residual, ffn, output in patterns:
        expected = str(classify([residual], [ffn], [output])[0])
        got = call_student(fn, residual, ffn, output)
        if got == expected:
            continue
        if got not in ("agreement", "residual", "ffn", "composition"):
            raise CheckFailed(f"`{name_of(fn)}` returned {got!r}; it should return one of 'agreement', 'residual', "
                              "'ffn', 'composition'.")
        raise CheckFailed(f"`{name_of(fn)}`({residual}, {ffn}, {output}) returned {got!r}; the case is {expected!r}. "
                          + ("When all three agree it is 'agreement': test that case first."
                             if expected == "agreement" else
                             "When residual and FFN agree but the output is another token, neither was kept: "
                             "'composition'." if residual == ffn else ""))
    passed(fn, "the same Fig. 11 case as ffnlib for every pattern of equal and different tokens.")
