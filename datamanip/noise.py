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
