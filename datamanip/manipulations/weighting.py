"""Per-example weighting manipulations: learned weighting, Ren et al., class proportion, none.

SPEC §3. All four return a weighted mean of the per-example losses; they differ in where the
weights come from.
"""

import numpy as np
import torch
from torch import Tensor

from datamanip import distributed
from datamanip.manipulations.base import (
    Step,
    linear_normalise,
    mean_per_class,
    softmax_normalise,
)


class ExampleWeights:
    """What the three weighting manipulations share: a weight per training example."""

    def __init__(self, labels: Tensor, num_labels: int, weights: Tensor):
        self.labels = labels.cpu()
        self.num_labels = num_labels
        self.weights = weights

    def log_values(self) -> dict[str, float]:
        return mean_per_class(self.weights, self.labels, self.num_labels, "weight_mean")

    def example_weights(self) -> np.ndarray:
        return self.weights.numpy().copy()

    def set_weights(self, positions: Tensor, values: Tensor) -> None:
        """Sets the weights of this process's examples, then everyone's on every process, so
        that each example's weight lives in one place and all processes hold the same vector."""
        self.weights[positions] = values.float().cpu()
        if distributed.world_size() > 1:
            self.weights[distributed.gather(positions)] = distributed.gather(values.float().cpu())

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].clone()


class LearnedWeighting(ExampleWeights):
    """One weight per training example, learned from the reward over the whole run (Hu et al. 2019).

    The batch loss is Σ ŵ_i ℓ_i with ŵ the normalised weights of the batch. The weight gradient
    is SPEC §3's ∂L_val/∂w_i = ∇L_val(θ')ᵀ Δ_i, with Δ_i the optimiser's step of example i
    alone: the derivative with respect to the example's coefficient in the lookahead, passed
    to the raw weight as it is (the normalisation is not differentiated, as in the paper). The
    update is w_i ← max(w_i / w_decay − ∂L_val/∂w_i, 1e-5).

    ``w_init`` defaults to 0.01, not the paper's 1: the weight gradients of MiniLM on SST-2 are
    about 1e-3 to 1e-2, so weights starting at 1 need two to three visits (epochs) of division
    by ``w_decay`` before the gradient moves them, and in a 5-epoch run the classifier has
    learnt to predict the majority class by then (README, Results).

    Args:
        labels: [num_train] class of every training example (for the per-class log).
        num_labels: number of classes.
        w_init: initial weight (1 in the paper).
        w_decay: divisor on the old weight at each update (5 for SST-2 at 20 and 50 : 1000).
        norm: ``"linear"`` or ``"softmax"`` normalisation within the batch.
        temperature: softmax temperature T (1 for text, 10 for CIFAR low-data).
    """

    name = "weighting"
    uses_reward = True
    floor = 1e-5

    def __init__(
        self,
        labels: Tensor,
        num_labels: int,
        w_init: float = 0.01,
        w_decay: float = 5.0,
        norm: str = "linear",
        temperature: float = 1.0,
    ):
        if norm not in ("linear", "softmax"):
            raise ValueError(f"norm must be 'linear' or 'softmax', not {norm!r}")
        super().__init__(labels, num_labels, torch.full((len(labels),), float(w_init)))
        self.w_decay, self.norm, self.temperature = w_decay, norm, temperature
        self._last_grad = 0.0

    def normalised(self, positions: Tensor, w: Tensor | None = None) -> Tensor:
        w = self.weights[positions] if w is None else w
        if self.norm == "softmax":
            return softmax_normalise(w, self.temperature)
        return linear_normalise(w)

    def lookahead_weights(self, step: Step) -> tuple[Tensor, list[Tensor]]:
        device = step.example_losses().device
        w = self.weights[step.batch.positions].to(device).requires_grad_()
        w_hat = self.normalised(step.batch.positions).to(device)
        # Value ŵ, gradient straight to w: ∂L_val/∂w_i is the coefficient's derivative (SPEC §3).
        return w_hat + (w - w.detach()), [w]

    def reward_step(self, step: Step, grads: list[Tensor]) -> None:
        grad = grads[0].detach().float().cpu()
        positions = step.batch.positions
        updated = self.weights[positions] / self.w_decay - grad
        self.set_weights(positions, updated.clamp(min=self.floor))
        self._last_grad = grad.abs().mean().item()

    def train_loss(self, step: Step) -> Tensor:
        losses = step.example_losses()
        return (self.normalised(step.batch.positions).to(losses.device) * losses).sum()

    def log_values(self) -> dict[str, float]:
        values = super().log_values()
        values["weight_grad_abs"] = self._last_grad
        return values


class RenWeighting(ExampleWeights):
    """Ren et al. 2018: weights re-derived from zero at each step, ŵ ∝ max(−∂L_val/∂ε_i, 0).

    Ren et al. expand the lookahead around ε = 0. Under Adam that point has no preconditioner at
    the first step (v = 0, so the step divides by Adam's ε), so the expansion is taken around the
    plain step (ε_i = 1/batch) instead: the derivative is the same inner product
    ∇L_val(θ')ᵀ P ∇ℓ_i, with ∇L_val evaluated one plain step later. The weights are linearly
    normalised; a batch whose weights are all zero has zero loss, so its optimiser step
    carries only momentum and weight decay.
    """

    name = "ren"
    uses_reward = True

    def __init__(self, labels: Tensor, num_labels: int):
        # The weight each example got when it was last seen.
        super().__init__(labels, num_labels, torch.zeros(len(labels)))
        self._batch_weights: Tensor | None = None
        self._weighted_step: Step | None = None

    def lookahead_weights(self, step: Step) -> tuple[Tensor, list[Tensor]]:
        losses = step.example_losses()
        eps = torch.full_like(losses, 1.0 / step.total).detach().requires_grad_()
        return eps, [eps]

    def reward_step(self, step: Step, grads: list[Tensor]) -> None:
        self._batch_weights = linear_normalise(-grads[0].detach().float())
        self._weighted_step = step
        self.set_weights(step.batch.positions, self._batch_weights)

    def train_loss(self, step: Step) -> Tensor:
        losses = step.example_losses()
        # Ren's weights belong to the batch they were derived on: a step without a reward step
        # (--reward-every k) trains plainly rather than on another batch's weights.
        if self._weighted_step is not step:
            return step.mean(losses)
        return (self._batch_weights.to(losses.device) * losses).sum()


class ProportionWeighting(ExampleWeights):
    """Inverse class frequency: every example of class k weighs 1 / n_k, normalised in the batch."""

    name = "proportion"
    uses_reward = False

    def __init__(self, labels: Tensor, num_labels: int):
        counts = torch.bincount(labels.cpu(), minlength=num_labels).float()
        super().__init__(labels, num_labels, (1.0 / counts.clamp(min=1))[labels.cpu()])

    def train_loss(self, step: Step) -> Tensor:
        losses = step.example_losses()
        w_hat = linear_normalise(self.weights[step.batch.positions])
        return (w_hat.to(losses.device) * losses).sum()


class NoManipulation:
    """Plain training: the mean loss of the batch."""

    name = "none"
    uses_reward = False

    def __init__(self, labels: Tensor, num_labels: int):
        self.num_examples = len(labels)

    def train_loss(self, step: Step) -> Tensor:
        return step.mean(step.example_losses())

    def log_values(self) -> dict[str, float]:
        return {}

    def example_weights(self) -> np.ndarray:
        return np.ones(self.num_examples, dtype=np.float32)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


WEIGHTING_METHODS = {
    "weighting": LearnedWeighting,
    "ren": RenWeighting,
    "proportion": ProportionWeighting,
    "none": NoManipulation,
}
