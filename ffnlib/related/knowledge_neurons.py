"""Knowledge neurons (Dai et al., ACL 2022) in the key-value view of Geva et al.

Dai et al. look for the few FFN neurons that express a relational fact ("The capital of France is" ->
Paris). In Geva et al.'s terms a neuron is a **memory**: its activation is the coefficient ``m_i`` (the input
of the FFN's ``down`` module at the last prompt position), and its value ``v_i`` is what the memory writes.

**The attribution** is :func:`knowledge_attribution`: integrated gradients of the answer's probability with
respect to the coefficients of one layer at the last prompt position, from a zero baseline (Dai's choice),
for every memory of every layer. ``implementation="captum"`` runs captum's ``IntegratedGradients`` naively (a
forward pass of the whole prompt per step); ``"fast"`` (default) gives the same numbers: a change at the
last position of layer l cannot change earlier positions, so the prompt's keys and values are cached once
and, per layer, only the last position runs again, from layer l upward, with the m steps as one batch.

Choices (each a parameter; defaults follow the authors' code, Hunter-DDM/knowledge-neurons):

- target: the probability of the answer's first token (with its leading space), ``"first_token"``; or the
  whole answer's log-probability, ``"answer_logprob"``;
- m = 20 steps, a left Riemann sum (``alpha = 0, 1/m, ..., (m-1)/m``, as their ``scaled_input``);
- coarse neurons of a prompt: attribution >= t x the prompt's maximum, t = 0.2;
- refining over a fact's prompts (one per template): keep the neurons found in at least
  ``max(p x prompts, 3)`` of them; p starts at 0.7 and moves by 0.05 (up to 6 tries per relation) until a
  relation's facts have 2-5 neurons on average;
- **sign**. Our FFNs are gated: ``m_i = act(gate_i.x)(up_i.x)`` can be negative (the memory then writes
  ``-v_i``). The positive side (``sign=+1``: memories with ``m_i > 0`` and a positive attribution) is Dai's
  and the default; the negative side (``m_i < 0``, positive attribution: writing ``-v_i`` helps the answer)
  is found and reported separately;
- fact update: lambda1 = 1, lambda2 = 8 (swept by :func:`lambda2_sweep`); a success needs the new answer on
  top **and** held-out perplexity within ``max_perplexity_ratio`` = 1.5 x the unedited model's (ours, not
  theirs: :func:`edit_success`; Dai's rank-only count is kept as ``success_unbounded``).

Facts come from the ``countryinfo`` package (offline); our PARAREL-style templates are in
``data/knowledge_neurons/templates.json``. The experiments (:func:`suppress_amplify`, :func:`specificity`,
:func:`same_answer_effect`, :func:`value_view`, :func:`trigger_view`, :func:`layer_view`,
:func:`edit_facts`, :func:`lambda2_sweep`, :func:`erase_relations`) return DataFrames; every model change is
undone on exit (hooks removed, weights restored bit for bit). :func:`findings` turns them into verdicts
against controls.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import bigbench
from ..capture import capture
from ..errors import ParameterError, ResultsError
from ..interventions import intervene
from ..stats import Estimate, binomial, resampled, share
from ..progress import tqdm
from ..reference import DATA_DIR, relative_depth
from ..storage import ensure_dir, fingerprint, load_result, read_json, save_result

TEMPLATES_PATH = DATA_DIR / "knowledge_neurons" / "templates.json"
TARGETS = ("first_token", "answer_logprob")
IMPLEMENTATIONS = ("fast", "captum")
METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
FACT_SOURCES = ("countryinfo", "wikidata")
SUBJECT, ANSWER = "[X]", "[Y]"
KEEP_RATIO = 0.1  # scores stored per prompt: >= 0.1 x the side's maximum (as the authors' 1_analyze_mlm.py)
_VERSION = 1  # bump when a stored column's computation changes


# =====================================================================================================
# Facts
# =====================================================================================================
def _plain(name) -> bool:
    """Names that read naturally inside a template (no parentheses, commas or slashes)."""
    return isinstance(name, str) and bool(name.strip()) and not re.search(r"[(),/]", name)


def countryinfo_facts() -> pd.DataFrame:
    """Facts read from the ``countryinfo`` package (offline): relation, subject, answer, source.

    Relations: capital (country -> capital), capital_of (capital -> country; capitals of several countries
    are left out), continent (countryinfo's region), official_language (the first listed ISO 639-1 code,
    named by ``pycountry``, parenthesised qualifiers dropped) and demonym. Names with parentheses, commas or
    slashes ("Cocos (Keeling) Islands", "Virgin Islands, British") are left out; duplicates are dropped.
    """
    try:
        import countryinfo
        import pycountry
        from countryinfo import CountryInfo
    except ImportError as exc:
        raise ParameterError("The default facts need the packages countryinfo and pycountry: "
                             "pip install countryinfo==1.0.1 pycountry==26.2.16 (or `make setup`).") from exc
    source = f"countryinfo {countryinfo.__version__}"
    rows = []
    for info in CountryInfo.all().values():
        country = info.get("name")
        if not _plain(country):
            continue
        capital = info.get("capital")
        if _plain(capital):
            rows.append(("capital", country, capital))
            rows.append(("capital_of", capital, country))
        if _plain(info.get("region")):
            rows.append(("continent", country, info["region"]))
        codes = info.get("languages") or []
        language = pycountry.languages.get(alpha_2=codes[0]) if codes else None
        if language is not None:
            name = re.sub(r"\s*\(.*\)\s*$", "", language.name)
            if _plain(name):
                rows.append(("official_language", country, name))
        if _plain(info.get("demonym")):
            rows.append(("demonym", country, info["demonym"]))
    facts = pd.DataFrame(rows, columns=["relation", "subject", "answer"]).drop_duplicates()
    ambiguous = facts.groupby(["relation", "subject"])["answer"].transform("nunique") > 1
    facts = facts[~ambiguous].drop_duplicates(["relation", "subject"])
    return facts.assign(source=source).reset_index(drop=True)


# ---- BIG-bench qa_wikidata (only when asked for: a 358 MB source download, ffnlib.bigbench) ------------
BIGBENCH_VERSION = bigbench.VERSION
_WIKIDATA_PROMPT = re.compile(r"^The (?P<relation>.+?) of (?P<subject>.+) is$")


def wikidata_facts_from_task(task: dict) -> pd.DataFrame:
    """The task's prompts of the form "The <relation> of <subject> is" as facts (relation, subject, answer).

    Prompts of other forms ("X is located in") and prompts with several valid answers are left out. The
    relation is the phrase as BIG-bench wrote it ("capital", "official language", ...).
    """
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list):
        raise ResultsError("The qa_wikidata task has no 'examples' list; the file is not the expected task.json.")
    rows = []
    for example in examples:
        target = example.get("target")
        if isinstance(target, list):
            if len(target) != 1:
                continue
            target = target[0]
        match = _WIKIDATA_PROMPT.match(str(example.get("input", "")).strip())
        if match and _plain(target) and _plain(match["subject"]):
            rows.append((match["relation"], match["subject"], target.strip()))
    facts = pd.DataFrame(rows, columns=["relation", "subject", "answer"]).drop_duplicates(["relation", "subject"])
    return facts.assign(source=f"bigbench {BIGBENCH_VERSION} qa_wikidata").reset_index(drop=True)


def wikidata_facts(cache: str | os.PathLike | None = None, download: bool = True) -> pd.DataFrame:
    """Facts from BIG-bench's qa_wikidata task (Apache-2.0), cached as JSON in the user cache.

    The first call downloads the bigbench 1.0.0 sdist (358 MB), caches its task files (:mod:`ffnlib.bigbench`)
    and deletes the archive; later calls read the cache. ``download=False`` only reads what is already there
    (a clear error otherwise).
    """
    return wikidata_facts_from_task(bigbench.task("qa_wikidata", cache, download,
                                                  hint="Use facts='countryinfo' (the default, offline). "))


def load_facts(source: str = "countryinfo", relations: Sequence[str] | None = None,
               templates: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Facts (relation, subject, answer, source) of ``relations`` (default: every relation with templates).

    ``source="countryinfo"`` (default, offline) or ``"wikidata"`` (BIG-bench qa_wikidata: a 358 MB download
    the first time; its relations are mapped to ours by ``wikidata_relations`` in the templates file).
    """
    if source not in FACT_SOURCES:
        raise ParameterError(f"facts must be one of {FACT_SOURCES}, got {source!r}.")
    templates = load_templates() if templates is None else templates
    if source == "countryinfo":
        facts = countryinfo_facts()
    else:
        mapping = {ours: theirs for ours, theirs in read_json(TEMPLATES_PATH)["wikidata_relations"].items()
                   if not ours.startswith("_")}
        raw = wikidata_facts()
        facts = pd.concat([raw[raw["relation"] == theirs].assign(relation=ours) for ours, theirs in mapping.items()],
                          ignore_index=True)
    if relations is None:  # every relation with templates (and, for Wikidata, with a mapping)
        wanted = [r for r in templates if source == "countryinfo" or r in set(facts["relation"])]
    else:
        wanted = list(relations)
    for relation in wanted:
        if relation not in templates:
            raise ParameterError(f"Relation {relation!r} has no templates; relations with templates: "
                                 f"{sorted(templates)}.")
        if not (facts["relation"] == relation).any():
            raise ParameterError(f"Relation {relation!r} has no facts in the {source} data. Choose among "
                                 f"{sorted(facts['relation'].unique())}.")
    return facts[facts["relation"].isin(wanted)].reset_index(drop=True)


def sample_facts(facts: pd.DataFrame, per_relation: int | None, seed: int = 0) -> pd.DataFrame:
    """Up to ``per_relation`` facts of each relation (a seeded sample, kept in the data's order; None: all)."""
    if per_relation is None:
        return facts.reset_index(drop=True)
    keep = []
    for relation, group in facts.groupby("relation", sort=False):
        rng = np.random.default_rng([seed, _stable(relation)])
        keep.extend(sorted(rng.choice(group.index.to_numpy(), min(per_relation, len(group)), replace=False)))
    return facts.loc[sorted(keep)].reset_index(drop=True)


