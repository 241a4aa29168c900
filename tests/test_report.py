"""The report is built from the summaries a run wrote, never from hard-coded numbers."""

import json
import re

import pytest

import ffnlib

from ffnlib.report import normalise_verdict, write_report


@pytest.mark.parametrize("text, verdict", [
    ("holds", "holds"), ("holds: at chance level", "holds"), ("does not hold (no significant rise)", "does not hold"),
    ("differs: above chance in lower layers", "does not hold"), ("not above the baseline", "does not hold"),
    ("the direction holds, but both medians stay near chance", "partly"), ("partly", "partly"),
    ("(no verdict: needs human annotation)", "not measured"),
    ("holds without training too (architectural)", "holds without training too (architectural)"),
])
def test_worded_verdicts_map_to_the_report_labels(text, verdict):
    assert normalise_verdict(text) == verdict


def test_report_shows_each_finding_once_with_measured_numbers(tmp_path):
    from ffnlib.findings import findings_rows
    from ffnlib.stats import Estimate

    run = tmp_path / "m" / "ci"
    (run / "summaries").mkdir(parents=True)
    ours = {"last_hurts_most": Estimate(-0.4, -0.45, -0.35, 100, "keys", "bootstrap")}
    control = {"last_hurts_most": Estimate(-0.1, -0.15, -0.05, 25, "keys", "bootstrap")}
    rows = findings_rows("01_keys", ours, control, {"last_hurts_most": "last -93.5%"}, "random-init-abc")
    (run / "summaries" / "01_keys.json").write_text(json.dumps({
        "findings": rows, "manifests": {"triggers": {"model": "m"}}, "model": {"model": "m", "layers": 2, "d_ff": 4}}))
    (run / "summaries" / "02_values.json").write_text(json.dumps({"comparison": [  # an older summary's table
        {"finding": "Agreement rises", "paper": "3.5%", "ours": "0.53%", "verdict": "the direction holds, but weak",
         "figure": "figures/g.png"},
        {"finding": "Confident values", "paper": "46", "ours": "64", "verdict": "holds", "figure": float("nan")},
        {"finding": "Shallow", "paper": "1-9", "ours": "0.36", "verdict": "(no verdict: needs annotation)",
         "section": "5 (Fig. 7)"}]}))
    md, page = write_report(run)
    text = md.read_text()
    assert ("| Sec. 3 (Fig. 3) | Removing the last token of a trigger prefix lowers the key's coefficient more than "
            "removing the first or a random token |") in text
    assert "| -40.00% [-45.00, -35.00]; last -93.5% | -10.00% [-15.00, -5.00] | **holds** |" in text
    assert "| Sec. 4 | Agreement rises | 3.5% | 0.53% (the direction holds, but weak) | — | **partly** |" in text
    assert "| Sec. 4 | Confident values | 46 | 64 | — | **holds** |" in text  # NaN: no figure
    assert "| Sec. 5 (Fig. 7) | Shallow | 1-9 | 0.36 (no verdict: needs annotation) | — | **not measured** |" in text
    assert "random-init control [95% CI]" in text and "Control: the same architecture with random weights" in text
    assert "## How the findings are judged" in text and "Rule: holds if our interval lies below the control's" in text
    assert "- Code: not recorded" in text  # summaries written before they recorded the code
    assert "![ours](figures/g.png)" in text and "nan" not in text.lower()
    # Section 3: one measured finding (holds) and 6 without numbers; the older table: holds, partly, not measured
    assert "Verdicts: 2 hold, 1 partly, 0 hold without training too (architectural), 0 do not hold, " \
           "7 not measured." in text
    assert '"triggers"' in text and "0.53%" in text
    assert "<img src='figures/01_removal.png'>" in page.read_text() and "architectural" in page.read_text()


def test_publish_copies_the_report_with_exactly_the_figures_it_shows(tmp_path):
    import re

    from ffnlib.report import main, publish_report

    run_dir = tmp_path / "results" / "m" / "default"
    (run_dir / "figures").mkdir(parents=True)
    for name in ("a.png", "b.png", "unused.png", "a.svg"):
        (run_dir / "figures" / name).write_bytes(name.encode())
    (run_dir / "report.md").write_text("# r\n![ours](figures/a.png)\n![ours](figures/b.png) ![ours](figures/a.png)\n")
    dest = tmp_path / "docs" / "m-default"
    (dest / "figures").mkdir(parents=True)
    (dest / "figures" / "stale.png").write_bytes(b"old")
    copied = publish_report(run_dir, dest)
    assert copied.read_text() == (run_dir / "report.md").read_text()
    assert sorted(p.name for p in (dest / "figures").iterdir()) == ["a.png", "b.png"]
    for link in re.findall(r"\]\(([^)]+)\)", copied.read_text()):
        assert (dest / link).read_bytes() == (run_dir / link).read_bytes()
    (run_dir / "figures" / "b.png").unlink()
    with pytest.raises(ffnlib.ResultsError, match=r"figures/b.png"):
        publish_report(run_dir, dest)
    assert main([str(tmp_path / "nowhere")]) == 2  # no summaries: a clear error, exit code 2


