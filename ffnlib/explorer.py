"""The memory explorer's analyses: what a memory stores, what a prompt uses, what an edit changes.

Three views, each a plain function returning a dataclass (the widgets in ``ffnlib.widgets.explorer``
and the static atlas in ``ffnlib.atlas`` only render them):

- **Memory view** (:func:`memory_view`): one memory ``(layer, i)``: its top trigger examples (mined by
  ``ffnlib.keys.mine_trigger_examples``) with the prefix's last token marked, the top tokens of its value
  ``v_i`` (and of ``-v_i`` for gated FFNs, whose coefficients can be negative), its coefficient over a
  corpus sample (:class:`CoefficientSample`) and the Section 3 pattern measures of its triggers.
- **Prompt view** (:func:`analyse_prompt`): for each layer, the memories that contribute most to the
  next-token prediction at the prompt's last position, ranked by ``|m_i|·||v_i||`` as LM-Debugger ranks
  sub-updates, each with the top tokens of ``v_i`` (or ``-v_i`` when ``m_i < 0``), and the residual's top
  prediction before and after the FFN (``Adapter.logits_from_residual``).
- **Attribution** (:func:`attribute_prediction`, the prompt view's "attribute" action): the memories with the
  largest knowledge-neuron attribution (integrated gradients, Dai et al. 2022, through
  ``ffnlib.related.knowledge_neurons.knowledge_attribution``) for the model's prediction at the prompt's last
  position, each with the top tokens of its value.
- **Interventions** (:func:`compare_intervention`): the next-token distribution and a short greedy
  continuation with and without edits made by ``ffnlib.interventions.intervene``.
- **Contributions** (:func:`contribution_maps`): for the prompt and one layer, the four maps of Kobayashi et al.
  (ICLR 2024; ``ffnlib.related.contextualization``): how much each input token contributes to each position after
  attention (ATB), through the FFN (ATBFF), after the FFN's residual (ATBFFRES) and through the next norm
  (ATBFFRESLN), each row normalised to sum to 1.

Search (:func:`search_value_token`, :func:`search_trigger_word`) jumps to memories whose value promotes
a token, or whose trigger examples contain a word. :class:`Explorer` holds the state the widgets show.
The ``render_*`` functions turn the dataclasses into self-contained HTML (inline CSS and SVG, no script),
which the widgets display and the atlas writes to files.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .capture import capture, forward_until_stop, stop_after
from .errors import ParameterError
from .interventions import intervene
from .related import contextualization as ctx

SEARCH_BY = ("value token", "trigger word")


# ---- small helpers --------------------------------------------------------------------------------
def _check_memory(adapter, layer: int, memory: int) -> tuple[int, int]:
    layer = adapter.check_layer(layer)
    if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or not 0 <= memory < adapter.d_ff:
        raise ParameterError(f"Memory {memory!r} is out of range: layers have {adapter.d_ff} memories "
                             f"(0..{adapter.d_ff - 1}).")
    return layer, int(memory)


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ParameterError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ParameterError(f"The prompt must be a non-empty string, got {prompt!r}. Type some text first.")
    return prompt


@torch.no_grad()
def value_norms(adapter, layer: int) -> torch.Tensor:
    """||v_i|| for every memory of one layer (d_ff,)."""
    return adapter.values(layer).float().norm(dim=-1)


@torch.no_grad()
def top_tokens(loaded, layer: int, memories: Sequence[int], signs: Sequence[int] | int = 1,
               k: int = 10) -> list[pd.DataFrame]:
    """The ``k`` most probable tokens of ``sign * v_i`` for each memory, read as the model reads its residual.

    Returns one DataFrame (rank, token_id, token, probability) per memory, in the order given.
    """
    adapter = loaded.adapter
    memories = [int(m) for m in memories]
    if not memories:
        return []
    signs = [signs] * len(memories) if isinstance(signs, (int, np.integer)) else [int(s) for s in signs]
    if any(s not in (1, -1) for s in signs):
        raise ParameterError(f"sign must be +1 or -1, got {signs}.")
    vectors = adapter.values(layer)[memories] * torch.tensor(signs, dtype=adapter.values(layer).dtype,
                                                           device=adapter.values(layer).device)[:, None]
    probs = adapter.logits_from_values(vectors).float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    frames = []
    for row in range(len(memories)):
        ids = top.indices[row].tolist()
        frames.append(pd.DataFrame({"rank": np.arange(len(ids)), "token_id": ids,
                                    "token": loaded.token_strings(ids),
                                    "probability": top.values[row].cpu().numpy()}))
    return frames


def _distribution(loaded, logits: torch.Tensor, k: int) -> pd.DataFrame:
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]))
    ids = top.indices.tolist()
    return pd.DataFrame({"rank": np.arange(len(ids)), "token_id": ids, "token": loaded.token_strings(ids),
                         "probability": top.values.cpu().numpy()})


# ---- prompt view ----------------------------------------------------------------------------------
@dataclass
class PromptAnalysis:
    """What the model does with a prompt at its last position, layer by layer.

    ``memories``: one row per (layer, rank): memory, coefficient m_i, value_norm ||v_i||,
    score = |m_i|·||v_i||, sign (+1: the memory writes v_i; -1: it writes -v_i), top_tokens (list of str)
    and top_token_ids. ``layers``: one row per layer: the top token and its probability of the residual
    before the FFN and after it (``before_*``, ``after_*``), ``changed`` (the FFN changed the top token),
    and the probability each gives the model's final prediction (``before_p_final``, ``after_p_final``).
    ``prediction``: the model's own next-token distribution (top tokens).
    """

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    memories: pd.DataFrame
    layers: pd.DataFrame
    prediction: pd.DataFrame

    def contributors(self, n: int | None = None) -> pd.DataFrame:
        """The memories of all layers by score, largest first (``n`` of them)."""
        frame = self.memories.sort_values("score", ascending=False, kind="stable")
        return frame.head(n) if n is not None else frame


@torch.no_grad()
def analyse_prompt(loaded, prompt: str, layers: Iterable[int] | None = None, top_memories: int = 5,
                   k_tokens: int = 5, k_prediction: int = 10) -> PromptAnalysis:
    """Per layer, the memories that contribute most at the prompt's last position, and the residual's top
    prediction before and after the FFN (see :class:`PromptAnalysis`)."""
    prompt = _check_prompt(prompt)
    top_memories, k_tokens = _check_positive("top_memories", top_memories), _check_positive("k_tokens", k_tokens)
    adapter = loaded.adapter
    layer_list = adapter.check_layers(layers)
    ids = loaded.encode(prompt)
    inputs = torch.tensor([ids], device=loaded.device)
    with capture(loaded, layer_list, what=("coefficients", "residual_before", "residual_after")) as acts:
        logits = loaded.model(inputs).logits[0, -1]
    final = int(logits.argmax())
    memory_rows, vectors = [], []
    for layer in layer_list:
        m = acts.coefficients[layer][0, -1].float()
        values = adapter.values(layer)
        norms = values.float().norm(dim=-1).to(m.device)
        score = m.abs() * norms
        for rank, memory in enumerate(score.topk(min(top_memories, adapter.d_ff)).indices.tolist()):
            sign = 1 if float(m[memory]) >= 0 else -1
            vectors.append(sign * values[memory])
            memory_rows.append({"layer": layer, "rank": rank, "memory": memory, "coefficient": float(m[memory]),
                                "value_norm": float(norms[memory]), "score": float(score[memory]), "sign": sign})
    # every projection of the analysis in two batched calls: memories (sign * v_i), then residuals
    top = adapter.logits_from_values(torch.stack(vectors)).float().softmax(-1).topk(k_tokens, dim=-1)
    for row, ids_ in zip(memory_rows, top.indices.tolist()):
        row["top_tokens"], row["top_token_ids"] = loaded.token_strings(ids_), ids_
    residuals = torch.stack([getattr(acts, f"residual_{side}")[layer][0, -1]
                             for layer in layer_list for side in ("before", "after")])
    probs = adapter.logits_from_residual(residuals).float().softmax(-1).reshape(len(layer_list), 2, -1)
    layer_rows = []
    for i, layer in enumerate(layer_list):
        row = {"layer": layer}
        for j, side in enumerate(("before", "after")):
            best = int(probs[i, j].argmax())
            row.update({f"{side}_token_id": best, f"{side}_token": loaded.token_strings([best])[0],
                        f"{side}_prob": float(probs[i, j, best]), f"{side}_p_final": float(probs[i, j, final])})
        row["changed"] = row["before_token_id"] != row["after_token_id"]
        layer_rows.append(row)
    return PromptAnalysis(prompt=prompt, token_ids=ids, tokens=loaded.token_strings(ids),
                          memories=pd.DataFrame(memory_rows), layers=pd.DataFrame(layer_rows),
                          prediction=_distribution(loaded, logits, k_prediction))


# ---- attribution (the prompt view's "attribute" action) ----------------------------------------------
@dataclass
class PromptAttribution:
    """The memories that most support the model's prediction at the prompt's last position.

    ``memories``: one row per memory, largest attribution first: layer, memory, score (integrated gradients of
    the predicted token's probability, Dai et al.'s knowledge-neuron attribution), coefficient m_i, sign
    (+1: the memory writes v_i; -1: m_i < 0, it writes -v_i), top_tokens and top_token_ids of ``sign * v_i``.
    """

    prompt: str
    tokens: list[str]
    token_id: int
    token: str
    probability: float
    layers: list[int]
    steps: int
    memories: pd.DataFrame


def attribute_prediction(loaded, prompt: str, top: int = 10, layers: Iterable[int] | None = None, steps: int = 20,
                         k_tokens: int = 5) -> PromptAttribution:
    """The ``top`` memories with the largest attribution for the model's own next-token prediction.

    Every memory of ``layers`` (all by default) at the prompt's last position is scored by
    :func:`ffnlib.related.knowledge_neurons.knowledge_attribution` (zero baseline, ``steps`` points); the
    positive scores are ranked. On a CPU this takes a few seconds for SmolLM2's 30 layers.
    """
    from .related.knowledge_neurons import knowledge_attribution

    prompt = _check_prompt(prompt)
    top, k_tokens = _check_positive("top", top), _check_positive("k_tokens", k_tokens)
    ids = loaded.encode(prompt)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids], device=loaded.device)).logits[0, -1].float()
    token = int(logits.argmax())
    result = knowledge_attribution(loaded, ids, [token], layers=layers, steps=steps)
    scores = result.scores.flatten()
    best = scores.topk(min(top, int((scores > 0).sum()) or 1)).indices.tolist()
    d_ff = result.scores.shape[1]
    rows = []
    for index in best:
        layer, memory = result.layers[index // d_ff], index % d_ff
        coefficient = float(result.coefficients[index // d_ff, memory])
        rows.append({"layer": layer, "memory": memory, "score": float(scores[index]), "coefficient": coefficient,
                     "sign": 1 if coefficient >= 0 else -1})
    for row in rows:
        table = top_tokens(loaded, row["layer"], [row["memory"]], row["sign"], k=k_tokens)[0]
        row["top_tokens"], row["top_token_ids"] = table["token"].tolist(), table["token_id"].tolist()
    return PromptAttribution(prompt=prompt, tokens=loaded.token_strings(ids), token_id=token,
                             token=loaded.token_strings([token])[0], probability=float(logits.softmax(-1)[token]),
                             layers=result.layers, steps=result.steps, memories=pd.DataFrame(rows))


# ---- interventions --------------------------------------------------------------------------------
_EDIT = re.compile(r"^\s*L?(-?\d+)\s*[:/]\s*#?(\d+)\s*(?:=\s*(\S+))?\s*$", re.I)


def parse_edits(text: str) -> dict[tuple[int, int], float]:
    """Read edits written as ``layer:memory`` (switch off) or ``layer:memory=value`` (set the coefficient),
    separated by commas, semicolons or new lines, e.g. ``"28:1234, 20:77=5"``."""
    if not isinstance(text, str):
        raise ParameterError(f"Edits must be text like '28:1234, 20:77=5', got {text!r}.")
    edits: dict[tuple[int, int], float] = {}
    for part in re.split(r"[,;\n]", text):
        if not part.strip():
            continue
        match = _EDIT.match(part)
        if not match:
            raise ParameterError(f"Cannot read the edit {part.strip()!r}: write layer:memory to switch a memory "
                                 "off, or layer:memory=value to set its coefficient (e.g. 28:1234=0, 20:77=5).")
        layer, memory, value = int(match.group(1)), int(match.group(2)), match.group(3)
        if value is None or value.lower() == "off":
            amount = 0.0
        else:
            try:
                amount = float(value)
            except ValueError as exc:
                raise ParameterError(f"The value in {part.strip()!r} must be a number (or 'off').") from exc
            if not np.isfinite(amount):
                raise ParameterError(f"The value in {part.strip()!r} must be a finite number.")
        edits[(layer, memory)] = amount
    return edits


def format_edits(edits: Mapping[tuple[int, int], float]) -> str:
    """The inverse of :func:`parse_edits`."""
    return ", ".join(f"{layer}:{memory}" if value == 0 else f"{layer}:{memory}={value:g}"
                     for (layer, memory), value in edits.items())


@torch.no_grad()
def greedy_continuation(loaded, ids: Sequence[int], max_new_tokens: int = 10) -> list[int]:
    """The greedy continuation of ``ids`` (token ids), with the model's KV cache.

    Inside ``intervene`` every step runs under the edits (the cached keys and values of earlier positions
    were computed under them too), so the continuation is that of the edited model.
    """
    eos = loaded.tokenizer.eos_token_id
    new: list[int] = []
    past, step = None, torch.tensor([list(ids)], device=loaded.device)
    for _ in range(max_new_tokens):
        out = loaded.model(input_ids=step, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if eos is not None and token == eos:
            break
        step = torch.tensor([[token]], device=loaded.device)
    return new


@dataclass
class InterventionComparison:
    """The next-token distribution and a greedy continuation, without and with the edits.

    ``changes``: the union of both top-k lists: token_id, token, p_before, p_after, logit_before,
    logit_after, logit_change, logprob_change.
    """

    prompt: str
    edits: dict
    before: pd.DataFrame
    after: pd.DataFrame
    changes: pd.DataFrame
    continuation_before: str
    continuation_after: str


@torch.no_grad()
def compare_intervention(loaded, prompt: str, edits: Mapping[tuple[int, int], float], k: int = 10,
                         max_new_tokens: int = 10, scale: bool = False,
                         track: Sequence[int] = ()) -> InterventionComparison:
    """Run the prompt without and with ``edits`` (``{(layer, memory): coefficient}``; 0 switches off).

    ``changes`` covers the top-``k`` tokens of both runs and the token ids in ``track``. Uses
    :func:`ffnlib.interventions.intervene`, whose hooks are removed afterwards in every case.
    """
    prompt = _check_prompt(prompt)
    if not edits:
        raise ParameterError("No edits given: choose memories to switch off or set (e.g. 28:1234 or 20:77=5).")
    k = _check_positive("k", k)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ParameterError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}.")
    ids = loaded.encode(prompt)
    inputs = torch.tensor([ids], device=loaded.device)
    base = loaded.model(inputs).logits[0, -1].float()
    continuation_before = greedy_continuation(loaded, ids, max_new_tokens)
    with intervene(loaded, dict(edits), scale=scale):
        edited = loaded.model(inputs).logits[0, -1].float()
        continuation_after = greedy_continuation(loaded, ids, max_new_tokens)
    before, after = _distribution(loaded, base, k), _distribution(loaded, edited, k)
    union = list(dict.fromkeys(before["token_id"].tolist() + after["token_id"].tolist() + [int(t) for t in track]))
    p_base, p_edit = base.softmax(-1), edited.softmax(-1)
    changes = pd.DataFrame({"token_id": union, "token": loaded.token_strings(union),
                            "p_before": p_base[union].cpu().numpy(), "p_after": p_edit[union].cpu().numpy(),
                            "logit_before": base[union].cpu().numpy(), "logit_after": edited[union].cpu().numpy()})
    changes["logit_change"] = changes["logit_after"] - changes["logit_before"]
    changes["logprob_change"] = np.log(changes["p_after"].clip(lower=1e-30)) - np.log(
        changes["p_before"].clip(lower=1e-30))
    decode = loaded.tokenizer.decode
    return InterventionComparison(prompt=prompt, edits=dict(edits), before=before, after=after, changes=changes,
                                  continuation_before=decode(continuation_before),
                                  continuation_after=decode(continuation_after))


# ---- coefficients over a corpus sample --------------------------------------------------------------
class CoefficientSample:
    """Every token's coefficients of one layer over a sample of sentences, for the memory view's histogram.

    A layer is computed when first asked for (one batched forward pass that stops after that layer) and
    the last ``cached_layers`` layers are kept; :meth:`prefetch` gets many memories of many layers in one
    pass. BOS positions and padding are left out. Sentences are cut to ``max_tokens`` tokens.
    """

    def __init__(self, loaded, texts: Iterable[str] | pd.DataFrame, max_tokens: int = 48, batch_size: int = 16,
                 cached_layers: int = 4):
        if isinstance(texts, pd.DataFrame):
            texts = texts["text"].tolist()
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ParameterError("CoefficientSample needs at least one non-empty sentence.")
        self.loaded = loaded
        self.batch_size = _check_positive("batch_size", batch_size)
        self.cached_layers = _check_positive("cached_layers", cached_layers)
        self.ids = [loaded.encode(t)[:_check_positive("max_tokens", max_tokens)] for t in texts]
        self._start = len(loaded.bos)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._columns: dict[tuple[int, int], np.ndarray] = {}

    @property
    def n_sentences(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        return sum(max(0, len(ids) - self._start) for ids in self.ids)

    def _run(self, layers: list[int], keep) -> None:
        """One batched pass over the sample that stops after the last of ``layers``; ``keep(layer, m)`` gets
        each layer's coefficients (real tokens only, BOS left out) batch by batch."""
        pad = self.loaded.tokenizer.pad_token_id or 0
        for start in range(0, len(self.ids), self.batch_size):
            batch = self.ids[start: start + self.batch_size]
            width = max(len(ids) for ids in batch)
            inputs = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                inputs[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            with capture(self.loaded, layers, what=("coefficients",)) as acts, \
                    stop_after(self.loaded, max(layers)), torch.no_grad():
                forward_until_stop(self.loaded.model, input_ids=inputs.to(self.loaded.device),
                                   attention_mask=mask.to(self.loaded.device), use_cache=False)
            real = mask.bool()
            real[:, : self._start] = False
            for layer in layers:
                keep(layer, acts.coefficients[layer].float().cpu()[real])

    def layer(self, layer: int) -> torch.Tensor:
        """The coefficients (n_tokens, d_ff) of one layer, on the CPU."""
        layer = self.loaded.adapter.check_layer(layer)
        if layer in self._cache:
            self._cache.move_to_end(layer)
            return self._cache[layer]
        parts: list[torch.Tensor] = []
        self._run([layer], lambda _, m: parts.append(m))
        self._cache[layer] = torch.cat(parts)
        while len(self._cache) > self.cached_layers:
            self._cache.popitem(last=False)
        return self._cache[layer]

    def prefetch(self, memories: Iterable[tuple[int, int]]) -> None:
        """Compute the coefficients of many memories, of any layers, in one pass over the sample (the atlas
        uses this), keeping only those memories' columns."""
        wanted: dict[int, list[int]] = {}
        for layer, memory in memories:
            layer, memory = _check_memory(self.loaded.adapter, layer, memory)
            if (layer, memory) not in self._columns and layer not in self._cache:
                wanted.setdefault(layer, []).append(memory)
        if not wanted:
            return
        parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
        self._run(sorted(wanted), lambda layer, m: parts[layer].append(m[:, wanted[layer]]))
        for layer, chunks in parts.items():
            columns = torch.cat(chunks)
            for j, memory in enumerate(wanted[layer]):
                self._columns[(layer, memory)] = columns[:, j].numpy()

    def of(self, layer: int, memory: int) -> np.ndarray:
        """The coefficients of one memory at every token of the sample."""
        layer, memory = _check_memory(self.loaded.adapter, layer, memory)
        if (layer, memory) in self._columns and layer not in self._cache:
            return self._columns[(layer, memory)]
        return self.layer(layer)[:, memory].numpy()


# ---- memory view ----------------------------------------------------------------------------------
def _sentence_index(triggers) -> dict[int, list[int]]:
    """sentence_id -> token ids of mined trigger examples."""
    return triggers.token_index()


def pattern_measures(loaded, triggers, rows: pd.DataFrame) -> dict:
    """Section 3's pattern measures of one key's trigger rows (``ffnlib.keys.key_pattern_measures``:
    ``shallow_token``, ``shallow_bigram``, ``topic_concentration``, ...), plus the most common last token
    of the triggers and its share, for display."""
    from .keys import key_pattern_measures

    measures = {}
    for name, value in key_pattern_measures(loaded, triggers, rows).items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and not np.isfinite(value):
            value = None
        elif name in ("triggers", "labelled") and value is not None:
            value = int(value)
        measures[name] = value
    if not rows.empty:
        index = triggers.token_index()
        lasts = pd.Series([int(index[int(s)][int(p)]) for s, p in zip(rows["sentence_id"], rows["position"])])
        counts = lasts.value_counts()
        measures["most_common_last_token"] = loaded.token_strings([int(counts.index[0])])[0]
        measures["its_share"] = float(counts.iloc[0] / len(rows))
    return measures


def key_rows(triggers, layer: int, memory: int, sign: int = 1) -> pd.DataFrame:
    """One key's rows of ``triggers.triggers`` (strongest first), as ``triggers.of`` gives them.

    The miner writes its table in blocks of k rows ordered by sign (+1 first), layer and memory, so the
    block is found by arithmetic; it is checked, and ``triggers.of`` (a scan of the whole table) is used
    whenever the table is laid out otherwise.
    """
    table, manifest = triggers.triggers, getattr(triggers, "manifest", None) or {}
    try:
        layers, k = [int(x) for x in manifest["layers"]], int(manifest["k"])
        signs = [1, -1] if manifest.get("negative") else [1]
        d_ff = len(table) // (len(signs) * len(layers) * k)
        if sign in signs and layer in layers and 0 <= memory < d_ff:
            start = ((signs.index(sign) * len(layers) + layers.index(layer)) * d_ff + memory) * k
            rows = table.iloc[start: start + k]
            if (len(rows) == k and (rows["layer"].to_numpy() == layer).all()
                    and (rows["memory"].to_numpy() == memory).all() and (rows["sign"].to_numpy() == sign).all()
                    and (rows["rank"].to_numpy() == np.arange(k)).all()):
                return rows.reset_index(drop=True)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    return triggers.of(layer, memory, sign)


def _mined_negative(triggers, adapter) -> bool:
    """Whether the trigger examples have a negative side (sign -1)."""
    manifest = getattr(triggers, "manifest", None) or {}
    if "negative" in manifest:
        return bool(manifest["negative"])
    return bool((triggers.triggers["sign"] == -1).any())


@dataclass
class MemorySide:
    """One sign of a memory: sign +1 is v_i with its top positive coefficients, sign -1 is -v_i with the
    most negative coefficients (gated FFNs only)."""

    sign: int
    triggers: pd.DataFrame  # rank, coefficient, sentence_id, position, next_token, prefix, last_token, ...
    top_tokens: pd.DataFrame  # rank, token_id, token, probability
    measures: dict


@dataclass
class MemoryView:
    layer: int
    memory: int
    value_norm: float
    sides: list[MemorySide]
    sample: np.ndarray | None = None  # the memory's coefficient at every token of a corpus sample
    n_sample_sentences: int = 0

    def side(self, sign: int) -> MemorySide | None:
        return next((s for s in self.sides if s.sign == sign), None)


def memory_view(loaded, triggers, layer: int, memory: int, n_triggers: int = 10, k_tokens: int = 10,
                sample: CoefficientSample | None = None, negative: bool | None = None) -> MemoryView:
    """Everything the memory view shows for memory ``memory`` of ``layer`` (see the module docstring).

    ``triggers`` is a ``ffnlib.keys.TriggerExamples`` (or ``None``: values only). ``negative`` adds the
    negative side, ``-v_i`` and the most negative coefficients (default: when the triggers were mined with
    a negative side, i.e. for gated FFNs).
    """
    adapter = loaded.adapter
    layer, memory = _check_memory(adapter, layer, memory)
    n_triggers, k_tokens = _check_positive("n_triggers", n_triggers), _check_positive("k_tokens", k_tokens)
    if negative is None:
        negative = _mined_negative(triggers, adapter) if triggers is not None else adapter.gated
    signs = [1, -1] if negative else [1]
    tokens = top_tokens(loaded, layer, [memory] * len(signs), signs, k_tokens)
    sides = []
    for sign, table in zip(signs, tokens):
        if triggers is not None:
            from .keys import trigger_table

            rows = key_rows(triggers, layer, memory, sign)
            one_key = dataclasses.replace(triggers, triggers=rows)  # trigger_table then scans k rows, not all
            shown = trigger_table(one_key, loaded.tokenizer, layer, memory, sign, n=n_triggers)
            measures = pattern_measures(loaded, triggers, rows)
        else:
            shown, measures = pd.DataFrame(), {}
        sides.append(MemorySide(sign=sign, triggers=shown, top_tokens=table, measures=measures))
    return MemoryView(layer=layer, memory=memory, value_norm=float(adapter.values(layer)[memory].float().norm()),
                      sides=sides, sample=sample.of(layer, memory) if sample is not None else None,
                      n_sample_sentences=sample.n_sentences if sample is not None else 0)


# ---- search ---------------------------------------------------------------------------------------
def _token_variants(tokenizer, word: str) -> list[list[int]]:
    """Token id sequences of ``word`` as it may appear in text: with and without a leading space,
    as typed, lower case and capitalised."""
    word = word.strip()
    forms = dict.fromkeys([word, word.lower(), word.capitalize(), word.upper()])
    seqs = []
    for form in forms:
        for text in (" " + form, form):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


class ValueIndex:
    """Finds the memories whose value promotes a given token, without projecting every value.

    For a value ``v`` read as ``x = g ⊙ v`` (mean-centred first for a LayerNorm), the logit of token ``t``
    is ``x·e_t (+ b_t)``. Its z-score against the whole vocabulary, ``(x·e_t + b_t - mean) / std``, costs
    one matrix-vector product per layer, since the mean and spread of ``x·e`` over the vocabulary follow
    from the mean and covariance of the head's rows. The best candidates by z-score are then projected
    exactly (``Adapter.logits_from_values``) to get the token's rank and probability.
    """

    def __init__(self, loaded):
        self.loaded = loaded
        adapter = loaded.adapter
        weight = adapter.head.weight.detach().float()
        bias = getattr(adapter.head, "bias", None)
        self.bias = bias.detach().float() if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        self.weight = weight
        self.mean = weight.mean(0)
        centred = weight - self.mean
        self.covariance = centred.T @ centred / weight.shape[0]
        self.bias_mean, self.bias_var = float(self.bias.mean()), float(self.bias.var(unbiased=False))
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _layer(self, layer: int):
        if layer not in self._inputs:
            adapter = self.loaded.adapter
            x = adapter.values(layer).float()
            if adapter.is_layernorm():
                x = x - x.mean(-1, keepdim=True)
            x = x * adapter.norm_gain().float()
            mean = x @ self.mean + self.bias_mean
            std = ((x @ self.covariance) * x).sum(-1).add(self.bias_var).clamp_min(1e-12).sqrt()
            self._inputs[layer] = (x, mean, std)
        return self._inputs[layer]

    @torch.no_grad()
    def z_scores(self, token_id: int, layers: Iterable[int] | None = None) -> torch.Tensor:
        """(n_layers, d_ff) z-score of ``token_id``'s logit in each value's distribution (for ``+v_i``)."""
        layer_list = self.loaded.adapter.check_layers(layers)
        e, b = self.weight[token_id], float(self.bias[token_id])
        rows = []
        for layer in layer_list:
            x, mean, std = self._layer(layer)
            rows.append((x @ e + b - mean) / std)
        return torch.stack(rows)

    @torch.no_grad()
    def search(self, token_id: int, layers: Iterable[int] | None = None, negative: bool | None = None,
               limit: int = 20, candidates: int = 100) -> pd.DataFrame:
        """Memories whose value (or negated value, gated FFNs) ranks ``token_id`` highest.

        Returns layer, memory, sign, token_id, token, rank (0 = the value's top token), probability, z;
        sorted by rank, then probability.
        """
        adapter = self.loaded.adapter
        layer_list = adapter.check_layers(layers)
        negative = adapter.gated if negative is None else bool(negative)
        z = self.z_scores(token_id, layer_list)
        found = []
        for sign in ([1, -1] if negative else [1]):
            flat = (sign * z).flatten()
            best = flat.topk(min(candidates, flat.numel()))
            for value, position in zip(best.values.tolist(), best.indices.tolist()):
                found.append((layer_list[position // adapter.d_ff], position % adapter.d_ff, sign, value))
        rows = []
        for layer in sorted({f[0] for f in found}):
            picked = [f for f in found if f[0] == layer]
            vectors = adapter.values(layer)[[f[1] for f in picked]] * torch.tensor(
                [float(f[2]) for f in picked], device=adapter.values(layer).device)[:, None]
            logits = adapter.logits_from_values(vectors).float()
            ranks = (logits > logits[:, token_id: token_id + 1]).sum(-1)
            probs = logits.softmax(-1)[:, token_id]
            for (lay, memory, sign, value), rank, prob in zip(picked, ranks.tolist(), probs.tolist()):
                rows.append({"layer": lay, "memory": memory, "sign": sign, "token_id": token_id, "rank": int(rank),
                             "probability": float(prob), "z": float(value)})
        frame = pd.DataFrame(rows, columns=["layer", "memory", "sign", "token_id", "rank", "probability", "z"])
        frame.insert(4, "token", self.loaded.token_strings([token_id])[0] if len(frame) else [])
        frame = frame.sort_values(["rank", "probability"], ascending=[True, False], kind="stable")
        return frame.head(_check_positive("limit", limit)).reset_index(drop=True)


def search_value_token(loaded, token: str, layers: Iterable[int] | None = None, limit: int = 20,
                       index: ValueIndex | None = None, negative: bool | None = None) -> pd.DataFrame:
    """Memories whose value promotes ``token`` (a word or piece that is one token of the model, with or
    without a leading space), best first. See :class:`ValueIndex`."""
    if not isinstance(token, str) or not token.strip():
        raise ParameterError(f"Search for a non-empty token, got {token!r}.")
    tokenizer = loaded.tokenizer
    singles = [ids[0] for ids in _token_variants(tokenizer, token) if len(ids) == 1]
    typed = [ids for ids in (tokenizer(" " + token.strip(), add_special_tokens=False)["input_ids"],
                             tokenizer(token.strip(), add_special_tokens=False)["input_ids"]) if len(ids) == 1]
    candidates = list(dict.fromkeys([ids[0] for ids in typed] + singles))[:2]
    if not candidates:
        pieces = loaded.token_strings(tokenizer(" " + token.strip(), add_special_tokens=False)["input_ids"])
        raise ParameterError(f"{token.strip()!r} is not a single token of {loaded.name}: it splits into {pieces}. "
                             "Search for one of those pieces.")
    index = index or ValueIndex(loaded)
    frames = [index.search(t, layers, negative=negative, limit=limit) for t in candidates]
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["rank", "probability"], ascending=[True, False], kind="stable").head(limit).reset_index(
        drop=True)


def _occurrences(ids: Sequence[int], patterns: list[list[int]]) -> list[int]:
    """End positions of every occurrence of any pattern in ``ids``."""
    ends = []
    for pattern in patterns:
        n = len(pattern)
        for start in range(len(ids) - n + 1):
            if ids[start] == pattern[0] and list(ids[start: start + n]) == pattern:
                ends.append(start + n - 1)
    return sorted(set(ends))


def search_trigger_word(loaded, triggers, word: str, limit: int = 20, index: dict | None = None) -> pd.DataFrame:
    """Memories whose trigger examples contain ``word`` (any case, with or without a leading space).

    Returns layer, memory, sign, last (triggers whose prefix *ends* with the word), anywhere (triggers
    whose prefix contains it), best_rank (the best-ranked such trigger) and n_triggers; sorted by last,
    then anywhere, then best_rank.
    """
    if not isinstance(word, str) or not word.strip():
        raise ParameterError(f"Search for a non-empty word, got {word!r}.")
    if triggers is None:
        raise ParameterError("Searching triggers needs mined trigger examples (ffnlib.keys.mine_trigger_examples).")
    patterns = _token_variants(loaded.tokenizer, word)
    index = index if index is not None else _sentence_index(triggers)
    first_end: dict[int, int] = {}
    ends: set[tuple[int, int]] = set()
    for sentence_id, ids in index.items():
        found = _occurrences([int(t) for t in ids], patterns)
        if found:
            first_end[sentence_id] = found[0]
            ends.update((sentence_id, e) for e in found)
    columns = ["layer", "memory", "sign", "last", "anywhere", "best_rank", "n_triggers"]
    if not first_end:
        return pd.DataFrame(columns=columns)
    table = triggers.triggers
    rows = table[table["sentence_id"].isin(list(first_end))]
    first = rows["sentence_id"].map(first_end)
    contains = rows["position"].to_numpy() >= first.to_numpy()
    rows = rows[contains].copy()
    end_keys = np.array([(s << 20) | e for s, e in ends], dtype=np.int64)
    rows["is_last"] = np.isin((rows["sentence_id"].to_numpy(np.int64) << 20) | rows["position"].to_numpy(np.int64),
                              end_keys)
    grouped = rows.groupby(["layer", "memory", "sign"]).agg(last=("is_last", "sum"), anywhere=("is_last", "size"),
                                                            best_rank=("rank", "min")).reset_index()
    k = (getattr(triggers, "manifest", None) or {}).get("k")
    if k is None:
        counts = table.groupby(["layer", "memory", "sign"]).size().rename("n_triggers").reset_index()
        grouped = grouped.merge(counts, on=["layer", "memory", "sign"])
    else:
        grouped["n_triggers"] = int(k)
    grouped = grouped.sort_values(["last", "anywhere", "best_rank"], ascending=[False, False, True], kind="stable")
    return grouped[columns].head(_check_positive("limit", limit)).astype(
        {"last": int, "anywhere": int, "best_rank": int, "n_triggers": int}).reset_index(drop=True)


# ---- contributions (Kobayashi et al. 2024) ---------------------------------------------------------
@dataclass
class ContributionMaps:
    """The contribution maps of one prompt at one layer: ``maps[stage]`` is a (n, n) array whose row ``i`` says
    how position ``i``'s vector at that stage shares itself among the input tokens ``j ≤ i`` (row-normalised
    norms ``‖y_{i←j}‖``); ``stages`` are those of :data:`ffnlib.related.contextualization.MAIN_STAGES` this layer
    has."""

    prompt: str
    layer: int
    tokens: list[str]
    stages: tuple[str, ...]
    maps: dict[str, np.ndarray]


def contribution_maps(loaded, prompt: str, layer: int, max_tokens: int = ctx.MAX_TOKENS) -> ContributionMaps:
    """The four maps (ATB, ATBFF, ATBFFRES, ATBFFRESLN) of ``prompt`` at ``layer`` (see :class:`ContributionMaps`).
    A prompt longer than ``max_tokens`` or a layer out of range raises a ParameterError that says so."""
    prompt = _check_prompt(prompt)
    layer = loaded.adapter.check_layer(layer)
    result = ctx.decompose(loaded, prompt, layers=[layer], max_tokens=max_tokens)
    stages = tuple(stage for stage in ctx.MAIN_STAGES if stage in result.stages[layer])
    maps = {}
    for stage in stages:
        raw = result.map(layer, stage)
        total = raw.sum(1, keepdims=True)
        maps[stage] = raw / np.where(total > 0, total, 1.0)
    return ContributionMaps(prompt, layer, loaded.token_strings(result.token_ids[0]), stages, maps)


# ---- the explorer's state -------------------------------------------------------------------------
@dataclass
class Explorer:
    """What the explorer widgets show, and the actions they call, as plain methods (tested without a browser).

    ``triggers``: a ``TriggerExamples`` (``None`` disables trigger examples and the trigger search);
    ``sample``: a :class:`CoefficientSample` for the histogram (``None`` leaves it out).
    """

    loaded: object
    triggers: object = None
    sample: CoefficientSample | None = None
    n_triggers: int = 10
    k_tokens: int = 10
    top_memories: int = 5
    max_new_tokens: int = 10
    layer: int = 0
    memory: int = 0
    view: MemoryView | None = None
    results: pd.DataFrame | None = None
    analysis: PromptAnalysis | None = None
    attribution: PromptAttribution | None = None
    top_attributed: int = 10
    steps: int = 20
    comparison: InterventionComparison | None = None
    contributions_view: ContributionMaps | None = None
    edits: dict = field(default_factory=dict)
    _index: dict | None = field(default=None, repr=False)
    _values: ValueIndex | None = field(default=None, repr=False)

    @property
    def adapter(self):
        return self.loaded.adapter

    @property
    def sentence_index(self) -> dict | None:
        if self._index is None and self.triggers is not None:
            self._index = _sentence_index(self.triggers)
        return self._index

    # memory view
    def show_memory(self, layer: int, memory: int) -> MemoryView:
        self.view = memory_view(self.loaded, self.triggers, layer, memory, self.n_triggers, self.k_tokens,
                                self.sample)
        self.layer, self.memory = self.view.layer, self.view.memory
        return self.view

    def search(self, query: str, by: str = "value token", limit: int = 20) -> pd.DataFrame:
        if by not in SEARCH_BY:
            raise ParameterError(f"Search by one of {SEARCH_BY}, got {by!r}.")
        if by == "value token":
            if self._values is None:
                self._values = ValueIndex(self.loaded)
            self.results = search_value_token(self.loaded, query, limit=limit, index=self._values)
        else:
            self.results = search_trigger_word(self.loaded, self.triggers, query, limit=limit,
                                               index=self.sentence_index)
        return self.results

    # prompt view
    def analyse(self, prompt: str) -> PromptAnalysis:
        self.analysis = analyse_prompt(self.loaded, prompt, top_memories=self.top_memories)
        return self.analysis

    def attribute(self, prompt: str) -> PromptAttribution:
        """The prompt view's "attribute" action (see :func:`attribute_prediction`)."""
        self.attribution = attribute_prediction(self.loaded, prompt, top=self.top_attributed, steps=self.steps)
        return self.attribution

    def contributions(self, prompt: str, layer: int) -> ContributionMaps:
        self.contributions_view = contribution_maps(self.loaded, prompt, layer)
        return self.contributions_view

    # interventions
    def set_edits(self, edits: Mapping[tuple[int, int], float] | str) -> dict:
        edits = parse_edits(edits) if isinstance(edits, str) else dict(edits)
        for layer, memory in edits:
            _check_memory(self.adapter, layer, memory)
        self.edits = {(self.adapter.check_layer(layer), memory): float(v) for (layer, memory), v in edits.items()}
        return self.edits

    def add_edits(self, memories: Iterable[tuple[int, int]], value: float = 0.0) -> dict:
        edits = dict(self.edits)
        for layer, memory in memories:
            edits[(int(layer), int(memory))] = float(value)
        return self.set_edits(edits)

    def apply(self, prompt: str) -> InterventionComparison:
        """Compare the prompt without and with the edits; the top token of each edited memory's ``v_i`` (and
        ``-v_i`` for gated FFNs) is always listed in ``changes``, so its direct effect shows."""
        track = []
        for layer, memory in list(self.edits)[:20]:
            for table in top_tokens(self.loaded, layer, [memory] * (2 if self.adapter.gated else 1),
                                    [1, -1] if self.adapter.gated else [1], k=1):
                track.append(int(table["token_id"].iloc[0]))
        self.comparison = compare_intervention(self.loaded, prompt, self.edits, max_new_tokens=self.max_new_tokens,
                                               track=track)
        return self.comparison


# ---- HTML -----------------------------------------------------------------------------------------
STYLE = """
<style>
.ffn-view { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 13px; color: #222; }
.ffn-view h3 { font-size: 15px; margin: 10px 0 6px; }
.ffn-view h4 { font-size: 13px; margin: 8px 0 4px; color: #444; }
.ffn-view table { border-collapse: collapse; margin: 4px 0 10px; }
.ffn-view th, .ffn-view td { border-bottom: 1px solid #e3e3e3; padding: 2px 8px; text-align: left;
  vertical-align: top; }
.ffn-view th { background: #f4f4f4; font-weight: 600; }
.ffn-view td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ffn-tok { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; background: #eef2f7;
  border-radius: 3px; padding: 0 3px; margin: 0 1px; }
.ffn-neg .ffn-tok { background: #f7eeee; }
.ffn-prefix { font-family: Georgia, serif; }
.ffn-prefix mark { background: #ffd866; padding: 0 1px; border-radius: 2px; }
.ffn-next { color: #999; font-style: italic; }
.ffn-bar { display: inline-block; height: 9px; background: #5b8def; vertical-align: middle; margin-right: 4px; }
.ffn-neg .ffn-bar { background: #e0685b; }
.ffn-sides { display: flex; flex-wrap: wrap; gap: 24px; }
.ffn-side { flex: 1 1 420px; min-width: 320px; }
.ffn-changed { color: #b35900; font-weight: 600; }
.ffn-note { color: #666; font-size: 12px; }
.ffn-error { color: #b00020; font-weight: 600; }
.ffn-up { color: #1a7f37; } .ffn-down { color: #b00020; }
</style>
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def token_html(token: str) -> str:
    """A token as a monospace chip, whitespace visible (new lines as ⏎)."""
    return f'<span class="ffn-tok">{_e(token.replace(chr(10), "⏎"))}</span>'


def _sign_name(sign: int) -> str:
    return "+v" if sign > 0 else "−v"


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def render_top_tokens(frame: pd.DataFrame, title: str = "") -> str:
    top = max(float(frame["probability"].max()), 1e-30) if len(frame) else 1.0
    rows = "".join(
        f'<tr><td class="num">{int(r.rank) + 1}</td><td>{token_html(r.token)}</td>'
        f'<td><span class="ffn-bar" style="width:{max(1, round(100 * float(r.probability) / top))}px"></span>'
        f'{_p(float(r.probability))}</td></tr>' for r in frame.itertuples())
    head = f"<h4>{_e(title)}</h4>" if title else ""
    return f'{head}<table class="ffn-top-tokens"><tr><th>#</th><th>token</th><th>probability</th></tr>{rows}</table>'


def render_triggers(frame: pd.DataFrame, title: str = "") -> str:
    head = f"<h4>{_e(title)}</h4>" if title else ""
    if frame.empty:
        return head + '<p class="ffn-note">No trigger examples.</p>'
    rows = "".join(
        f'<tr><td class="num">{int(r.rank) + 1}</td><td class="num">{float(r.coefficient):.3g}</td>'
        f'<td class="ffn-prefix">{_e(r.prefix)}<mark>{_e(r.last_token)}</mark>'
        f'<span class="ffn-next">{_e(r.next_token)}</span></td></tr>' for r in frame.itertuples())
    return (f'{head}<table class="ffn-triggers"><tr><th>#</th><th>m</th>'
            f'<th>trigger example (last token marked, next token in grey)</th></tr>{rows}</table>')


MEASURE_NOTES = {
    "triggers": "trigger examples of this side",
    "shallow_token": "share of triggers whose last token is shared with at least 2 others (shallow pattern)",
    "shallow_bigram": "the same for the last two tokens",
    "labelled": "triggers with a topic label",
    "topic_concentration": "share of the most common topic among labelled triggers (semantic pattern)",
    "most_common_last_token": "the most common last token",
    "its_share": "share of triggers ending with it",
}


def render_measures(measures: Mapping) -> str:
    if not measures:
        return ""

    def cell(name, value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.2f}"
        return token_html(value) if name == "most_common_last_token" else _e(value)

    rows = "".join(f'<tr><td title="{_e(MEASURE_NOTES.get(k, ""))}">{_e(k.replace("_", " "))}</td>'
                   f'<td class="num">{cell(k, v)}</td></tr>' for k, v in measures.items())
    return f'<h4>Pattern measures (Section 3)</h4><table class="ffn-measures">{rows}</table>'


def render_histogram(values: np.ndarray | None, bins: int = 40, width: int = 520, height: int = 140,
                     marks: Mapping[str, float] | None = None, title: str = "") -> str:
    """An inline SVG histogram of ``values`` (log-scaled counts), with vertical lines at ``marks``."""
    if values is None or len(values) == 0:
        return ""
    values = np.asarray(values, dtype=np.float64)
    marks = {k: float(v) for k, v in (marks or {}).items() if v is not None and np.isfinite(v)}
    low = min(values.min(), *marks.values()) if marks else values.min()
    high = max(values.max(), *marks.values()) if marks else values.max()
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    left, bottom, plot_w, plot_h = 40, height - 22, width - 50, height - 40
    scale = np.log1p(counts) / max(np.log1p(counts).max(), 1e-12)
    bar_w = plot_w / bins

    def x_of(v):
        return left + (v - low) / (high - low) * plot_w

    bars = "".join(
        f'<rect class="ffn-hist-bar" x="{left + i * bar_w:.1f}" y="{bottom - s * plot_h:.1f}" '
        f'width="{max(bar_w - 1, 1):.1f}" height="{s * plot_h:.1f}" fill="#8aa9d6">'
        f'<title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}</title></rect>'
        for i, (c, s) in enumerate(zip(counts, scale)))
    def label(i, name, v):
        right = x_of(v) > left + plot_w / 2
        x = x_of(v) - 3 if right else x_of(v) + 3
        return (f'<text x="{x:.1f}" y="{bottom - plot_h + 10 + 11 * i}" font-size="10" fill="#d9534f" '
                f'text-anchor="{"end" if right else "start"}">{_e(name)}</text>')

    lines = "".join(
        f'<line x1="{x_of(v):.1f}" x2="{x_of(v):.1f}" y1="{bottom - plot_h:.1f}" y2="{bottom}" stroke="#d9534f" '
        f'stroke-dasharray="3,2"/>{label(i, name, v)}' for i, (name, v) in enumerate(marks.items()))
    axis = (f'<line x1="{left}" x2="{left + plot_w}" y1="{bottom}" y2="{bottom}" stroke="#555"/>'
            f'<text x="{left}" y="{height - 6}" font-size="10">{low:.3g}</text>'
            f'<text x="{left + plot_w}" y="{height - 6}" font-size="10" text-anchor="end">{high:.3g}</text>'
            f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="10" text-anchor="middle">coefficient m</text>'
            f'<text x="4" y="{bottom - plot_h + 8}" font-size="10">count</text>'
            f'<text x="4" y="{bottom - plot_h + 19}" font-size="9" fill="#777">(log)</text>')
    head = f"<h4>{_e(title)}</h4>" if title else ""
    return (f'{head}<svg class="ffn-histogram" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{bars}{lines}{axis}</svg>')


def render_memory_view(view: MemoryView, model_name: str = "") -> str:
    sides = []
    for side in view.sides:
        label = "positive side: v" if side.sign > 0 else "negative side: −v (m < 0)"
        cls = "ffn-side" + (" ffn-neg" if side.sign < 0 else "")
        triggers_title = ("Top trigger examples (largest m)" if side.sign > 0
                          else "Top trigger examples (most negative m)")
        sides.append(f'<div class="{cls}" data-sign="{side.sign}"><h3>{_e(label)}</h3>'
                     f'{render_top_tokens(side.top_tokens, "Top tokens of " + ("v" if side.sign > 0 else "−v"))}'
                     f'{render_triggers(side.triggers, triggers_title)}{render_measures(side.measures)}</div>')
    marks = {}
    for side in view.sides:
        if not side.triggers.empty:
            marks[f"top-1 trigger ({_sign_name(side.sign)})"] = float(side.triggers["coefficient"].iloc[0])
    hist = render_histogram(view.sample, marks=marks,
                            title=f"Coefficient over a corpus sample ({view.n_sample_sentences} sentences, "
                                  f"{0 if view.sample is None else len(view.sample)} tokens)")
    where = f" · {_e(model_name)}" if model_name else ""
    return (f'{STYLE}<div class="ffn-view ffn-memory-view" data-layer="{view.layer}" data-memory="{view.memory}">'
            f'<h3>Layer {view.layer}, memory {view.memory}{where}</h3>'
            f'<p class="ffn-note">||v|| = {view.value_norm:.3g}</p>{hist}'
            f'<div class="ffn-sides">{"".join(sides)}</div></div>')


def render_search_results(frame: pd.DataFrame, by: str) -> str:
    if frame is None or frame.empty:
        return f'{STYLE}<div class="ffn-view ffn-search"><p class="ffn-note">No memory found.</p></div>'
    if by == "value token":
        head = "<tr><th>layer</th><th>memory</th><th>side</th><th>token</th><th>rank in value</th><th>p</th></tr>"
        rows = "".join(f"<tr><td>{r.layer}</td><td>{r.memory}</td><td>{_sign_name(r.sign)}</td><td>"
                       f"{token_html(r.token)}</td><td class='num'>{r.rank + 1}</td><td class='num'>"
                       f"{r.probability:.3f}</td></tr>" for r in frame.itertuples())
    else:
        head = ("<tr><th>layer</th><th>memory</th><th>side</th><th>ending with it</th><th>containing it</th>"
                "<th>of triggers</th></tr>")
        rows = "".join(f"<tr><td>{r.layer}</td><td>{r.memory}</td><td>{_sign_name(r.sign)}</td>"
                       f"<td class='num'>{r.last}</td><td class='num'>{r.anywhere}</td>"
                       f"<td class='num'>{r.n_triggers}</td></tr>" for r in frame.itertuples())
    return f'{STYLE}<div class="ffn-view ffn-search"><table>{head}{rows}</table></div>'


def search_label(row, by: str) -> str:
    """A one-line label of a search result (for a selection list)."""
    if by == "value token":
        return (f"L{row.layer} #{row.memory} {_sign_name(row.sign)}: {row.token!r} rank {row.rank + 1}, "
                f"p={row.probability:.3f}")
    return f"L{row.layer} #{row.memory} {_sign_name(row.sign)}: {row.last} end / {row.anywhere} contain"


def contributor_label(row) -> str:
    tokens = " ".join(repr(t) for t in list(row.top_tokens)[:3])
    return f"L{row.layer} #{row.memory} m={row.coefficient:+.2f} → {tokens}"


def render_prompt_analysis(analysis: PromptAnalysis) -> str:
    prediction = " ".join(f"{token_html(r.token)}<span class='ffn-note'>{r.probability:.2f}</span>"
                          for r in analysis.prediction.itertuples())
    by_layer = {layer: frame for layer, frame in analysis.memories.groupby("layer")}
    rows = []
    for r in analysis.layers.itertuples():
        memories = "".join(
            f'<div class="{"ffn-neg" if m.sign < 0 else ""}">#{m.memory} <span class="ffn-note">m={m.coefficient:+.2f}'
            f' |m|·||v||={m.score:.2f}</span> → {" ".join(token_html(t) for t in m.top_tokens)}</div>'
            for m in by_layer[r.layer].itertuples())
        changed = ' class="ffn-changed"' if r.changed else ""
        rows.append(f'<tr data-layer="{r.layer}"><td class="num">{r.layer}</td>'
                    f'<td>{token_html(r.before_token)} <span class="ffn-note">{r.before_prob:.2f}</span></td>'
                    f'<td{changed}>{token_html(r.after_token)} <span class="ffn-note">{r.after_prob:.2f}</span></td>'
                    f'<td>{memories}</td></tr>')
    prompt = "".join(token_html(t) for t in analysis.tokens)
    return (f'{STYLE}<div class="ffn-view ffn-prompt-view"><h3>Prompt</h3><p>{prompt}</p>'
            f'<h4>Next-token prediction</h4><p class="ffn-prediction">{prediction}</p>'
            f'<h4>Layer by layer, at the last position</h4>'
            f'<p class="ffn-note">Residual top token before and after the FFN (probability), and the memories with '
            f'the largest |m|·||v||, each with the top tokens of v (of −v, in red, when m &lt; 0). An orange '
            f'"after" means the FFN changed the top token.</p>'
            f'<table class="ffn-prompt-table"><tr><th>layer</th><th>before FFN</th><th>after FFN</th>'
            f'<th>top memories</th></tr>{"".join(rows)}</table></div>')


def _map_svg(matrix: np.ndarray, tokens: list[str], title: str, cell: int = 14) -> str:
    """One map as an inline SVG heatmap: rows are the positions i, columns the input tokens j (darker: more)."""
    n = len(tokens)
    label = 90
    width, height = label + n * cell + 4, 18 + n * cell + label
    top = float(matrix.max()) if matrix.size and matrix.max() > 0 else 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="ffn-map">',
             f'<text x="{label}" y="12" font-size="12" font-weight="600">{_e(title)}</text>']
    for i in range(n):
        y = 18 + i * cell
        parts.append(f'<text x="{label - 4}" y="{y + cell - 3}" font-size="10" text-anchor="end" '
                     f'font-family="monospace">{_e(tokens[i][:12])}</text>')
        for j in range(i + 1):
            shade = float(matrix[i, j]) / top
            parts.append(f'<rect x="{label + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="rgb(33,102,172)" fill-opacity="{shade:.3f}"><title>{_e(tokens[i])} ← '
                         f'{_e(tokens[j])}: {float(matrix[i, j]):.3f}</title></rect>')
    for j in range(n):
        x = label + j * cell + cell - 4
        y = 18 + n * cell + 4
        parts.append(f'<text x="{x}" y="{y}" font-size="10" font-family="monospace" text-anchor="end" '
                     f'transform="rotate(-90 {x} {y})">{_e(tokens[j][:12])}</text>')
    return "".join(parts) + "</svg>"


def render_contribution_maps(view: ContributionMaps) -> str:
    maps = "".join(f'<div class="ffn-side">{_map_svg(view.maps[stage], view.tokens, stage)}'
                   f'<div class="ffn-note">{_e(ctx.STAGE_LABELS[stage])}</div></div>' for stage in view.stages)
    return (f'{STYLE}<div class="ffn-view ffn-contributions"><h3>Contributions at layer {view.layer}</h3>'
            f'<p class="ffn-note">Row i: how position i\'s vector shares itself among the input tokens j ≤ i '
            f'(norm of each token\'s part, each row summing to 1; Kobayashi et al., ICLR 2024). ATB: after attention '
            f'and its residual; ATBFF: the FFN\'s output (its input norm included); ATBFFRES: the layer\'s output; '
            f'ATBFFRESLN: through the norm the next layer reads.</p><div class="ffn-sides">{maps}</div></div>')


def attribution_label(row) -> str:
    tokens = " ".join(repr(t) for t in list(row.top_tokens)[:3])
    return f"L{row.layer} #{row.memory} IG={row.score:.3g} m={row.coefficient:+.2f} → {tokens}"


def render_attribution(attribution: PromptAttribution) -> str:
    rows = "".join(
        f'<tr class="{"ffn-neg" if r.sign < 0 else ""}" data-layer="{r.layer}" data-memory="{r.memory}">'
        f'<td class="num">{r.layer}</td><td class="num">{r.memory}</td><td class="num">{r.score:.3g}</td>'
        f'<td class="num">{r.coefficient:+.2f}</td><td>{" ".join(token_html(t) for t in r.top_tokens)}</td></tr>'
        for r in attribution.memories.itertuples())
    prompt = "".join(token_html(t) for t in attribution.tokens)
    return (f'{STYLE}<div class="ffn-view ffn-attribution"><h3>Attribution</h3><p>{prompt} → '
            f'{token_html(attribution.token)} <span class="ffn-note">p = {attribution.probability:.3f}</span></p>'
            f'<p class="ffn-note">The memories with the largest integrated-gradients attribution (Dai et al.\'s '
            f'knowledge-neuron score: zero baseline, {attribution.steps} points, {len(attribution.layers)} layers) for '
            f'this prediction at the last position, each with the top tokens of its value (of −v, in red, when '
            f'm &lt; 0).</p><table class="ffn-attribution-table"><tr><th>layer</th><th>memory</th><th>score</th>'
            f'<th>m</th><th>value top tokens</th></tr>{rows}</table></div>')


def render_intervention(comparison: InterventionComparison) -> str:
    rows = "".join(
        f'<tr><td>{token_html(r.token)}</td><td class="num">{r.p_before:.3f}</td><td class="num">{r.p_after:.3f}</td>'
        f'<td class="num {"ffn-up" if r.logit_change > 0 else "ffn-down"}">{r.logit_change:+.2f}</td>'
        f'<td class="num {"ffn-up" if r.logprob_change > 0 else "ffn-down"}">{r.logprob_change:+.2f}</td></tr>'
        for r in comparison.changes.itertuples())
    edits = ", ".join(f"L{layer} #{memory} {'off' if v == 0 else f'm={v:g}'}"
                      for (layer, memory), v in comparison.edits.items())
    return (f'{STYLE}<div class="ffn-view ffn-intervention"><h3>Interventions: {_e(edits)}</h3>'
            f'<h4>Greedy continuation</h4><table class="ffn-continuations">'
            f'<tr><td>without</td><td class="ffn-prefix">{_e(comparison.prompt)}<mark>'
            f'{_e(comparison.continuation_before)}</mark></td></tr>'
            f'<tr><td>with</td><td class="ffn-prefix">{_e(comparison.prompt)}<mark>'
            f'{_e(comparison.continuation_after)}</mark></td></tr></table>'
            f'<h4>Next-token distribution</h4><table class="ffn-changes"><tr><th>token</th><th>p without</th>'
            f'<th>p with</th><th>logit change</th><th>log-prob change</th></tr>{rows}</table></div>')


def render_error(error: Exception) -> str:
    return f'{STYLE}<div class="ffn-view"><p class="ffn-error">{_e(error)}</p></div>'


__all__ = ["Explorer", "PromptAnalysis", "PromptAttribution", "ContributionMaps", "InterventionComparison", "MemoryView",
           "MemorySide", "CoefficientSample", "ValueIndex", "analyse_prompt", "attribute_prediction",
           "contribution_maps", "compare_intervention", "memory_view", "key_rows", "value_norms",
           "parse_edits", "format_edits", "greedy_continuation", "search_value_token", "search_trigger_word",
           "top_tokens", "pattern_measures", "render_memory_view", "render_prompt_analysis", "render_attribution",
           "render_contribution_maps", "render_intervention",
           "render_search_results", "render_histogram"]
