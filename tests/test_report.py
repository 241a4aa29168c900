"""The report is built from the summaries a run wrote, never from hard-coded numbers."""

import json

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
