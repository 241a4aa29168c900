"""The suite runner (ffnlib.suite): parameters, errors, skipped notebooks, streaming, and the whole suite on a model
folder of the paper's FFN form. Each test has its own results folder; the ci-scale notebooks that share one results
folder are in tests/test_notebooks.py."""

import nbformat
import pytest

import ffnlib
from ffnlib.suite import NOTEBOOK_DIR, execute

NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))


def test_a_notebook_with_nothing_to_analyse_is_skipped_not_failed(tmp_path):
    """``Run.nothing_to_analyse`` raises NothingToAnalyse in the kernel; ``execute`` turns it into
    NotebookSkipped (which the suite logs and passes over), any other error into NotebookError."""
    from ffnlib.errors import NotebookSkipped

    for raised, expected in (("ffnlib.NothingToAnalyse('no fact is known')", NotebookSkipped),
                             ("ValueError('broken')", ffnlib.NotebookError)):
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(f"import ffnlib\nraise {raised}")]
        path = tmp_path / "stops.ipynb"
        nbformat.write(nb, path)
        with pytest.raises(expected) as info:
            execute(path, tmp_path / "out.ipynb", {"x": 2})
        assert (type(info.value) is NotebookSkipped) == (expected is NotebookSkipped)
    assert "no fact is known" in str(NotebookSkipped("stops.ipynb: no fact is known"))


def test_unknown_parameter_is_refused(tmp_path):
    with pytest.raises(ffnlib.ParameterError, match="no parameter"):
        execute(NOTEBOOK_DIR / "00_quickstart.ipynb", tmp_path / "o.ipynb", {"scael": "ci"})


