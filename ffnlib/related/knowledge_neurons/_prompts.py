"""Templates and prompts: each fact in each of its relation's templates, as token ids the model reads, with the
answer's token ids (leading space) that the attribution and every experiment score."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ...errors import ParameterError
from ...reference import DATA_DIR
from ...storage import read_json

__all__ = ["TEMPLATES_PATH", "check_template", "load_templates", "encode_answer", "build_prompts"]

TEMPLATES_PATH = DATA_DIR / "knowledge_neurons" / "templates.json"
SUBJECT, ANSWER = "[X]", "[Y]"


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