def test_a_report_made_in_parts_adds_the_other_parts_notebooks_with_their_figures(tmp_path, monkeypatch):
    """Two runs of the same model and scale, each of some notebooks (as on machines that cannot run the whole
    suite): the second adds the first's published part, its own summaries win, and the figures come along."""
    from ffnlib.report import add_summaries, main, publish_report

    def make_run(root, notebooks, model="m", scale="default"):
        run = root / model / scale
        (run / "summaries").mkdir(parents=True)
        (run / "figures").mkdir()
        for name, ours in notebooks.items():
            (run / "figures" / f"{name}.png").write_bytes(f"{root.name}-{name}".encode())
            (run / "summaries" / f"{name}.json").write_text(json.dumps({
                "model": {"model": model, "layers": 2, "d_ff": 4},
                "comparison": [{"finding": f"finding of {name}", "paper": "1", "ours": ours, "verdict": "holds",
                                "figure": f"figures/{name}.png"}]}))
        return run

    first = make_run(tmp_path / "a", {"06_kn": "6.0", "09_maps": "9.0"})
    write_report(first)
    published = tmp_path / "docs" / "m-default"
    publish_report(first, published)
    assert json.loads((published / "run.json").read_text()) == {"model": "m", "scale": "default"}
    assert sorted(p.name for p in (published / "summaries").iterdir()) == ["06_kn.json", "09_maps.json"]

    second = make_run(tmp_path / "b", {"01_keys": "1.0", "09_maps": "9.5"})
    assert add_summaries(second, published) == ["06_kn"]
    text = write_report(second)[0].read_text()
    for row in ("| finding of 01_keys | 1 | 1.0 |", "| finding of 06_kn | 1 | 6.0 |", "| finding of 09_maps | 1 | 9.5 |"):
        assert row in text
    assert "9.0" not in text  # the run's own 09 wins over the added one
    assert f"Made in parts: `06_kn` from `{published}`" in text
    assert (second / "figures" / "06_kn.png").read_bytes() == b"a-06_kn"  # the added part's figure
    assert (second / "figures" / "09_maps.png").read_bytes() == b"b-09_maps"  # the run's own
    assert "Made in parts: 06_kn from" in (second / "report.html").read_text()

    # the first part is run again with a new number and republished: adding again replaces the added notebook
    summary = json.loads((first / "summaries" / "06_kn.json").read_text())
    summary["comparison"][0]["ours"] = "6.5"
    summary["comparison"][0]["figure"] = "figures/01_keys.png"  # names a figure of the second run's own notebook
    (first / "summaries" / "06_kn.json").write_text(json.dumps(summary))
    (first / "figures" / "01_keys.png").write_bytes(b"a-01_keys")
    write_report(first)
    publish_report(first, published)
    assert add_summaries(second, published) == ["06_kn"]  # the run's own 01 and 09 are never replaced
    text = write_report(second)[0].read_text()
    assert "| finding of 06_kn | 1 | 6.5 |" in text and "| finding of 06_kn | 1 | 6.0 |" not in text
    assert (second / "figures" / "01_keys.png").read_bytes() == b"b-01_keys"  # not overwritten by the added part

    monkeypatch.chdir(second)  # a run folder given as "." has the same model and scale
    assert add_summaries(".", published) == ["06_kn"]
    monkeypatch.chdir(tmp_path)  # a source under the working folder is recorded relative to it
    add_summaries(second, published)
    assert json.loads((second / "summaries" / "06_kn.json").read_text())["added_from"] == "docs/m-default"

    other_scale = make_run(tmp_path / "c", {"01_keys": "1.0"}, scale="ci")
    with pytest.raises(ffnlib.ResultsError, match="holds m at scale default.*m at scale ci"):
        add_summaries(other_scale, published)
    with pytest.raises(ffnlib.ResultsError, match="no summaries"):
        add_summaries(second, tmp_path / "nowhere")
    third = make_run(tmp_path / "d", {"01_keys": "1.0"})
    assert main([str(third), "--add", str(published), "--publish", str(tmp_path / "out")]) == 0
    assert "finding of 06_kn" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "figures" / "09_maps.png").read_bytes() == b"a-09_maps"