# =====================================================================================================
# Templates and prompts
# =====================================================================================================
def check_template(template: str, relation: str = "?") -> str:
    """The prompt part of a template (the text before ``[Y]``), or a clear error.

    A template has the subject slot ``[X]`` once and ends with the answer slot ``[Y]`` (a final full stop
    is allowed): a causal LM predicts the answer right after the prompt.
    """
    if not isinstance(template, str) or not template.strip():
        raise ParameterError(f"A template of relation {relation!r} must be a non-empty string, got {template!r}.")
    if template.count(SUBJECT) != 1:
        raise ParameterError(f"Template {template!r} of relation {relation!r} must contain the subject slot {SUBJECT} "
                             f"exactly once (it has {template.count(SUBJECT)}), e.g. 'The capital of [X] is [Y]'.")
    body = template.strip()
    body = body[:-1].rstrip() if body.endswith(".") else body
    if template.count(ANSWER) != 1 or not body.endswith(ANSWER):
        raise ParameterError(f"Template {template!r} of relation {relation!r} must end with the answer slot {ANSWER} "
                             "(once, at the very end): a causal LM predicts the answer after the prompt, so the "
                             "answer cannot come earlier. Rephrase it, e.g. 'The capital of [X] is [Y]'.")
    prompt = body[: -len(ANSWER)].rstrip()
    if prompt == SUBJECT or not prompt:
        raise ParameterError(f"Template {template!r} of relation {relation!r} has no words around the subject.")
    return prompt


def load_templates(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Our templates per relation (``data/knowledge_neurons/templates.json``), each checked."""
    data = read_json(TEMPLATES_PATH if path is None else path)
    relations = data.get("relations", data)
    out = {}
    for relation, entry in relations.items():
        if relation.startswith("_"):
            continue
        templates = entry["templates"] if isinstance(entry, dict) else entry
        for template in templates:
            check_template(template, relation)
        out[relation] = list(templates)
    return out


def encode_answer(tokenizer, answer: str, where: str = "") -> list[int]:
    """The answer's token ids with a leading space, or a clear error if the tokenizer cannot encode it."""
    if not isinstance(answer, str) or not answer.strip():
        raise ParameterError(f"The answer{where} is empty: every fact needs an answer to predict.")
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    decoded = tokenizer.decode(ids).strip() if ids else ""
    if not ids or (unk is not None and unk in ids) or decoded != answer.strip():
        raise ParameterError(f"The tokenizer cannot encode the answer {answer!r}{where}: it becomes {ids} "
                             f"(decoded {decoded!r}). Drop that fact or use another model.")
    return list(ids)


def build_prompts(loaded, facts: pd.DataFrame, templates: Mapping[str, Sequence[str]] | None = None,
                  skip_unencodable: bool = False) -> pd.DataFrame:
    """One prompt per (fact, template): fact_id, relation, subject, answer, template_id, prompt (text),
    prompt_ids (as the model reads them, BOS included), answer_ids (leading space), answer_token (the first).

    Errors: a relation with no templates or no facts, a bad template, an answer the tokenizer cannot encode
    (with ``skip_unencodable=True`` such facts are dropped instead and listed in ``attrs["skipped"]``).
    """
    templates = load_templates() if templates is None else templates
    missing = {"relation", "subject", "answer"} - set(facts.columns)
    if missing:
        raise ParameterError(f"facts needs the columns relation, subject, answer; {sorted(missing)} missing.")
    if facts.empty:
        raise ParameterError("There are no facts: give at least one (relation, subject, answer).")
    facts = facts.reset_index(drop=True)
    if "fact_id" not in facts.columns:
        facts = facts.assign(fact_id=np.arange(len(facts)))
    rows, skipped = [], []
    for relation, group in facts.groupby("relation", sort=False):
        if relation not in templates or not templates[relation]:
            raise ParameterError(f"Relation {relation!r} has facts but no templates; add some to "
                                 f"{TEMPLATES_PATH} (relations there: {sorted(templates)}).")
        prompts = [check_template(t, relation) for t in templates[relation]]
        for fact in group.itertuples():
            try:
                answer_ids = encode_answer(loaded.tokenizer, fact.answer, f" of fact ({relation}, {fact.subject!r})")
            except ParameterError:
                if not skip_unencodable:
                    raise
                skipped.append((relation, fact.subject, fact.answer))
                continue
            for template_id, prompt in enumerate(prompts):
                text = prompt.replace(SUBJECT, fact.subject.strip())
                rows.append({"fact_id": int(fact.fact_id), "relation": relation, "subject": fact.subject,
                             "answer": fact.answer, "template_id": template_id, "prompt": text,
                             "prompt_ids": loaded.encode(text), "answer_ids": answer_ids,
                             "answer_token": answer_ids[0]})
    out = pd.DataFrame(rows)
    out.insert(0, "prompt_id", np.arange(len(out)))
    out.attrs["skipped"] = skipped
    return out


# =====================================================================================================
# Running prompts (with optional coefficient edits at the last position)
# =====================================================================================================
def _batches(n: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


@torch.no_grad()
def answer_probabilities(loaded, prompt_ids: Sequence[Sequence[int]], answer_tokens: Sequence[int],
                         factors: Sequence[Mapping[tuple[int, int], float]] | None = None,
                         batch_size: int = 32) -> pd.DataFrame:
    """For each prompt: the probability of its answer token at the last position (``p_answer``), its rank
    (0 = the model's top token), its negative log-probability (``nll``) and the top token.

    A prompt whose logits are not all finite (NaN or inf, e.g. after an edit that broke the model) gets
    ``rank`` = the vocabulary size (below every real rank, so never "correct" nor a success) and
    ``top_token`` = -1: NaN compares false, and would otherwise give rank 0.

    ``factors``: one mapping ``{(layer, memory): factor}`` per prompt (or ``None``); each listed coefficient
    is multiplied by its factor **at that prompt's last position only**, as Dai et al.'s suppress (0) and
    amplify (2) do. Prompts are batched by length and right-padded (padding never reaches a real position);
    the head runs only at the batch's last positions.
    """
    adapter, model = loaded.adapter, loaded.model
    n = len(prompt_ids)
    if factors is not None and len(factors) != n:
        raise ParameterError(f"factors has {len(factors)} entries for {n} prompts.")
    pad = loaded.tokenizer.pad_token_id or 0
    out = {"p_answer": np.zeros(n), "rank": np.zeros(n, np.int64), "nll": np.zeros(n),
           "top_token": np.zeros(n, np.int64)}
    order = np.argsort([len(ids) for ids in prompt_ids], kind="stable")
    for part in _batches(n, batch_size):
        rows = order[part]
        lengths = torch.tensor([len(prompt_ids[r]) for r in rows])
        ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : lengths[j]] = torch.tensor(list(prompt_ids[r]))
            mask[j, : lengths[j]] = 1
        last = lengths - 1
        handles = []
        if factors is not None:
            by_layer: dict[int, torch.Tensor] = {}
            for j, r in enumerate(rows):
                for (layer, memory), factor in factors[r].items():
                    layer = adapter.check_layer(int(layer))
                    if layer not in by_layer:
                        by_layer[layer] = torch.ones(len(rows), adapter.d_ff)
                    by_layer[layer][j, int(memory)] = float(factor)
            handles = [adapter.down(layer).register_forward_pre_hook(
                _last_position_hook(m.to(loaded.device), last.to(loaded.device))) for layer, m in by_layer.items()]
        keep = torch.unique(last)  # the head runs at these positions only
        try:
            logits = model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                           logits_to_keep=keep.to(loaded.device)).logits
        finally:
            for handle in handles:
                handle.remove()
        column = torch.searchsorted(keep, last)
        final = _wide(logits[torch.arange(len(rows)), column.to(logits.device)])
        log_probs = final.log_softmax(-1)
        answers = torch.tensor([int(answer_tokens[r]) for r in rows], device=final.device)[:, None]
        out["p_answer"][rows] = log_probs.gather(1, answers)[:, 0].exp().cpu().numpy()
        out["nll"][rows] = -log_probs.gather(1, answers)[:, 0].cpu().numpy()
        broken = ~torch.isfinite(final).all(-1)  # NaN compares false: without this a broken row ranks 0
        rank = (final > final.gather(1, answers)).sum(-1)
        out["rank"][rows] = torch.where(broken, final.shape[-1], rank).cpu().numpy()
        out["top_token"][rows] = torch.where(broken, -1, final.argmax(-1)).cpu().numpy()
    return pd.DataFrame(out)


def _last_position_hook(multiplier: torch.Tensor, last: torch.Tensor):
    """A ``down`` pre-hook multiplying each row's coefficients at its last position by ``multiplier``."""
    rows = torch.arange(len(last), device=last.device)

    def hook(module, args):
        coefficients = args[0]
        shaped = coefficients.reshape(len(last), -1, coefficients.shape[-1]).clone()  # OPT flattens tokens
        shaped[rows, last] = shaped[rows, last] * multiplier.to(shaped.dtype)
        return (shaped.reshape(coefficients.shape), *args[1:])

    return hook


def evaluate_prompts(loaded, prompts: pd.DataFrame, batch_size: int = 32) -> pd.DataFrame:
    """``prompts`` with the model's answer: p_answer, rank, nll, top_token, correct (rank 0), top10."""
    result = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                  batch_size=batch_size)
    out = prompts.reset_index(drop=True).copy()
    for column in result.columns:
        out[column] = result[column].to_numpy()
    out["correct"] = out["rank"] == 0
    out["top10"] = out["rank"] < 10
    return out