def test_wrongly_typed_parameter_is_a_clear_error(tmp_path):
    with pytest.raises(ffnlib.NotebookError, match=r"00_quickstart.ipynb stopped in cell \d+ with ParameterError: "
                                                   r"Parameter seed='zero' has type str; it must be int") as info:
        execute(NOTEBOOK_DIR / "00_quickstart.ipynb", tmp_path / "o.ipynb", {"scale": "ci", "seed": "zero"})
    assert str(tmp_path / "o.ipynb") in str(info.value)  # where to look
    assert (tmp_path / "o.ipynb").exists() and not list(tmp_path.glob(".*.running.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter(name):
    """papermill only warns about a line of the parameters cell it cannot parse, and then refuses that
    parameter: every name the cell assigns must be one papermill reports."""
    import ast

    import papermill

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert {"model", "scale", "seed", "results_dir", "device"} <= assigned
    assert set(papermill.inspect_notebook(str(NOTEBOOK_DIR / name))) == assigned


def test_the_suite_streams_what_the_notebooks_print_and_text_progress_bars(tmp_path, caplog, monkeypatch):
    """``make run`` shows the notebooks' messages and progress bars as text on the console (not as widgets
    that no one sees): ffnlib.progress gives plain tqdm bars under FFNLIB_PROGRESS=text."""
    import io
    import logging

    from tqdm.std import tqdm as text_bar

    from ffnlib import progress

    monkeypatch.setenv("FFNLIB_PROGRESS", "text")
    bar = progress.tqdm(range(3), file=io.StringIO())
    assert type(bar) is text_bar and bar.mininterval == 30
    monkeypatch.delenv("FFNLIB_PROGRESS")
    assert type(progress.tqdm(range(3), disable=True)) is not text_bar  # Jupyter: tqdm.auto's choice
    with caplog.at_level(logging.INFO, logger="papermill"):
        execute(NOTEBOOK_DIR / "00_quickstart.ipynb", tmp_path / "o.ipynb",
                {"scale": "ci", "results_dir": str(tmp_path)}, stream=True)
    assert "largest relative error of sum_i m_i v_i" in caplog.text


def test_the_whole_suite_runs_on_a_tiny_opt_model_from_a_folder_in_bf16(smollm, tmp_path):
    """OPT is the family with the paper's own FFN form (plain, ReLU, with biases); its FFN runs on
    (batch * tokens, d). The whole suite, as ``make run MODEL=<folder> SCALE=ci PRECISION=bfloat16`` runs it, on a
    tiny random OPT saved with save_pretrained: every notebook in bf16 (the ci-results group runs them all in
    float32 on SmolLM2), with the control drawn twice (``--control-draws 2``; the ci scale draws it once). Its
    weights are random, so judged against its random-weights control (other random initialisations) no finding
    may hold."""
    import torch
    from tiny_models import CASE_IDS, CASES, build_config

    from ffnlib.report import load_summaries
    from ffnlib.suite import SUITE, run_suite

    case = CASES[CASE_IDS.index("opt")]
    torch.manual_seed(11)  # not the control's seed (0): the control must be another random initialisation
    folder = tmp_path / "tiny-opt"
    case.model_cls(build_config(case, vocab=len(smollm.tokenizer), positions=512)).save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    lines = []
    run_dir = run_suite(model=str(folder), scale="ci", results=str(tmp_path / "results"), log=lines.append,
                        precision="bfloat16", control_draws=2)
    assert run_dir.name == "ci-bfloat16" and any("computing in bfloat16" in line for line in lines)
    summaries = load_summaries(run_dir)
    assert set(summaries) == set(SUITE)
    model = summaries["03_aggregation"]["model"]  # loaded.describe()
    assert (model["family"], model["gated"], model["layers"], model["d_ff"]) == ("opt", False, 2, case.d_ff)
    assert {s["model"]["precision"] for s in summaries.values() if isinstance(s.get("model"), dict)} == {"bfloat16"}
    report = (run_dir / "report.md").read_text()
    assert "plain FFN" in report and "OPTForCausalLM" in report and "computing in bfloat16" in report
    # the control drawn twice (two random initialisations) in every notebook that has one
    assert "drawn 2 times, each finding's control number being the mean over the draws" in report
    assert all(len(s["control"]["draws"]) == 2 for s in summaries.values() if s.get("control"))
    if summaries["06_knowledge_neurons"].get("skipped"):  # a random model knows no facts: 06 stops, the suite goes on
        assert "`06_knowledge_neurons` stopped with nothing to analyse" in report
        assert {f["verdict"] for f in summaries["06_knowledge_neurons"]["findings"]} == {"not measured"}
    # the suite's sanity check: a random model judged against its random-weights control holds nothing. The
    # findings judged against their own baselines only (06, 07: method comparisons within one model) may hold
    # on a random model too (k-means experts beat random ones there as well), so they are not part of it.
    from ffnlib.findings import finding

    verdicts = [f["verdict"] for s in summaries.values() for f in s["findings"] if finding(f["key"]).controlled]
    assert len(verdicts) >= 20 and "holds" not in verdicts, verdicts
    assert all(f["control"] not in ("", "no control") for s in summaries.values() for f in s["findings"]
               if f["verdict"] != "not measured")
    # the memory card reads this run and its control: every field is filled or names the notebook that computes it
    from ffnlib.card import memory_card
    from ffnlib.models import load_model

    layer = int(summaries["07_moefication"]["layers"][-1])
    card = memory_card(load_model(str(folder), precision="bfloat16"), layer, 3, results=str(tmp_path / "results"),
                       scale="ci")
    for name in card.tables():
        if getattr(card, name) is None:
            assert card.missing[name].removeprefix("run notebook ").split(":")[0] in SUITE, card.missing[name]
        else:
            assert name not in card.missing, name
    for name in ("triggers", "value_tokens", "aggregation", "experts", "router", "corpus_size", "percentiles"):
        assert getattr(card, name) is not None, card.missing.get(name)



@pytest.mark.skipif(not __import__("os").environ.get("FFNLIB_FAMILY_SUITES"),
                    reason="about 2.5 min a family on 2 cores: set FFNLIB_FAMILY_SUITES=1 to run")
@pytest.mark.parametrize("case_id", ["bloom", "gpt-j", "gpt-neox-parallel"])
def test_the_whole_suite_runs_on_a_tiny_model_of_each_awkward_family_from_its_folder(smollm, tmp_path, case_id):
    """``make run MODEL=<folder> SCALE=ci`` on tiny random BLOOM (its activation is ``gelu_impl``), GPT-J and
    GPT-NeoX (attention and FFN in parallel: notebook 09 has no "after attention, before the FFN" stage there)
    models saved with save_pretrained: every notebook runs and writes its summary, and the report is written.
    Outside CI for its time (the tiny OPT above runs in CI); the verdicts are not asserted here: at ci, 4 sentences
    in notebook 09, one random initialisation can beat another (docs/verdicts.md)."""
    import torch
    from tiny_models import CASE_IDS, CASES, build_config

    from ffnlib.report import load_summaries
    from ffnlib.suite import SUITE, run_suite

    case = CASES[CASE_IDS.index(case_id)]
    torch.manual_seed(11)  # not the control's seed (0)
    folder = tmp_path / f"tiny-{case_id}"
    case.model_cls(build_config(case, vocab=len(smollm.tokenizer), positions=512)).save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    run_dir = run_suite(model=str(folder), scale="ci", results=str(tmp_path / "results"), log=lambda line: None)
    summaries = load_summaries(run_dir)
    assert set(summaries) == set(SUITE)
    assert summaries["03_aggregation"]["model"]["family"] == case.family
    from ffnlib.findings import of_notebook

    for name, summary in summaries.items():  # every registered finding has its row, measured or not
        assert sorted(f["key"] for f in summary["findings"]) == sorted(f.key for f in of_notebook(name)), name
    assert "## " in (run_dir / "report.md").read_text()

def test_the_control_parameter_reaches_the_notebooks_that_take_it(tmp_path):
    import papermill

    from ffnlib.suite import SUITE, run_suite, suite_notebooks

    takes = {nb.stem for nb in suite_notebooks(SUITE) if "control" in papermill.inspect_notebook(str(nb))}
    assert {"01_keys", "02_values", "03_aggregation", "09_ff_attention_maps"} <= takes
    for nb in ("01_keys", "02_values", "03_aggregation", "09_ff_attention_maps"):
        assert papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{nb}.ipynb"))["control"]["default"] == '"random-init"'
    with pytest.raises(ffnlib.ParameterError, match="control must be one of"):
        run_suite(scale="ci", results=str(tmp_path), control="shuffled", log=lambda *a: None)


def _cli(*args):
    """``python -m ffnlib.suite`` in a subprocess; no notebook kernel may start."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ffnlib.suite", "--quiet", *args], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_the_command_line_refuses_an_unknown_notebook_and_lists_the_suite(tmp_path):
    from ffnlib.suite import SUITE

    done = _cli("--notebooks", "99_nope", "01_keys", "--results", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "'99_nope' is not a notebook of the suite" in done.stderr
    assert all(name in done.stderr for name in SUITE)
    assert not (tmp_path / "r").exists()  # checked before anything was written
    with pytest.raises(ffnlib.ParameterError, match="05_explorer is interactive"):
        __import__("ffnlib.suite").suite.suite_notebooks(["05_explorer"])


@pytest.mark.parametrize("model, message", [
    ("/nonexistent/x", r"Cannot load the model '/nonexistent/x'"),
    ("/nonexistent/x.gguf", r"The GGUF file /nonexistent/x.gguf does not exist"),
    ("no-such-org/no-such-model-ffnlib", r"not in the local Hugging Face cache and the hub cannot be reached"),
])
def test_the_command_line_checks_the_model_before_the_first_kernel(tmp_path, model, message):
    import re

    done = _cli("--model", model, "--scale", "ci", "--results", str(tmp_path / "r"))
    assert done.returncode == 2, done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert "running 00_quickstart" not in done.stdout + done.stderr
    assert not list((tmp_path / "r").rglob("*.ipynb"))  # no kernel started, no notebook written


def test_the_command_line_checks_the_results_folder(tmp_path):
    (tmp_path / "afile").write_text("")
    done = _cli("--scale", "ci", "--results", str(tmp_path / "afile"))
    assert done.returncode == 2 and "is a file: give a folder" in done.stderr, done.stderr


def test_check_model_reads_a_folder_without_its_weights(smollm, tmp_path):
    """A folder with config and tokenizer passes; without a tokenizer it is refused, as load_model would."""
    from tiny_models import CASE_IDS, CASES, build_config

    from ffnlib.errors import ModelNotFoundError
    from ffnlib.models import check_model

    assert check_model("smollm2-135m") == "embedded" and check_model("wiki-relu-lm") == "trained"
    case = CASES[CASE_IDS.index("gpt2")]
    folder = tmp_path / "tiny"
    build_config(case, vocab=len(smollm.tokenizer), positions=64).save_pretrained(folder)  # config only
    with pytest.raises(ModelNotFoundError, match="has a model .config.json. but no tokenizer"):
        check_model(str(folder))
    smollm.tokenizer.save_pretrained(folder)
    assert check_model(str(folder)) == "folder"


def test_bootstrap_resamples_come_from_the_scale_unless_a_notebook_asks(tmp_path):
    """``Run.resamples``: the scale's ``n_boot`` (1,000 at default, 200 at ci, for the tests' time) where the
    notebook's parameter is None, the parameter otherwise; MoEfication's sizes read the same field."""
    from ffnlib.config import SCALES
    from ffnlib.notebook import Run
    from ffnlib.related.moefication import get_sizes

    runs = {name: Run(loaded=None, scale=SCALES[name], seed=0, out=tmp_path, device="cpu") for name in SCALES}
    assert {name: run.resamples() for name, run in runs.items()} == {"ci": 200, "default": 1000, "full": 1000}
    assert runs["ci"].resamples(50) == 50
    assert {name: get_sizes(name).n_boot for name in SCALES} == {"ci": 200, "default": 1000, "full": 1000}
    with pytest.raises(ffnlib.ParameterError, match="n_boot must be a positive int, got 0"):
        runs["default"].resamples(0)
