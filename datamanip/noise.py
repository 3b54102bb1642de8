"""Finding flipped labels from what a run learned: rank training examples, count the flipped.

``--label-noise p`` (:func:`datamanip.data.subsets.flip_labels`) marks the flipped examples in
``weights.parquet``; a manipulation that learned to distrust them gives them the lowest weights.
"""

import pandas as pd

RANKINGS = {
    "weight": "lowest weight, ties by higher loss",
    "weight_alone": "lowest weight, ties in training order",
    "loss": "highest loss",
}


def ranked(weights: pd.DataFrame, by: str = "weight") -> pd.DataFrame:
    """Training examples, the most suspect first (see :data:`RANKINGS`).

    Many weights sit at the 1e-5 floor: ``"weight"`` breaks those ties by the higher final
    loss, ``"weight_alone"`` by position in the training subset (a seeded shuffle, so as good
    as random), which shows what the weights find without the loss's help.
    """
    if by == "weight":
        keys, ascending = ["weight", "loss"], [True, False]
    elif by == "weight_alone":
        keys, ascending = ["weight"], [True]
    elif by == "loss":
        keys, ascending = ["loss"], [False]
    else:
        raise ValueError(f"rank by one of {', '.join(RANKINGS)}, not {by!r}")
    return weights.sort_values(keys, ascending=ascending, kind="stable")


def precision_at_k(weights: pd.DataFrame, k: int, by: str = "weight") -> float:
    """Fraction of flipped labels among the ``k`` most suspect examples (k capped at the size)."""
    top = ranked(weights, by).head(k)
    return float(top["flipped"].mean()) if len(top) else 0.0


def noise_detection(weights: pd.DataFrame, method: str, ks=(50, 100, 200)) -> dict:
    """Precision at finding flipped labels of the k most down-weighted training examples (and,
    for comparison, of the k with the highest final loss), beside the base rate."""
    out = {"base_rate": float(weights["flipped"].mean()), "flipped": int(weights["flipped"].sum())}
    if method != "none":
        floor = weights["weight"] <= weights["weight"].min() * (1 + 1e-6)
        out |= {
            "at_lowest_weight": int(floor.sum()),
            "flipped_at_lowest_weight": int(weights["flipped"][floor].sum()),
        }
    for k in ks:
        if method != "none":
            out[f"precision_at_{k}_lowest_weight"] = precision_at_k(weights, k, by="weight")
            out[f"precision_at_{k}_weight_alone"] = precision_at_k(weights, k, by="weight_alone")
        out[f"precision_at_{k}_highest_loss"] = precision_at_k(weights, k, by="loss")
    return out
