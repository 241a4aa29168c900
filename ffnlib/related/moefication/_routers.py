"""Routers: which experts a token uses. The similarity router's centroid keys (:func:`centroid_keys`) and the
authors' MLP router (:class:`MLPRouter`: ``Linear(d, E, no bias) -> Tanh -> Linear(E, E, no bias)``, initialised
with the centroids and the identity, trained with BCE on the expert sizes divided by the batch maximum; Adam,
lr 0.01, batches of 512, 90/10 split, the epoch with the best held-out mass kept at 20%). :func:`train_routers`
trains one per split and layer on captured activations (:func:`router_data`), checkpointed per split and cached."""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import Adapter
from ...errors import ParameterError
from ...mining import corpus_fingerprint, prepare_sentences
from ...progress import say, tqdm
from ...storage import fingerprint, load_result, save_result
from ._cache import base_request
from ._choices import SPLITS
from ._ffn import key_features, membership, memory_sizes
from ._partitions import RANDOM_SEED_STEP, split_draw, split_kind
from ._passes import captured
from ._splits import ExpertSplits

__all__ = ["centroid_keys", "MLPRouter", "train_router", "Routers", "router_data", "train_routers"]


@torch.no_grad()
def centroid_keys(adapter: Adapter, layer: int, labels: np.ndarray, n_experts: int,
                  cluster_rows: str = "gate") -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's centroid key, as the authors: the mean of its normalised rows.

    Returns ``(w, c2)``: ``w`` (E, d_model) is the centroid's dot product with an input as a linear map
    (for ``"both"`` the input is duplicated, so the gate and up halves add up, over sqrt 2), and ``c2``
    (E,) the centroid's squared norm, so that ``-||x̂ - c||² = 2·x̂·w - c2 - 1`` for a unit input x̂.
    """
    features = torch.as_tensor(key_features(adapter, layer, cluster_rows))
    centres = membership(labels, n_experts).T @ features / (len(labels) // n_experts)
    c2 = (centres**2).sum(-1)
    d = adapter.d_model
    w = centres if centres.shape[1] == d else (centres[:, :d] + centres[:, d:]) / math.sqrt(2)
    return w.contiguous(), c2


class MLPRouter(nn.Module):
    """The authors' router: ``Linear(d, E, no bias) -> Tanh -> Linear(E, E, no bias)``."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.first = nn.Linear(d_model, n_experts, bias=False)
        self.second = nn.Linear(n_experts, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _captured_mass(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Mean over tokens of the share of the expert sizes in the ``k`` experts with the top ``scores``."""
    chosen = targets.gather(1, scores.topk(k, dim=-1).indices).sum(-1)
    total = targets.sum(-1)
    ok = total > 0
    return float((chosen[ok] / total[ok]).mean()) if ok.any() else float("nan")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. A router's products are tiny: on a shared 2-core machine two
    threads made training 15-30 times slower (each small operation waits for the other thread), and one thread
    makes the result independent of the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_router(inputs: torch.Tensor, targets: torch.Tensor, w_init: torch.Tensor, epochs: int = 30,
                 seed: int = 0, batch: int = 512, lr: float = 0.01, val_share: float = 0.2) -> dict:
    """Train one :class:`MLPRouter` as the authors (see the module docstring) on normalised inputs (N, d) and
    expert sizes (N, E), on one thread. Returns its weights, the best epoch, and the held-out mass kept at
    ``val_share`` of the experts by the router and by the ground truth (the upper bound)."""
    with _one_thread():
        return _train_router(inputs, targets, w_init, epochs, seed, batch, lr, val_share)


def _train_router(inputs, targets, w_init, epochs, seed, batch, lr, val_share) -> dict:
    n, d = inputs.shape
    n_experts = targets.shape[1]
    if n < 20:
        raise ParameterError(f"Only {n} tokens to train a router on: give more router sentences.")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_train = n // 10 * 9
    train, val = order[:n_train], order[n_train:]
    router = MLPRouter(d, n_experts)
    with torch.no_grad():
        router.first.weight.copy_(w_init)
        router.second.weight.copy_(torch.eye(n_experts))
    optim = torch.optim.Adam(router.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    k = max(1, int(n_experts * val_share))
    x_val, t_val = inputs[val].float(), targets[val]
    best = {"val_mass": -1.0, "epoch": -1, "state": None}
    for epoch in range(int(epochs)):
        router.train()
        shuffled = train[torch.randperm(n_train, generator=gen)]
        for start in range(0, n_train, batch):
            idx = shuffled[start: start + batch]
            target = targets[idx]
            target = target / target.max().clamp_min(1e-30)
            optim.zero_grad()
            loss = loss_fn(router(inputs[idx].float()).reshape(-1), target.reshape(-1))
            loss.backward()
            optim.step()
        router.eval()
        with torch.no_grad():
            mass = _captured_mass(router(x_val), t_val, k)
        if mass > best["val_mass"]:
            best = {"val_mass": mass, "epoch": epoch,
                    "state": {k_: v.detach().clone() for k_, v in router.state_dict().items()}}
    with torch.no_grad():
        upper = _captured_mass(t_val, t_val, k)
    return {"first": best["state"]["first.weight"], "second": best["state"]["second.weight"],
            "epoch": best["epoch"], "val_mass": best["val_mass"], "val_mass_ground_truth": upper,
            "train_tokens": n_train, "val_tokens": n - n_train}


@dataclass
class Routers:
    """Trained MLP routers: ``frame`` has split, layer, first (E·d floats), second (E·E floats), epoch,
    val_mass, val_mass_ground_truth, train_tokens, val_tokens."""

    frame: pd.DataFrame
    manifest: dict

    def router(self, split: str, layer: int) -> MLPRouter:
        rows = self.frame[(self.frame["split"] == split) & (self.frame["layer"] == layer)]
        if rows.empty:
            raise ParameterError(f"No trained router for split {split!r}, layer {layer}.")
        row = rows.iloc[0]
        n_experts = int(round(math.sqrt(len(row["second"]))))
        d = len(row["first"]) // n_experts
        router = MLPRouter(d, n_experts)
        with torch.no_grad():
            router.first.weight.copy_(torch.as_tensor(np.asarray(row["first"], dtype=np.float32)).view(n_experts, d))
            router.second.weight.copy_(torch.as_tensor(np.asarray(row["second"], dtype=np.float32))
                                       .view(n_experts, n_experts))
        return router.eval().requires_grad_(False)


def router_data(loaded, table: pd.DataFrame, splits: ExpertSplits, batch_tokens: int = 1024,
                progress: bool = True) -> dict[int, dict]:
    """Per layer: the normalised FFN inputs (float16, N x d) of the real tokens of ``table`` and, per split,
    their expert sizes ``Σ_i |m_i|·||v_i||`` (float32, N x E)."""
    adapter = loaded.adapter
    layers = splits.layers
    norms = {layer: adapter.written_value_norms(layer) for layer in layers}
    members = {(s, layer): membership(splits.labels(s, layer), splits.n_experts) for s in splits.splits
               for layer in layers}
    data = {layer: {"x": [], **{s: [] for s in splits.splits}} for layer in layers}
    for _, real, acts in captured(loaded, table, layers, ("coefficients", "ffn_input"), batch_tokens,
                                   "Router training data", progress):
        flat = real.reshape(-1)
        for layer in layers:
            x = acts.ffn_input[layer].reshape(-1, adapter.d_model)[flat].float()
            sizes = memory_sizes(acts.coefficients[layer].reshape(-1, adapter.d_ff)[flat], norms[layer])
            data[layer]["x"].append(F.normalize(x, dim=-1).half().cpu())
            for s in splits.splits:
                data[layer][s].append((sizes @ members[(s, layer)]).cpu())
    return {layer: {key: torch.cat(parts) for key, parts in d.items()} for layer, d in data.items()}


def train_routers(loaded, sentences: pd.DataFrame, splits: ExpertSplits, epochs: int = 30, seed: int = 0,
                  cluster_rows: str | None = None, batch_tokens: int = 1024, out_dir=None,
                  progress: bool = True) -> Routers:
    """Train one MLP router per split and layer on the tokens of ``sentences`` (training split).

    Each router is seeded on its own (seed, split, layer), so a resumed run gives the same routers. With
    ``out_dir`` each split's routers are checkpointed and the result is cached by its manifest.
    """
    adapter = loaded.adapter
    cluster_rows = cluster_rows or splits.manifest.get("cluster_rows", "gate")
    if cluster_rows == "keys":
        cluster_rows = "gate"
    table = prepare_sentences(loaded, sentences)
    request = {**base_request(loaded, splits.layers, "routers"), "splits": fingerprint(splits.manifest),
               "split_names": splits.splits, "epochs": int(epochs), "seed": int(seed), "cluster_rows": cluster_rows,
               "corpus": corpus_fingerprint(table), "sentences": len(table), "lr": 0.01, "batch": 512}
    name = f"moe-routers-{fingerprint(request)}"
    partial = None
    if out_dir is not None:
        cached = load_result(out_dir, name, request)
        if cached is not None:
            say(f"Reusing the cached MLP routers {Path(out_dir) / name}.parquet.", progress)
            return Routers(cached, request)
        partial = Path(out_dir) / f"{name}.partial"
    parts, todo = {}, []
    for split in splits.splits:
        found = None if partial is None else load_result(partial, split, {**request, "split": split})
        if found is None:
            todo.append(split)
        else:
            parts[split] = found
    if parts and todo:
        say(f"Resuming the routers: {len(parts)} of {len(splits.splits)} splits read from {partial}.", progress)
    if todo:
        data = router_data(loaded, table, splits, batch_tokens, progress)
        bar = tqdm(total=len(todo) * len(splits.layers), desc="Training MLP routers", unit="router",
                   disable=not progress)
        for split in todo:
            rows = []
            for layer in splits.layers:
                w, _ = centroid_keys(adapter, layer, splits.labels(split, layer), splits.n_experts, cluster_rows)
                out = train_router(data[layer]["x"], data[layer][split], w, epochs,
                                   seed=seed * 1_000_003 + 7919 * layer + SPLITS.index(split_kind(split))
                                   + RANDOM_SEED_STEP * split_draw(split))
                rows.append({"split": split, "layer": layer,
                             "first": out["first"].reshape(-1).numpy().astype(np.float32),
                             "second": out["second"].reshape(-1).numpy().astype(np.float32),
                             **{k: out[k] for k in ("epoch", "val_mass", "val_mass_ground_truth", "train_tokens",
                                                    "val_tokens")}})
                bar.update(1)
            parts[split] = pd.DataFrame(rows)
            if partial is not None:
                save_result(partial, split, parts[split], {**request, "split": split})
        bar.close()
    frame = pd.concat([parts[s] for s in splits.splits], ignore_index=True)
    if out_dir is not None:
        save_result(out_dir, name, frame, request)
        shutil.rmtree(partial, ignore_errors=True)
    return Routers(frame, request)
