"""The experts side of a card (notebook 07, MoEfication): the memory's expert under each split (k-means,
co-activation, and each draw of the random split), the expert's other members, and how often the trained router
picks that expert (``tables/07_router_picks.csv``); read from notebook 07's cached splits and tables."""

from __future__ import annotations

import pandas as pd

from ._part import Part

__all__ = ["experts_part"]


def _found(run, what: str, analysis: str) -> tuple[str, dict] | None:
    request = ((run.summary("07_moefication") or {}).get("manifests") or {}).get(what)
    names = run.find(request) if request else run.find(analysis=analysis)
    names = [n for n in names if not n.endswith("-info")]
    return (names[0], run.manifests()[names[0]]) if names else None


def experts_part(run, layer: int, memory: int) -> Part:
    """The card's ``experts`` and ``router``, from notebook 07's results."""
    part = Part()
    splits = _found(run, "splits", "moefication_splits")
    if splits is None:
        for name in ("experts", "router"):
            part.lack(name, "its expert splits are not in the results")
        return part
    name, request = splits
    if layer not in request.get("layers", []):
        for field_name in ("experts", "router"):
            part.lack(field_name, f"it MoEfied layers {request.get('layers')} (the scale's), not layer {layer}; "
                                  f"run it with layers=[{layer}]")
        return part
    rows = run.load(name, filters=[("layer", "==", int(layer))])
    if rows is None:
        for field_name in ("experts", "router"):
            part.lack(field_name, f"its expert splits ({name}) cannot be read")
        return part
    table = []
    for split, group in rows.groupby("split", sort=False):
        expert = int(group.loc[group["memory"] == memory, "expert"].iloc[0])
        members = sorted(int(m) for m in group.loc[group["expert"] == expert, "memory"])
        table.append({"split": split, "expert": expert, "size": len(members),
                      "mates": [m for m in members if m != memory]})
    part.fields["experts"] = pd.DataFrame(table)
    part.notes["experts"] = f"notebook 07's splits ({name}); mates: the expert's other memories"
    picks = run.table("07_router_picks")
    if picks is None or not {"split", "share", "layer", "expert", "picked_rate"} <= set(picks.columns):
        part.lack("router", "the run's notebook 07 saved the routers' weights and validation mass, not how often "
                            "the trained router picks each expert (tables/07_router_picks.csv)")
        return part
    mine = part.fields["experts"][["split", "expert"]]
    rows = picks[picks["layer"] == layer].merge(mine, on=["split", "expert"])
    columns = ["split", "share", "expert", "picked_rate", "uniform_rate", "experts_kept", "n_experts"]
    part.fields["router"] = rows.reindex(columns=columns).sort_values(["split", "share"]).reset_index(drop=True)
    part.notes["router"] = ("notebook 07's trained (mlp) router on held-out tokens: picked_rate = share of tokens at "
                            "which it picked this memory's expert, at each share of experts kept; uniform_rate = "
                            "a router that picks every expert equally often")
    return part
