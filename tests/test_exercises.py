"""The exercise notebooks (exercises/): the student copies are nbgrader's output for the sources; every source,
with its solutions, passes every check on the real model; every student copy, untouched, fails every check with
the message that says it is not written yet. And each check names the common mistakes it is meant to catch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from ffnlib import exercises as ex

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "exercises"
SETS = sorted(p.name for p in (EXERCISES / "source").iterdir() if p.is_dir())


def _notebook(kind: str, name: str) -> Path:
    return EXERCISES / kind / name / f"{name}_exercises.ipynb"


def _role(cell) -> str:
    info = cell.metadata.get("nbgrader", {})
    if info.get("grade"):
        return "check"
    return "solution" if info.get("solution") else "other"


def _execute(path: Path, results: Path):
    """Run a notebook at scale="ci" (its parameters overridden in a cell after them, as papermill does), going
    on after an error (a student's copy fails)."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f'scale = "ci"\nresults_dir = {str(results)!r}'))
    NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def _errors(cell) -> list[dict]:
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_every_paper_section_and_related_notebook_with_exercises_has_a_set():
    assert SETS == ["01_keys", "02_values", "03_aggregation", "05_explorer", "06_knowledge_neurons", "07_moefication",
                    "08_relu_vs_softmax", "09_ff_attention_maps"]
    related = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb") if "05" < p.stem[:2] < "10"}
    assert related <= set(SETS), "every related-work notebook has its exercise set"
    for name in SETS:
        nb = nbformat.read(_notebook("source", name), as_version=4)
        roles = [_role(c) for c in nb.cells]
        assert roles.count("solution") == roles.count("check") >= 2
        # a check right after each exercise (a setup cell may sit between two exercises, never between an
        # exercise and its check)
        for i, role in enumerate(roles):
            if role == "solution":
                assert roles[i + 1] == "check", (name, i)
        intro = nb.cells[0].source
        assert "Before you start" in intro and "Time:" in intro  # what to know first, and how long


@pytest.mark.parametrize("name", SETS)
def test_student_copy_is_nbgraders_output_for_the_source(name, tmp_path):
    """The committed student copy is exactly what `make exercises` (nbgrader) generates from the source."""
    course = tmp_path / "course"
    shutil.copytree(EXERCISES / "source" / name, course / "source" / name)
    shutil.copy(EXERCISES / "nbgrader_config.py", course)
    done = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", name, "--no-db", "--force"],
                          cwd=course, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    generated = json.loads((course / "release" / name / f"{name}_exercises.ipynb").read_text())
    committed = json.loads(_notebook("release", name).read_text())
    assert generated == committed, f"exercises/release/{name} is stale: run `make exercises`"
    student = nbformat.read(_notebook("release", name), as_version=4)
    source = nbformat.read(_notebook("source", name), as_version=4)
    for mine, theirs in zip(source.cells, student.cells):
        if _role(mine) == "solution":  # the solution is gone, the stub is there, the signature stays
            assert "raise NotImplementedError()" in theirs.source and "BEGIN SOLUTION" not in theirs.source
            assert theirs.source.splitlines()[0] == mine.source.splitlines()[0]
        else:
            assert theirs.source == mine.source
        if _role(mine) == "check":
            assert theirs.metadata["nbgrader"]["locked"] and theirs.metadata.get("editable") is False


def _results(tmp_path_factory, name: str) -> Path:
    """One results folder per set, shared by its source and student runs: what the first run computed (the card
    exercise mines its layer) the second finds, as a student's second run would."""
    folder = tmp_path_factory.getbasetemp() / "exercise-results" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# the card set's two runs on one worker, so that the second finds the layer the first mined
_PAIRED = [pytest.param(n, marks=pytest.mark.xdist_group("exercises-05")) if n == "05_explorer" else n for n in SETS]


@pytest.mark.parametrize("name", _PAIRED)
def test_the_solutions_pass_every_check(name, tmp_path_factory):
    nb = _execute(_notebook("source", name), _results(tmp_path_factory, name))
    assert not [(i, _errors(c)) for i, c in enumerate(nb.cells) if _errors(c)]
    checks = [c for c in nb.cells if _role(c) == "check"]
    assert checks and all("✔" in _text(c) and "passed" in _text(c) for c in checks)


@pytest.mark.parametrize("name", _PAIRED)
def test_the_student_copy_fails_every_check_saying_what_to_do(name, tmp_path_factory):
    nb = _execute(_notebook("release", name), _results(tmp_path_factory, name))
    for i, cell in enumerate(nb.cells):
        errors = _errors(cell)
        if _role(cell) == "check":
            assert [e["ename"] for e in errors] == ["NotDoneYet"], (i, errors)
            assert "is not written yet: replace `raise NotImplementedError()`" in errors[0]["evalue"]
            assert "hint(" in errors[0]["evalue"]
        elif cell.cell_type == "code" and errors:
            # only a cell that uses the student's functions may fail, and only because they are stubs
            assert [e["ename"] for e in errors] == ["NotImplementedError"], (i, errors)


# ---- each check names the mistake it is for --------------------------------------------------------------
LAYER = 20


def _fails(check, *args, match: str):
    with pytest.raises(ex.CheckFailed, match=match):
        check(*args)


def test_coefficients_check_names_a_transposed_result_and_the_gated_mistakes(smollm):
    def transposed(x, keys, gates, activation):
        return (activation(x @ gates.T) * (x @ keys.T)).T

    def wrong_half(x, keys, gates, activation):
        return activation(x @ keys.T) * (x @ gates.T)

    def plain_on_gated(x, keys, gates, activation):
        return activation(x @ keys.T)

    def no_activation(x, keys, gates, activation):
        return (x @ gates.T) * (x @ keys.T) if gates is not None else x @ keys.T

    _fails(ex.check_memory_coefficients, transposed, smollm, LAYER, match="looks transposed")
    _fails(ex.check_memory_coefficients, wrong_half, smollm, LAYER, match="activation is on the wrong half")
    _fails(ex.check_memory_coefficients, plain_on_gated, smollm, LAYER, match="plain FFN's formula, but this model is gated")
    _fails(ex.check_memory_coefficients, no_activation, smollm, LAYER, match="activation f is missing")
    _fails(ex.check_memory_coefficients, lambda x, k, g, a: [1, 2], smollm, LAYER, match="returned list; it should")


def test_trigger_prefix_check_catches_both_off_by_ones(smollm, wiki):
    sentences = wiki.head(6)

    def short(token_ids, coefficients, memory):
        return token_ids[: int(coefficients[:, memory].argmax())]

    def long(token_ids, coefficients, memory):
        return token_ids[: int(coefficients[:, memory].argmax()) + 2]

    _fails(ex.check_trigger_prefix, short, smollm, LAYER, sentences, (0,), match="stops just before the token")
    _fails(ex.check_trigger_prefix, long, smollm, LAYER, sentences, (0,), match="also holds the next token")


def test_value_check_catches_the_forgotten_gain_and_logits(smollm):
    def no_gain(value, norm_gain, head_weight):
        return torch.softmax(value @ head_weight.T, dim=-1)

    def logits(value, norm_gain, head_weight):
        return (value * norm_gain) @ head_weight.T

    _fails(ex.check_value_distribution, no_gain, smollm, LAYER, match="projected the raw value")
    _fails(ex.check_value_distribution, logits, smollm, LAYER, match="look like logits")
    _fails(ex.check_value_distribution, lambda v, g, e: torch.softmax((v / g) @ e.T, dim=-1), smollm, LAYER,
           match="divided by the gain")


def test_agreement_check_catches_the_off_by_one_and_the_sentence_end(smollm, wiki):
    def last_token(top, ids, position):
        return ids[position] == top

    def crashes_at_the_end(top, ids, position):
        return ids[position + 1] == top

    def end_agrees(top, ids, position):
        return position + 1 >= len(ids) or ids[position + 1] == top

    def last_token_end_handled(top, ids, position):
        return position + 1 < len(ids) and ids[position] == top

    _fails(ex.check_agrees, last_token, smollm, wiki, match="off-by-one trap")
    _fails(ex.check_agrees, last_token_end_handled, smollm, wiki, match="off-by-one trap")
    _fails(ex.check_agrees, crashes_at_the_end, smollm, wiki, match="IndexError where the trigger prefix is the whole")
    _fails(ex.check_agrees, end_agrees, smollm, wiki, match="nothing follows it, so it cannot agree")


def test_aggregation_checks_catch_the_missing_norm_and_the_agreement_case(smollm):
    def no_norm(before, ffn, norm, head):
        return tuple(head(h).argmax(-1) for h in (before, ffn, before + ffn))

    def output_is_residual(before, ffn, norm, head):
        return tuple(head(norm(h)).argmax(-1) for h in (before, ffn, before))

    _fails(ex.check_top_tokens, no_norm, smollm, LAYER, match="skips the final norm")
    _fails(ex.check_top_tokens, output_is_residual, smollm, LAYER, match="output_top is the residual's top token")
    _fails(ex.check_fig11_case, lambda r, f, o: "residual" if o == r else "ffn" if o == f else "composition",
           match="When all three agree it is 'agreement'")
    _fails(ex.check_fig11_case, lambda r, f, o: "kept", match="one of 'agreement'")
    _fails(ex.check_fig11_case, lambda r, f, o: "agreement" if o == r == f else "residual" if r == f or o == r
           else "ffn" if o == f else "composition", match="neither was kept: 'composition'")


def test_integrated_gradient_checks_name_the_three_usual_mistakes(smollm):
    def ig(target, m, steps, alphas=None, times_m=True, only_last=False):
        alphas = torch.arange(steps, dtype=m.dtype) / steps if alphas is None else alphas
        points = (alphas[:, None] * m).requires_grad_(True)
        grads = torch.autograd.grad(target(points).sum(), points)[0]
        grad = grads[-1] if only_last else grads.mean(0)
        return m * grad if times_m else grad

    right = torch.arange(1, 21, dtype=torch.float32) / 20
    args = (smollm, "The capital of France is", " Paris", 18)
    scores = ex.check_integrated_gradients(ig, *args)
    _fails(ex.check_integrated_gradients, lambda t, m, s: ig(t, m, s, times_m=False), *args,
           match="returned the average gradient")
    _fails(ex.check_integrated_gradients, lambda t, m, s: ig(t, m, s, alphas=right), *args,
           match="right Riemann sum")
    _fails(ex.check_integrated_gradients, lambda t, m, s: ig(t, m, s, alphas=right, only_last=True), *args,
           match="gradient at the real coefficients only")
    _fails(ex.check_integrated_gradients, lambda t, m, s: ig(t, m, s, alphas=torch.linspace(0, 1, s)), *args,
           match="include both 0 and 1")
    _fails(ex.check_coarse_neurons, lambda s, t: {i for i, v in enumerate(s.tolist()) if v >= t}, scores,
           match="absolute score")


def test_moefication_checks_name_the_missing_absolute_value_and_the_dense_ffn(smollm):
    def signed(m, norms, labels, n):
        return (m * norms) @ torch.nn.functional.one_hot(labels, n).float()

    def no_norms(m, norms, labels, n):
        return m.abs() @ torch.nn.functional.one_hot(labels, n).float()

    _fails(ex.check_expert_scores, signed, smollm, LAYER, match="take the absolute value first")
    _fails(ex.check_expert_scores, no_norms, smollm, LAYER, match="value norms are missing")
    _fails(ex.check_expert_scores, lambda m, norms, labels, n: m.abs() * norms, smollm, LAYER,
           match="these are the memories' sizes; sum them")

    def first_expert_only(m, values, labels, chosen):
        picked = torch.zeros(len(chosen), int(labels.max()) + 1, dtype=torch.bool).scatter_(1, chosen[:, :1], True)
        return (m * picked[:, labels]) @ values

    _fails(ex.check_expert_ffn, first_expert_only, smollm, LAYER, match="only the first chosen expert")
    _fails(ex.check_expert_ffn, lambda m, values, labels, chosen: m @ values, smollm, LAYER,
           match="this is the dense FFN")


def test_attention_map_checks_name_the_per_summand_statistic_and_the_per_summand_activation(smollm):
    def own_statistic(summands, gain, eps):
        return torch.stack([gain * y / (y.pow(2).mean() + eps).sqrt() for y in summands])

    _fails(ex.check_norm_split, own_statistic, smollm, LAYER, match="normalised with its own RMS")
    _fails(ex.check_norm_split, lambda y, g, eps: y / (y.sum(0).pow(2).mean() + eps).sqrt(), smollm, LAYER,
           match="gain g is missing")
    _fails(ex.check_activation_shares, lambda summands, act: act(summands), smollm, LAYER,
           match="activation to each summand alone")
    _fails(ex.check_activation_shares, lambda summands, act: act(summands.sum(0)).expand(len(summands), -1) / len(summands),
           smollm, LAYER, match="split g\\(p\\) equally")


def test_softmax_memory_checks_name_the_wrong_axis_the_missing_norm_and_the_signed_mass(smollm):
    def over_tokens(x, keys, values, norm):
        out = torch.softmax(x @ keys.T, dim=0) @ values
        return out if norm is None else norm(out)

    _fails(ex.check_softmax_memory, over_tokens, match="runs over the tokens")
    _fails(ex.check_softmax_memory, lambda x, k, v, norm: torch.softmax(x @ k.T, dim=-1) @ v,
           match="the LayerNorm is missing")
    _fails(ex.check_top_mass, lambda m, share: m.topk(3, dim=-1).values.sum(-1) / m.sum(-1), smollm, LAYER,
           match="can be negative")
    _fails(ex.check_top_mass, lambda m, share: m.abs().max(-1).values / m.abs().sum(-1), smollm, LAYER,
           match="kept only the largest slot")


# ---- 05: one memory's card ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def card_run(smollm, tmp_path_factory):
    """A ci-scale run of the default model whose results folder holds nothing yet (as in a fresh checkout)."""
    from ffnlib.config import get_scale
    from ffnlib.notebook import Run

    out = tmp_path_factory.mktemp("card") / "smollm2-135m" / "ci"
    out.mkdir(parents=True)
    return Run(loaded=smollm, scale=get_scale("ci"), seed=0, out=out, device="cpu")


@pytest.fixture(scope="module")
def card_results(card_run):
    return ex.card_results(card_run, LAYER)  # mines the layer and projects its values: nothing is cached yet


def trigger_pattern(triggers, sign):
    """The notebook's solution."""
    rows = triggers[triggers["sign"] == sign]
    tokens = rows["last_token"].value_counts()
    labelled = rows["topic"][rows["topic"].notna() & (rows["topic"] != "Uncategorized")].value_counts()
    topic, share = (labelled.index[0], labelled.iloc[0] / labelled.sum()) if labelled.sum() >= 5 else (None, None)
    return {"last_token": tokens.index[0], "last_token_share": tokens.iloc[0] / len(rows), "topic": topic,
            "topic_share": share}


def value_reading(triggers, value_tokens, sign):
    """The notebook's solution."""
    top = value_tokens[value_tokens["sign"] == sign].sort_values("rank")["token"].iloc[0]
    first = triggers[triggers["sign"] == sign].sort_values("rank").iloc[0]
    return {"promotes": top, "agrees": first["next_token"] == top}


def test_card_exercise_without_results_mines_the_layer_and_picks_memories_that_tell_mistakes_apart(
        smollm, card_run, card_results):
    assert card_results.folder == card_run.out / "exercises" / f"layer-{LAYER}"
    memories = ex.card_memories(card_results, LAYER)
    assert len(memories) == len(set(memories)) == 8
    cards = ex.exercise_cards(smollm, LAYER, card_results, memories)
    for card in cards:  # the two tables the student reads, both signs, CARD_TRIGGERS rows each
        assert set(card.triggers["sign"]) == {1, -1}
        assert (card.triggers.groupby("sign").size() == ex.CARD_TRIGGERS).all()
        assert set(card.value_tokens["sign"]) == {1, -1} and card.value_agreement is not None
    # the first (the one the notebook shows) is the most confident of the values that agree with their top trigger
    agreement = cards[0].value_agreement
    assert agreement["agrees"].any()
    first = agreement[agreement["agrees"]]["max_prob"].max()
    others = [c.value_agreement for c in cards[1:]]
    assert all(a[a["agrees"]]["max_prob"].max() <= first for a in others if a["agrees"].any())


def test_card_exercise_reads_the_runs_results_when_they_hold_the_layer(smollm, card_results, tmp_path):
    """A run whose folder holds the layer's trigger examples and value projection (as after notebooks 01 and 02)
    is read as it is: nothing is mined, and the cards are the same."""
    from ffnlib.config import get_scale
    from ffnlib.notebook import Run

    out = tmp_path / "smollm2-135m" / "ci"
    shutil.copytree(card_results.folder, out)
    run = Run(loaded=smollm, scale=get_scale("ci"), seed=0, out=out, device="cpu")
    results = ex.card_results(run, LAYER)
    assert results.folder == out and not (out / "exercises").exists()
    memories = ex.card_memories(card_results, LAYER)
    assert ex.card_memories(results, LAYER) == memories
    mine, theirs = (ex.exercise_cards(smollm, LAYER, r, memories[:2]) for r in (results, card_results))
    for a, b in zip(mine, theirs):
        assert a.triggers.equals(b.triggers) and a.value_agreement.equals(b.value_agreement)


def test_card_checks_pass_the_solutions_and_a_stub_is_not_done(smollm, card_results, capsys):
    ex.check_trigger_pattern(trigger_pattern, smollm, LAYER, card_results)
    ex.check_value_reading(value_reading, smollm, LAYER, card_results)
    printed = capsys.readouterr().out
    assert "✔ `trigger_pattern` passed" in printed and "✔ `value_reading` passed" in printed
    assert "of 16 values agree" in printed  # every sign of the 8 cards was checked, none left out as ambiguous

    def trigger_pattern_stub(triggers, sign):
        raise NotImplementedError()

    with pytest.raises(ex.NotDoneYet, match="is not written yet"):
        ex.check_trigger_pattern(trigger_pattern_stub, smollm, LAYER, card_results)


def test_card_checks_name_the_off_by_ones_the_sign_and_the_topic_rules(smollm, card_results):
    cards = ex.exercise_cards(smollm, LAYER, card_results)

    def next_token(triggers, sign):
        return trigger_pattern(triggers.assign(last_token=triggers["next_token"]), sign)

    def both_signs(triggers, sign):
        return trigger_pattern(triggers.assign(sign=sign), sign)

    def every_topic(triggers, sign):
        rows, topics = triggers[triggers["sign"] == sign], triggers[triggers["sign"] == sign]["topic"].value_counts()
        return {**trigger_pattern(triggers, sign), "topic": topics.index[0], "topic_share": topics.iloc[0] / len(rows)}

    def count(triggers, sign):
        answer = trigger_pattern(triggers, sign)
        return {**answer, "last_token_share": answer["last_token_share"] * (triggers["sign"] == sign).sum()}

    args = (smollm, LAYER, card_results, cards)
    _fails(ex.check_trigger_pattern, next_token, *args, match="FOLLOWS each trigger")
    _fails(ex.check_trigger_pattern, both_signs, *args, match="counted the triggers of both signs")
    _fails(ex.check_trigger_pattern, every_topic, *args, match="only the triggers with a topic label")
    _fails(ex.check_trigger_pattern, count, *args, match="should be a share")

    def minus_v(triggers, value_tokens, sign):  # -v for a positive coefficient, +v for a negative one
        return value_reading(triggers, value_tokens.assign(sign=-value_tokens["sign"]), sign)

    def last_token(triggers, value_tokens, sign):
        return value_reading(triggers.assign(next_token=triggers["last_token"]), value_tokens, sign)

    def any_trigger(triggers, value_tokens, sign):
        answer = value_reading(triggers, value_tokens, sign)
        rows = triggers[triggers["sign"] == sign]
        return {**answer, "agrees": bool((rows["next_token"] == answer["promotes"]).any())}

    _fails(ex.check_value_reading, minus_v, *args, match="read the tokens of the other sign")
    _fails(ex.check_value_reading, last_token, *args, match="off-by-one trap")
    _fails(ex.check_value_reading, any_trigger, *args, match="about the key's TOP trigger")
    _fails(ex.check_value_reading, lambda t, v, s: {"promotes": 0, "agrees": False}, *args, match="the token's text")
    _fails(ex.check_value_reading, lambda t, v, s: value_reading(t, v, s)["promotes"], *args,
           match="should return a dict with the keys")


def test_every_exercise_has_hints_under_the_name_its_stub_message_gives():
    """A stub's NotDoneYet says `hint('<function name>')`: every function a source notebook asks for has hints."""
    import ast

    for name in SETS:
        for cell in nbformat.read(_notebook("source", name), as_version=4).cells:
            if _role(cell) == "solution":
                (function,) = [n.name for n in ast.parse(cell.source).body if isinstance(n, ast.FunctionDef)]
                assert function in ex.HINTS and len(ex.HINTS[function]) >= 2, (name, function)


def test_hints_come_one_at_a_time_and_a_stub_says_where_to_write(capsys):
    ex.hints.hints_given.clear()
    first, second = ex.hint("agrees"), ex.hint("agrees")
    assert first.startswith("Hint 1 of 3") and second.startswith("Hint 2 of 3") and first != second
    ex.hint("agrees")
    assert "last hint" in ex.hint("agrees")
    with pytest.raises(KeyError, match="the exercises are"):
        ex.hint("agree")

    def fig11_case(r, f, o):
        raise NotImplementedError()

    with pytest.raises(ex.NotDoneYet, match=r"`fig11_case` is not written yet.*hint\('fig11_case'\)"):
        ex.check_fig11_case(fig11_case)
    assert set(ex.HINTS) >= {"memory_coefficients", "trigger_prefix", "value_distribution", "agrees", "top_tokens",
                             "fig11_case", "integrated_gradients", "coarse_neurons", "expert_scores", "expert_ffn",
                             "norm_split", "activation_shares", "softmax_memory", "top_mass", "trigger_pattern",
                             "value_reading"}
