"""Text augmentation by a label-conditional masked LM, learned from the reward (SPEC §4).

Per step, ``max(⌊L/7⌋, 2)`` content tokens of each example are masked; one augmenter forward
gives a distribution over the vocabulary at each masked position, and Gumbel-softmax draws soft
tokens from it. The classifier embeds a soft token as ``probs @ E`` (E its word-embedding matrix)
through ``inputs_embeds``, so the validation loss of the lookahead reaches the augmenter.

- φ step (``learned`` only): the classifier's loss on K soft samples of the batch is the
  lookahead loss; the engine returns ∂L_val(θ')/∂φ for the augmenter's parameters; one Adam step.
- θ step: the classifier trains on the real batch plus one fresh soft sample per example from
  the (updated) augmenter.

With ``mlm_anchor`` λ > 0 the φ step descends L_val(θ') + λ·MLM, MLM being the augmenter's
cross-entropy of the original tokens at the masked positions of the same forward: a pull back
towards the data that keeps the reward from driving the augmenter into one token (README,
low-data augmentation). λ = 0 is the paper's method. The MLM loss is logged either way.

``fixed`` is the same augmenter never updated by the reward (the CBERT baseline of the paper).
"""

import torch
from torch import Tensor, nn
from torch.func import functional_call

from datamanip import distributed
from datamanip.augmenter import content_mask, label_segments, masked_lm_logits
from datamanip.embedding_rows import EmbeddingOffset
from datamanip.manipulations.base import (
    AugmentationState,
    Batch,
    Step,
    at_least_float32,
    twice_differentiable,
)


