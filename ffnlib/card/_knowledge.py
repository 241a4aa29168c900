"""The knowledge-neuron side of a card (notebook 06): the facts for which the memory is a knowledge neuron, with its
attribution, read from notebook 06's neuron tables and its cached attribution.

Notebook 06 saves its knowledge neurons with the fact's relation and id (``tables/06_neurons.csv``, and
``06_neurons_negative.csv`` for the negative side), not the fact's subject and answer. The card reads those from
the same fact sample the notebook drew (``ffnlib.related.knowledge_neurons``: ``load_facts``, ``sample_facts``,
``build_prompts`` with the run's seed) and shows them only when the prompts agree with the cached attribution's
manifest (the same prompt ids, tokens and answers), so a fact is never named wrongly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import FFNLibError
from ..related import knowledge_neurons as kn
from ..storage import fingerprint
from ._part import Part

__all__ = ["knowledge_neurons", "knowledge_part", "suppression_rows"]

_SUPPRESSION_COLUMNS = ["fact_id", "sign", "relation", "prompts", "change", "random_change"]
_FACT_COLUMNS = ["relation", "fact_id", "subject", "answer", "prompt", "sign", "prompts", "share", "mean_ratio",
                 "mean_score"]


def knowledge_neurons(run) -> pd.DataFrame | None:
    """Notebook 06's knowledge neurons, both signs (``tables/06_neurons.csv`` and ``06_neurons_negative.csv``:
    relation, fact_id, layer, memory, sign, share, mean_ratio, ...), or None when it saved none."""
    tables = [run.table(name) for name in ("06_neurons", "06_neurons_negative")]
    tables = [t for t in tables if t is not None]
    return pd.concat(tables, ignore_index=True) if tables else None


def _attribution(run, summary: dict) -> tuple[str, dict] | None:
    request = (summary.get("manifests") or {}).get("attribution")
    names = [n for n in run.find(request) if not n.endswith("-prompts")] if request else []
    return (names[0], request) if names else None


def _prompts(loaded, run, summary: dict, attribution: tuple[str, dict] | None, seed: int) -> pd.DataFrame | None:
    """The notebook's prompts (prompt_id, fact_id, relation, subject, answer) rebuilt from its fact sample, or None
    when they do not match the cached attribution's manifest (another seed, source or tokenizer)."""
    def rebuild():
        source = str(summary.get("facts_source", ""))
        if attribution is None or not source.startswith("countryinfo"):
            return None  # Wikidata facts are a 358 MB download: never fetched to draw a card
        try:
            sizes = kn.kn_scale(summary.get("scale") or run.folder.name)
            relations = [row["relation"] for row in summary.get("accuracy", [])]
            templates = {r: t[: sizes.templates] if sizes.templates else t for r, t in kn.load_templates().items()
                         if r in relations}
            facts = kn.load_facts("countryinfo", relations=relations, templates=templates)
            prompts = kn.build_prompts(loaded, kn.sample_facts(facts, sizes.screened_facts, seed=seed), templates,
                                       skip_unencodable=True)
        except FFNLibError:
            return None
        attributed = run.load(f"{attribution[0]}-prompts")
        if attributed is None:
            return None
        chosen = prompts[prompts["prompt_id"].isin(set(attributed["prompt_id"].astype(int)))]
        identity = fingerprint([[int(r.prompt_id), list(map(int, r.prompt_ids)), list(map(int, r.answer_ids))]
                                for r in chosen.itertuples()])
        if identity != attribution[1].get("prompts"):
            return None
        return chosen[["prompt_id", "fact_id", "relation", "subject", "answer", "template_id", "prompt"]]

    return run.memo(("kn_prompts", seed), rebuild)


