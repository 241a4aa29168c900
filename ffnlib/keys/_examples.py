"""Mined trigger examples (the trigger table and its sentences), and one key's examples as text or HTML."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..config import check_int
from ..errors import ParameterError
from ..mining import POSITION_BITS, TopKState

__all__ = ["TRIGGER_COLUMNS", "TriggerExamples", "trigger_table", "trigger_html"]

TRIGGER_COLUMNS = ["layer", "memory", "sign", "rank", "coefficient", "sentence_id", "position", "next_token"]


@dataclass
class TriggerExamples:
    """Mined trigger examples (see the ``ffnlib.keys`` docstring and the column contract in ``triggers``).

    - ``triggers``: layer, memory, sign (+1 top positive / -1 most negative coefficients), rank (0 =
      strongest), coefficient, sentence_id, position (index of the prefix's last token in the
      sentence's token ids), next_token (token id at position + 1, or -1 at the sentence's end);
    - ``sentences``: sentence_id, text, title, topic, token_ids (exactly as ``loaded.encode`` gives);
    - ``manifest``: what produced it; ``stats``: how the run went (throughput, padding, resume, cache).
    """

    triggers: pd.DataFrame
    sentences: pd.DataFrame
    manifest: dict
    stats: dict = field(default_factory=dict)
    # sentences mined -> the top-k state after that prefix of the corpus (a run without out_dir keeps
    # them here; with out_dir each is saved as the result of a run on that prefix: see trigger_snapshot)
    snapshots: dict = field(default_factory=dict, repr=False)

    def of(self, layer: int, memory: int, sign: int = 1) -> pd.DataFrame:
        """One key's trigger examples, strongest first."""
        t = self.triggers
        rows = t[(t["layer"] == layer) & (t["memory"] == memory) & (t["sign"] == sign)]
        if rows.empty:
            layers = sorted(t["layer"].unique().tolist())
            raise ParameterError(f"No trigger examples for layer {layer}, memory {memory}, sign {sign}: mined layers "
                                 f"are {layers}, memories 0..{int(t['memory'].max())}, signs "
                                 f"{sorted(t['sign'].unique().tolist())}.")
        return rows.sort_values("rank").reset_index(drop=True)

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.manifest["layers"]]

    @property
    def n_bos(self) -> int:
        return int(self.manifest.get("n_bos", 0))

    def token_index(self) -> dict[int, list[int]]:
        """sentence_id -> token ids."""
        return dict(zip(self.sentences["sentence_id"].astype("int64").tolist(), self.sentences["token_ids"]))

    def state(self) -> TopKState:
        """The result as a :class:`TopKState` (e.g. to :func:`merge` the results of two corpus shards)."""
        signs = [1, -1] if self.manifest["negative"] else [1]
        t = self.triggers.sort_values(["sign", "layer", "memory", "rank"], ascending=[False, True, True, True])
        shape = (len(signs), len(self.layers), -1, int(self.manifest["k"]))
        sign = t["sign"].to_numpy(np.float32)
        scores = torch.from_numpy((t["coefficient"].to_numpy(np.float32) * sign).reshape(shape))
        keys = torch.from_numpy(((t["sentence_id"].to_numpy(np.int64) << POSITION_BITS)
                                 | t["position"].to_numpy(np.int64)).reshape(shape))
        return TopKState(self.layers, signs, scores, keys)


def _decode_parts(tokenizer, ids: list[int], position: int, n_bos: int) -> tuple[str, str, str]:
    """(text before the last token, the last token, the next token) of a prefix."""
    decode = tokenizer.decode
    before = decode(ids[n_bos:position])
    whole = decode(ids[n_bos: position + 1])
    last = whole[len(before):] if whole.startswith(before) else decode(ids[position: position + 1])
    following = decode(ids[position + 1: position + 2]) if position + 1 < len(ids) else ""
    return before, last, following


def trigger_table(examples: TriggerExamples, tokenizer, layer: int, memory: int, sign: int = 1,
                  n: int = 25) -> pd.DataFrame:
    """One key's top-n trigger examples as text: rank, coefficient, prefix (text before the last token),
    last_token, next_token, sentence_id, position, title, topic."""
    n = check_int("n", n)
    rows = examples.of(layer, memory, sign).head(n)
    index = examples.token_index()
    meta = examples.sentences.set_index("sentence_id")
    out = []
    for r in rows.itertuples():
        ids = [int(t) for t in index[int(r.sentence_id)]]
        before, last, following = _decode_parts(tokenizer, ids, int(r.position), examples.n_bos)
        out.append({"rank": int(r.rank), "coefficient": float(r.coefficient), "prefix": before, "last_token": last,
                    "next_token": following, "sentence_id": int(r.sentence_id), "position": int(r.position),
                    "title": meta.at[int(r.sentence_id), "title"], "topic": meta.at[int(r.sentence_id), "topic"]})
    return pd.DataFrame(out)


def trigger_html(examples: TriggerExamples, tokenizer, layer: int, memory: int, sign: int = 1, n: int = 25) -> str:
    """One key's trigger examples as an HTML table: the prefix with its last token highlighted, the
    coefficient and the next token (display with ``IPython.display.HTML``)."""
    table = trigger_table(examples, tokenizer, layer, memory, sign, n)
    esc = html.escape
    side = "most negative" if sign == -1 else "top"
    rows = "".join(
        f"<tr><td>{r.rank}</td><td style='text-align:right'>{r.coefficient:.3f}</td>"
        f"<td style='text-align:left'>{esc(r.prefix)}<mark><b>{esc(r.last_token)}</b></mark></td>"
        f"<td style='text-align:left;color:#666'>{esc(r.next_token)}</td></tr>"
        for r in table.itertuples())
    return (f"<div><b>Layer {layer}, memory {memory}</b> ({side} coefficients)<table>"
            "<tr><th>rank</th><th>coefficient</th><th>prefix (last token marked)</th><th>next token</th></tr>"
            f"{rows}</table></div>")
