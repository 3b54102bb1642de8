"""Manipulations: small objects behind one protocol (:class:`Manipulation`) the engine calls."""

from datamanip.manipulations.base import Batch, Manipulation, Step
from datamanip.manipulations.weighting import (
    WEIGHTING_METHODS,
    LearnedWeighting,
    NoManipulation,
    ProportionWeighting,
    RenWeighting,
)

__all__ = [
    "WEIGHTING_METHODS",
    "Batch",
    "LearnedWeighting",
    "Manipulation",
    "NoManipulation",
    "ProportionWeighting",
    "RenWeighting",
    "Step",
]
