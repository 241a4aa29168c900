"""Facts to look for: (relation, subject, answer) rows from ``countryinfo`` (offline, the default) or BIG-bench's
qa_wikidata (a 358 MB download once), and a seeded sample of them per relation."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ... import bigbench
from ...errors import ParameterError, ResultsError
from ...storage import read_json
from ._prompts import TEMPLATES_PATH, load_templates

__all__ = ["FACT_SOURCES", "stable_seed", "countryinfo_facts", "BIGBENCH_VERSION", "wikidata_facts_from_task",
           "wikidata_facts", "load_facts", "sample_facts"]

FACT_SOURCES = ("countryinfo", "wikidata")


def stable_seed(text: str) -> int:
    """A seed part from a name (e.g. a relation) that is the same in every run (Python's hash is not)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


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
        rng = np.random.default_rng([seed, stable_seed(relation)])
        keep.extend(sorted(rng.choice(group.index.to_numpy(), min(per_relation, len(group)), replace=False)))
    return facts.loc[sorted(keep)].reset_index(drop=True)