def _name_facts(loaded, run, summary: dict, mine: pd.DataFrame, layer: int, memory: int, seed: int) -> bool:
    """Fill ``mine``'s subject, answer and mean attribution score (over the fact's prompts); False when the
    notebook's prompts cannot be rebuilt and matched."""
    attribution = _attribution(run, summary)
    prompts = _prompts(loaded, run, summary, attribution, seed)
    if prompts is None:
        return False
    facts = prompts.sort_values("template_id", kind="stable").drop_duplicates("fact_id").set_index("fact_id")
    mine["subject"] = mine["fact_id"].map(facts["subject"])
    mine["answer"] = mine["fact_id"].map(facts["answer"])
    mine["prompt"] = mine["fact_id"].map(facts["prompt"])  # its first template's prompt, as notebook 06 asked it
    scores = run.load(attribution[0], filters=[("layer", "==", int(layer)), ("memory", "==", int(memory))])
    if scores is not None and len(scores):
        mean = scores.merge(prompts[["prompt_id", "fact_id"]], on="prompt_id").groupby(["fact_id", "sign"])["score"]
        mean = mean.mean()
        mine["mean_score"] = [mean.get((int(f), int(s)), np.nan) for f, s in zip(mine["fact_id"], mine["sign"])]
    return True


def knowledge_part(loaded, run, layer: int, memory: int, seed: int = 0) -> Part:
    """The card's ``facts`` and ``suppression``, from notebook 06's results."""
    part = Part()
    summary = run.summary("06_knowledge_neurons")
    neurons = knowledge_neurons(run)
    if summary is None or neurons is None:
        for name in ("facts", "suppression"):
            part.lack(name, "its knowledge neurons (tables/06_neurons.csv) are not in the results")
        return part
    attributed = (summary.get("parameters") or {}).get("layers")
    if attributed is not None and layer not in attributed:
        for name in ("facts", "suppression"):
            part.lack(name, f"it attributed layers {attributed} only (the scale's top layers), not layer {layer}; "
                            "at scale default it attributes every layer")
        return part
    mine = neurons[(neurons["layer"] == layer) & (neurons["memory"] == memory)].copy()
    mine["subject"], mine["answer"], mine["prompt"], mine["mean_score"] = None, None, None, np.nan
    if len(mine) and not _name_facts(loaded, run, summary, mine, layer, memory, seed):
        part.notes["facts"] = ("the facts' subjects and answers could not be matched to notebook 06's attribution "
                               "(another seed, or Wikidata facts): relation and fact id only")
    part.fields["facts"] = mine.reindex(columns=_FACT_COLUMNS).reset_index(drop=True)
    part.notes.setdefault("facts", f"notebook 06's knowledge neurons of {summary.get('analysed_facts')} facts "
                                   "(share: of the fact's prompts where it was a coarse neuron; mean_ratio: its "
                                   "attribution over the prompt's largest; mean_score: its attribution)")
    if len(mine) == 0:
        part.fields["suppression"] = pd.DataFrame(columns=_SUPPRESSION_COLUMNS)
        part.notes["suppression"] = "not a knowledge neuron of any analysed fact: nothing was suppressed"
        return part
    each = run.table("06_suppress_each")
    if each is None or not {"fact_id", "layer", "memory", "kind", "change"} <= set(each.columns):
        part.lack("suppression", "the run's notebook 06 saved only the mean change of suppressing each fact's "
                                 "neurons together (tables/06_suppress_amplify.csv), not each neuron's "
                                 "(tables/06_suppress_each.csv)")
        return part
    part.fields["suppression"] = suppression_rows(each, layer, memory)
    part.notes["suppression"] = ("notebook 06: this memory's coefficient set to 0 alone at the last position of its "
                                 "fact's prompts; change = relative change of the answer's probability (mean over "
                                 "prompts), beside one random memory of the layer suppressed alone")
    return part


def suppression_rows(each: pd.DataFrame, layer: int, memory: int) -> pd.DataFrame:
    """Per fact (and sign), the mean change of the answer's probability when memory ``memory`` of ``layer`` is
    suppressed alone, and when its random counterpart is (``kn.suppress_each``'s rows)."""
    mine = each[(each["layer"] == layer) & (each["memory"] == memory)]
    keys = ["fact_id", "sign"] if "sign" in mine.columns else ["fact_id"]
    rows = []
    for key, group in mine.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        alone, random = (group.loc[group["kind"] == kind, "change"] for kind in ("knowledge", "random"))
        rows.append({**dict(zip(keys, map(int, key))), "relation": group["relation"].iloc[0]
                     if "relation" in group.columns else None, "prompts": int(len(alone)),
                     "change": float(alone.mean()) if len(alone) else np.nan,
                     "random_change": float(random.mean()) if len(random) else np.nan})
    return pd.DataFrame(rows).reindex(columns=_SUPPRESSION_COLUMNS)
