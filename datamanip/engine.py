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

from datamanip import distributed
from datamanip.embedding_rows import EmbeddingOffset, EmbeddingRows
from datamanip.errors import DatamanipError
from datamanip.lookahead import lookahead
from datamanip.manipulations.base import (
    Batch,
    DropoutMasks,
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
    so that its activations stay small beside the training batch's (the gradient is the same);
    each chunk's backward adds into the leaves' ``.grad`` one parameter at a time, so no second
    full-size gradient is ever held. With several processes each holds a shard of the
    validation set; the loss and gradient are summed over them (:mod:`datamanip.distributed`),
    so every process gets the whole set's.
    """
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    was_training = model.training
    model.eval()
    total = int(distributed.sum_scalar(sum(len(b.labels) for b in val)))
    loss_sum = 0.0
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
                loss.backward()
                loss_sum += loss.item()
    finally:
        model.train(was_training)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves.values()]
    return distributed.sum_scalar(loss_sum), distributed.sum_(grads)


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
    batch_grads = distributed.sum_([g.detach().clone() for g in grads])
    new_params, precond = lookahead(optimizer, params, batch_grads)
    val_loss, val_grads = validation_gradient(model, dict(zip(names, new_params)), val, autocast)

    inner = sum(
        (g * (p * v)).sum() for g, p, v in zip(grads, precond, val_grads) if g.requires_grad
    )
    phi_grads = torch.autograd.grad(
        inner, phi, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    # φ is shared by the processes here (one tensor, each process's examples add to it).
    return distributed.sum_(list(phi_grads)), val_loss


def example_reward_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Step,
    coeffs: Tensor,
    phi: list[Tensor],
    val: list[Batch],
    autocast=None,
    compact_embedding: bool = True,
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
        compact_embedding: False holds the whole word embedding (the reference the compact
            one is tested against).

    Returns:
        ``(grads, val_loss)`` as :func:`reward_gradients` returns them.
    """
    autocast = autocast or nullcontext
    names, params = trainable(model)
    losses = step.example_losses()
    grads = list(
        torch.autograd.grad(
            (coeffs.detach() * losses).sum(),
            params,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    )
    distributed.sum_(grads)  # Σ_i c_i ∇ℓ_i over the global batch
    # The word embedding only on the rows the batch and the validation set look up.
    rows = EmbeddingRows.of(model, params, [step.batch, *val]) if compact_embedding else None
    inputs, at = step.batch.inputs, params
    if rows is not None:
        grads, at = rows.take(grads), rows.take(params)
        val, inputs = [rows.batch(b) for b in val], rows.batch(step.batch).inputs
    val_loss, directions = lookahead_direction(
        model, optimizer, names, params, grads, val, autocast, rows
    )

    eps = difference_scale(params, directions)  # the scale of all of θ, not of the kept rows
    d = directional_derivatives(model, step, names, at, directions, eps, inputs)
    # Each process's φ are its own examples' coefficients: nothing to reduce.
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
    embeds_tokens: bool = False,
) -> tuple[list[Tensor], float]:
    """∂L_val(θ')/∂φ when the manipulation gives its lookahead loss as a function of θ: the
    fast path of augmentation.

    With g(θ, φ) = ∇_θ L(θ, φ) and u = P ∇L_val(θ'), the reward gradient is
    ∂/∂φ ⟨g(θ, φ), u⟩ (P held fixed, as in :func:`reward_gradients`), and ⟨g, u⟩ is the
    derivative of L along u. A central difference turns it into first-order work only:
    ∂L_val/∂φ ≈ ∇_φ [L(θ + εu, φ) − L(θ − εu, φ)] / 2ε, two forwards and one backward into φ,
    with no double backward and no second-order graph. The forwards replay the dropout masks
    of the forward at θ. Measured against the exact :func:`reward_gradients` in
    ``tests/test_augment.py``.

    Args:
        loss_at: ``loss_at(params, offset)`` is the manipulation's training loss with the
            model's trainable parameters replaced by ``params`` (None: θ), differentiable in
            ``phi``; ``offset`` is None or an :class:`EmbeddingOffset` to add to the word
            embedding.
        phi, val, autocast: as for :func:`reward_gradients`.
        embeds_tokens: the loss embeds its tokens itself from the word embedding and applies
            ``offset``. The word embedding's lookahead then runs on the rows the validation
            set reads alone, and the shifted points move them through ``offset``
            (:mod:`datamanip.embedding_rows`); the result is the same.
    """
    autocast = autocast or nullcontext
    ahead = function_lookahead(model, optimizer, loss_at, val, autocast, embeds_tokens)
    names, params, rows, directions = ahead.names, ahead.params, ahead.rows, ahead.directions
    eps = difference_scale(params, directions)
    if eps == 0.0:
        return [torch.zeros_like(p) for p in phi], ahead.val_loss
    table_index = rows.index if rows is not None else -1
    difference, offset = 0.0, None
    for sign in (1.0, -1.0):
        shifted = {
            n: p.detach() if k == table_index else p.detach() + (sign * eps) * u
            for k, (n, p, u) in enumerate(zip(names, params, directions))
        }
        if rows is not None:  # the table stays at θ; its kept rows move through the offset
            offset = EmbeddingOffset(rows, (sign * eps) * directions[rows.index])
        # No autocast: the two losses differ by about 3e-4 of their size (the shift), below
        # bf16's resolution (8e-3), so the difference is taken in float32.
        with restore_rng(ahead.rng), ahead.masks.replay():  # the forward at θ's dropout masks
            loss = _loss_at(loss_at, shifted | scratch_buffers(model), offset)
        difference = difference + loss * (sign / (2 * eps))
        del shifted, loss
    # One backward for both points: the augmenter's part of the graph is walked once.
    phi_grads = torch.autograd.grad(difference, phi, allow_unused=True, materialize_grads=True)
    return distributed.sum_(phi_grads), ahead.val_loss  # φ (the augmenter) is shared


@dataclass
class FunctionLookahead:
    """What :func:`function_lookahead` leaves for the difference at θ ± εu: the trainable
    parameters, the rows of the word embedding kept (None: all), the random state and dropout
    masks of the forward at θ, L_val(θ') and u."""

    names: list[str]
    params: list[Tensor]
    rows: EmbeddingRows | None
    rng: dict
    masks: DropoutMasks
    val_loss: float
    directions: list[Tensor]


def function_lookahead(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_at,
    val: list[Batch],
    autocast,
    embeds_tokens: bool = False,
) -> FunctionLookahead:
    """The lookahead of :func:`function_reward_gradients`: the manipulation's loss at θ, its
    gradient, θ' and the direction u (arguments as there)."""
    names, params = trainable(model)
    rows = EmbeddingRows.of(model, params, val) if embeds_tokens else None
    at_theta = dict(zip(names, params)) | scratch_buffers(model)  # buffers: see scratch_buffers
    offset = wrt = None
    if rows is not None:  # the table's gradient, on the kept rows, is the offset's at zero
        table = params[rows.index]
        delta = table.new_zeros(len(rows.rows), table.shape[1], requires_grad=True)
        offset = EmbeddingOffset(rows, delta)
        at_theta[names[rows.index]] = table.detach()
        wrt = params[: rows.index] + [delta] + params[rows.index + 1 :]
        val = [rows.batch(b) for b in val]
    rng, masks = capture_rng(), DropoutMasks()
    with restore_rng(rng), autocast(), masks:
        loss = _loss_at(loss_at, at_theta, offset)
    grads = list(
        torch.autograd.grad(loss, wrt or params, allow_unused=True, materialize_grads=True)
    )
    del loss
    distributed.sum_(grads)
    val_loss, directions = lookahead_direction(
        model, optimizer, names, params, grads, val, autocast, rows
    )
    return FunctionLookahead(names, params, rows, rng, masks, val_loss, directions)


def _loss_at(loss_at, params: dict[str, Tensor], offset: EmbeddingOffset | None) -> Tensor:
    """``loss_at(params)``, with the offset only where there is one: a manipulation without
    ``embeds_tokens`` may define ``loss_at(params)`` alone, as the protocol first had it."""
    return loss_at(params) if offset is None else loss_at(params, offset)


def lookahead_direction(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    params: list[Tensor],
    grads: list[Tensor],
    val: list[Batch],
    autocast,
    rows: EmbeddingRows | None = None,
) -> tuple[float, list[Tensor]]:
    """L_val(θ') and the direction u = P ∇L_val(θ') of the first-order reward paths.

    θ' and P come from :func:`lookahead` on the batch gradient ``grads`` (whose buffers then
    hold P; the list is emptied, so no gradient outlives this), ∇L_val(θ') from
    :func:`validation_gradient`; u is written in place of the validation gradient, so θ', P
    and u are never all held at once. With ``rows``, the word embedding's entries of ``grads``
    and of the result hold its kept rows.
    """
    new_params, precond = lookahead(
        optimizer,
        params,
        grads,
        precond_into_grads=True,
        rows={rows.index: rows.rows} if rows is not None else None,
    )
    grads.clear()  # the caller's references too: only P keeps a buffer through validation
    val_loss, directions = validation_gradient(model, dict(zip(names, new_params)), val, autocast)
    del new_params
    for u, p in zip(directions, precond):
        u.mul_(p)
    return val_loss, directions


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
    model: nn.Module,
    step: Step,
    names: list[str],
    params: list[Tensor],
    directions: list[Tensor],
    eps: float,
    inputs: dict[str, Tensor],
) -> Tensor:
    """[batch] d_i = ∇ℓ_i(θ)ᵀ u by a central difference over two graph-free forwards at
    θ ± εu on ``inputs`` (the step's batch, its ids renumbered where ``params`` holds a
    compact word embedding)."""
    if eps == 0.0:
        return torch.zeros_like(step.example_losses())
    # One buffer serves both points: θ + εu, then moved in place to θ − εu.
    shifted = [torch.add(p.detach(), u, alpha=eps) for p, u in zip(params, directions)]
    shifted_losses = []
    for sign in (1.0, -1.0):
        if sign < 0:
            torch._foreach_add_(shifted, directions, alpha=-2 * eps)
        masks = step.masks.replay() if step.masks else nullcontext()
        with restore_rng(step.rng_state), masks:  # the training forward's dropout masks
            at = dict(zip(names, shifted)) | scratch_buffers(model)
            logits = functional_call(model, at, args=(), kwargs=inputs).logits
        shifted_losses.append(
            nn.functional.cross_entropy(
                at_least_float32(logits).double(), step.batch.labels, reduction="none"
            )
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
    # Budget knobs (README, "Cost"): a reward step every k-th manipulated step; a random subset of
    # this many validation examples per reward step (None: all, as the paper); the manipulation
    # only during this fraction of all training steps, plain training after.
    reward_every: int = 1
    val_batch_size: int | None = None
    manipulate_until: float = 1.0


@dataclass
class TrainResult:
    best_epoch: int
    best_val_accuracy: float
    best_state: dict
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


@dataclass
class LoopState:
    """Where the loop stands and what it has kept: all a checkpoint needs besides the model,
    the optimiser, the manipulation and the RNGs (:mod:`datamanip.checkpoint`)."""

    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # its global batches already taken
    global_step: int = 0
    seen: int = 0  # examples of the epoch so far (all processes)
    loss_sum: float = 0.0  # their summed training loss
    best_epoch: int = -1
    best_val_accuracy: float = -1.0
    best_val_loss: float = float("inf")
    best_state: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0  # training time before this process started (resumed runs)


def step_plan(config: TrainConfig, step: int, steps_per_epoch: int, uses_reward: bool):
    """``(manipulating, reward)`` of global step ``step``: a pure function of the step, so a
    resumed run keeps the schedule.

    The manipulation is off in the warm-up epochs of a reward-learning manipulation and after
    the fraction ``manipulate_until`` of the steps that follow them; its reward step runs on
    every ``reward_every``-th manipulated step.
    """
    warmup_steps = config.warmup_epochs * steps_per_epoch if uses_reward else 0
    after_warmup = config.epochs * steps_per_epoch - warmup_steps
    manipulated_steps = warmup_steps + math.ceil(config.manipulate_until * after_warmup)
    manipulating = warmup_steps <= step < manipulated_steps
    reward = uses_reward and manipulating and (step - warmup_steps) % config.reward_every == 0
    return manipulating, reward


def reward_validation(val_data, val_batches: list[Batch], size: int | None, seed: int, device):
    """The validation batches one reward step scores on: all of them, or a random ``size``
    drawn from a generator of its own (``seed``), so that the subset leaves the run's dropout
    masks and data order unchanged. Each process takes its shard of the subset."""
    if size is None or size >= len(val_data):
        return val_batches
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(val_data), generator=generator)[:size].sort().values
    return [val_data.batch(distributed.shard(rows)).to(device)]


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
    checkpoints=None,
) -> TrainResult:
    """Trains ``model`` with ``manipulation``; returns the best-validation-accuracy state.

    With several processes, ``config.batch_size`` is the global batch: every process takes its
    shard of each batch of :func:`epoch_order` and of the validation set, and the engine sums
    the first-order quantities over them (:mod:`datamanip.distributed`), so a step is the step
    one process would take on the whole batch, up to the order of floating-point sums.

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
        checkpoints: optional :class:`datamanip.checkpoint.Checkpoints`; the loop resumes from
            its newest checkpoint and saves after steps and at each epoch end.
    """
    device = accelerator.device
    # The lookahead and the reward run on the bare module (SPEC §7), without the autocast
    # wrapper Accelerate puts on its forward: the engine autocasts where precision allows.
    inner_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    val_positions = distributed.shard(torch.arange(len(val_data)))
    val_batches = [val_data.batch(p).to(device) for p in val_positions.split(64)]
    check_shards(len(train_data), config.batch_size, len(val_data))
    steps_per_epoch = -(-len(train_data) // config.batch_size)
    metrics = metrics or (lambda record: None)
    state = (checkpoints.restore(LoopState) if checkpoints else None) or LoopState()
    if progress:
        progress.start(config.epochs, steps_per_epoch)
        if state.global_step:  # resumed: the steps taken before
            progress.skip(state.epoch * steps_per_epoch + state.step_in_epoch)

    start = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        warm = epoch < config.warmup_epochs
        batches = epoch_order(len(train_data), config.seed, epoch).split(config.batch_size)
        epoch_start, seen_here = time.perf_counter(), 0
        model.train()
        for step_in_epoch in range(state.step_in_epoch, len(batches)):
            positions = distributed.shard(batches[step_in_epoch])
            batch = train_data.batch(positions).to(device)
            total = len(batches[step_in_epoch])
            manipulating, reward = step_plan(
                config, state.global_step, steps_per_epoch, manipulation.uses_reward
            )
            val = val_batches
            if reward:
                seed = config.seed * 1_000_003 + state.global_step
                val = reward_validation(val_data, val_batches, config.val_batch_size, seed, device)
            loss, reward_loss = take_step(
                inner_model,
                optimizer,
                manipulation,
                batch,
                val,
                reward,
                accelerator,
                manipulating,
                total,
            )
            if not math.isfinite(loss):
                raise DatamanipError(
                    f"the training loss became {loss} at epoch {epoch}, step {step_in_epoch + 1}; "
                    "lower --lr or use --mixed-precision no"
                )
            state.global_step += 1
            state.step_in_epoch = step_in_epoch + 1
            state.seen += total
            state.loss_sum += loss * total
            seen_here += total
            if progress:
                progress.step(epoch, step_in_epoch + 1, loss)
            if state.global_step % config.log_every == 0:
                record = {
                    "kind": "step",
                    "epoch": epoch,
                    "step": state.global_step,
                    "loss": state.loss_sum / state.seen,
                    "examples_per_s": seen_here / (time.perf_counter() - epoch_start),
                }
                if reward_loss is not None:
                    record["reward_loss"] = reward_loss
                metrics(record | manipulation.log_values())
            if checkpoints and state.step_in_epoch < len(batches):  # the epoch end saves below
                state.wall_time_s += time.perf_counter() - start
                start = time.perf_counter()
                checkpoints.step_done(state)

        val_acc, val_loss = accuracy_and_loss(inner_model, val_batches)
        first = epoch * steps_per_epoch
        plans = [
            step_plan(config, s, steps_per_epoch, manipulation.uses_reward)
            for s in range(first, first + steps_per_epoch)
        ]
        record = {
            "kind": "epoch",
            "epoch": epoch,
            "step": state.global_step,
            "loss": state.loss_sum / state.seen,
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            "manipulated": any(plan[0] for plan in plans),
            "reward_steps": sum(plan[1] for plan in plans),
            "examples_per_s": seen_here / (time.perf_counter() - epoch_start),
        }
        metrics(record | manipulation.log_values())
        state.history.append(record)
        logger.info("epoch %d: loss %.4f, val accuracy %.4f", epoch, record["loss"], val_acc)
        if progress:
            progress.epoch_end(epoch, val_acc)
        if on_epoch_end:
            on_epoch_end(epoch)
        # Warm-up epochs of a reward-learning manipulation are plain training: they do not count
        # as the manipulation's best epoch (as in the reference code). Plain epochs after
        # --manipulate-until do: the manipulation shaped the model they start from.
        counts = not (warm and manipulation.uses_reward)
        if counts and (
            val_acc > state.best_val_accuracy
            or (val_acc == state.best_val_accuracy and val_loss < state.best_val_loss)
        ):
            state.best_epoch, state.best_val_accuracy, state.best_val_loss = (
                epoch,
                val_acc,
                val_loss,
            )
            state.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in inner_model.state_dict().items()
            }
        state.epoch, state.step_in_epoch, state.seen, state.loss_sum = epoch + 1, 0, 0, 0.0
        if checkpoints:
            state.wall_time_s += time.perf_counter() - start
            start = time.perf_counter()
            checkpoints.epoch_done(state)
    if progress:
        progress.close()
    return TrainResult(
        best_epoch=state.best_epoch,
        best_val_accuracy=state.best_val_accuracy,
        best_state=state.best_state,
        history=state.history,
        wall_time_s=state.wall_time_s + time.perf_counter() - start,
    )


