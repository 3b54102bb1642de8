"""The word-embedding rows a reward step can see.

In the weight gradient ∇L_val(θ')ᵀ P ∇ℓ_i (SPEC §3), the word-embedding part is non-zero only on
rows that the training batch and the validation set both look up: P is zero on rows the batch
never touched (:mod:`datamanip.lookahead`), and ∇L_val(θ') is zero on rows the validation set
never looks up. The validation forward at θ' reads only its own rows, and the forwards at θ ± εu
only the batch's. So the weighting fast path (:func:`datamanip.engine.example_reward_gradients`)
holds θ', P, ∇L_val(θ') and the shifted points of the word embedding on those rows alone: a few
thousand of the vocabulary's 30,522 on SST-2, where the word embedding is half of MiniLM's
parameters. The model itself is unchanged: the forwards swap in the compact table and look it up
with the input ids renumbered into it.

The augmentation fast path (:func:`datamanip.engine.function_reward_gradients`) cannot swap the
table: its soft tokens read every row (``probs @ E``). But the validation forward at θ' still
reads only the validation set's rows, so the lookahead is needed on those rows alone, and u is
zero elsewhere. Its forwards take the table at θ plus an :class:`EmbeddingOffset` on the kept
rows: zero at θ (its gradient is the table's gradient on those rows) and ±εu at the shifted
points. The product ``probs @ E`` at θ is then computed once for all three forwards.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datamanip import distributed
from datamanip.manipulations.base import Batch


@dataclass
class EmbeddingRows:
    """The rows of the word embedding kept, and the renumbering of input ids into them.

    Attributes:
        index: position of the word embedding among the trainable parameters.
        rows: [kept] vocabulary ids kept, ascending; ids up to the padding id always are, so
            that the padding id keeps its own number (``nn.Embedding`` sends it no gradient).
        renumber: [vocabulary] each id's row in the compact table (-1: not kept).
    """

    index: int
    rows: Tensor
    renumber: Tensor

    @classmethod
    def of(
        cls, model: nn.Module, params: list[Tensor], batches: list[Batch]
    ) -> "EmbeddingRows | None":
        """The rows ``batches`` look up, or None where the model does not fit the scheme (no
        ``nn.Embedding`` input table, a frozen or tied one, batches without ``input_ids``).

        With several processes the rows are those of every process's batches, so that the
        compact tensors line up when they are summed."""
        try:
            embedding = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):  # image models have no input table
            return None
        if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
            return None
        weight = embedding.weight
        index = next((i for i, p in enumerate(params) if p is weight), None)
        tied = sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1
        if index is None or tied or any("input_ids" not in b.inputs for b in batches):
            return None

        used = torch.zeros(weight.shape[0], device=weight.device)
        for batch in batches:
            used[batch.inputs["input_ids"].reshape(-1)] = 1.0
        if embedding.padding_idx is not None:
            used[: embedding.padding_idx + 1] = 1.0
        rows = distributed.sum_([used])[0].nonzero().squeeze(1)
        renumber = torch.full_like(used, -1, dtype=torch.long)
        renumber[rows] = torch.arange(len(rows), device=rows.device)
        return cls(index, rows, renumber)

    def take(self, tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` (one per trainable parameter) with the embedding's cut to the kept rows."""
        out = list(tensors)
        out[self.index] = out[self.index].detach()[self.rows]
        return out

    def batch(self, batch: Batch) -> Batch:
        """``batch`` with its input ids renumbered into the compact table."""
        inputs = dict(batch.inputs, input_ids=self.renumber[batch.inputs["input_ids"]])
        return Batch(batch.positions, batch.labels, inputs)


@dataclass
class EmbeddingOffset:
    """The word embedding E + D, where D is ``delta`` on the kept rows and zero elsewhere.

    A loss that embeds tokens itself (soft tokens) takes it from the engine instead of a
    whole shifted table: ``lookup`` and ``project`` give what E + D would, touching only the
    kept rows of D.

    Attributes:
        rows: the kept rows.
        delta: [kept, hidden] D on those rows.
    """

    rows: EmbeddingRows
    delta: Tensor

    def lookup(self, input_ids: Tensor, table: Tensor) -> Tensor:
        """[*ids, hidden] rows of E + D for ``input_ids``; ``table`` is E."""
        slots = self.rows.renumber[input_ids]
        padded = torch.cat([self.delta, self.delta.new_zeros(1, self.delta.shape[1])])
        return nn.functional.embedding(input_ids, table) + padded[slots]  # -1: the zero row

    def project(self, probs: Tensor, product: Tensor) -> Tensor:
        """[..., hidden] ``probs @ (E + D)``, given ``product`` = ``probs @ E``."""
        kept = probs[..., self.rows.rows].to(self.delta.dtype)
        return product + (kept @ self.delta).to(product.dtype)
