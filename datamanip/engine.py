"""The training loop: lookahead, reward, the φ step and the θ step (SPEC §2).

The loop knows nothing about weights or augmenters. It asks the manipulation for the loss to
look ahead on (:meth:`Manipulation.lookahead_loss`), computes the reward gradient
∂L_val(θ')/∂φ with :func:`reward_gradients`, hands it back (:meth:`Manipulation.reward_step`),
and takes the real optimiser step on :meth:`Manipulation.train_loss`.
"""

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from datamanip.errors import DatamanipError
from datamanip.lookahead import lookahead
from datamanip.manipulations.base import (
    Batch,
    Manipulation,
    Step,
    at_least_float32,
    capture_rng,
    restore_rng,
)

logger = logging.getLogger(__name__)


def trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def scratch_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the model's buffers, for the extra forwards of the reward gradient.

    BatchNorm moves its running statistics in place on every forward in train mode, and the
    real step's backward needs them unchanged (autograd saved them). The forwards at θ ± εu,
    or on augmented examples, run on these copies instead, so the statistics move only with the
    real training step and a run's statistics do not depend on the manipulation.
    """
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def validation_gradient(
    model: nn.Module, params: dict[str, Tensor], val: list[Batch], autocast, chunk: int = 10
):
    """Mean validation cross-entropy at ``params`` and its gradient, model in eval mode.

    The reward is scored without dropout, so that it measures the looked-ahead model, not a
    random sub-network of it. The validation set goes through in chunks of ``chunk`` examples,
    so that its activations stay small beside the training batch's (the gradient is the same).
    """
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    was_training = model.training
    model.eval()
    total = sum(len(b.labels) for b in val)
    loss_sum, grads = 0.0, None
    try:
        for batch in val:
            for rows in torch.arange(len(batch.labels)).split(chunk):
                inputs = {k: v[rows] for k, v in batch.inputs.items()}
                with autocast():
                    logits = functional_call(model, leaves, args=(), kwargs=inputs).logits
                loss = (
                    nn.functional.cross_entropy(
                        at_least_float32(logits), batch.labels[rows], reduction="sum"
                    )
                    / total
                )
                parts = torch.autograd.grad(
                    loss, list(leaves.values()), allow_unused=True, materialize_grads=True
                )
                grads = list(parts) if grads is None else [g.add_(p) for g, p in zip(grads, parts)]
                loss_sum += loss.item()
    finally:
        model.train(was_training)
    return loss_sum, grads


def reward_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    phi: list[Tensor],
    val: list[Batch],
    autocast=None,
) -> tuple[list[Tensor], float]:
    """∂L_val(θ')/∂φ, where θ' is the optimiser's lookahead step on ``loss`` (SPEC §2).

    Batched: one backward with ``create_graph`` gives the batch gradient g(φ) as a function of
    φ; after the validation gradient ∇L_val(θ') is known, one more backward of the scalar
    ⟨g(φ), P ∇L_val(θ')⟩ gives the reward gradient of all of φ at once (for weighting: all
    per-example weight gradients, with no loop over examples). P is the optimiser's
    preconditioner ∂Δ/∂g (:func:`datamanip.lookahead.lookahead`): exact for SGD, with Adam's
    second moment held fixed during the step for Adam.

    Args:
        model: the unwrapped model at θ (train mode; its forward built ``loss``).
        optimizer: the real optimiser; its state is read, not changed.
        loss: the manipulated training loss at θ, differentiable in ``phi``.
        phi: the tensors the reward gradient is wanted for.
        val: the validation batches.

    Returns:
        ``(grads, val_loss)``: ∂L_val(θ')/∂φ for each tensor of ``phi``, and L_val(θ').
    """
    autocast = autocast or nullcontext
    names, params = trainable(model)
    grads = torch.autograd.grad(
        loss, params, create_graph=True, allow_unused=True, materialize_grads=True
    )
    new_params, precond = lookahead(optimizer, params, [g.detach() for g in grads])
    val_loss, val_grads = validation_gradient(model, dict(zip(names, new_params)), val, autocast)

    inner = sum(
        (g * (p * v)).sum() for g, p, v in zip(grads, precond, val_grads) if g.requires_grad
    )
    phi_grads = torch.autograd.grad(
        inner, phi, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    return list(phi_grads), val_loss


def example_reward_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Step,
    coeffs: Tensor,
    phi: list[Tensor],
    val: list[Batch],
    autocast=None,
) -> tuple[list[Tensor], float]:
    """∂L_val(θ')/∂φ when the lookahead loss is Σ_i c_i(φ) ℓ_i: the fast path of weighting.

    By the chain rule ∂L_val(θ')/∂c_i = ∇L_val(θ')ᵀ P ∇ℓ_i = d_i, the derivative of the
    example's loss ℓ_i along the direction u = P ∇L_val(θ'). All d_i of the batch come from two
    extra forwards without a graph, at θ ± εu (a central difference, with the dropout masks of
    the training forward replayed): no loop over examples, no second-order graph, so the step
    holds little more memory than a plain one. ``example_reward_gradients`` agrees with the
    exact double-backward :func:`reward_gradients` to the central difference's error, measured
    in ``tests/test_weight_gradients.py``. The backward through c(φ) (the normalisation of the
    weights) is exact.

    Args:
        model: the unwrapped model at θ, in train mode.
        optimizer: the real optimiser; its state is read, not changed.
        step: the step, whose ``example_losses()`` are the ℓ_i at θ (graph kept for the θ step).
        coeffs: [batch] c(φ), differentiable in ``phi``.
        phi: the tensors the reward gradient is wanted for.
        val: the validation batches.

    Returns:
        ``(grads, val_loss)`` as :func:`reward_gradients` returns them.
    """
    autocast = autocast or nullcontext
    names, params = trainable(model)
    losses = step.example_losses()
    grads = torch.autograd.grad(
        (coeffs.detach() * losses).sum(),
        params,
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )
    # Hold θ' and P (in the gradients' buffers) through the validation pass; then only u.
    new_params, precond = lookahead(optimizer, params, grads, precond_into_grads=True)
    del grads
    val_loss, directions = validation_gradient(model, dict(zip(names, new_params)), val, autocast)
    del new_params
    for u, p in zip(directions, precond):
        u.mul_(p)  # u = P ∇L_val(θ'), in place of the validation gradient
    del precond

    d = directional_derivatives(model, step, names, params, directions)
    phi_grads = torch.autograd.grad(
        (coeffs * d.to(coeffs.dtype)).sum(), phi, allow_unused=True, materialize_grads=True
    )
    return list(phi_grads), val_loss


def function_reward_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_at,
    phi: list[Tensor],
    val: list[Batch],
    autocast=None,
) -> tuple[list[Tensor], float]:
    """∂L_val(θ')/∂φ when the manipulation gives its lookahead loss as a function of θ: the
    fast path of augmentation.

    With g(θ, φ) = ∇_θ L(θ, φ) and u = P ∇L_val(θ'), the reward gradient is
    ∂/∂φ ⟨g(θ, φ), u⟩ (P held fixed, as in :func:`reward_gradients`), and ⟨g, u⟩ is the
    derivative of L along u. A central difference turns it into first-order work only:
    ∂L_val/∂φ ≈ ∇_φ [L(θ + εu, φ) − L(θ − εu, φ)] / 2ε, two forwards and two backwards into φ,
    with no double backward and no second-order graph. The forwards replay the dropout masks
    of the forward at θ. Measured against the exact :func:`reward_gradients` in
    ``tests/test_augment.py``.

    Args:
        loss_at: ``loss_at(params)`` is the manipulated training loss with the model's
            trainable parameters replaced by ``params`` (None: θ), differentiable in ``phi``.
        phi, val, autocast: as for :func:`reward_gradients`.
    """
    autocast = autocast or nullcontext
    names, params = trainable(model)
    rng = capture_rng()
    with restore_rng(rng), autocast():
        # θ itself, with copies of the buffers: see scratch_buffers.
        loss = loss_at(dict(zip(names, params)) | scratch_buffers(model))
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    del loss
    new_params, precond = lookahead(optimizer, params, grads, precond_into_grads=True)
    del grads
    val_loss, directions = validation_gradient(model, dict(zip(names, new_params)), val, autocast)
    del new_params
    for u, p in zip(directions, precond):
        u.mul_(p)
    del precond
    eps = difference_scale(params, directions)
    if eps == 0.0:
        return [torch.zeros_like(p) for p in phi], val_loss
    phi_grads = None
    for sign in (1.0, -1.0):
        shifted = {n: p.detach() + (sign * eps) * u for n, p, u in zip(names, params, directions)}
        with restore_rng(rng), autocast():
            shifted_loss = loss_at(shifted | scratch_buffers(model))
        parts = torch.autograd.grad(
            shifted_loss * (sign / (2 * eps)),
            phi,
            retain_graph=sign > 0,  # the augmenter's graph serves both differences
            allow_unused=True,
            materialize_grads=True,
        )
        del shifted, shifted_loss
        phi_grads = (
            list(parts) if phi_grads is None else [a.add_(b) for a, b in zip(phi_grads, parts)]
        )
    return phi_grads, val_loss


def difference_scale(params: list[Tensor], directions: list[Tensor]) -> float:
    """ε with ‖εu‖ = r ‖θ‖, r = 0.06 · machine-eps^(1/3) (3e-4 in float32): a central
    difference's truncation error grows as ε² and its rounding error as 1/ε. On the tiny test
    BERT in float32, r = 1e-2 / 3e-3 / 1e-3 / 3e-4 / 1e-4 gave max errors 1e-1 / 1e-2 / 1.2e-3 /
    7e-4 / 1.3e-3 of the largest weight gradient under AdamW (one-sided differences: 5e-3 at
    best, which is why the central one is used)."""
    r = 0.06 * torch.finfo(params[0].dtype).eps ** (1 / 3)
    theta = sum(torch.linalg.vector_norm(p.detach()).item() ** 2 for p in params) ** 0.5
    u = sum(torch.linalg.vector_norm(d).item() ** 2 for d in directions) ** 0.5
    return r * theta / u if u > 0 else 0.0


@torch.no_grad()
def directional_derivatives(
    model: nn.Module, step: Step, names: list[str], params: list[Tensor], directions: list[Tensor]
) -> Tensor:
    """[batch] d_i = ∇ℓ_i(θ)ᵀ u by a central difference over two graph-free forwards."""
    eps = difference_scale(params, directions)
    if eps == 0.0:
        return torch.zeros_like(step.example_losses())
    shifted_losses = []
    for sign in (1.0, -1.0):
        shifted = {n: p.detach() + (sign * eps) * u for n, p, u in zip(names, params, directions)}
        shifted |= scratch_buffers(model)
        with restore_rng(step.rng_state):  # the same dropout masks as the training forward
            logits = functional_call(model, shifted, args=(), kwargs=step.batch.inputs).logits
        del shifted
        labels = step.batch.labels
        shifted_losses.append(
            nn.functional.cross_entropy(at_least_float32(logits).double(), labels, reduction="none")
        )
    return (shifted_losses[0] - shifted_losses[1]) / (2 * eps)


@dataclass
class TrainConfig:
    """Training settings the loop needs (the CLI and recipes resolve them; SPEC §5)."""

    epochs: int = 5
    batch_size: int = 25
    warmup_epochs: int = 0
    seed: int = 0
    log_every: int = 10


@dataclass
class TrainResult:
    best_epoch: int
    best_val_accuracy: float
    best_state: dict
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


def epoch_order(num_examples: int, seed: int, epoch: int) -> Tensor:
    """The training order of one epoch, fixed by the training seed and the epoch alone."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    manipulation: Manipulation,
    train_data,
    val_data,
    config: TrainConfig,
    accelerator,
    metrics=None,
    progress=None,
    on_epoch_end=None,
) -> TrainResult:
    """Trains ``model`` with ``manipulation``; returns the best-validation-accuracy state.

    Args:
        model, optimizer: as returned by ``accelerator.prepare``.
        manipulation: the manipulation (see :mod:`datamanip.manipulations.base`).
        train_data, val_data: encoded splits with ``batch(positions)`` and ``labels``.
        config: epochs, batch size, warm-up epochs (plain training before the manipulation
            starts), training seed and log interval.
        accelerator: the run's ``accelerate.Accelerator``.
        metrics: callable taking one dict per log line (the run directory's metrics.jsonl).
        progress: optional front end with ``start``, ``step``, ``epoch_end`` and ``close``.
        on_epoch_end: optional callable taking the epoch number, called after its validation
            (the run writes the augmenter's samples there).
    """
    device = accelerator.device
    inner_model = accelerator.unwrap_model(model)
    val_batches = [val_data.batch(p).to(device) for p in _chunks(len(val_data), 64)]
    steps_per_epoch = -(-len(train_data) // config.batch_size)
    metrics = metrics or (lambda record: None)
    if progress:
        progress.start(config.epochs, steps_per_epoch)

    start = time.perf_counter()
    best = TrainResult(best_epoch=-1, best_val_accuracy=-1.0, best_state={})
    best_val_loss = float("inf")
    global_step = 0
    for epoch in range(config.epochs):
        active = manipulation.uses_reward and epoch >= config.warmup_epochs
        order = epoch_order(len(train_data), config.seed, epoch)
        epoch_start, seen, loss_sum = time.perf_counter(), 0, 0.0
        model.train()
        for step_in_epoch, positions in enumerate(order.split(config.batch_size)):
            batch = train_data.batch(positions).to(device)
            loss, reward_loss = take_step(
                inner_model, optimizer, manipulation, batch, val_batches, active, accelerator
            )
            if not math.isfinite(loss):
                raise DatamanipError(
                    f"the training loss became {loss} at epoch {epoch}, step {step_in_epoch + 1}; "
                    "lower --lr or use --mixed-precision no"
                )
            global_step += 1
            seen += len(positions)
            loss_sum += loss * len(positions)
            if progress:
                progress.step(epoch, step_in_epoch + 1, loss)
            if global_step % config.log_every == 0:
                record = {
                    "kind": "step",
                    "epoch": epoch,
                    "step": global_step,
                    "loss": loss_sum / seen,
                    "examples_per_s": seen / (time.perf_counter() - epoch_start),
                }
                if reward_loss is not None:
                    record["reward_loss"] = reward_loss
                metrics(record | manipulation.log_values())

        val_acc, val_loss = accuracy_and_loss(inner_model, val_batches)
        record = {
            "kind": "epoch",
            "epoch": epoch,
            "step": global_step,
            "loss": loss_sum / seen,
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            "manipulated": active,
            "examples_per_s": seen / (time.perf_counter() - epoch_start),
        }
        metrics(record | manipulation.log_values())
        best.history.append(record)
        logger.info("epoch %d: loss %.4f, val accuracy %.4f", epoch, record["loss"], val_acc)
        if progress:
            progress.epoch_end(epoch, val_acc)
        if on_epoch_end:
            on_epoch_end(epoch)
        # Warm-up epochs of a reward-learning manipulation are plain training: they do not count
        # as the manipulation's best epoch (as in the reference code).
        counts = active or not manipulation.uses_reward
        if counts and (
            val_acc > best.best_val_accuracy
            or (val_acc == best.best_val_accuracy and val_loss < best_val_loss)
        ):
            best.best_epoch, best.best_val_accuracy, best_val_loss = epoch, val_acc, val_loss
            best.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in inner_model.state_dict().items()
            }
    if progress:
        progress.close()
    best.wall_time_s = time.perf_counter() - start
    return best


def take_step(
    model: nn.Module,
    optimizer,
    manipulation: Manipulation,
    batch: Batch,
    val_batches: list[Batch],
    active: bool,
    accelerator,
) -> tuple[float, float | None]:
    """One training step: the φ step when ``active``, then the θ step.

    Returns the batch's mean training loss at θ and the reward loss L_val(θ') (None when the
    manipulation was not active).
    """
    weights_path = hasattr(manipulation, "lookahead_weights")
    function_path = hasattr(manipulation, "lookahead_function")
    step = Step(batch, model, twice_differentiable=active and not (weights_path or function_path))
    with accelerator.autocast():
        losses = step.example_losses()

    # φ step: lookahead on the manipulated batch, reward on the validation set.
    reward_loss = None
    if active and weights_path:
        coeffs, phi = manipulation.lookahead_weights(step)
        phi_grads, reward_loss = example_reward_gradients(
            model, optimizer, step, coeffs, phi, val_batches, accelerator.autocast
        )
        manipulation.reward_step(step, phi_grads)
    elif active and function_path:
        loss_at, phi = manipulation.lookahead_function(step)
        phi_grads, reward_loss = function_reward_gradients(
            model, optimizer, loss_at, phi, val_batches, accelerator.autocast
        )
        manipulation.reward_step(step, phi_grads)
    elif active:
        lookahead_loss, phi = manipulation.lookahead_loss(step)
        phi_grads, reward_loss = reward_gradients(
            model, optimizer, lookahead_loss, phi, val_batches, accelerator.autocast
        )
        manipulation.reward_step(step, phi_grads)

    # θ step: the real optimiser step on the batch with the updated φ; warm-up epochs of a
    # reward-learning manipulation train plainly.
    plain = manipulation.uses_reward and not active
    loss = losses.mean() if plain else manipulation.train_loss(step)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return losses.detach().mean().item(), reward_loss


def _chunks(n: int, size: int) -> list[Tensor]:
    return list(torch.arange(n).split(size))


@torch.no_grad()
def predict(model: nn.Module, data, device, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and per-example losses over ``data``, in its order (eval mode)."""
    was_training = model.training
    model.eval()
    order = torch.as_tensor(np.argsort(data.lengths(), kind="stable"))  # similar lengths batch well
    preds = torch.empty(len(data), dtype=torch.long)
    losses = torch.empty(len(data))
    for positions in order.split(batch_size):
        batch = data.batch(positions).to(device)
        logits = at_least_float32(model(**batch.inputs).logits)
        preds[positions] = logits.argmax(-1).cpu()
        losses[positions] = nn.functional.cross_entropy(
            logits, batch.labels, reduction="none"
        ).cpu()
    model.train(was_training)
    return preds.numpy(), losses.numpy()


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, batches: list[Batch]) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    correct, loss, total = 0, 0.0, 0
    for batch in batches:
        logits = at_least_float32(model(**batch.inputs).logits)
        correct += (logits.argmax(-1) == batch.labels).sum().item()
        loss += nn.functional.cross_entropy(logits, batch.labels, reduction="sum").item()
        total += len(batch.labels)
    model.train(was_training)
    return correct / total, loss / total
