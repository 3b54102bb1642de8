"""Text examples as model inputs: tokenised once, padded per batch to the longest example."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from datamanip.manipulations.base import Batch
from datamanip.models import quiet_transformers


@dataclass
class EncodedSplit:
    """A split tokenised for one model.

    Attributes:
        input_ids: token ids of every example, special tokens included, cut to ``max_length``.
        labels: [examples] class ids.
        truncated: how many examples were longer than ``max_length`` and were cut.
        pad_id: the tokenizer's padding id.
    """

    input_ids: list[list[int]]
    labels: Tensor
    truncated: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, positions: Tensor) -> Batch:
        rows = [self.input_ids[i] for i in positions.tolist()]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [batch, seq]
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        return Batch(positions, self.labels[positions], inputs)

    def lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.input_ids])


def encode(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> EncodedSplit:
    """Tokenises ``texts`` once; examples longer than ``max_length`` tokens are cut and counted."""
    # Untruncated on purpose, to count the cut examples: the tokenizer's warning about
    # sequences over the model's maximum would only repeat, unasked, what the count reports.
    with quiet_transformers():
        full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in full)
    cut = [ids if len(ids) <= max_length else ids[: max_length - 1] + [ids[-1]] for ids in full]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedSplit(cut, torch.tensor(np.asarray(labels), dtype=torch.long), truncated, pad_id)
