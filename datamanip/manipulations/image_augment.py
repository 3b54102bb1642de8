"""Image augmentation by learnable random transforms, learned from the reward.

The augmenter (:class:`datamanip.image_transforms.ImageAugmenter`) holds one magnitude and one
probability per transform; those are φ. Per step:

- φ step (``learned`` only): K augmented copies of the batch (fresh draws) are the lookahead
  loss; the engine's first-order path (:func:`datamanip.engine.function_reward_gradients`)
  returns ∂L_val(θ')/∂φ; one Adam step, then each magnitude is kept in [0, its largest].
- θ step: the classifier trains on the real batch plus one fresh augmented copy of it from the
  (updated) augmenter, as the text augmentation does (SPEC §4).

``fixed`` is the same augmenter at its initial settings, never updated.

The forwards of the lookahead run the model in train mode (batch statistics, as the real step
does) on copies of the batch-norm buffers, so that only the real step moves the running
statistics the validation forward and evaluation use.
"""

import logging

import torch
from torch import Tensor, nn
from torch.func import functional_call

from datamanip import distributed
from datamanip.image_transforms import Draws, ImageAugmenter, draw
from datamanip.manipulations.base import (
    AugmentationState,
    Batch,
    Step,
    at_least_float32,
    twice_differentiable,
)

logger = logging.getLogger(__name__)


class ImageAugmentation(AugmentationState):
    """Augmentation by learnable image transforms; ``learned`` trains them by the reward.

    Args:
        augmenter: the transforms with their initial magnitudes and probabilities.
        learned: True for ``learned`` (φ step each step), False for ``fixed``.
        num_samples: K, augmented copies of the batch in the lookahead.
        lr: Adam learning rate of the magnitudes and probability logits.
        seed: fixes the random draws.
    """

    def __init__(
        self,
        augmenter: ImageAugmenter,
        learned: bool = True,
        num_samples: int = 1,
        lr: float = 1e-2,
        seed: int = 0,
    ):
        super().__init__(augmenter, learned, num_samples, lr, seed)

    def augment(self, batch: Batch, copies: int, draws: Draws | None = None) -> Tensor:
        """[copies·batch, 3, H, W] augmented ``pixel_values``, differentiable in φ."""
        pixels = batch.inputs["pixel_values"].repeat(copies, 1, 1, 1)
        if draws is None:
            draws = draw(len(pixels), self.augmenter.names, self.generator)
        return self.augmenter(pixels, draws)

    def classifier_loss(self, step: Step, pixels: Tensor, params=None) -> Tensor:
        """Mean cross-entropy of the classifier on augmented images, at θ or at ``params``,
        with the batch-norm running statistics left as they were."""
        model = step.model
        copies = len(pixels) // len(step.batch.labels)
        state = dict(params) if params is not None else dict(model.named_parameters())
        state |= {name: b.clone() for name, b in model.named_buffers()}  # updated in place
        logits = functional_call(model, state, args=(), kwargs={"pixel_values": pixels}).logits
        labels = step.batch.labels.repeat(copies)
        # This shard's share of the global batch's mean (the mean itself with one process).
        losses = nn.functional.cross_entropy(at_least_float32(logits), labels, reduction="none")
        return losses.sum() / (copies * (step.total or len(step.batch.labels)))

    # --- the protocol --------------------------------------------------------------------

    def lookahead_function(self, step: Step):
        """The lookahead loss as a function of the classifier's parameters (None: θ itself),
        differentiable in the magnitudes and probabilities, and those parameters."""
        pixels = self.augment(step.batch, self.num_samples)

        def loss_at(params: dict[str, Tensor] | None = None) -> Tensor:
            return self.classifier_loss(step, pixels, params)

        return loss_at, self.phi

    def lookahead_loss(self, step: Step) -> tuple[Tensor, list[Tensor]]:
        """The same loss at θ, for the engine's exact double-backward path (the reference the
        tests hold the fast path to)."""
        loss_at, phi = self.lookahead_function(step)
        with twice_differentiable():
            return loss_at(None), phi

    def reward_step(self, step: Step, grads: list[Tensor]) -> None:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        for param, grad in zip(self.phi, grads):
            param.grad = grad.to(param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.augmenter.project()
        self._log["augmenter_grad_norm"] = norm

    def train_loss(self, step: Step) -> Tensor:
        """Mean loss over the real batch and one fresh augmented copy of it."""
        with torch.no_grad():
            pixels = self.augment(step.batch, 1)
        real = step.mean(step.example_losses())
        logits = step.model(pixel_values=pixels).logits
        losses = nn.functional.cross_entropy(
            at_least_float32(logits), step.batch.labels, reduction="none"
        )
        augmented = step.mean(losses)
        self._log["augmented_loss"] = distributed.sum_scalar(augmented.item())  # every shard's
        return (real + augmented) / 2

    def log_values(self) -> dict[str, float]:
        return dict(self._log) | self.augmenter.settings()
