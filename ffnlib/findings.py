"""The findings registry: every finding the report judges, declared once, with its rule.

A :class:`Finding` says what the paper claims and how we judge it: the paper's number (from
``data/paper/``), the measure that computes ours (a function of the section's module, named by
``measure``, returning an :class:`ffnlib.stats.Estimate` with its 95% interval), the direction or range
the paper claims, the figure it is read from, and the size we ask for. The section modules compute
measures; this module judges them; the report prints the verdicts and, in a section of their own, the rules.

Every measure is computed twice: on the trained model ("ours") and on a **random-weights control**, the
same architecture re-initialised by its own initialiser from its config, seeded (``ffnlib.controls``),
run on the same corpus with the same parameters. A measure may come with a baseline of its own run (a base
rate, an empirical baseline): its key with ``"/baseline"`` appended.

Verdicts (:func:`judge`), for a claim that ours is greater (or less) than what the effect's absence gives:

- **holds**: ours beats the control significantly in the paper's direction (the 95% intervals do not
  overlap), beats its own baseline likewise where it has one, and, where the paper gives a number, the
  interval's conservative end reaches ``SIZE_SHARE`` (half) of the paper's size, measured from ``null``;
- **partly**: the direction holds significantly, the size does not;
- **holds without training too (architectural)**: ours shows the effect (against its baseline, or beyond
  ``null``, and at the size "holds" asks) but does not beat the control, which shows it as well (not significantly
  less than ours); ours short of that size, with the control showing it too, does not hold;
- **does not hold**: the remaining cases; **not measured**: no number (e.g. it needs human annotation).

For a claimed range (``direction="within"``: e.g. 10-50% of memories active) "shows the effect" means the
interval lies inside the range; "holds" then needs the control's interval not to lie inside it.
Later analyses (the related-work notebooks) add their findings to ``FINDINGS`` the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .stats import Estimate

__all__ = ["SIZE_SHARE", "VERDICTS", "ARCHITECTURAL", "DIRECTIONS", "Finding", "judge", "FINDINGS", "UNVERIFIED",
           "KN_SECTION", "MOE_SECTION", "SHEN_SECTION", "KOBAYASHI_SECTION", "finding", "of_notebook",
           "findings_rows"]

SIZE_SHARE = 0.5  # "holds" needs at least half the paper's size, where the paper gives a number
VERDICTS = ("holds", "partly", "holds without training too (architectural)", "does not hold", "not measured")
ARCHITECTURAL = VERDICTS[2]
DIRECTIONS = ("greater", "less", "within")


@dataclass(frozen=True)
class Finding:
    """One finding of the paper, and how we judge it (see the module docstring)."""

    key: str  # "<notebook>.<measure key>", e.g. "02_values.agreement_upper_peak"
    section: str  # "Sec. 4"
    figure: str  # the paper's figure or table ("Fig. 4"), or "" for the text
    claim: str  # the finding, in words
    paper: str  # the paper's number or statement, in words (with its source: data/paper/)
    direction: str  # "greater", "less" or "within"
    paper_value: float | None = None  # on the measure's scale, where the paper gives a number
    null: float | None = 0.0  # the measure's value without the effect (for the size, and "shows the effect")
    within: tuple[float, float] | None = None  # the claimed range (direction "within")
    baseline: bool = False  # the measure comes with a baseline of its own run ("<key>/baseline")
    percent: bool = True  # display the measure x 100 with "%" (False: as a plain number)
    digits: int = 2  # decimals shown (of the percentage, or of the plain number)
    unit_note: str = ""  # what the number is, e.g. "upper minus lower layers, percentage points"
    our_figure: str | None = None  # our figure's stem under figures/, shown beside the finding
    # The size asked, stated directly, where "half the paper's size from ``null``" makes no sense: for a claim
    # that little is lost (e.g. "over 95% of the performance kept"), at most twice the paper's loss.
    reach: float | None = None
    reach_note: str = ""  # why ``reach`` is what it is, in words (printed by the report)
    # Judged against the random-weights control (Sections 3-5, notebook 09). False where a random-weights model has
    # nothing to measure (it knows no facts, keeps nothing; notebooks 06 and 07): the finding's own baseline, or
    # ``null``, is its control.
    controlled: bool = True

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"{self.key}: direction must be one of {DIRECTIONS}")
        if (self.direction == "within") != (self.within is not None):
            raise ValueError(f"{self.key}: a range claim needs `within`, and only it")

    @property
    def notebook(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def measure(self) -> str:
        return self.key.split(".", 1)[1]

    def rule(self) -> str:
        """The verdict rule in words (printed by the report)."""
        if self.direction != "within" and self.null is None and not self.baseline:
            return "not judged: it needs human annotation, and there is no control for an annotator"
        if self.direction == "within":
            low, high = (self.fmt(v) for v in self.within)
            if not self.controlled:
                return f"holds if our interval lies within {low}..{high}"
            return (f"holds if our interval lies within {low}..{high} and the control's does not; "
                    f"architectural if both do")
        word = "above" if self.direction == "greater" else "below"
        parts = [f"holds if our interval lies {word} the control's"] if self.controlled else []
        if self.baseline:
            parts.append(f"{word} our own baseline's")
        elif not self.controlled:
            parts.append(f"{word} {self.fmt(self.null)}")
        reach = self.reach
        note = self.reach_note
        if reach is None and self.paper_value is not None:
            reach = self.null + SIZE_SHARE * (self.paper_value - self.null)
            note = (f"{SIZE_SHARE:.0%} of the paper's {self.fmt(self.paper_value)}"
                    + (f" from {self.fmt(self.null)}" if self.null else ""))
        if reach is not None:
            parts.append(f"its conservative end is {'at least' if self.direction == 'greater' else 'at most'} "
                         f"{self.fmt(reach)} ({note})")
        rule = ("holds if our interval lies " if not self.controlled else "") + ", and ".join(parts)
        rule = rule.replace("holds if our interval lies holds if", "holds if") + "; partly if only the direction holds"
        reference = "its baseline" if self.baseline else f"{self.fmt(self.null)}" if self.null is not None else None
        if reference is not None and self.controlled:
            rule += (f"; architectural if the control is {word} {reference} as well"
                     + (" and ours reaches that size" if reach is not None else ""))
        return rule

    def fmt(self, value: float) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{100 * value:.{self.digits}f}%" if self.percent else f"{value:+.{self.digits}f}"

    def text(self, estimate: Estimate | None) -> str:
        if estimate is None or not estimate.measured:
            return "not measured"
        if self.percent:
            return estimate.text(100, self.digits, "%")
        return estimate.text(1, self.digits)


def _sign(direction: str) -> int:
    return 1 if direction == "greater" else -1


def _beats(a: Estimate, b: Estimate, direction: str) -> bool:
    """``a``'s interval lies entirely on the claimed side of ``b``'s."""
    if not (a.measured and b.measured):
        return False
    return a.low > b.high if direction == "greater" else a.high < b.low


def _beyond(a: Estimate, value: float, direction: str) -> bool:
    return a.measured and (a.low > value if direction == "greater" else a.high < value)


def _inside(a: Estimate, bounds: tuple[float, float]) -> bool:
    return a.measured and bounds[0] <= a.low and a.high <= bounds[1]


def _shows(finding: Finding, estimate: Estimate, baseline: Estimate | None) -> bool:
    """Whether one run shows the claimed effect on its own (against its baseline, or beyond ``null``)."""
    if finding.direction == "within":
        return _inside(estimate, finding.within)
    if finding.baseline:
        return baseline is not None and _beats(estimate, baseline, finding.direction)
    return finding.null is not None and _beyond(estimate, finding.null, finding.direction)


def _reaches_size(finding: Finding, ours: Estimate) -> bool:
    bound = ours.low if finding.direction == "greater" else ours.high
    sign = _sign(finding.direction)
    if finding.reach is not None:
        return sign * (bound - finding.reach) >= 0
    if finding.paper_value is None:
        return True
    null = finding.null or 0.0
    return sign * (bound - null) >= SIZE_SHARE * sign * (finding.paper_value - null)


def judge(finding: Finding, ours: Estimate | None, control: Estimate | None,
          ours_baseline: Estimate | None = None, control_baseline: Estimate | None = None) -> str:
    """The verdict of one finding (see the module docstring). Without a control (``None``) a finding is
    judged against its baseline or ``null`` only, and cannot be called architectural."""
    if ours is None or not ours.measured:
        return "not measured"
    if finding.direction != "within" and finding.null is None and not finding.baseline:
        return "not measured"  # no rule applies (e.g. human annotations: no control to compare with)
    if finding.baseline and (ours_baseline is None or not ours_baseline.measured):
        return "not measured"  # the measure's own baseline could not be measured (e.g. no such facts)
    shows = _shows(finding, ours, ours_baseline)
    control_shows = control is not None and control.measured and _shows(finding, control, control_baseline)
    if finding.direction == "within":
        if shows:
            return ARCHITECTURAL if control_shows else "holds"
        overlaps = ours.high >= finding.within[0] and ours.low <= finding.within[1]
        return "partly" if overlaps else "does not hold"
    beats_control = control is None or _beats(ours, control, finding.direction)
    if shows and beats_control:
        return "holds" if _reaches_size(finding, ours) else "partly"
    if shows and control_shows and _reaches_size(finding, ours):
        return ARCHITECTURAL
    return "does not hold"


# =====================================================================================================
# The registry
# =====================================================================================================
FINDINGS: tuple[Finding, ...] = (
    # ---- Section 3: keys capture input patterns (notebook 01) ----------------------------------------
    Finding("01_keys.last_hurts_most", "Sec. 3", "Fig. 3", "Removing the last token of a trigger prefix lowers "
            "the key's coefficient more than removing the first or a random token",
            "in every layer: last -65..-70% (layer 1) to -20% (layer 16), first -10..-15%, random -15..-20% "
            "(unverified reading of Fig. 3)", "less", percent=True,
            unit_note="per key: change when removing the last token minus the smaller of the other two, "
                      "percentage points of the coefficient", our_figure="01_removal"),
    Finding("01_keys.last_hurts_more_in_lower", "Sec. 3", "Fig. 3", "... most of all in lower layers",
            "about -65..-70% at layer 1 to -20% at layer 16 (unverified reading)", "less", percent=True,
            unit_note="change when removing the last token, lower minus upper layers (depth 9/16 split)",
            our_figure="01_removal"),
    Finding("01_keys.shallow_lower", "Sec. 3", "Fig. 2", "Shallow patterns (a shared last token) in lower layers",
            "mostly shallow in layers 1-9 of 16", "greater", percent=True,
            unit_note="share of a key's top-25 prefixes ending in a token shared by >= 3 of them, lower minus "
                      "upper layers", our_figure="01_patterns"),
    Finding("01_keys.semantic_upper", "Sec. 3", "Fig. 2", "Semantic patterns (a shared topic) in upper layers",
            "mostly semantic in layers 10-16 of 16", "greater", percent=True,
            unit_note="topic concentration of a key's top-25 prefixes, upper minus lower layers",
            our_figure="01_patterns"),
    Finding("01_keys.keys_with_pattern", "Sec. 3", "", "Keys with a pattern (>= 3 prefixes)",
            "100% of 160 annotated keys", "greater", null=None, percent=True,
            unit_note="needs human annotation (ffnlib.widgets.annotation)"),
    Finding("01_keys.patterns_per_key", "Sec. 3", "", "Patterns per key", "3.6", "greater", null=None,
            percent=False, unit_note="needs human annotation"),
    Finding("01_keys.prefixes_covered", "Sec. 3", "Fig. 2", "Prefixes covered by a pattern", "65-80%",
            "greater", null=None, percent=True, unit_note="needs human annotation"),
    # ---- Section 4: values represent distributions (notebook 02) -------------------------------------
    Finding("02_values.agreement_lower", "Sec. 4", "Fig. 4", "Agreement in lower layers is close to zero",
            "close to 0% in layers 1-10", "within", within=(-0.005, 0.005), percent=True,
            unit_note="agreement in layers up to relative depth 10/16 minus its empirical baseline (claimed "
                      "range: within 0.5 percentage points of it)", our_figure="02_agreement"),
    Finding("02_values.agreement_rise", "Sec. 4", "Fig. 4", "Agreement rises in the upper layers",
            "~0% in layers 1-10, rising up to 3.5% in layers 11-16", "greater", percent=True,
            unit_note="agreement in upper minus lower layers (relative depth 10/16 split)",
            our_figure="02_agreement"),
    Finding("02_values.agreement_upper_peak", "Sec. 4", "Fig. 4", "Upper-layer agreement is far above chance "
            "(the best upper layer)", "3.5% in the best upper layer; chance 1/|V| = 0.0004%", "greater",
            paper_value=0.035, baseline=True, percent=True,
            unit_note="agreement of the best upper layer; baseline: that layer's empirical baseline (each value "
                      "paired with another key's top trigger)", our_figure="02_agreement"),
    Finding("02_values.target_rank_fall", "Sec. 4", "Fig. 5", "The rank of the top trigger's next token falls in "
            "upper layers", "median ~10-15K of 267,744 (3.7-5.6%) in layers 1-7, ~0-2K (0-0.7%) in layers 14-16 "
            "(unverified reading)", "greater", paper_value=0.043, percent=True,
            unit_note="median rank as a share of the vocabulary, first 7/16 minus last 3/16 of depth",
            our_figure="02_target_ranks"),
    Finding("02_values.confidence_rise", "Sec. 4", "Fig. 6", "Agreement rises with the value's max probability",
            "more confident values agree more often", "greater", percent=True,
            unit_note="agreement of the most minus the least confident tenth of the values",
            our_figure="02_agreement_by_confidence"),
    Finding("02_values.confident_upper", "Sec. 4", "Table 2", "The 100 most confident values sit in upper layers",
            "97 of 100 in layers 11-16 (chance 37.5)", "greater", paper_value=0.975 - 0.375, percent=True,
            unit_note="share of the 100 most confident values in the upper layers minus the upper layers' share "
                      "of all layers", our_figure="02_confident_layers"),
    Finding("02_values.confident_agreeing", "Sec. 4", "Table 2", "Confident values with an agreeing top-50 trigger",
            "46 of 100", "greater", paper_value=0.46, baseline=True, percent=True,
            unit_note="share of the 100 most confident values with an agreeing trigger; baseline: with other "
                      "keys' triggers"),
    # ---- Section 5: aggregating memories (notebook 03) -----------------------------------------------
    Finding("03_aggregation.active_share", "Sec. 5", "Fig. 7", "10-50% of the memories are active per example",
            "10%-50% (positive coefficient)", "within", within=(0.10, 0.50), percent=True,
            unit_note="mean share of active memories (the chosen rule) over layers and examples",
            our_figure="03_fig7_active_memories"),
    Finding("03_aggregation.zero_agreement_output", "Sec. 5", "Fig. 8", "The layer's prediction (layer output, "
            "authors' code) matches no active memory's", "mean 84% of examples (66%-96% by layer)", "greater",
            paper_value=0.84, percent=True, unit_note="mean over layers of the share of examples with zero "
                                                      "agreement", our_figure="03_fig8_zero_agreement"),
    Finding("03_aggregation.zero_agreement_ffn", "Sec. 5", "Fig. 8", "The layer's prediction (FFN output, paper's "
            "text) matches no active memory's", "mean 84% of examples (66%-96% by layer)", "greater",
            paper_value=0.84, percent=True, unit_note="mean over layers of the share of examples with zero "
                                                      "agreement", our_figure="03_fig8_zero_agreement"),
    Finding("03_aggregation.stop_words_output", "Sec. 5", "Fig. 8", "When a memory agrees with the layer output, "
            "the target is often a stop word", "60%", "greater", paper_value=0.60, baseline=True, percent=True,
            unit_note="share of agreeing (example, layer) pairs; baseline: share over all pairs"),
    Finding("03_aggregation.short_prefix_output", "Sec. 5", "Fig. 8", "When a memory agrees with the layer output, "
            "the prefix is often short (< 5 tokens)", "43%", "greater", paper_value=0.43, baseline=True,
            percent=True, unit_note="share of agreeing pairs; baseline: share over all pairs"),
    Finding("03_aggregation.stop_words_ffn", "Sec. 5", "Fig. 8", "When a memory agrees with the FFN output, "
            "the target is often a stop word", "60%", "greater", paper_value=0.60, baseline=True, percent=True,
            unit_note="share of agreeing (example, layer) pairs; baseline: share over all pairs"),
    Finding("03_aggregation.short_prefix_ffn", "Sec. 5", "Fig. 8", "When a memory agrees with the FFN output, "
            "the prefix is often short (< 5 tokens)", "43%", "greater", paper_value=0.43, baseline=True,
            percent=True, unit_note="share of agreeing pairs; baseline: share over all pairs"),
    Finding("03_aggregation.residual_final_trend", "Sec. 5", "Fig. 9", "The residual's top token matches the final "
            "prediction more often with depth", "2% (first layer) to 86% (last), monotonic: Spearman +1",
            "greater", paper_value=1.0, percent=False,
            unit_note="Spearman correlation of the per-layer share with depth", our_figure="03_fig9_residual_final"),
    Finding("03_aggregation.residual_prob_trend", "Sec. 5", "Fig. 10", "The residual's probability of the final "
            "token rises with depth", "rises (qualitative)", "greater", percent=False,
            unit_note="Spearman correlation of the per-layer mean probability with depth",
            our_figure="03_fig10_residual_confidence"),
    Finding("03_aggregation.residual_dominates", "Sec. 5", "Fig. 11", "The output usually keeps the residual's "
            "prediction", "the residual case dominates (qualitative)", "greater", percent=True,
            unit_note="residual case minus FFN case, mean share over layers", our_figure="03_fig11_ffn_cases"),
    Finding("03_aggregation.ffn_rarely_overrides", "Sec. 5", "Fig. 11", "The FFN rarely overrides the residual "
            "with its own top token", "rare (qualitative)", "within", within=(0.0, 0.2), percent=True,
            unit_note="FFN case, mean share over layers (claimed range: below 20%)", our_figure="03_fig11_ffn_cases"),
    Finding("03_aggregation.composition", "Sec. 5", "Fig. 11", "Composition: the output is sometimes neither the "
            "residual's nor the FFN's token", "happens (qualitative)", "greater", null=0.01, percent=True,
            unit_note="composition case, mean share over layers (the effect: above 1%)",
            our_figure="03_fig11_ffn_cases"),
)



def _uncontrolled(findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
    """Findings judged against their own baselines only (``controlled=False``)."""
    return tuple(replace(f, controlled=False) for f in findings)


UNVERIFIED = "(third-party reading, unverified)"
KN_SECTION = "Knowledge neurons (Dai et al., 2022)"
FINDINGS += _uncontrolled((
    # ---- Knowledge neurons, Dai et al. ACL 2022 (notebook 06); the paper's numbers: data/paper/knowledge_neurons.json.
    # A random-weights model knows no facts, so each finding's own control is its baseline (random memories of the
    # same layers, other relations, other facts with the same answer).
    Finding("06_knowledge_neurons.neurons_per_fact", KN_SECTION, "", "A fact is expressed by a few neurons",
            f"4.13 per fact, BERT-base {UNVERIFIED}", "within", within=(2.0, 5.0), percent=False,
            unit_note="knowledge neurons per fact (claimed range: 2-5, the refining rule's target)",
            our_figure="06_layers"),
    Finding("06_knowledge_neurons.top_layers", KN_SECTION, "", "Knowledge neurons sit mostly in the top layers",
            f"mostly in the top layers {UNVERIFIED}", "greater", baseline=True,
            unit_note="per fact, the share of its neurons in the upper half of the depth; baseline: the upper half's "
                      "share of the attributed layers", our_figure="06_layers"),
    Finding("06_knowledge_neurons.suppress", KN_SECTION, "Fig. 3", "Suppressing a fact's neurons lowers the "
            "answer's probability", f"-29.03% (random neurons -1.47%) {UNVERIFIED}", "less", paper_value=-0.2903,
            baseline=True, unit_note="relative change of the answer's probability, mean over facts; baseline: as many "
                                     "random memories of the same layers", our_figure="06_effects"),
    Finding("06_knowledge_neurons.amplify", KN_SECTION, "Fig. 3", "Amplifying (doubling) a fact's neurons raises the "
            "answer's probability", f"+31.17% (random neurons -1.27%) {UNVERIFIED}", "greater", paper_value=0.3117,
            baseline=True, unit_note="relative change of the answer's probability; baseline: random same-layer memories",
            our_figure="06_effects"),
    Finding("06_knowledge_neurons.relation_specific", KN_SECTION, "", "Suppressing a relation's neurons hurts its own "
            "facts more than other relations'", f"other relations change little {UNVERIFIED}", "less", baseline=True,
            unit_note="relative change of the answer's probability of the relation's own facts; baseline: other "
                      "relations' facts", our_figure="06_specificity"),
    Finding("06_knowledge_neurons.fact_specific", KN_SECTION, "", "A fact's neurons are specific to the fact, not to "
            "its answer word", "implied by the knowledge-neuron thesis; Niu et al. (ICLR 2024) argue they track word "
            "patterns", "less", baseline=True,
            unit_note="relative change of the fact's own answer probability; baseline: other facts with the same answer",
            our_figure="06_specificity"),
    Finding("06_knowledge_neurons.values_promote_answer", KN_SECTION, "", "Knowledge neurons are memories whose values "
            "promote the answer", "new: not tested by Dai et al. (the key-value view of Geva et al.)", "greater",
            baseline=True, unit_note="share of the neurons whose value ranks the answer in its top 10; baseline: random "
                                     "memories of the same layers", our_figure="06_values"),
    Finding("06_knowledge_neurons.keys_about_subject", KN_SECTION, "", "Knowledge neurons' keys fire on text about the "
            "subject", "new: not tested by Dai et al. (the trigger examples of Geva et al.)", "greater", baseline=True,
            unit_note="share of the neurons with a top trigger example naming the subject; baseline: random "
                      "memories of the same layers", our_figure="06_values"),
    Finding("06_knowledge_neurons.layer_agreement", KN_SECTION, "", "Knowledge neurons sit where values agree with "
            "their keys' triggers (Section 4)", "new: Dai et al.'s top layers vs Geva et al.'s agreement by layer",
            "greater", percent=False, unit_note="Spearman correlation, over the attributed layers, of the share of "
                                                "knowledge neurons with Section 4's agreement", our_figure="06_layers"),
    Finding("06_knowledge_neurons.update", KN_SECTION, "Table 5", "Editing the neurons' values updates the fact",
            f"success 34.4% (random neurons 0.0%) {UNVERIFIED}", "greater", paper_value=0.344, baseline=True,
            unit_note="share of facts whose prediction becomes the new answer while held-out perplexity stays within "
                      "the bound (default 1.5x the unedited model's; Dai count the prediction only); baseline: random "
                      "same-layer memories", our_figure="06_editing"),
    Finding("06_knowledge_neurons.erase", KN_SECTION, "Table 6", "Erasing a relation's top-20 neurons raises its "
            "perplexity", f"+106.6% and +128.2% (P19, P106); other relations +1.1..+10.1% {UNVERIFIED}", "greater",
            paper_value=1.066, baseline=True, unit_note="relative change of the answer perplexity of the erased "
                                                        "relation's facts; baseline: 20 random same-layer memories",
            our_figure="06_editing"),
))

MOE_SECTION = "MoEfication (Zhang et al., 2022)"
FINDINGS += _uncontrolled((
    # ---- MoEfication, Zhang et al. Findings of ACL 2022 (notebook 07), on ReLU T5; the paper's numbers: PAPER in
    # ffnlib/related/moefication/_paper.py ([3p]: third-party readings of its tables). CATS and TEAL are gated-FFN
    # methods.
    Finding("07_moefication.sparse_activation", MOE_SECTION, "", "Few memories carry each output (activation "
            "sparsity)", f"80% of inputs activate less than 3% of the neurons (ReLU T5-XLarge) {UNVERIFIED}",
            "greater", paper_value=0.80, unit_note="share of (token, layer) pairs whose top 3% of memories carry >= 90% "
            "of the |m|·||v|| mass", our_figure="07_sparsity"),
    Finding("07_moefication.keep_95", MOE_SECTION, "", "10-30% of the FFN keeps over 95% of the performance",
            "over 95% of the performance with 10-30% of the FFN (ReLU T5, trained MLP router)", "greater",
            paper_value=0.95, baseline=True, reach=0.90, reach_note="at most twice the paper's 5% loss",
            unit_note="top-1 agreement with the dense model of the best realistic experts at <= 30% of the FFN; "
                      "baseline: random experts with the same router", our_figure="07_quality"),
    Finding("07_moefication.kmeans_beats_random", MOE_SECTION, "Table 2", "Clustering the keys beats random experts "
            "(MLP router)", f"98.1% vs 94.7% of the dense scores at 20% (T5-Large) {UNVERIFIED}", "greater",
            paper_value=0.034, unit_note="top-1 agreement, k-means minus random experts, both with the MLP router, "
                                         "paired over sentences (paper: points of retained score)",
            our_figure="07_quality"),
    Finding("07_moefication.coactivation_beats_random", MOE_SECTION, "Table 2", "Co-activation experts beat random "
            "experts (MLP router)", f"98.0% vs 94.7% at 20% (T5-Large) {UNVERIFIED}", "greater", paper_value=0.033,
            unit_note="top-1 agreement, co-activation minus random experts, MLP router, paired over sentences",
            our_figure="07_quality"),
    Finding("07_moefication.mlp_beats_similarity", MOE_SECTION, "Table 2", "A trained MLP router beats routing by "
            "similarity to the centroid keys", f"98.0% vs 90.6% at 20% (co-activation experts) {UNVERIFIED}",
            "greater", paper_value=0.074, unit_note="top-1 agreement, MLP minus similarity router, co-activation "
                                                    "experts, paired over sentences", our_figure="07_quality"),
    Finding("07_moefication.cats", MOE_SECTION, "", "CATS: thresholding act(gate·x) keeps the model at 50% of the "
            "memories", "within 1-2% of the base model at 50% MLP sparsity (Llama2-7B, Mistral-7B; task accuracy)",
            "less", baseline=True, reach=0.04, reach_note="at most twice the paper's 2% loss, read as perplexity",
            unit_note="held-out perplexity increase over the dense model at 50%; baseline: random memories at 50%",
            our_figure="07_quality"),
    Finding("07_moefication.teal", MOE_SECTION, "", "TEAL: thresholding the FFN's inputs costs little perplexity at "
            "50%", f"Llama-3-8B WikiText perplexity 5.87 -> 6.67 (+13.6%) at 50% {UNVERIFIED}", "less",
            baseline=True, reach=2 * (6.67 / 5.87 - 1), reach_note="at most twice the paper's +13.6%",
            unit_note="held-out perplexity increase over the dense model at 50%; baseline: random memories at 50%",
            our_figure="07_quality"),
) + tuple(
    Finding(f"07_moefication.{view}_{split}", MOE_SECTION, "", f"An expert's memories share {what} ({split} experts)",
            "new: not measured by the paper (it reads experts as functional groups)", "greater", baseline=True,
            unit_note=f"share of the pairs of memories of one expert sharing {what}; baseline: random experts",
            our_figure="07_coherence")
    for view, what in (("trigger_topics", "their dominant trigger topic"), ("value_tokens", "a top-10 value token"))
    for split in ("kmeans", "coactivation")))

SHEN_SECTION = "ReLU vs softmax memories (Shen et al., 2023)"
_SHEN_SECONDARY = "(secondary summaries of the paper, not checked against the PDF)"
FINDINGS += _uncontrolled((
    # ---- Shen et al., arXiv 2302.06461 (notebook 08), on IWSLT14 De-En translation (BLEU); ours: small LMs trained
    # here on the embedded corpus (held-out loss, nats per token). Each measure compares variants trained on the same
    # data and budget; the comparison variant is its control. Intervals: bootstrap over held-out blocks, paired.
    Finding("08_relu_vs_softmax.softmax_worse", SHEN_SECTION, "", "A softmax over the slots is worse than ReLU",
            f"BLEU 33.08 (softmax) vs 34.22 (ReLU) {_SHEN_SECONDARY}", "greater", percent=False, digits=3,
            unit_note="held-out loss of softmax minus ReLU (nats per token), mean over slot counts and seeds",
            our_figure="08_perplexity"),
    Finding("08_relu_vs_softmax.ln_matches_relu", SHEN_SECTION, "", "With a LayerNorm on its output, the softmax "
            "memory is as good as ReLU", f"BLEU 34.21 (softmax + LN) vs 34.22 (ReLU): \"equivalent\" "
            f"{_SHEN_SECONDARY}", "within", within=(-0.01, 0.01), percent=False, digits=3,
            unit_note="held-out loss of softmax + LN minus ReLU (nats per token), mean over slot counts and seeds; "
                      "claimed range ±0.01 nats (±1% perplexity): our reading of \"equivalent\"",
            our_figure="08_perplexity"),
    Finding("08_relu_vs_softmax.relu_lead_grows", SHEN_SECTION, "", "ReLU's lead over softmax grows with the "
            "number of slots", f"ReLU ahead at every size from 32 to 4,096 slots; softmax + LN falls behind again "
            f"at 3,072-4,096 {_SHEN_SECONDARY}", "greater", percent=False, digits=3,
            unit_note="slope of (softmax - ReLU) held-out loss per doubling of the slots (nats per token)",
            our_figure="08_perplexity"),
    Finding("08_relu_vs_softmax.softmax_concentrated", SHEN_SECTION, "", "Under softmax a few slots carry the mass",
            f"top 0.2% of the slots carry over 85% of the mass {_SHEN_SECONDARY}", "greater", paper_value=0.85,
            baseline=True, unit_note="share of Σ|m_i| in the top 0.2% of the slots (at least one), at the largest "
                                     "slot count, mean over tokens and layers; baseline: the same for ReLU's |m|",
            our_figure="08_memories"),
))

KOBAYASHI_SECTION = "FF blocks through attention maps (Kobayashi et al., 2024)"
_KOBAYASHI_UNVERIFIED = "(third-party summaries of the paper; no number could be verified)"
FINDINGS += (
    # ---- Kobayashi, Kuribayashi, Yokoi & Inui, ICLR 2024 (notebook 09). The paper's numbers could not be retrieved
    # (shared research note related-relu-kobayashi.md), so no size is asked for. Each measure has a baseline of the
    # same run (the class's base rate among all candidate pairs, the FFN's own change of the map, the same correlation
    # with the FFN's change shuffled within each query row) AND is judged against the random-weights control (the
    # same measures on the same architecture with random weights, on the first ``control_sentences`` sentences):
    # cancellation shows in random models too, so without the control its "holds" would not say that training put it
    # there.
    Finding("09_ff_attention_maps.amplified_subword", KOBAYASHI_SECTION, "", "The FFN amplifies pairs of sub-word "
            "pieces of one word", f"FF amplifies sub-word pairs that form one word {_KOBAYASHI_UNVERIFIED}", "greater",
            baseline=True, unit_note="share of sub-word pairs among the top-k FF-amplified pairs of each sentence and "
                                     "layer (BOS/first position and self-pairs excluded); baseline: their share among "
                                     "all candidate pairs", our_figure="09_amplified_classes"),
    Finding("09_ff_attention_maps.amplified_capitalised_span", KOBAYASHI_SECTION, "", "The FFN amplifies pairs of "
            "tokens of one named entity (a capitalised span)", f"FF amplifies tokens of one named entity or multi-word "
            f"expression {_KOBAYASHI_UNVERIFIED}", "greater", baseline=True,
            unit_note="share of pairs within one run of capitalised words among the top-k FF-amplified pairs; "
                      "baseline: their share among all candidate pairs", our_figure="09_amplified_classes"),
    Finding("09_ff_attention_maps.amplified_frequent_bigram", KOBAYASHI_SECTION, "", "The FFN amplifies frequent "
            "collocations (multi-word expressions)", f"FF amplifies tokens of one multi-word expression, e.g. adjacent "
            f"nouns {_KOBAYASHI_UNVERIFIED}", "greater", baseline=True,
            unit_note="share of adjacent pairs forming a frequent, collocated corpus bigram (PMI) among the top-k "
                      "FF-amplified pairs; baseline: their share among all candidate pairs",
            our_figure="09_amplified_classes"),
    Finding("09_ff_attention_maps.cancel_block", KOBAYASHI_SECTION, "", "RES and the norms undo FF's "
            "contextualisation change", f"FF's change of the map is largely undone by the following RES and LN "
            f"{_KOBAYASHI_UNVERIFIED}", "less", baseline=True, percent=False, digits=4,
            unit_note="1 − Spearman ρ between the map the FFN reads and the layer's last map (after RES and the next "
                      "norm), mean over layers and sentences; baseline: the same between the FFN's input and output "
                      "maps (FF's own change)", our_figure="09_cancellation"),
    Finding("09_ff_attention_maps.cancel_pairwise", KOBAYASHI_SECTION, "", "RES and the norms push back on FF's "
            "change pair by pair", f"FF and its surroundings cancel each other's effect {_KOBAYASHI_UNVERIFIED}",
            "less", baseline=True, percent=False,
            unit_note="Pearson correlation, over the map entries j < i, of FF's change with the change RES and the "
                      "norms make after it, mean over layers and sentences; baseline: the same with FF's change "
                      "shuffled within each query row", our_figure="09_cancellation"),
)

_BY_KEY = {f.key: f for f in FINDINGS}


def finding(key: str) -> Finding:
    return _BY_KEY[key]


def of_notebook(notebook: str) -> list[Finding]:
    return [f for f in FINDINGS if f.notebook == notebook]


def findings_rows(notebook: str, ours: dict[str, Estimate], control: dict[str, Estimate] | None,
                  details: dict[str, str] | None = None, control_name: str = "",
                  control_note: str = "no control") -> list[dict]:
    """The summary rows (``summaries/<notebook>.json`` ``findings``) of one notebook's findings: each
    judged from the measures of the trained model (``ours``) and of the control (``None``: none; the control
    column then says ``control_note``)."""
    rows = []
    details = details or {}
    for f in of_notebook(notebook):
        mine = ours.get(f.measure)
        theirs = None if control is None else control.get(f.measure)
        base = ours.get(f"{f.measure}/baseline")
        control_base = None if control is None else control.get(f"{f.measure}/baseline")
        verdict = judge(f, mine, theirs, base, control_base)
        rows.append({
            "key": f.key, "section": f.section, "figure_ref": f.figure, "finding": f.claim, "paper": f.paper,
            "ours": f.text(mine) + (f" (baseline {f.text(base)})" if base is not None else ""),
            "ours_detail": details.get(f.measure, ""),
            "control": control_note if control is None else (
                f.text(theirs) + (f" (baseline {f.text(control_base)})" if control_base is not None else "")),
            "control_name": control_name, "verdict": verdict, "rule": f.rule(), "measure": f.unit_note,
            "figure": f"figures/{f.our_figure}.png" if f.our_figure else None, "paper_figure": None,
            "estimate": None if mine is None else mine.as_dict(),
            "control_estimate": None if theirs is None else theirs.as_dict(),
        })
    return rows