def check_shards(num_examples: int, batch_size: int, num_val: int) -> None:
    """Every process needs at least one example of every global batch, the last one included,
    and of the validation set."""
    n = distributed.world_size()
    if num_val < n:
        raise DatamanipError(
            f"{num_val} validation examples cannot be shared by {n} processes; raise "
            "--val-per-class or launch fewer processes"
        )
    last = num_examples % batch_size or batch_size
    if min(batch_size, last) < n:
        raise DatamanipError(
            f"a batch of {min(batch_size, last)} examples ({num_examples} examples, --batch-size "
            f"{batch_size}) cannot be shared by {n} processes; choose a --batch-size whose "
            f"last batch holds at least {n}"
        )


def take_step(
    model: nn.Module,
    optimizer,
    manipulation: Manipulation,
    batch: Batch,
    val_batches: list[Batch],
    reward: bool,
    accelerator,
    manipulating: bool = True,
    total: int | None = None,
) -> tuple[float, float | None]:
    """One training step: the φ step when ``reward``, then the θ step.

    The θ step trains on the manipulation's loss while ``manipulating`` and on the plain mean
    loss otherwise (warm-up epochs, and after --manipulate-until). ``batch`` is this process's
    shard of a global batch of ``total`` examples (None: the batch is the whole of it).

    Returns the global batch's mean training loss at θ and the reward loss L_val(θ') (None
    without a φ step).
    """
    weights_path = hasattr(manipulation, "lookahead_weights")
    function_path = hasattr(manipulation, "lookahead_function")
    step = Step(
        batch,
        model,
        twice_differentiable=reward and not (weights_path or function_path),
        total=total or len(batch.labels),
        record_masks=reward and weights_path,
    )
    with accelerator.autocast():
        losses = step.example_losses()

    # φ step: lookahead on the manipulated batch, reward on the validation set.
    reward_loss = None
    if reward and weights_path:
        coeffs, phi = manipulation.lookahead_weights(step)
        phi_grads, reward_loss = example_reward_gradients(
            model, optimizer, step, coeffs, phi, val_batches, accelerator.autocast
        )
        manipulation.reward_step(step, phi_grads)
    elif reward and function_path:
        loss_at, phi = manipulation.lookahead_function(step)
        phi_grads, reward_loss = function_reward_gradients(
            model,
            optimizer,
            loss_at,
            phi,
            val_batches,
            accelerator.autocast,
            getattr(manipulation, "embeds_tokens", False),
        )
        manipulation.reward_step(step, phi_grads)
    elif reward:
        lookahead_loss, phi = manipulation.lookahead_loss(step)
        phi_grads, reward_loss = reward_gradients(
            model, optimizer, lookahead_loss, phi, val_batches, accelerator.autocast
        )
        manipulation.reward_step(step, phi_grads)

    # θ step: the real optimiser step on the batch with the updated φ. Each process's loss is
    # its share of the global batch's, so the gradients are summed over the processes.
    loss = manipulation.train_loss(step) if manipulating else step.mean(losses)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    distributed.sum_grads(trainable(model)[1])
    optimizer.step()
    return distributed.sum_scalar(losses.detach().sum().item()) / step.total, reward_loss


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
    # With several processes each scored its shard of the validation set.
    correct, loss, total = (distributed.sum_scalar(x) for x in (correct, loss, total))
    return correct / total, loss / total