def accuracy_by_relation(evaluated: pd.DataFrame) -> pd.DataFrame:
    """Per relation: facts, prompts, accuracy (answer's first token at rank 1) and top-10 accuracy over
    prompts, and the facts the model gets right in at least one template (those analysed)."""
    per_fact = evaluated.groupby(["relation", "fact_id"])["correct"].any().rename("any_correct").reset_index()
    table = evaluated.groupby("relation").agg(facts=("fact_id", "nunique"), prompts=("prompt_id", "size"),
                                               accuracy=("correct", "mean"), top10_accuracy=("top10", "mean"))
    table["facts_right_once"] = per_fact.groupby("relation")["any_correct"].sum()
    table["share_right_once"] = table["facts_right_once"] / table["facts"]
    return table.reset_index()


def select_facts(evaluated: pd.DataFrame, per_relation: int | None, seed: int = 0) -> pd.DataFrame:
    """The prompts of up to ``per_relation`` facts per relation (seeded sample) among the facts the model gets
    right in at least one template (None: all of them)."""
    right = evaluated.groupby("fact_id")["correct"].transform("any")
    pool = evaluated[right]
    chosen = []
    for relation, group in pool.groupby("relation", sort=True):
        ids = np.array(sorted(group["fact_id"].unique()))
        if per_relation is not None and len(ids) > per_relation:
            rng = np.random.default_rng([seed, _stable(relation)])
            ids = np.sort(rng.choice(ids, per_relation, replace=False))
        chosen.extend(ids.tolist())
    return evaluated[evaluated["fact_id"].isin(chosen)].reset_index(drop=True)


