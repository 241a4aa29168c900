"""The knowledge-neuron attribution of a prompt (:func:`knowledge_attribution`) and of many prompts, cached and
checkpointed (:func:`attribute_prompts`). The integration itself: :func:`fast_integrated_gradients` and
:func:`captum_integrated_gradients`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ...errors import ParameterError
from ...progress import tqdm
from ...storage import ensure_dir, fingerprint, load_result, save_result
from ._integrated_gradients import METHODS, TARGETS, captum_integrated_gradients, fast_integrated_gradients

__all__ = ["IMPLEMENTATIONS", "KEEP_RATIO", "Attribution", "knowledge_attribution", "Attributions", "score_rows",
           "attribute_prompts"]

IMPLEMENTATIONS = ("fast", "captum")
KEEP_RATIO = 0.1  # scores stored per prompt: >= 0.1 x the side's maximum (as the authors' 1_analyze_mlm.py)
_VERSION = 1  # bump when a stored column's computation changes


@dataclass
class Attribution:
    """Integrated-gradients scores of every memory of ``layers`` for one prompt and answer.

    ``scores[j, i]``: memory i of layer ``layers[j]``; ``coefficients[j, i]``: its m_i at the last prompt
    position; ``value``: the target at the real coefficients (P(first answer token), or log P(answer)).
    """

    layers: list[int]
    scores: torch.Tensor
    coefficients: torch.Tensor
    value: float
    target: str
    steps: int
    method: str
    implementation: str


def knowledge_attribution(loaded, prompt_ids: Sequence[int], answer_ids: Sequence[int], layers=None,
                          steps: int = 20, method: str = "riemann_left", target: str = "first_token",
                          implementation: str = "fast") -> Attribution:
    """**The knowledge-neuron attribution** (Dai et al., Eq. 3-4) of one prompt, for every memory of ``layers``.

    For layer l, let ``m`` be its coefficients at the last prompt position (the input of its ``down``
    module) and ``F(m')`` the target with ``m`` replaced by ``m'`` (all else unchanged): the probability of
    the answer's first token (``target="first_token"``), or the whole answer's log-probability
    (``"answer_logprob"``). The score of memory i is ``m_i * integral_0^1 dF(alpha m)/dm_i dalpha``, from the
    zero baseline, approximated with ``steps`` points of ``method`` (captum's names; Dai: a left Riemann sum
    of 20 points). ``implementation="captum"``: captum's IntegratedGradients, a whole forward pass per point;
    ``"fast"``: the same numbers from the prompt's cached keys and values, rerunning only the last position
    from layer l upward, all points as one batch (:func:`fast_integrated_gradients`).
    """
    adapter = loaded.adapter
    layer_list = adapter.check_layers(layers)
    if target not in TARGETS:
        raise ParameterError(f"target must be one of {TARGETS}, got {target!r}.")
    if implementation not in IMPLEMENTATIONS:
        raise ParameterError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if method not in METHODS:
        raise ParameterError(f"method must be one of {METHODS} (captum's names), got {method!r}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ParameterError(f"steps must be an int >= 2, got {steps!r}.")
    prompt_ids, answer_ids = [int(t) for t in prompt_ids], [int(t) for t in answer_ids]
    if not prompt_ids or not answer_ids:
        raise ParameterError("The prompt and the answer need at least one token each.")
    run = fast_integrated_gradients if implementation == "fast" else captum_integrated_gradients
    with torch.enable_grad():
        scores, coefficients, value = run(loaded, prompt_ids, answer_ids, layer_list, int(steps), method, target)
    return Attribution(layer_list, scores, coefficients, value, target, int(steps), method, implementation)


@dataclass
class Attributions:
    """The stored attribution of many prompts.

    ``scores``: prompt_id, layer, memory, sign (+1: m_i > 0; -1: m_i < 0), score (> 0), coefficient and
    ratio = score / the prompt's largest score of that sign; rows with ratio >= ``keep_ratio`` only (Dai's
    code stored >= 0.1 x max too). ``per_prompt``: prompt_id, value (the target at the real coefficients),
    max_positive, max_negative, total (sum of all scores, signed), seconds.
    """

    scores: pd.DataFrame
    per_prompt: pd.DataFrame
    manifest: dict


def score_rows(prompt_id: int, attribution: Attribution, keep_ratio: float) -> tuple[pd.DataFrame, dict]:
    """One prompt's stored rows (see :class:`Attributions`): each side's memories with a score >= ``keep_ratio`` x
    that side's largest, and the prompt's summary (value, total, max_positive, max_negative)."""
    scores, coefficients = attribution.scores, attribution.coefficients
    layers = torch.tensor(attribution.layers)
    frames, info = [], {"prompt_id": prompt_id, "value": attribution.value, "total": float(scores.sum())}
    for sign, name in ((1, "max_positive"), (-1, "max_negative")):
        side = (scores > 0) & (coefficients * sign > 0)
        best = float(scores[side].max()) if bool(side.any()) else 0.0
        info[name] = best
        if best <= 0:
            continue
        keep = side & (scores >= keep_ratio * best)
        rows, memories = keep.nonzero(as_tuple=True)
        frames.append(pd.DataFrame({"prompt_id": np.int64(prompt_id), "layer": layers[rows].numpy().astype(np.int16),
                                    "memory": memories.numpy().astype(np.int32), "sign": np.int8(sign),
                                    "score": scores[rows, memories].numpy(),
                                    "coefficient": coefficients[rows, memories].numpy(),
                                    "ratio": (scores[rows, memories] / best).numpy()}))
    empty = pd.DataFrame({"prompt_id": pd.Series(dtype=np.int64), "layer": pd.Series(dtype=np.int16),
                          "memory": pd.Series(dtype=np.int32), "sign": pd.Series(dtype=np.int8),
                          "score": pd.Series(dtype=np.float32), "coefficient": pd.Series(dtype=np.float32),
                          "ratio": pd.Series(dtype=np.float32)})
    return (pd.concat(frames, ignore_index=True) if frames else empty), info


def attribute_prompts(loaded, prompts: pd.DataFrame, layers=None, steps: int = 20, method: str = "riemann_left",
                      target: str = "first_token", implementation: str = "fast", keep_ratio: float = KEEP_RATIO,
                      out_dir=None, checkpoint_every: int = 10, progress: bool = True) -> Attributions:
    """:func:`knowledge_attribution` for every prompt of ``prompts`` (see :func:`build_prompts`).

    With ``out_dir``: finished prompts are checkpointed every ``checkpoint_every`` prompts (an interrupted
    run resumes, with identical results) and the result is cached with a manifest (model, prompts and
    parameters); a later call with the same manifest loads it and says so.
    """
    layer_list = loaded.adapter.check_layers(layers)
    if not 0 < keep_ratio <= 1:
        raise ParameterError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}.")
    if prompts.empty:
        raise ParameterError("There are no prompts to attribute (no fact was selected).")
    keys = prompts[["prompt_id", "prompt_ids", "answer_ids"]]
    request = {"analysis": "knowledge_attribution", "version": _VERSION, "model": loaded.key,
               "file_hash": loaded.file_hash, "prompts": fingerprint([[int(r.prompt_id), list(map(int, r.prompt_ids)),
                                                                       list(map(int, r.answer_ids))]
                                                                      for r in keys.itertuples()]),
               "n_prompts": len(prompts), "layers": layer_list, "steps": int(steps), "method": method,
               "target": target, "implementation": implementation, "keep_ratio": float(keep_ratio),
               "dtype": str(next(loaded.model.parameters()).dtype)}
    name = f"kn-attribution-{fingerprint(request)}"
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        scores = load_result(folder, name, request)
        per_prompt = load_result(folder, f"{name}-prompts", request)
        if scores is not None and per_prompt is not None:
            if progress:
                print(f"Loaded the cached attribution {folder / name}.parquet ({len(per_prompt)} prompts, same model, "
                      "prompts and parameters); not recomputing.")
            return Attributions(scores, per_prompt, request)
    partial = folder / f"{name}.partial" if folder is not None else None
    done_scores, done_info, chunk = [], [], 0
    if partial is not None and partial.exists():
        while (partial / f"chunk-{chunk:05d}.parquet").exists():
            part = load_result(partial, f"chunk-{chunk:05d}", {**request, "chunk": chunk})
            info = load_result(partial, f"chunk-{chunk:05d}-prompts", {**request, "chunk": chunk})
            if part is None or info is None:
                break
            done_scores.append(part)
            done_info.append(info)
            chunk += 1
        if progress and done_info:
            print(f"Resuming the attribution: {sum(len(i) for i in done_info)} of {len(prompts)} prompts were "
                  f"read from checkpoints in {partial}.")
    finished = {int(p) for info in done_info for p in info["prompt_id"]}
    todo = prompts[~prompts["prompt_id"].isin(finished)]
    pending_scores, pending_info = [], []
    bar = tqdm(total=len(prompts), initial=len(finished), unit="prompt", desc="Attributing prompts",
               disable=not progress)
    try:
        for row in todo.itertuples():
            started = time.perf_counter()
            attribution = knowledge_attribution(loaded, row.prompt_ids, row.answer_ids, layer_list, steps, method,
                                                target, implementation)
            frame, info = score_rows(int(row.prompt_id), attribution, keep_ratio)
            info["seconds"] = time.perf_counter() - started
            pending_scores.append(frame)
            pending_info.append(info)
            bar.update(1)
            if partial is not None and len(pending_info) >= checkpoint_every:
                save_result(partial, f"chunk-{chunk:05d}", pd.concat(pending_scores, ignore_index=True),
                            {**request, "chunk": chunk})
                save_result(partial, f"chunk-{chunk:05d}-prompts", pd.DataFrame(pending_info),
                            {**request, "chunk": chunk})
                done_scores.extend(pending_scores)
                done_info.append(pd.DataFrame(pending_info))
                pending_scores, pending_info, chunk = [], [], chunk + 1
    finally:
        bar.close()
    done_scores.extend(pending_scores)
    if pending_info:
        done_info.append(pd.DataFrame(pending_info))
    scores = pd.concat(done_scores, ignore_index=True).sort_values(["prompt_id", "sign", "layer", "memory"],
                                                                   ascending=[True, False, True, True])
    per_prompt = pd.concat(done_info, ignore_index=True).sort_values("prompt_id").reset_index(drop=True)
    scores = scores.reset_index(drop=True)
    if folder is not None:
        save_result(folder, name, scores, request)
        save_result(folder, f"{name}-prompts", per_prompt, request)
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return Attributions(scores, per_prompt, request)
