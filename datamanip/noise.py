"""Finding flipped labels from what a run learned: rank training examples, count the flipped.

``--label-noise p`` (:func:`datamanip.data.subsets.flip_labels`) marks the flipped examples in
``weights.parquet``; a manipulation that learned to distrust them gives them the lowest weights.
"""

import pandas as pd


def ranked(weights: pd.DataFrame, by: str = "weight") -> pd.DataFrame:
    """Training examples, the most suspect first: lowest weight, or highest loss.

    Ties (many weights sit at the 1e-5 floor) are broken by the higher loss, then by position,
    so the ranking is deterministic.
    """
    if by == "weight":
        keys, ascending = ["weight", "loss"], [True, False]
    elif by == "loss":
        keys, ascending = ["loss"], [False]
    else:
        raise ValueError(f"rank by 'weight' or 'loss', not {by!r}")
    return weights.sort_values(keys, ascending=ascending, kind="stable")


def precision_at_k(weights: pd.DataFrame, k: int, by: str = "weight") -> float:
    """Fraction of flipped labels among the ``k`` most suspect examples (k capped at the size)."""
    top = ranked(weights, by).head(k)
    return float(top["flipped"].mean()) if len(top) else 0.0
