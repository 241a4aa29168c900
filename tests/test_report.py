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
])
def test_worded_verdicts_map_to_the_report_labels(text, verdict):
    assert normalise_verdict(text) == verdict


def test_report_shows_each_finding_once_with_measured_numbers(tmp_path):
    run = tmp_path / "m" / "ci"
    (run / "summaries").mkdir(parents=True)
    finding = {"section": "Sec. 3", "finding": "Removing the last token hurts most", "paper": "every layer",
               "ours": "last -93.5%", "verdict": "holds", "figure": "figures/f.png", "paper_figure": None}
    (run / "summaries" / "01_keys.json").write_text(json.dumps({
        "findings": [finding], "comparison": [{**finding, "verdict": "holds"}],
        "manifests": {"triggers": {"model": "m"}}, "model": {"model": "m", "layers": 2, "d_ff": 4}}))
    (run / "summaries" / "02_values.json").write_text(json.dumps({"comparison": [
        {"finding": "Agreement rises", "paper": "3.5%", "ours": "0.53%", "verdict": "the direction holds, but weak",
         "figure": "figures/g.png"},
        {"finding": "Confident values", "paper": "46", "ours": "64", "verdict": "holds", "figure": float("nan")},
        {"finding": "Above chance", "paper": "x9,371", "ours": "x2,432", "verdict": "holds (also against the baseline)"},
        {"finding": "Shallow", "paper": "1-9", "ours": "0.36", "verdict": "(no verdict: needs annotation)",
         "section": "5 (Fig. 7)"}]}))
    md, page = write_report(run)
    text = md.read_text()
    assert "| Sec. 4 | Agreement rises | 3.5% | 0.53% (the direction holds, but weak) | **partly** |" in text
    assert "| Sec. 4 | Confident values | 46 | 64 | **holds** |" in text  # no "(holds)" repeated; NaN: no figure
    assert "| Sec. 5 (Fig. 7) | Shallow | 1-9 | 0.36 (no verdict: needs annotation) | **not measured** |" in text
    assert "| x2,432 (holds (also against the baseline)) | **holds** |" in text
    assert "![ours](figures/g.png)" in text and "nan" not in text.lower()
    assert text.count("Removing the last token hurts most") == 2  # table row + figure section, not duplicated
    assert "Verdicts: 3 hold, 1 partly, 0 do not hold, 1 not measured." in text
    assert "last -93.5%" in text and "0.53%" in text and '"triggers"' in text
    assert "<img src='figures/f.png'>" in page.read_text()


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