def masked_count(length: int) -> int:
    """Tokens masked in an example of ``length`` real tokens: max(⌊L/7⌋, 2) (SPEC §4)."""
    return max(length // 7, 2)


def choose_masks(
    input_ids: Tensor, attention_mask: Tensor, special_ids: list[int], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Rows and columns of the masked positions: ``masked_count`` content tokens per example
    (fewer when the example has fewer), drawn without replacement."""
    allowed = content_mask(input_ids, attention_mask, special_ids).cpu()
    lengths = attention_mask.sum(1).cpu()
    rows, cols = [], []
    for row in range(input_ids.shape[0]):
        where = allowed[row].nonzero().flatten()
        count = min(masked_count(int(lengths[row])), len(where))
        chosen = where[torch.randperm(len(where), generator=generator)[:count]].sort().values
        rows.append(torch.full((count,), row, dtype=torch.long))
        cols.append(chosen)
    return torch.cat(rows), torch.cat(cols)


def gumbel_softmax(
    logits: Tensor, tau: float, samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """[samples, *logits.shape] soft samples softmax((logits + g) / τ), g ~ Gumbel(0, 1)."""
    logits = at_least_float32(logits)
    uniform = torch.rand((samples, *logits.shape), generator=generator, dtype=logits.dtype)
    gumbel = -torch.log(-torch.log(uniform.to(logits.device).clamp(1e-10, 1.0 - 1e-7)))
    return torch.softmax((logits[None] + gumbel) / tau, dim=-1)


def input_embedding_name(model: nn.Module) -> str:
    """The parameter name of the classifier's word-embedding matrix."""
    weight = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if param is weight:
            return name
    raise ValueError("the classifier's input embeddings are not among its parameters")


def soft_embeddings(
    input_ids: Tensor,
    rows: Tensor,
    cols: Tensor,
    probs: Tensor,
    E: Tensor,
    offset: EmbeddingOffset | None = None,
    product: Tensor | None = None,
):
    """[K·batch, seq, hidden] word embeddings of K copies of the batch, where the masked
    positions (rows, cols) of copy k carry the soft token ``probs[k] @ E``; one-hot elsewhere.
    With ``offset`` the table is E + offset, and ``product`` is ``probs @ E``, computed once."""
    samples = probs.shape[0]
    if offset is None:
        hard = nn.functional.embedding(input_ids, E)  # [batch, seq, hidden]
        soft = probs.to(E.dtype) @ E  # [K, masked, hidden]
    else:
        hard, soft = offset.lookup(input_ids, E), offset.project(probs, product)
    out = hard.unsqueeze(0).repeat(samples, 1, 1, 1)  # [K, batch, seq, hidden]
    out[:, rows, cols] = soft.to(out.dtype)
    return out.flatten(0, 1)


class TextAugmentation(AugmentationState):
    """Augmentation by a label-conditional masked LM; ``learned`` trains it by the reward.

    Args:
        augmenter: the masked LM (segment table sized for the labels), fine-tuned beforehand.
        special_ids: token ids never masked ([CLS], [SEP], padding ...).
        learned: True for ``learned`` (φ step each step), False for ``fixed``.
        num_samples: K, soft samples of the batch in the lookahead (4 in the paper).
        tau: Gumbel-softmax temperature (1 in the paper).
        lr: Adam learning rate of the augmenter in the φ step.
        seed: fixes mask positions and Gumbel noise.
        mlm_anchor: λ, the coefficient of the augmenter's MLM loss beside the reward in the φ
            step.
    """

    def __init__(
        self,
        augmenter: nn.Module,
        special_ids: list[int],
        mask_id: int,
        learned: bool = True,
        num_samples: int = 4,
        tau: float = 1.0,
        lr: float = 4e-6,
        seed: int = 0,
        mlm_anchor: float = 0.0,
    ):
        super().__init__(augmenter, learned, num_samples, lr, seed)
        self.special_ids = list(special_ids)
        self.mask_id = mask_id
        self.tau = tau
        self.mlm_anchor = mlm_anchor
        self._anchor_grads: list[Tensor] | None = None

    # The lookahead loss embeds its tokens itself (inputs_embeds) and applies the engine's
    # offset of the word embedding (function_reward_gradients).
    embeds_tokens = True

    # --- sampling ------------------------------------------------------------------------

    def masked_logits(self, batch: Batch, generator: torch.Generator):
        """Masks the batch and runs the augmenter once; returns (rows, cols, [masked, vocab])."""
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        rows, cols = choose_masks(ids, mask, self.special_ids, generator)
        masked = ids.clone()
        masked[rows, cols] = self.mask_id
        rows, cols = rows.to(ids.device), cols.to(ids.device)
        logits = masked_lm_logits(
            self.augmenter,
            rows,
            cols,
            input_ids=masked,
            attention_mask=mask,
            token_type_ids=label_segments(mask, batch.labels),
        )
        return rows, cols, logits

    def classifier_loss(
        self, step: Step, rows, cols, probs, params=None, offset=None, product=None
    ) -> Tensor:
        """Mean cross-entropy of the classifier on the soft samples, at θ or at ``params``, with
        the word embedding moved by ``offset`` (``product``: ``probs @ E``, see
        :func:`soft_embeddings`)."""
        model, batch = step.model, step.batch
        samples = probs.shape[0]
        name = input_embedding_name(model)
        E = model.get_input_embeddings().weight if params is None else params[name]
        ids = batch.inputs["input_ids"]
        kwargs = {
            "inputs_embeds": soft_embeddings(ids, rows, cols, probs, E, offset, product),
            "attention_mask": batch.inputs["attention_mask"].repeat(samples, 1),
        }
        if params is None:
            logits = model(**kwargs).logits
        else:
            logits = functional_call(model, params, args=(), kwargs=kwargs).logits
        labels = batch.labels.repeat(samples)
        # This shard's share of the global batch's mean (SPEC §4's loss over K samples).
        losses = nn.functional.cross_entropy(at_least_float32(logits), labels, reduction="none")
        return losses.sum() / (samples * (step.total or len(batch.labels)))

    # --- the protocol --------------------------------------------------------------------

    def lookahead_function(self, step: Step):
        """The lookahead loss as a function of the classifier's parameters (None: θ itself),
        differentiable in the augmenter's parameters, and those parameters.

        The augmenter samples in eval mode (no dropout) here and in the θ step: the Gumbel
        noise is its randomness, and the φ step then learns the same sampler the θ step uses.
        """
        self.augmenter.eval()
        rows, cols, logits = self.masked_logits(step.batch, self.generator)
        self.anchor(step, rows, cols, logits)
        probs = gumbel_softmax(logits, self.tau, self.num_samples, self.generator)
        product = None

        def loss_at(params: dict[str, Tensor] | None = None, offset=None) -> Tensor:
            nonlocal product
            if offset is not None and product is None:
                # probs @ E at θ, once for the three forwards that move E by an offset; in
                # full precision, as the forwards at θ ± εu take their difference in it.
                E = step.model.get_input_embeddings().weight.detach()
                with torch.autocast(E.device.type, enabled=False):
                    product = probs.to(E.dtype) @ E  # [K, masked, hidden]
            return self.classifier_loss(step, rows, cols, probs, params, offset, product)

        return loss_at, self.phi

    def lookahead_loss(self, step: Step) -> tuple[Tensor, list[Tensor]]:
        """The same loss at θ, for the engine's exact double-backward path (tests use it as the
        reference of the fast path)."""
        loss_at, phi = self.lookahead_function(step)
        with twice_differentiable():
            return loss_at(None), phi

    def anchor(self, step: Step, rows: Tensor, cols: Tensor, logits: Tensor) -> None:
        """The augmenter's MLM loss at the masked positions: logged, and with λ > 0 its
        gradient kept for :meth:`reward_step` (taken now, while the augmenter's graph lives)."""
        originals = step.batch.inputs["input_ids"][rows, cols]
        losses = nn.functional.cross_entropy(at_least_float32(logits), originals, reduction="none")
        # This shard's share of the global batch's mean over masked positions: each example
        # counts by its own masked positions' mean, as the classifier's losses count by example.
        per_example = torch.zeros(len(step.batch.labels), dtype=losses.dtype, device=losses.device)
        per_example.index_add_(0, rows, losses)
        counts = torch.bincount(rows, minlength=len(per_example)).clamp(min=1)
        mlm = step.mean(per_example / counts)
        self._log["augmenter_mlm_loss"] = distributed.sum_scalar(mlm.item())
        self._anchor_grads = None
        if self.mlm_anchor > 0:
            self._anchor_grads = list(
                torch.autograd.grad(
                    mlm * self.mlm_anchor,
                    self.phi,
                    retain_graph=True,  # the reward's backward walks the same graph after
                    allow_unused=True,
                    materialize_grads=True,
                )
            )
            distributed.sum_(self._anchor_grads)

    def reward_step(self, step: Step, grads: list[Tensor]) -> None:
        if self._anchor_grads is not None:
            reward_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
            self._log["augmenter_reward_grad_norm"] = reward_norm
            grads = [g + a for g, a in zip(grads, self._anchor_grads)]
            self._anchor_grads = None
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
        for param, grad in zip(self.phi, grads):
            param.grad = grad.to(param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._log["augmenter_grad_norm"] = norm

    def train_loss(self, step: Step) -> Tensor:
        """Mean loss over the real batch and one fresh soft sample of each of its examples."""
        with torch.no_grad():
            self.augmenter.eval()
            rows, cols, logits = self.masked_logits(step.batch, self.generator)
            probs = gumbel_softmax(logits, self.tau, 1, self.generator)
        real = step.mean(step.example_losses())
        augmented = self.classifier_loss(step, rows, cols, probs)
        self._log["augmented_loss"] = distributed.sum_scalar(augmented.item())  # every shard's
        return (real + augmented) / 2

    def log_values(self) -> dict[str, float]:
        return dict(self._log)

    # --- what the run shows --------------------------------------------------------------

    @torch.no_grad()
    def rewrite(self, batch: Batch, seed: int, most_likely: bool = True):
        """Hard rewrites of ``batch``: at ``seed``'s masked positions, the most likely token
        (or, with ``most_likely=False``, one categorical sample). Returns (ids, rows, cols)."""
        was_training = self.augmenter.training
        self.augmenter.eval()
        generator = torch.Generator().manual_seed(seed)
        rows, cols, logits = self.masked_logits(batch, generator)
        if most_likely:
            tokens = logits.argmax(-1)
        else:
            tokens = gumbel_softmax(logits, 1.0, 1, generator)[0].argmax(-1)
        ids = batch.inputs["input_ids"].clone()
        ids[rows, cols] = tokens
        self.augmenter.train(was_training)
        return ids, rows, cols
