"""The papers' own numbers that notebook 07's findings are read against (MoEfication's abstract and Table 2, CATS,
TEAL; [3p]: a third-party reading of a table)."""

from __future__ import annotations

import numpy as np

__all__ = ["PAPER", "table2_retained"]

PAPER = {
    "keep_95": {"value": 0.95, "shares": (0.10, 0.30), "source": "abstract: 10-30% of FFN parameters keep over "
                "95% of the performance (ReLU T5)"},
    "speedup_25": {"value": 2.0, "share": 0.25, "source": "abstract: 2x speed-up with 25% of FFN parameters (FLOPs)"},
    "sparse_inputs": {"value": 0.80, "neurons": 0.03, "source": "[3p] 80% of inputs activate less than 3% of the "
                      "neurons in T5-XLarge (ReLU)"},
    # Table 2, T5-Large, 20% of neurons [3p-table]: mean over SST-2 / MNLI / RACE of score / dense score
    "table2": {"dense": (96.2, 89.5, 81.3), "random+mlp": (94.1, 84.1, 75.0), "kmeans+mlp": (95.9, 87.5, 78.7),
               "coactivation+similarity": (92.2, 81.4, 71.0), "coactivation+mlp": (95.4, 87.5, 79.0),
               "source": "[3p-table] Table 2, T5-Large, 20% of neurons (SST-2 / MNLI / RACE)"},
    "cats": {"value": 0.02, "keep": 0.5, "source": "CATS abstract: within 1-2% of the base model at 50% MLP "
             "sparsity, no fine-tuning (Llama2-7B, Mistral-7B; downstream accuracy)"},
    "teal": {"ppl": {0.25: 5.94 / 5.87, 0.4: 6.21 / 5.87, 0.5: 6.67 / 5.87}, "share": 0.5,
             "source": "[3p-table] TEAL Table 1, WikiText perplexity of Llama-3-8B, 5.87 dense -> 5.94 / 6.21 / "
                       "6.67 at 25 / 40 / 50% model-wide sparsity"},
}


def table2_retained(name: str) -> float:
    """Mean over the three tasks of Table 2 of a setting's score divided by the dense score."""
    dense = PAPER["table2"]["dense"]
    return float(np.mean([s / d for s, d in zip(PAPER["table2"][name], dense)]))
