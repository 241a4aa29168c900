"""The report is built from the summaries a run wrote, never from hard-coded numbers."""

import json

import pytest

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
        {"finding": "Agreement rises", "paper": "3.5%", "ours": "0.53%", "verdict": "the direction holds, but weak"}]}))
    md, page = write_report(run)
    text = md.read_text()
    assert text.count("Removing the last token hurts most") == 2  # table row + figure section, not duplicated
    assert "Verdicts: 1 hold, 1 partly, 0 do not hold, 0 not measured." in text
    assert "last -93.5%" in text and "0.53%" in text and '"triggers"' in text
    assert "<img src='figures/f.png'>" in page.read_text()