def _stable(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


# =====================================================================================================
# The knowledge-neuron attribution (integrated gradients over the coefficients)
# =====================================================================================================
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
    from layer l upward, all points as one batch (see the module docstring).
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
    run = _ig_fast if implementation == "fast" else _ig_captum
    with torch.enable_grad():
        scores, coefficients, value = run(loaded, prompt_ids, answer_ids, layer_list, int(steps), method, target)
    return Attribution(layer_list, scores, coefficients, value, target, int(steps), method, implementation)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float64 stays float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _target(logits: torch.Tensor, answer_ids: list[int], target: str) -> torch.Tensor:
    """The target per row from the logits of the answer positions (rows, positions, vocab)."""
    if target == "first_token":
        return _wide(logits[:, 0]).softmax(-1)[:, answer_ids[0]]
    log_probs = _wide(logits).log_softmax(-1)
    index = torch.tensor(answer_ids, device=logits.device)
    return log_probs[:, torch.arange(len(answer_ids), device=logits.device), index].sum(-1)


def _approximation(method: str, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from captum.attr._utils.approximation_methods import approximation_parameters  # the points captum uses

    step_sizes, alphas = approximation_parameters(method)
    return (torch.tensor(step_sizes(steps), dtype=torch.float32, device=device),
            torch.tensor(alphas(steps), dtype=torch.float32, device=device))


def _scored_tokens(prompt_ids: list[int], answer_ids: list[int], target: str) -> list[int]:
    """The tokens whose outputs the target reads: the last prompt token, then the answer but its last token."""
    return prompt_ids[-1:] + (answer_ids[:-1] if target == "answer_logprob" else [])


def _ig_captum(loaded, prompt_ids, answer_ids, layers, steps, method, target):
    """Integrated gradients with captum, naively: each point is a forward pass of the whole prompt."""
    from captum.attr import IntegratedGradients

    model, adapter, device = loaded.model, loaded.adapter, loaded.device
    full = torch.tensor([prompt_ids + _scored_tokens(prompt_ids, answer_ids, target)[1:]], device=device)
    n_scored = len(_scored_tokens(prompt_ids, answer_ids, target))
    position = len(prompt_ids) - 1
    with torch.no_grad(), capture(adapter, layers, what=("coefficients",)) as acts:
        value = float(_target(model(input_ids=full, logits_to_keep=n_scored).logits, answer_ids, target)[0])
    scores, coefficients = [], []
    for layer in layers:
        m = _wide(acts.coefficients[layer][0, position])

        def forward(scaled: torch.Tensor, layer=layer) -> torch.Tensor:
            rows = scaled.shape[0]

            def hook(module, args):
                c = args[0]
                shaped = c.reshape(rows, -1, c.shape[-1]).clone()
                shaped[:, position] = scaled.to(c.dtype)
                return (shaped.reshape(c.shape), *args[1:])

            handle = adapter.down(layer).register_forward_pre_hook(hook)
            try:
                logits = model(input_ids=full.expand(rows, -1), logits_to_keep=n_scored).logits
            finally:
                handle.remove()
            return _target(logits, answer_ids, target)

        attributions = IntegratedGradients(forward).attribute(
            m[None], baselines=torch.zeros_like(m[None]), n_steps=steps, method=method, internal_batch_size=steps)
        scores.append(_wide(attributions[0].detach()).cpu())
        coefficients.append(m.cpu())
    return torch.stack(scores), torch.stack(coefficients), value


def _prefix_cache(model, prefix: list[int], device):
    """The keys and values of the prompt without its last token (an empty cache for a one-token prompt)."""
    from transformers import DynamicCache

    if not prefix:
        return DynamicCache(config=model.config)
    with torch.no_grad():
        return model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values


def _copy_cache(cache, batch: int, from_layer: int):
    """A copy of ``cache`` with the layers from ``from_layer`` on repeated ``batch`` times."""
    import copy

    cache = copy.deepcopy(cache)
    if batch > 1:
        for index, layer in enumerate(cache.layers):
            if index >= from_layer:
                layer.batch_repeat_interleave(batch)
    return cache


def _ig_fast(loaded, prompt_ids, answer_ids, layers, steps, method, target, rows_per_batch: int = 120):
    """Integrated gradients from the cached prompt (see :func:`knowledge_attribution`).

    The prompt without its last token runs once (its keys and values are cached), then once more with the
    last token (the real coefficients and the target's value). The layers are then taken in groups of
    ``rows_per_batch // steps``; one forward pass serves a whole group: only the scored positions run
    (the last prompt token, plus the answer for ``answer_logprob``), the layers up to the group's first one
    in a batch of one (nothing there depends on the points), the layers above in a batch of
    ``steps x group``, where each layer's rows get that layer's points and all other rows its real
    coefficients. A model whose blocks cannot broadcast a batch of one against the larger batch (OPT
    flattens tokens inside its FFN) runs every layer in the larger batch instead: the same numbers.
    """
    model, adapter, device = loaded.model, loaded.adapter, loaded.device
    step_sizes, alphas = _approximation(method, steps, device)
    scored = _scored_tokens(prompt_ids, answer_ids, target)
    new = torch.tensor([scored], device=device)
    prefix = _prefix_cache(model, prompt_ids[:-1], device)
    with torch.no_grad(), capture(adapter, layers, what=("coefficients",)) as acts:
        logits = model(input_ids=new, past_key_values=_copy_cache(prefix, 1, 0), use_cache=True,
                       logits_to_keep=len(scored)).logits
        value = float(_target(logits, answer_ids, target)[0])
    true = {layer: _wide(acts.coefficients[layer][0, 0]) for layer in layers}
    per_batch = max(1, rows_per_batch // steps)
    broadcast = True
    scores = {}
    for start in range(0, len(layers), per_batch):
        group = layers[start: start + per_batch]
        rows = steps * len(group)
        points = [(alphas[:, None] * true[layer][None]).requires_grad_(True) for layer in group]  # paths 0 -> m

        def make_hook(slot: int):
            def hook(module, args):
                c = args[0]
                shaped = c.reshape(-1, len(scored), c.shape[-1]).expand(rows, -1, -1)
                first = torch.cat([shaped[: slot * steps, 0], points[slot].to(c.dtype),
                                   shaped[(slot + 1) * steps:, 0]])
                out = torch.cat([first[:, None], shaped[:, 1:]], dim=1)
                return (out if c.dim() == 3 else out.reshape(-1, c.shape[-1]), *args[1:])

            return hook

        for attempt in (0, 1):
            handles = [adapter.down(layer).register_forward_pre_hook(make_hook(slot))
                       for slot, layer in enumerate(group)]
            try:
                cache = _copy_cache(prefix, rows, group[0] + 1 if broadcast else 0)
                ids = new if broadcast else new.expand(rows, -1)
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=len(scored)).logits
                break
            except RuntimeError:
                if not broadcast or attempt:
                    raise
                broadcast = False  # this family cannot broadcast a batch of one: run it all in the large batch
            finally:
                for handle in handles:
                    handle.remove()
        values = _target(logits, answer_ids, target)
        grads = torch.autograd.grad(values.sum(), points)
        for layer, grad in zip(group, grads):
            scores[layer] = (true[layer] * (step_sizes[:, None] * grad).sum(0)).detach().cpu()
    return (torch.stack([scores[layer] for layer in layers]),
            torch.stack([true[layer].cpu() for layer in layers]), value)


# =====================================================================================================
# Attributing many prompts (cached, checkpointed)
# =====================================================================================================
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


def _score_rows(prompt_id: int, attribution: Attribution, keep_ratio: float) -> tuple[pd.DataFrame, dict]:
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
    import time

    layer_list = loaded.adapter.check_layers(layers)
    if not 0 < keep_ratio <= 1:
        raise ParameterError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}.")
    if prompts.empty:
        raise ParameterError("There are no prompts to attribute (no fact was selected).")
    keys = prompts[["prompt_id", "prompt_ids", "answer_ids"]]
    request = {"analysis": "knowledge_attribution", "version": _VERSION, "model": loaded.name,
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
            frame, info = _score_rows(int(row.prompt_id), attribution, keep_ratio)
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


# =====================================================================================================
# From scores to knowledge neurons: the threshold and the refining rule
# =====================================================================================================
def coarse_neurons(scores: pd.DataFrame, threshold: float = 0.2, sign: int = 1) -> pd.DataFrame:
    """Each prompt's coarse neurons: the memories of side ``sign`` whose score is >= ``threshold`` x the
    prompt's largest score of that side (Dai's t = 0.2)."""
    if not 0 < threshold <= 1:
        raise ParameterError(f"threshold must be in (0, 1], got {threshold!r}.")
    if sign not in (1, -1):
        raise ParameterError(f"sign must be +1 or -1, got {sign!r}.")
    return scores[(scores["sign"] == sign) & (scores["ratio"] >= threshold - 1e-12)].reset_index(drop=True)


def refine(coarse_sets: Sequence[set], p: float, min_prompts: int = 3) -> set:
    """The neurons found in at least ``max(p x prompts, min_prompts)`` of a fact's prompts (Dai's refining;
    the authors' code uses ``min_prompts = 3``)."""
    counts = Counter(neuron for found in coarse_sets for neuron in set(found))
    needed = max(p * len(coarse_sets), min_prompts)
    return {neuron for neuron, count in counts.items() if count >= needed - 1e-9}


def find_knowledge_neurons(scores: pd.DataFrame, prompts: pd.DataFrame, threshold: float = 0.2, p: float = 0.7,
                           p_step: float = 0.05, target_range: tuple[float, float] = (2, 5), max_tries: int = 6,
                           min_prompts: int = 3, sign: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Knowledge neurons of every fact in ``prompts``, with p chosen per relation as the authors' code does.

    p starts at ``p``; while a relation's facts have fewer than ``target_range[0]`` neurons on average it
    moves down by ``p_step``, above ``target_range[1]`` up, at most ``max_tries`` evaluations; the last
    evaluation is kept. Returns (neurons, refining): neurons has relation, fact_id, layer, memory, sign,
    count (prompts where it is coarse), prompts (the fact's prompts), share, mean_ratio and p; refining has,
    per relation and try, p and the mean number of neurons per fact.
    """
    coarse = coarse_neurons(scores, threshold, sign)
    found = {pid: set(zip(g["layer"].astype(int), g["memory"].astype(int))) for pid, g in coarse.groupby("prompt_id")}
    mean_ratio = coarse.groupby(["prompt_id", "layer", "memory"])["ratio"].first()
    rows, history = [], []
    for relation, group in prompts.groupby("relation", sort=True):
        bags = {fact: [found.get(int(pid), set()) for pid in g["prompt_id"]] for fact, g in group.groupby("fact_id")}
        p_now = p
        for attempt in range(max_tries):
            refined = {fact: refine(bag, p_now, min_prompts) for fact, bag in bags.items()}
            mean = float(np.mean([len(r) for r in refined.values()])) if refined else 0.0
            history.append({"relation": relation, "try": attempt, "p": round(p_now, 6), "mean_neurons": mean,
                            "facts": len(refined)})
            if target_range[0] <= mean <= target_range[1]:
                break
            p_now = round(p_now - p_step if mean < target_range[0] else p_now + p_step, 6)
        for fact, neurons in refined.items():
            prompt_ids = group.loc[group["fact_id"] == fact, "prompt_id"].astype(int).tolist()
            for layer, memory in sorted(neurons):
                count = sum((layer, memory) in found.get(pid, set()) for pid in prompt_ids)
                ratios = [mean_ratio.get((pid, layer, memory)) for pid in prompt_ids]
                ratios = [r for r in ratios if r is not None]
                rows.append({"relation": relation, "fact_id": int(fact), "layer": int(layer), "memory": int(memory),
                             "sign": int(sign), "count": count, "prompts": len(prompt_ids),
                             "share": count / len(prompt_ids), "mean_ratio": float(np.mean(ratios)),
                             "p": history[-1]["p"]})
    columns = ["relation", "fact_id", "layer", "memory", "sign", "count", "prompts", "share", "mean_ratio", "p"]
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(history)


def neurons_per_fact(neurons: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """fact_id, relation, subject, answer and n_neurons (0 for facts without any)."""
    facts = prompts.drop_duplicates("fact_id")[["fact_id", "relation", "subject", "answer"]]
    counts = neurons.groupby("fact_id").size().rename("n_neurons")
    return facts.merge(counts, left_on="fact_id", right_index=True, how="left").fillna({"n_neurons": 0}).astype(
        {"n_neurons": int}).reset_index(drop=True)


def relation_neurons(neurons: pd.DataFrame, share: float = 0.1, top: int | None = None) -> dict[str, list]:
    """Per relation, its neurons: those of at least ``share`` of its facts (Dai's relation KNs, 10%), or with
    ``top``, its ``top`` most common neurons (Dai's erasing: 20), ties by layer then memory."""
    out = {}
    for relation, group in neurons.groupby("relation"):
        n_facts = max(group["fact_id"].nunique(), 1)
        counts = group.groupby(["layer", "memory"])["fact_id"].nunique().reset_index(name="facts")
        counts = counts.sort_values(["facts", "layer", "memory"], ascending=[False, True, True])
        if top is not None:
            counts = counts.head(top)
        else:
            counts = counts[counts["facts"] >= share * n_facts - 1e-9]
        out[relation] = [(int(l), int(m)) for l, m in zip(counts["layer"], counts["memory"])]
    return out


def random_like(neurons: Sequence[tuple[int, int]], d_ff: int, rng: np.random.Generator,
                exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """As many random memories as ``neurons``, from the same layers (one per neuron), none of ``exclude``."""
    taken = set(exclude) | set(neurons)
    out = []
    for layer, _ in neurons:
        while True:
            memory = int(rng.integers(d_ff))
            if (layer, memory) not in taken:
                taken.add((layer, memory))
                out.append((int(layer), memory))
                break
    return out


# =====================================================================================================
# Statistics
# =====================================================================================================
def bootstrap_interval(values, seed: int = 0, n_resamples: int = 2000) -> tuple[float, float]:
    """A seeded percentile-bootstrap 95% interval of the mean (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (math.nan, math.nan)
    if len(values) == 1 or np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    result = bootstrap((values,), np.mean, n_resamples=n_resamples, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def binomial_interval(successes: int, trials: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95% interval of a rate."""
    from scipy.stats import binomtest

    if trials == 0:
        return (math.nan, math.nan)
    interval = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=0.95, method="exact")
    return float(interval.low), float(interval.high)


def summarise(frame: pd.DataFrame, value: str, by: Sequence[str], unit: str = "fact_id", seed: int = 0) -> pd.DataFrame:
    """Mean of ``value`` per ``by``: first averaged within each ``unit`` (the sampled unit, a fact by
    default), then over units, with a seeded bootstrap 95% interval over units."""
    rows = []
    for key, group in frame.groupby(list(by), sort=True):
        per_unit = group.groupby(unit)[value].mean()
        low, high = bootstrap_interval(per_unit.to_numpy(), seed=seed)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "mean": float(per_unit.mean()),
                     "low": low, "high": high, "units": len(per_unit), "rows": len(group)})
    return pd.DataFrame(rows)


# =====================================================================================================
# Experiments
# =====================================================================================================
def _fact_neurons(neurons: pd.DataFrame) -> dict[int, list[tuple[int, int]]]:
    return {int(f): [(int(l), int(m)) for l, m in zip(g["layer"], g["memory"])] for f, g in neurons.groupby("fact_id")}


def suppress_amplify(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, seed: int = 0,
                     factors: Mapping[str, float] | None = None, batch_size: int = 32) -> pd.DataFrame:
    """Dai's suppress (coefficient x 0) and amplify (x 2) of each fact's neurons at the last position of each
    of its prompts, against as many random memories of the same layers (seeded, none of the fact's).

    One row per (prompt, kind, operation): fact_id, relation, prompt_id, kind ("knowledge"/"random"),
    operation, n_neurons, p_before, p_after, change = (p_after - p_before) / p_before.
    """
    factors = {"suppress": 0.0, "amplify": 2.0} if factors is None else dict(factors)
    by_fact = _fact_neurons(neurons)
    d_ff = loaded.adapter.d_ff
    jobs, meta = [], []
    for fact, group in prompts[prompts["fact_id"].isin(by_fact)].groupby("fact_id"):
        kn = by_fact[int(fact)]
        control = random_like(kn, d_ff, np.random.default_rng([seed, int(fact)]))
        for row in group.itertuples():
            jobs.append((row.prompt_ids, row.answer_token, {}))
            meta.append(None)
            for kind, chosen in (("knowledge", kn), ("random", control)):
                for operation, factor in factors.items():
                    jobs.append((row.prompt_ids, row.answer_token, {n: factor for n in chosen}))
                    meta.append({"fact_id": int(fact), "relation": row.relation, "prompt_id": int(row.prompt_id),
                                 "kind": kind, "operation": operation, "n_neurons": len(chosen)})
    if not jobs:
        return pd.DataFrame(columns=["fact_id", "relation", "prompt_id", "kind", "operation", "n_neurons",
                                     "p_before", "p_after", "change"])
    result = answer_probabilities(loaded, [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs],
                                  batch_size=batch_size)
    rows, before = [], None
    for info, p in zip(meta, result["p_answer"]):
        if info is None:
            before = float(p)
            continue
        rows.append({**info, "p_before": before, "p_after": float(p), "change": (float(p) - before) / before})
    return pd.DataFrame(rows)


@torch.no_grad()
def perplexity(loaded, token_lists: Sequence[Sequence[int]], batch_size: int = 16) -> pd.DataFrame:
    """Per sentence: the summed negative log-likelihood of its tokens after the first (``nll``) and their
    number (``tokens``); perplexity = exp(sum nll / sum tokens)."""
    pad = loaded.tokenizer.pad_token_id or 0
    rows = []
    for batch in _batches(len(token_lists), batch_size):
        lengths = [len(token_lists[i]) for i in batch]
        ids = torch.full((len(batch), max(lengths)), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(batch):
            ids[j, : lengths[j]] = torch.tensor(token_lists[i])
            mask[j, : lengths[j]] = 1
        logits = _wide(loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits)
        log_probs = logits[:, :-1].log_softmax(-1)
        nll = -log_probs.gather(-1, ids[:, 1:, None].to(logits.device))[..., 0] * mask[:, 1:].to(logits.device)
        rows.extend({"nll": float(nll[j].sum()), "tokens": lengths[j] - 1} for j in range(len(batch)))
    return pd.DataFrame(rows)


def _ppl(frame: pd.DataFrame) -> float:
    """exp(NLL per token); NaN when a sentence's NLL is NaN (pandas' sum would skip it: a broken model would get
    perplexity 1), inf past float range."""
    mean = frame["nll"].to_numpy(np.float64).sum() / max(frame["tokens"].sum(), 1)
    return math.inf if mean > 700 else float(math.exp(mean))


def heldout_token_lists(loaded, sentences: pd.DataFrame, max_tokens: int = 64) -> list[list[int]]:
    """Held-out sentences as the model reads them (BOS included), cut to ``max_tokens``; one-token ones dropped."""
    lists = [loaded.encode(text)[:max_tokens] for text in sentences["text"]]
    return [ids for ids in lists if len(ids) > 1]


def specificity(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, heldout: Sequence[Sequence[int]],
                seed: int = 0, share: float = 0.1, batch_size: int = 32) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Suppress one relation's neurons (Dai's relation KNs: those of >= ``share`` of its facts) at every
    position, and measure every analysed fact's answer and held-out perplexity; the control is as many
    random memories of the same layers. (Niu et al., 2024, ask whether the effect stays with the relation.)

    Returns (facts, heldout): facts has suppressed, kind, n_neurons, relation, same_relation, fact_id,
    prompt_id, p_before, p_after, change; heldout has suppressed, kind, n_neurons, ppl_before, ppl_after,
    change.
    """
    base = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                batch_size=batch_size)["p_answer"].to_numpy()
    base_ppl = _ppl(perplexity(loaded, heldout)) if len(heldout) else math.nan
    fact_rows, ppl_rows = [], []
    for relation, kn in relation_neurons(neurons, share=share).items():
        if not kn:
            continue
        control = random_like(kn, loaded.adapter.d_ff, np.random.default_rng([seed, _stable(relation)]))
        for kind, chosen in (("knowledge", kn), ("random", control)):
            with intervene(loaded, {n: 0.0 for n in chosen}, scale=True):
                after = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                             batch_size=batch_size)["p_answer"].to_numpy()
                ppl = _ppl(perplexity(loaded, heldout)) if len(heldout) else math.nan
            fact_rows.append(pd.DataFrame({"suppressed": relation, "kind": kind, "n_neurons": len(chosen),
                                           "relation": prompts["relation"].to_numpy(),
                                           "same_relation": prompts["relation"].to_numpy() == relation,
                                           "fact_id": prompts["fact_id"].to_numpy(),
                                           "prompt_id": prompts["prompt_id"].to_numpy(), "p_before": base,
                                           "p_after": after, "change": (after - base) / base}))
            ppl_rows.append({"suppressed": relation, "kind": kind, "n_neurons": len(chosen), "ppl_before": base_ppl,
                             "ppl_after": ppl, "change": (ppl - base_ppl) / base_ppl})
    facts = pd.concat(fact_rows, ignore_index=True) if fact_rows else pd.DataFrame()
    return facts, pd.DataFrame(ppl_rows)


def same_answer_effect(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, all_prompts: pd.DataFrame,
                       seed: int = 0, max_targets: int = 8, batch_size: int = 32) -> pd.DataFrame:
    """Suppress one fact's neurons (at the last position) and measure other facts that share its answer's
    first token (any relation, from ``all_prompts``), against facts of the same relation with another answer
    and against the fact itself; the control is as many random memories of the same layers.

    Rows: source_fact, target_fact, group ("self", "same answer", "same relation, other answer"), kind,
    prompt_id, p_before, p_after, change. At most ``max_targets`` target facts per group (seeded).
    """
    by_fact = _fact_neurons(neurons)
    d_ff = loaded.adapter.d_ff
    pool = all_prompts.drop_duplicates("fact_id")[["fact_id", "relation", "answer_token"]]
    jobs, meta = [], []
    for fact, group in prompts[prompts["fact_id"].isin(by_fact)].groupby("fact_id"):
        fact = int(fact)
        rng = np.random.default_rng([seed, fact, 7])
        first = group.iloc[0]
        same = pool[(pool["answer_token"] == first.answer_token) & (pool["fact_id"] != fact)]["fact_id"].to_numpy()
        other = pool[(pool["relation"] == first.relation)
                     & (pool["answer_token"] != first.answer_token)]["fact_id"].to_numpy()
        targets = {"self": [fact]}
        for label, ids in (("same answer", same), ("same relation, other answer", other)):
            targets[label] = sorted(rng.choice(ids, min(max_targets, len(ids)), replace=False).tolist())
        kn = by_fact[fact]
        control = random_like(kn, d_ff, np.random.default_rng([seed, fact]))
        for label, ids in targets.items():
            for row in all_prompts[all_prompts["fact_id"].isin(ids)].itertuples():
                for kind, chosen in (("knowledge", kn), ("random", control)):
                    jobs.append((row.prompt_ids, row.answer_token, {n: 0.0 for n in chosen}))
                    meta.append({"source_fact": fact, "target_fact": int(row.fact_id), "group": label, "kind": kind,
                                 "prompt_id": int(row.prompt_id)})
    if not jobs:
        return pd.DataFrame(columns=["source_fact", "target_fact", "group", "kind", "prompt_id", "p_before", "p_after",
                                     "change"])
    frame = pd.DataFrame(meta)
    unique = all_prompts[all_prompts["prompt_id"].isin(frame["prompt_id"])]  # each target prompt's base run, once
    base = answer_probabilities(loaded, unique["prompt_ids"].tolist(), unique["answer_token"].tolist(),
                                batch_size=batch_size)
    before = dict(zip(unique["prompt_id"], base["p_answer"]))
    after = answer_probabilities(loaded, [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs],
                                 batch_size=batch_size)
    frame["p_before"] = frame["prompt_id"].map(before).astype(float)
    frame["p_after"] = after["p_answer"].to_numpy()
    frame["change"] = (frame["p_after"] - frame["p_before"]) / frame["p_before"]
    return frame


@torch.no_grad()
def value_view(loaded, neurons: pd.DataFrame, prompts: pd.DataFrame, seed: int = 0, k_tokens: int = 5) -> pd.DataFrame:
    """The key-value view of each knowledge neuron's value: the top tokens of ``sign x v_i`` as the model reads
    its residual (``Adapter.logits_from_values`` on ``written_values``) and the rank of the fact's answer token
    in p_i (0 = top), next to a random memory of the same layer (seeded) read for the same answer.

    Rows: fact_id, relation, answer, layer, memory, sign, kind ("knowledge"/"random"), answer_rank,
    answer_prob, top_tokens (list of str), top_token_ids.
    """
    adapter = loaded.adapter
    answers = prompts.drop_duplicates("fact_id").set_index("fact_id")
    rows, vectors = [], []
    rng = np.random.default_rng([seed, 11])
    for row in neurons.itertuples():
        control = random_like([(row.layer, row.memory)], adapter.d_ff, rng)[0]
        for kind, (layer, memory) in (("knowledge", (row.layer, row.memory)), ("random", control)):
            vectors.append(row.sign * adapter.written_values(int(layer))[int(memory)])
            rows.append({"fact_id": int(row.fact_id), "relation": row.relation,
                         "answer": answers.at[row.fact_id, "answer"],
                         "answer_token": int(answers.at[row.fact_id, "answer_token"]), "layer": int(layer),
                         "memory": int(memory), "sign": int(row.sign), "kind": kind})
    if not rows:
        return pd.DataFrame(columns=["fact_id", "relation", "answer", "layer", "memory", "sign", "kind", "answer_rank",
                                     "answer_prob", "top_tokens", "top_token_ids"])
    for start in range(0, len(vectors), 256):
        logits = adapter.logits_from_values(torch.stack(vectors[start: start + 256])).float()
        probs = logits.softmax(-1)
        top = logits.topk(k_tokens, dim=-1).indices
        for j in range(logits.shape[0]):
            row = rows[start + j]
            answer_logit = logits[j, row["answer_token"]]
            row["answer_rank"] = int((logits[j] > answer_logit).sum())
            row["answer_prob"] = float(probs[j, row["answer_token"]])
            row["top_token_ids"] = top[j].tolist()
            row["top_tokens"] = loaded.token_strings(top[j].tolist())
    return pd.DataFrame(rows)


def cached_trigger_examples(loaded, sentences: pd.DataFrame, k: int, out_dir):
    """Notebook 01's mined trigger examples if they are cached in ``out_dir`` (the same request as notebook 01's:
    model, corpus, k, one prefix per sentence, all layers, its snapshots), ``None`` if they are not there (nothing
    is mined here: mining takes most of notebook 01's time)."""
    from ..keys import load_cached_triggers, trigger_request

    request = trigger_request(loaded, sentences, k)
    return load_cached_triggers(out_dir, request.name, request.request, request.table)


def trigger_view(loaded, neurons: pd.DataFrame, prompts: pd.DataFrame, triggers, top: int = 25,
                 seed: int = 0) -> pd.DataFrame:
    """Does a knowledge neuron's key fire on text about the fact? For each knowledge neuron (and a random
    memory of the same layer and sign, seeded) its top-``top`` trigger examples from notebook 01's mining:
    how many prefixes (up to and including the trigger token) or their articles' titles name the subject,
    and how many prefixes contain the answer.

    Rows: fact_id, relation, subject, answer, layer, memory, sign, kind, triggers, about_subject,
    mentions_answer, any_about_subject, any_mentions_answer.
    """
    if triggers is None:
        raise ParameterError("No trigger examples: run notebook 01 (or ffnlib.keys.mine_trigger_examples) first.")
    facts = prompts.drop_duplicates("fact_id").set_index("fact_id")
    table = triggers.triggers
    mined = set(triggers.layers)
    signs = set(table["sign"].unique().tolist())
    rng = np.random.default_rng([seed, 13])
    pairs = []  # (neuron row, kind, layer, memory)
    for row in neurons.itertuples():
        if row.layer in mined and row.sign in signs:
            control = random_like([(row.layer, row.memory)], loaded.adapter.d_ff, rng)[0]
            pairs += [(row, "knowledge", int(row.layer), int(row.memory)), (row, "random", *control)]
    needed = pd.DataFrame([(l, m, r.sign) for r, _, l, m in pairs], columns=["layer", "memory", "sign"])
    needed = needed.drop_duplicates()
    table = table[table["layer"].isin(needed["layer"].unique()) & (table["rank"] < top)]
    table = table.merge(needed.astype({c: table[c].dtype for c in needed.columns}), on=["layer", "memory", "sign"])
    grouped = {key: g for key, g in table.groupby(["layer", "memory", "sign"])}
    index = triggers.token_index()
    titles = triggers.sentences.set_index("sentence_id")["title"].to_dict()
    decode = loaded.tokenizer.decode
    rows = []
    for row, kind, layer, memory in pairs:
        subject, answer = facts.at[row.fact_id, "subject"], facts.at[row.fact_id, "answer"]
        found = grouped.get((layer, memory, row.sign))
        about = mentions = n = 0
        if found is not None:
            for t in found.itertuples():
                ids = index[int(t.sentence_id)]
                prefix = decode(ids[triggers.n_bos: int(t.position) + 1])
                title = titles.get(int(t.sentence_id)) or ""
                about += subject in prefix or subject in str(title)
                mentions += answer in prefix
                n += 1
        rows.append({"fact_id": int(row.fact_id), "relation": row.relation, "subject": subject, "answer": answer,
                     "layer": layer, "memory": memory, "sign": int(row.sign), "kind": kind, "triggers": n,
                     "about_subject": about, "mentions_answer": mentions, "any_about_subject": about > 0,
                     "any_mentions_answer": mentions > 0})
    return pd.DataFrame(rows)


def layer_view(neurons: pd.DataFrame, n_layers: int, agreement: pd.DataFrame | None = None,
               layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Knowledge neurons per attributed layer (``layers``, all by default): count, share, relative depth and the
    share a uniform spread would give, next to Section 4's agreement by layer (notebook 02's ``agreement``
    column, sign +1) when given; ``attrs["spearman"]``: the rank correlation of the two over the attributed
    layers and its p-value."""
    layers = list(range(n_layers)) if layers is None else sorted(int(l) for l in layers)
    counts = neurons.groupby("layer").size().reindex(layers, fill_value=0)
    frame = pd.DataFrame({"layer": layers, "relative_depth": relative_depth(np.array(layers), n_layers),
                          "neurons": counts.to_numpy(), "share": counts.to_numpy() / max(counts.sum(), 1),
                          "uniform": 1.0 / len(layers)})
    if agreement is not None and len(agreement):
        positive = agreement[agreement["sign"] == 1] if "sign" in agreement.columns else agreement
        frame = frame.merge(positive[["layer", "agreement"]], on="layer", how="left")
        both = frame.dropna(subset=["agreement"])
        if len(both) >= 3 and both["neurons"].nunique() > 1 and both["agreement"].nunique() > 1:
            from scipy.stats import spearmanr

            result = spearmanr(both["share"], both["agreement"])
            frame.attrs["spearman"] = {"rho": float(result.statistic), "p": float(result.pvalue), "layers": len(both)}
    return frame


# ---- editing the weights (always undone) ------------------------------------------------------------
@contextmanager
def edited_values(loaded, new_values: Mapping[tuple[int, int], torch.Tensor]) -> Iterator[None]:
    """Write new value vectors ``{(layer, memory): v}`` into the model's weights; on exit (errors included)
    the original weights are copied back, bit for bit."""
    adapter = loaded.adapter
    saved = []
    try:
        with torch.no_grad():
            for (layer, memory), vector in new_values.items():
                values = adapter.values(layer)  # a view of the down module's weight
                saved.append((layer, int(memory), values[int(memory)].clone()))
                values[int(memory)].copy_(vector.to(values.dtype))
        yield
    finally:
        with torch.no_grad():
            for layer, memory, original in reversed(saved):
                adapter.values(layer)[memory].copy_(original)


def update_vectors(loaded, neurons: Sequence[tuple[int, int, int]], old_token: int, new_token: int,
                   lambda1: float = 1.0, lambda2: float = 8.0) -> dict[tuple[int, int], torch.Tensor]:
    """Dai's fact update of each neuron's value: ``v - lambda1 |v|/|e_old| e_old + lambda2 |v|/|e_new| e_new``
    (e: input embeddings; their code: lambda1 = 1, lambda2 = 8). For a negative-side neuron (sign -1, it
    writes -v) the two terms change sign."""
    embeddings = loaded.model.get_input_embeddings().weight.detach()
    e_old, e_new = embeddings[old_token].float(), embeddings[new_token].float()
    out = {}
    for layer, memory, sign in neurons:
        v = loaded.adapter.values(layer)[memory].float()
        change = -lambda1 * v.norm() / e_old.norm() * e_old + lambda2 * v.norm() / e_new.norm() * e_new
        out[(int(layer), int(memory))] = v + sign * change
    return out


MAX_PERPLEXITY_RATIO = 1.5  # an update must leave held-out perplexity within 1.5x the unedited model's (ours)


def _check_ratio(max_ratio) -> float:
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not max_ratio >= 1:
        raise ParameterError(f"max_perplexity_ratio must be a number >= 1 (math.inf: any finite perplexity), "
                             f"got {max_ratio!r}.")
    return float(max_ratio)


def edit_success(rank: int, ppl_before: float, ppl_after: float, max_ratio: float = MAX_PERPLEXITY_RATIO) -> bool:
    """An update succeeds when the new answer is the top token (``rank == 0``) **and** held-out perplexity after
    the edit is at most ``max_ratio`` x the unedited model's. Dai et al. count rank 1 only and report intra- and
    inter-relation perplexity beside it, to show that an edit leaves other knowledge alone; an edit that
    destroys the model is no update, and 1.5x (the default) is a generous bound on "leaves the model working".
    A perplexity that is not finite (before or after) is a failure."""
    max_ratio = _check_ratio(max_ratio)
    return bool(int(rank) == 0 and math.isfinite(ppl_before) and math.isfinite(ppl_after)
                and ppl_after <= max_ratio * ppl_before)


def edit_facts(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, all_prompts: pd.DataFrame,
               heldout: Sequence[Sequence[int]], lambda1: float = 1.0, lambda2: float = 8.0, seed: int = 0,
               drop_shared: float = 0.1, n_others: int = 5, max_facts: int | None = None, batch_size: int = 32,
               max_perplexity_ratio: float = MAX_PERPLEXITY_RATIO) -> pd.DataFrame:
    """Dai's fact update: for each fact, one of its prompts the model gets right (seeded) and a new answer (the
    answer of another fact of the relation, seeded); the fact's neurons (without those of more than
    ``drop_shared`` of the relation's facts, as their code, and at least without those shared with another
    fact: with a handful of facts per relation 10% is less than one) have their values edited by
    :func:`update_vectors`, then the edit is undone. The same edit of as many random memories of the same
    layers is the control.

    Rows: fact_id, relation, kind, n_neurons, lambda1, lambda2, success (:func:`edit_success`: the new answer's
    first token on top and held-out perplexity within ``max_perplexity_ratio`` x), success_unbounded (on top,
    whatever the perplexity: Dai's success), success_at_5, changed (top token no longer the old answer),
    p_new_before/after, generalisation (share of the fact's other prompts whose top token becomes the new
    answer), intra/inter (mean NLL of the gold answer over ``n_others`` other facts of the same / other
    relations, before and after), heldout_ppl_before/after, heldout_ppl_ratio (after / before),
    max_perplexity_ratio. ``max_facts``: edit only the first facts (by fact_id) that qualify.
    """
    max_perplexity_ratio = _check_ratio(max_perplexity_ratio)
    d_ff = loaded.adapter.d_ff
    relation_counts = {rel: Counter((int(l), int(m)) for l, m in zip(g["layer"], g["memory"]))
                       for rel, g in neurons.groupby("relation")}
    relation_facts = neurons.groupby("relation")["fact_id"].nunique().to_dict()
    evaluated = prompts if "correct" in prompts.columns else evaluate_prompts(loaded, prompts, batch_size)
    pool = all_prompts.drop_duplicates("fact_id")
    base_ppl = _ppl(perplexity(loaded, heldout)) if len(heldout) else math.nan
    rows = []

    for fact, group in neurons.groupby("fact_id"):
        fact = int(fact)
        relation = group["relation"].iloc[0]
        limit = max(drop_shared * relation_facts[relation], 1)  # with few facts: shared by any other fact
        shared = {n for n, c in relation_counts[relation].items() if c > limit}
        chosen = [(int(l), int(m), int(s)) for l, m, s in zip(group["layer"], group["memory"], group["sign"])
                  if (int(l), int(m)) not in shared]
        mine = evaluated[evaluated["fact_id"] == fact]
        right = mine[mine["correct"]]
        if not chosen or right.empty or (max_facts is not None and len(rows) >= 2 * max_facts):
            continue
        rng = np.random.default_rng([seed, fact, 3])
        prompt = right.iloc[int(rng.integers(len(right)))]
        old = int(prompt["answer_token"])
        candidates = pool[(pool["relation"] == relation) & (pool["answer_token"] != old)]
        if candidates.empty:
            continue
        new = int(candidates.iloc[int(rng.integers(len(candidates)))]["answer_token"])
        intra_ids = pool[(pool["relation"] == relation) & (pool["fact_id"] != fact)]["fact_id"].to_numpy()
        inter_ids = pool[pool["relation"] != relation]["fact_id"].to_numpy()
        intra = all_prompts[all_prompts["fact_id"].isin(rng.choice(intra_ids, min(n_others, len(intra_ids)),
                                                                   replace=False))]
        inter = all_prompts[all_prompts["fact_id"].isin(rng.choice(inter_ids, min(n_others, len(inter_ids)),
                                                                   replace=False))]
        others = mine[mine["prompt_id"] != prompt["prompt_id"]]
        # one batch: the edited prompt and the fact's other prompts (read for the new answer), then the other
        # facts' prompts (read for their own answers)
        ids = ([prompt["prompt_ids"]] + others["prompt_ids"].tolist() + intra["prompt_ids"].tolist()
               + inter["prompt_ids"].tolist())
        tokens = [new] * (1 + len(others)) + intra["answer_token"].tolist() + inter["answer_token"].tolist()
        parts = np.repeat([0, 1, 2, 3], [1, len(others), len(intra), len(inter)])

        def measure():
            result = answer_probabilities(loaded, ids, tokens, batch_size=batch_size)
            return result, float(result.loc[parts == 2, "nll"].mean()), float(result.loc[parts == 3, "nll"].mean())

        before, intra_before, inter_before = measure()
        control = [(l, m, s) for (l, m), s in zip(random_like([(l, m) for l, m, _ in chosen], d_ff,
                                                              np.random.default_rng([seed, fact])),
                                                  [s for _, _, s in chosen])]
        for kind, edit in (("knowledge", chosen), ("random", control)):
            with edited_values(loaded, update_vectors(loaded, edit, old, new, lambda1, lambda2)):
                after, intra_after, inter_after = measure()
                ppl = _ppl(perplexity(loaded, heldout)) if len(heldout) else math.nan
            generalised = after.loc[parts == 1, "rank"]
            rank = int(after["rank"].iloc[0])
            rows.append({"fact_id": fact, "relation": relation, "kind": kind, "n_neurons": len(edit),
                         "lambda1": float(lambda1), "lambda2": float(lambda2),
                         "prompt_id": int(prompt["prompt_id"]), "old_token": old, "new_token": new,
                         "success": edit_success(rank, base_ppl, ppl, max_perplexity_ratio),
                         "success_unbounded": rank == 0, "success_at_5": rank < 5,
                         "changed": bool(after["top_token"].iloc[0] != old),
                         "p_new_before": float(before["p_answer"].iloc[0]),
                         "p_new_after": float(after["p_answer"].iloc[0]),
                         "generalisation": float((generalised == 0).mean()) if len(generalised) else math.nan,
                         "intra_nll_before": intra_before, "intra_nll_after": intra_after,
                         "inter_nll_before": inter_before, "inter_nll_after": inter_after,
                         "heldout_ppl_before": base_ppl, "heldout_ppl_after": ppl,
                         "heldout_ppl_ratio": ppl / base_ppl, "max_perplexity_ratio": max_perplexity_ratio})
    return pd.DataFrame(rows)


def lambda2_sweep(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, all_prompts: pd.DataFrame,
                  heldout: Sequence[Sequence[int]], lambda2s: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
                  lambda1: float = 1.0, seed: int = 0, drop_shared: float = 0.1, n_others: int = 5,
                  max_facts: int | None = None, batch_size: int = 32,
                  max_perplexity_ratio: float = MAX_PERPLEXITY_RATIO, out_dir=None,
                  progress: bool = True) -> pd.DataFrame:
    """:func:`edit_facts` at each lambda2 of ``lambda2s`` (the same facts, prompts, new answers and random
    controls at each): every edit's row, knowledge neurons and random memories. With ``out_dir`` each lambda2's
    rows are checkpointed (an interrupted sweep resumes) and the whole is cached with a manifest; a later call
    with the same request loads it. :func:`sweep_table` summarises it."""
    max_perplexity_ratio = _check_ratio(max_perplexity_ratio)
    lambda2s = [float(v) for v in lambda2s]
    if not lambda2s:
        raise ParameterError("lambda2s is empty: give at least one lambda2 to sweep.")

    def key(frame, columns):
        return fingerprint(frame[columns].to_json(orient="values"))

    request = {"analysis": "kn_lambda2_sweep", "version": _VERSION, "model": loaded.name,
               "file_hash": loaded.file_hash, "dtype": str(next(loaded.model.parameters()).dtype),
               "prompts": key(prompts, [c for c in ("prompt_id", "fact_id", "prompt_ids", "answer_token", "correct")
                                        if c in prompts.columns]),
               "all_prompts": key(all_prompts, ["prompt_id", "fact_id", "relation", "prompt_ids", "answer_token"]),
               "neurons": key(neurons, ["relation", "fact_id", "layer", "memory", "sign"]),
               "heldout": fingerprint([[int(t) for t in ids] for ids in heldout]), "lambda1": float(lambda1),
               "lambda2s": lambda2s, "seed": int(seed), "drop_shared": float(drop_shared), "n_others": int(n_others),
               "max_facts": max_facts, "max_perplexity_ratio": max_perplexity_ratio}
    name = f"kn-lambda2-sweep-{fingerprint(request)}"
    folder = ensure_dir(out_dir) if out_dir is not None else None
    if folder is not None:
        cached = load_result(folder, name, request)
        if cached is not None:
            if progress:
                print(f"Loaded the cached lambda2 sweep {folder / name}.parquet; not recomputing.")
            return cached
    partial = folder / f"{name}.partial" if folder is not None else None
    parts = []
    for index, lambda2 in enumerate(lambda2s):
        chunk = {**request, "chunk": index}
        part = load_result(partial, f"lambda2-{index:02d}", chunk) if partial is not None else None
        if part is None:
            part = edit_facts(loaded, prompts, neurons, all_prompts, heldout, lambda1, lambda2, seed, drop_shared,
                              n_others, max_facts, batch_size, max_perplexity_ratio)
            if partial is not None:
                save_result(partial, f"lambda2-{index:02d}", part, chunk)
        elif progress:
            print(f"Resuming the lambda2 sweep: lambda2 = {lambda2:g} read from its checkpoint in {partial}.")
        parts.append(part)
    sweep = pd.concat(parts, ignore_index=True)
    if folder is not None:
        import shutil

        save_result(folder, name, sweep, request)
        shutil.rmtree(partial, ignore_errors=True)
    return sweep


def sweep_table(sweep: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (lambda2, kind) of :func:`lambda2_sweep`: edits, success (bounded) and success_unbounded with exact
    binomial 95% intervals, and the median held-out perplexity ratio (after / before; a non-finite ratio counts
    as infinite) with a bootstrap 95% interval over edits (``ffnlib.stats``)."""
    columns = ["lambda2", "kind", "edits", "max_perplexity_ratio", "success", "success_low", "success_high",
               "success_unbounded", "success_unbounded_low", "success_unbounded_high", "ppl_ratio", "ppl_ratio_low",
               "ppl_ratio_high"]
    rows = []
    for (lambda2, kind), group in sweep.groupby(["lambda2", "kind"], sort=True):
        row = {"lambda2": float(lambda2), "kind": kind, "edits": len(group),
               "max_perplexity_ratio": float(group["max_perplexity_ratio"].iloc[0])}
        for column in ("success", "success_unbounded"):
            rate = binomial(int(group[column].sum()), len(group), "edits")
            row.update({column: rate.value, f"{column}_low": rate.low, f"{column}_high": rate.high})
        ratio = group["heldout_ppl_ratio"].to_numpy(np.float64)
        ratio = np.where(np.isfinite(ratio), ratio, np.inf)
        interval = resampled(ratio, lambda r: float(np.median(r)), "edits", seed=seed)
        row.update(ppl_ratio=float(np.median(ratio)), ppl_ratio_low=interval.low, ppl_ratio_high=interval.high)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def erase_relations(loaded, prompts: pd.DataFrame, neurons: pd.DataFrame, heldout: Sequence[Sequence[int]],
                    top: int = 20, seed: int = 0, batch_size: int = 32) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dai's erasing: zero the values of a relation's ``top`` most common neurons (their code: 20), measure
    every analysed fact's answer (negative log-likelihood of its first token, and whether it stays the top
    token) and held-out perplexity, undo; the control zeroes as many random memories of the same layers.

    Returns (facts, heldout): facts has erased, kind, n_neurons, relation, same_relation, fact_id,
    prompt_id, nll_before, nll_after, correct_before, correct_after; heldout has erased, kind, n_neurons,
    ppl_before, ppl_after, change.
    """
    before = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                  batch_size=batch_size)
    base_ppl = _ppl(perplexity(loaded, heldout)) if len(heldout) else math.nan
    fact_rows, ppl_rows = [], []
    for relation, kn in relation_neurons(neurons, top=top).items():
        control = random_like(kn, loaded.adapter.d_ff, np.random.default_rng([seed, _stable(relation), 5]))
        for kind, chosen in (("knowledge", kn), ("random", control)):
            zeros = {n: torch.zeros(loaded.adapter.d_model) for n in chosen}
            with edited_values(loaded, zeros):
                after = answer_probabilities(loaded, prompts["prompt_ids"].tolist(), prompts["answer_token"].tolist(),
                                             batch_size=batch_size)
                ppl = _ppl(perplexity(loaded, heldout)) if len(heldout) else math.nan
            fact_rows.append(pd.DataFrame({"erased": relation, "kind": kind, "n_neurons": len(chosen),
                                           "relation": prompts["relation"].to_numpy(),
                                           "same_relation": prompts["relation"].to_numpy() == relation,
                                           "fact_id": prompts["fact_id"].to_numpy(),
                                           "prompt_id": prompts["prompt_id"].to_numpy(),
                                           "nll_before": before["nll"].to_numpy(), "nll_after": after["nll"].to_numpy(),
                                           "correct_before": before["rank"].to_numpy() == 0,
                                           "correct_after": after["rank"].to_numpy() == 0}))
            ppl_rows.append({"erased": relation, "kind": kind, "n_neurons": len(chosen), "ppl_before": base_ppl,
                             "ppl_after": ppl, "change": (ppl - base_ppl) / base_ppl})
    facts = pd.concat(fact_rows, ignore_index=True) if fact_rows else pd.DataFrame()
    return facts, pd.DataFrame(ppl_rows)


# =====================================================================================================
# Sizes per scale, findings and curves for the report
# =====================================================================================================
@dataclass(frozen=True)
class KNScale:
    """How much notebook 06 does at each ``scale``."""

    name: str
    relations: tuple[str, ...] | None  # None: every relation with templates
    screened_facts: int | None  # facts per relation whose accuracy is measured (seeded sample; None: all)
    facts_per_relation: int | None  # facts analysed per relation, among those right in >= 1 template
    templates: int | None  # templates per relation (the first ones; None: all)
    top_layers: int | None  # attribute only the top layers (None: every layer, as Dai)
    heldout_sentences: int  # held-out sentences for perplexity
    lambda2_sweep: tuple[float, ...]  # the fact update's lambda2 values of the trade-off sweep


KN_SCALES = {
    "ci": KNScale("ci", ("capital", "official_language"), 8, 2, 3, 4, 4, (1.0, 8.0)),
    "default": KNScale("default", None, None, 4, None, None, 24, (1.0, 2.0, 4.0, 8.0)),
    "full": KNScale("full", None, None, 30, None, None, 200, (1.0, 2.0, 4.0, 8.0)),
}


def kn_scale(scale: str) -> KNScale:
    if scale not in KN_SCALES:
        raise ParameterError(f"Unknown scale {scale!r}: choose one of {list(KN_SCALES)}.")
    return KN_SCALES[scale]


def _separated(ours: tuple, control: tuple, direction: int) -> bool:
    return bool(ours[1] < control[0]) if direction < 0 else bool(ours[0] > control[1])


def _estimate(values, unit: str, seed: int) -> Estimate:
    """The mean of per-unit numbers with a seeded bootstrap 95% interval (``ffnlib.stats``)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return share(values, unit, seed=seed) if len(values) else Estimate.missing(unit)


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:+.1f}%"


def measures(results: Mapping[str, pd.DataFrame], n_layers: int, seed: int = 0,
             layers: Sequence[int] | None = None) -> tuple[dict[str, Estimate], dict[str, str]]:
    """The measures of the notebook's findings (``ffnlib.findings``, notebook ``06_knowledge_neurons``), each
    with a 95% interval (seeded bootstrap over facts, or exact binomial for shares of neurons), and the
    measure's own control under ``"<key>/baseline"``: as many random memories of the same layers (none of the
    fact's), the other relations' facts, or the other facts with the same answer. A random-weights model knows
    no facts, so these findings have no random-weights control: the baseline is theirs.

    ``results`` may hold: ``per_fact`` (:func:`neurons_per_fact`), ``neurons``, ``effects``
    (:func:`suppress_amplify`), ``specificity`` (its facts frame), ``same_answer``, ``values``
    (:func:`value_view`), ``triggers`` (:func:`trigger_view`), ``layers`` (:func:`layer_view`), ``edits``
    (:func:`edit_facts`, judged on ``success``: rank 1 within the perplexity bound), ``erase`` (the facts frame
    of :func:`erase_relations`). Missing ones are skipped.
    ``layers``: the attributed layers (all by default).
    """
    out: dict[str, Estimate] = {}
    details: dict[str, str] = {}
    per_fact = results.get("per_fact")
    if per_fact is not None and len(per_fact):
        counts = per_fact["n_neurons"].to_numpy(float)
        out["neurons_per_fact"] = _estimate(counts, "facts", seed)
        details["neurons_per_fact"] = (f"{len(counts)} facts, {(counts > 0).mean():.0%} with at least one; p is "
                                       "moved per relation towards 2-5 neurons per fact (Dai's code), so the count "
                                       "is not free")
    neurons = results.get("neurons")
    if neurons is not None and len(neurons):
        attributed = np.arange(n_layers) if layers is None else np.asarray(sorted(layers))
        upper_share = float((relative_depth(attributed, n_layers) > 0.5).mean())
        if 0.0 < upper_share < 1.0:  # with only one half attributed, the share says nothing
            depth = relative_depth(neurons["layer"].to_numpy(), n_layers)
            shares = pd.Series(depth > 0.5, index=neurons["fact_id"].to_numpy()).groupby(level=0).mean()
            out["top_layers"] = _estimate(shares.to_numpy(float), "facts", seed)
            out["top_layers/baseline"] = Estimate(upper_share, upper_share, upper_share, len(attributed), "layers",
                                                  "exact")
            details["top_layers"] = (f"per fact, the share of its neurons in the upper half; baseline: the upper "
                                     f"half's share of the {len(attributed)} attributed layers")
    effects = results.get("effects")
    if effects is not None and len(effects):
        for operation in ("suppress", "amplify"):
            for kind, key in (("knowledge", operation), ("random", f"{operation}/baseline")):
                rows = effects[(effects["operation"] == operation) & (effects["kind"] == kind)]
                if len(rows):
                    out[key] = _estimate(rows.groupby("fact_id")["change"].mean().to_numpy(), "facts", seed)
            if operation in out:
                details[operation] = f"baseline: as many random memories of the same layers, {out[operation].n} facts"
    spec = results.get("specificity")
    if spec is not None and len(spec):
        kn = spec[spec["kind"] == "knowledge"].assign(unit=lambda f: f["suppressed"] + ":" + f["fact_id"].astype(str))
        for same, key in ((True, "relation_specific"), (False, "relation_specific/baseline")):
            rows = kn[kn["same_relation"] == same]
            if len(rows):
                out[key] = _estimate(rows.groupby("unit")["change"].mean().to_numpy(), "facts", seed)
        details["relation_specific"] = "answer probability of the suppressed relation's facts; baseline: other relations'"
    same = results.get("same_answer")
    if same is not None and len(same):
        kn = same[same["kind"] == "knowledge"]
        for group, key in (("self", "fact_specific"), ("same answer", "fact_specific/baseline")):
            rows = kn[kn["group"] == group]
            if len(rows):
                out[key] = _estimate(rows.groupby("source_fact")["change"].mean().to_numpy(), "facts", seed)
        details["fact_specific"] = "the fact's own answer; baseline: other facts with the same answer"
    values = results.get("values")
    if values is not None and len(values):
        for kind, key in (("knowledge", "values_promote_answer"), ("random", "values_promote_answer/baseline")):
            hits = values.loc[values["kind"] == kind, "answer_rank"] < 10
            out[key] = binomial(int(hits.sum()), len(hits), "neurons")
        median = float(values.loc[values["kind"] == "knowledge", "answer_rank"].median())
        details["values_promote_answer"] = (f"median rank of the answer in the values' distributions {median:.0f}; "
                                            "baseline: random memories of the same layers")
    triggers = results.get("triggers")
    if triggers is not None and len(triggers):
        for kind, key in (("knowledge", "keys_about_subject"), ("random", "keys_about_subject/baseline")):
            hits = triggers.loc[triggers["kind"] == kind, "any_about_subject"]
            out[key] = binomial(int(hits.sum()), len(hits), "neurons")
        details["keys_about_subject"] = "a top trigger example names the subject; baseline: random same-layer memories"
    layer_table = results.get("layers")
    if layer_table is not None and "agreement" in layer_table.columns:
        both = layer_table.dropna(subset=["share", "agreement"])
        if len(both) >= 3:
            def rho(rows: np.ndarray) -> float:
                return float(pd.Series(rows[:, 0]).corr(pd.Series(rows[:, 1]), method="spearman"))

            out["layer_agreement"] = resampled(both[["share", "agreement"]].to_numpy(np.float64), rho, "layers",
                                               seed=seed)
            details["layer_agreement"] = (f"Spearman correlation over {len(both)} attributed layers between their "
                                          "share of knowledge neurons and their Section 4 agreement")
    edits = results.get("edits")
    if edits is not None and len(edits):
        for kind, key in (("knowledge", "update"), ("random", "update/baseline")):
            rate = edits.loc[edits["kind"] == kind, "success"]  # rank 1 and perplexity within the bound
            out[key] = binomial(int(rate.sum()), len(rate), "facts")
        kn, rnd = edits[edits["kind"] == "knowledge"], edits[edits["kind"] == "random"]
        details["update"] = (f"new answer at rank 1 in {kn['success_unbounded'].mean():.0%} of edits (random "
                             f"{rnd['success_unbounded'].mean():.0%}), {kn['success'].mean():.0%} with held-out "
                             f"perplexity within {kn['max_perplexity_ratio'].iloc[0]:g}x (random "
                             f"{rnd['success'].mean():.0%}); held-out perplexity {kn['heldout_ppl_before'].iloc[0]:.4g}"
                             f" -> {kn['heldout_ppl_after'].median():.4g} (median over edits; random neurons "
                             f"{rnd['heldout_ppl_after'].median():.4g}); prediction changed {kn['changed'].mean():.0%}")
    erase = results.get("erase")
    if erase is not None and len(erase):
        own = erase[erase["same_relation"]].assign(delta=lambda f: f["nll_after"] - f["nll_before"])
        for kind, key in (("knowledge", "erase"), ("random", "erase/baseline")):
            per_fact_delta = own[own["kind"] == kind].groupby("fact_id")["delta"].mean().to_numpy()
            e = _estimate(per_fact_delta, "facts", seed)  # mean change of the answer's log-perplexity
            out[key] = Estimate(math.expm1(e.value), math.expm1(e.low), math.expm1(e.high), e.n, e.unit, e.method) \
                if e.measured else e
        other = erase[~erase["same_relation"] & (erase["kind"] == "knowledge")]
        other_change = math.expm1(float((other["nll_after"] - other["nll_before"]).mean())) if len(other) else math.nan
        details["erase"] = (f"answer perplexity of the erased relation's facts; other relations {_pct(other_change)}; "
                            "baseline: 20 random memories of the same layers")
    return out, details


def curves(layers: pd.DataFrame, n_layers: int) -> dict:
    """Per-layer series for the report (one value per layer, None where a layer was not attributed): the share
    of knowledge neurons in each layer, and Section 4's agreement when the table has it."""
    def series(column):
        values = dict(zip(layers["layer"], layers[column]))
        return [None if l not in values or pd.isna(values[l]) else float(values[l]) for l in range(n_layers)]

    out = {"kn_share": {"label": "share of knowledge neurons in the layer", "values": series("share"), "paper": None}}
    if "agreement" in layers.columns:
        out["kn_agreement"] = {"label": "Section 4 agreement of the layer (notebook 02)", "values": series("agreement"),
                               "paper": None}
    return out