def test_the_control_line_states_the_controls_smaller_samples(tmp_path):
    """At the default scale the control's removal experiment and Section 5 sample less than the trained
    model's; the report says so next to the control (and says nothing where the sizes are equal)."""
    from ffnlib.findings import findings_rows
    from ffnlib.stats import Estimate

    def write(run, control_keys, control_examples):
        (run / "summaries").mkdir(parents=True)
        ours = {"last_hurts_most": Estimate(-0.4, -0.45, -0.35, 100, "keys", "bootstrap")}
        theirs = {"last_hurts_most": Estimate(-0.1, -0.15, -0.05, 25, "keys", "bootstrap")}
        rows = findings_rows("01_keys", ours, theirs, {}, "random-init-abc")
        (run / "summaries" / "01_keys.json").write_text(json.dumps({
            "findings": rows, "removal_keys": 100, "control": {"name": "random-init-abc", "removal_keys": control_keys},
            "model": {"model": "m", "layers": 2, "d_ff": 4}}))
        (run / "summaries" / "03_aggregation.json").write_text(json.dumps({
            "findings": [], "manifests": {"aggregation": {"n_examples": 4000}},
            "control": {"name": "random-init-abc", "manifests": {"aggregation": {"n_examples": control_examples}}}}))
        md, _ = write_report(run)
        return next(line for line in md.read_text().splitlines() if line.startswith("- Control:"))

    smaller = write(tmp_path / "a" / "m" / "default", 10, 1000)
    assert smaller.endswith("on smaller samples: 10 keys per layer in the removal experiment (ours 100); "
                            "the first 1,000 held-out examples in Section 5 (ours 4,000)")
    assert "smaller samples" not in write(tmp_path / "b" / "m" / "full", 100, 4000)


def test_the_report_states_the_code_each_notebook_ran(tmp_path):
    """Each summary records the code that computed it (Run.save_summary); the header states it, grouped, and says
    where a notebook's summary did not record it."""
    from ffnlib.version import code_version, describe_versions

    here = code_version()
    assert here["ffnlib"] == ffnlib.__version__
    assert here["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", here["commit"])
    one = {"ffnlib": "0.1.0", "commit": "a" * 40, "modified": False}
    assert describe_versions({"00_quickstart": one, "01_keys": one}) == f"ffnlib 0.1.0, commit {'a' * 12}"
    mixed = describe_versions({"00_quickstart": one, "01_keys": {**one, "modified": True}, "06_knowledge_neurons": None})
    assert mixed == (f"ffnlib 0.1.0, commit {'a' * 12} (00); ffnlib 0.1.0, commit {'a' * 12} with local changes (01); "
                     "not recorded (06)")
    run = tmp_path / "m" / "ci"
    (run / "summaries").mkdir(parents=True)
    (run / "summaries" / "00_quickstart.json").write_text(json.dumps({"code": one, "findings": []}))
    md, page = write_report(run)
    assert f"- Code: ffnlib 0.1.0, commit {'a' * 12}\n" in md.read_text()
    assert f"Code: ffnlib 0.1.0, commit {'a' * 12}" in page.read_text()


def test_the_headline_table_counts_each_reports_verdicts_and_names_missing_notebooks(tmp_path, capsys):
    """The README's table (``python -m ffnlib.report --headline``) from reports' summaries: the paper's findings
    (notebooks 01-03) apart from all, a notebook a report lacks named; and a folder without summaries refused."""
    from ffnlib.findings import findings_rows, of_notebook
    from ffnlib.report import headline_table, main
    from ffnlib.stats import Estimate

    run = tmp_path / "tiny" / "default"
    (run / "summaries").mkdir(parents=True)
    ours = {"last_hurts_most": Estimate(-0.4, -0.45, -0.35, 100, "keys", "bootstrap")}
    control = {"last_hurts_most": Estimate(-0.1, -0.15, -0.05, 25, "keys", "bootstrap")}
    model = {"model": "tiny", "layers": 2, "d_ff": 4, "gated": True}
    (run / "summaries" / "01_keys.json").write_text(json.dumps({
        "findings": findings_rows("01_keys", ours, control, {}, "random-init-abc"), "model": model}))
    (run / "summaries" / "09_ff_attention_maps.json").write_text(json.dumps({
        "findings": findings_rows("09_ff_attention_maps", {}, None), "model": model}))
    n01, n09 = len(of_notebook("01_keys")), len(of_notebook("09_ff_attention_maps"))
    table = headline_table([run])
    rows = table.splitlines()
    assert rows[2] == f"| [tiny]({run.as_posix()}/report.md) (gated FFN, 2 layers) | the paper's {n01} | 1 | 0 | 0 | " \
                      f"0 | {n01 - 1} |"
    # 09 without numbers: not measured; notebook 10 registers no findings of its own (it re-judges 01's and 02's)
    assert rows[3] == f"|  | all {n01 + n09} (no notebook 02, 03, 06, 07, 08) | 1 | 0 | 0 | 0 | {n01 + n09 - 1} |"
    assert main(["--headline", str(run)]) == 0 and capsys.readouterr().out == table
    (tmp_path / "empty").mkdir()
    assert main(["--headline", str(tmp_path / "empty")]) == 2
    assert "has no summaries/*.json" in capsys.readouterr().err
