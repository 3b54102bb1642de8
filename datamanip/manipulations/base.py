"""The protocol every manipulation follows, and the per-step view of the batch it works on.

The engine (:mod:`datamanip.engine`) owns the lookahead and the reward; a manipulation only says
how it shapes the training loss and how it moves its own parameters φ. Per step, when the
manipulation is active and uses the reward:

1. ``lookahead_loss(step)`` returns the training loss at θ as the manipulation shapes it, and the
   tensors φ the reward gradient is wanted for (leaves of that loss's graph). A manipulation
   whose loss is a weighted sum of the examples' losses, Σ c_i(φ) ℓ_i, may instead define
   ``lookahead_weights(step)`` returning ``(c, φ)``; the engine then takes a faster path that
   needs no second-order graph (:func:`datamanip.engine.example_reward_gradients`). A
   manipulation whose loss is a function of the model's parameters (augmentation) may define
   ``lookahead_function(step)`` returning ``(loss_at, φ)``, ``loss_at(params, offset)`` being
   that loss with the trainable parameters replaced by ``params`` (None: θ); the engine then
   takes a first-order path (:func:`datamanip.engine.function_reward_gradients`). The engine
   passes ``offset`` only to a manipulation that sets ``embeds_tokens = True``, saying that its
   loss builds the classifier's input embeddings itself; it must then add ``offset`` (an
   :class:`datamanip.embedding_rows.EmbeddingOffset`) to the word embedding, and the engine
   looks ahead on the word embedding's validation rows alone. Other manipulations may define
   ``loss_at(params)`` alone.
2. The engine takes the lookahead θ' on that loss, scores it on the validation set and hands back
   ∂L_val(θ')/∂φ to ``reward_step(step, grads)``, which updates φ.
3. ``train_loss(step)`` returns the loss for the real optimiser step, with the updated φ.

A manipulation that does not use the reward (``uses_reward = False``) only sees ``train_loss``.

Several processes: ``step.batch`` is this process's shard of a global batch of ``step.total``
examples, and every loss a manipulation returns is its shard's share of the global batch's loss
(a mean is ``step.mean(losses)``, a sum over the shard divided by ``step.total``); the engine
sums gradients over the processes. Normalising weights within the batch goes through
:func:`linear_normalise` / :func:`softmax_normalise`, which take their sums over every process.
Reward gradients of φ that belong to the shard's examples (``lookahead_weights``) stay with the
process; those of shared φ (an augmenter) arrive summed over the processes, the same on all.
``state_dict`` / ``load_state_dict`` save and restore φ (and any optimiser or generator of the
manipulation) for checkpoints; every process saves its own.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from datamanip import distributed
from datamanip.errors import DatamanipError


@dataclass
class Batch:
    """A batch of training examples.

    Attributes:
        positions: [batch] row of each example in the training subset.
        labels: [batch] class ids.
        inputs: keyword arguments for the model (``input_ids``, ``attention_mask`` ...).
    """

    positions: Tensor
    labels: Tensor
    inputs: dict[str, Tensor]

    def to(self, device) -> "Batch":
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        return Batch(self.positions, self.labels.to(device), inputs)


@dataclass
class Step:
    """One training step as a manipulation sees it: the batch and the model at θ."""

    batch: Batch
    model: nn.Module
    twice_differentiable: bool = True
    total: int | None = None  # examples in the global batch (None: this batch is all of it)
    record_masks: bool = False  # keep the forward's dropout masks for the forwards at θ ± εu
    _losses: Tensor | None = field(default=None, repr=False)
    rng_state: dict | None = field(default=None, repr=False)
    masks: "DropoutMasks | None" = field(default=None, repr=False)

    def example_losses(self) -> Tensor:
        """[batch] cross-entropy of each example at θ, computed once per step (graph kept)."""
        if self._losses is None:
            self.rng_state = capture_rng()  # replayed by forwards that must see the same dropout
            self.masks = DropoutMasks() if self.record_masks else None
            kernel = twice_differentiable() if self.twice_differentiable else nullcontext()
            with kernel, self.masks or nullcontext():
                logits = self.model(**self.batch.inputs).logits
            self._losses = nn.functional.cross_entropy(
                at_least_float32(logits), self.batch.labels, reduction="none"
            )
        return self._losses

    def mean(self, values: Tensor) -> Tensor:
        """This shard's share of the global batch's mean of ``values`` ([batch])."""
        return values.sum() / (self.total or len(values))


def capture_rng() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextmanager
def restore_rng(state: dict):
    """Runs the block from the random state ``state``, then puts the current state back."""
    devices = list(range(len(state["cuda"]))) if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])
        yield


class DropoutMasks(TorchDispatchMode):
    """The dropout masks of one forward, kept and handed to later forwards in the same order.

    Dropout draws its mask with ``bernoulli_``. The forwards at θ ± εu must see the masks of
    the training forward; drawing them again from the replayed random state costs about a tenth
    of a MiniLM forward on a CPU. Inside :meth:`replay` each ``bernoulli_`` copies the mask
    recorded at its place instead. A mask holds only 0 and 1 before dropout rescales it, so it
    is kept as booleans.

    Example::

        masks = DropoutMasks()
        with masks:  # draws and records
            loss = loss_of(model(**inputs))
        with masks.replay():  # the same masks, none drawn
            shifted = functional_call(model, shifted_params, (), inputs)
    """

    def __init__(self):
        super().__init__()
        self.masks: list[Tensor] = []
        self._next: int | None = None  # while replaying: the mask the next draw gets

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.aten.bernoulli_.float:
            return func(*args, **kwargs)
        if self._next is None:
            out = func(*args, **kwargs)
            self.masks.append(out.bool())
            return out
        if self._next >= len(self.masks) or self.masks[self._next].shape != args[0].shape:
            raise DatamanipError(
                "a replayed forward draws other dropout masks than the forward it replays; "
                "the model's forward must not depend on its parameters' values"
            )
        self._next += 1
        return args[0].copy_(self.masks[self._next - 1])

    @contextmanager
    def replay(self):
        self._next = 0
        try:
            with self:
                yield
            if self._next != len(self.masks):
                raise DatamanipError(
                    f"a replayed forward drew {self._next} of the {len(self.masks)} dropout "
                    "masks of the forward it replays; the model's forward must not depend on "
                    "its parameters' values"
                )
        finally:
            self._next = None


def at_least_float32(logits: Tensor) -> Tensor:
    """Losses are taken in float32 or better, also when the forward ran in bf16/fp16."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def twice_differentiable():
    """Attention through the math kernel: the fused CPU kernels of scaled-dot-product attention
    have no double backward, and the reward gradient differentiates the training gradient."""
    return sdpa_kernel([SDPBackend.MATH])


class Manipulation(Protocol):
    """What the engine calls. See the module docstring for the order of calls."""

    name: str
    uses_reward: bool

    def lookahead_loss(self, step: Step) -> tuple[Tensor, list[Tensor]]: ...

    def reward_step(self, step: Step, grads: list[Tensor]) -> None: ...

    def train_loss(self, step: Step) -> Tensor: ...

    def log_values(self) -> dict[str, float]:
        """The manipulation's own numbers for the step log (mean weight per class, ...)."""
        ...

    def example_weights(self) -> np.ndarray | None:
        """[num_train] the weight each training example carries now, or None."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class AugmentationState:
    """What the text and image augmentations share: the augmenter, trained by Adam from the
    reward (``learned``) or never updated (``fixed``), a generator for its random draws, and
    the state a checkpoint keeps of them.

    Args:
        augmenter: the module whose trainable parameters are φ.
        learned: True for ``learned`` (a φ step each reward step), False for ``fixed``.
        num_samples: K, augmented copies of the batch in the lookahead.
        lr: Adam learning rate of φ.
        seed: fixes the random draws.
    """

    def __init__(self, augmenter: nn.Module, learned: bool, num_samples: int, lr: float, seed: int):
        self.augmenter = augmenter
        self.learned = learned
        self.name = "learned" if learned else "fixed"
        self.uses_reward = learned
        self.num_samples = num_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.phi = [p for p in augmenter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.phi, lr=lr) if learned else None
        if not learned:
            augmenter.requires_grad_(False)
        self._log: dict[str, float] = {}

    def example_weights(self) -> np.ndarray | None:
        return None

    def state_dict(self) -> dict:
        state = {
            "augmenter": {k: v.detach().clone() for k, v in self.augmenter.state_dict().items()},
            "generator": self.generator.get_state(),
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.augmenter.load_state_dict(state["augmenter"])
        self.generator.set_state(state["generator"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def mean_per_class(values: Tensor, labels: Tensor, num_labels: int, prefix: str) -> dict:
    """``{prefix/class_k: mean of values over examples of class k}`` for classes present."""
    out = {}
    for k in range(num_labels):
        mask = labels == k
        if mask.any():
            out[f"{prefix}/class_{k}"] = values[mask].float().mean().item()
    return out


def linear_normalise(w: Tensor) -> Tensor:
    """ŵ = max(w, 0) / Σ max(w, 0), all zeros when the sum is ≤ 1e-8 (SPEC §3); the sum runs
    over the global batch (every process's shard)."""
    w = w.clamp(min=0)
    total = w.sum()
    if distributed.world_size() > 1:
        total = distributed.sum_([total.detach().clone()])[0]
    return w / total if total > 1e-8 else torch.zeros_like(w)


def softmax_normalise(w: Tensor, temperature: float) -> Tensor:
    """softmax(w / T) over the global batch (every process's shard)."""
    if distributed.world_size() == 1:
        return torch.softmax(w / temperature, dim=0)
    z = w / temperature
    z = z - distributed.max_(z.max())
    e = z.exp()
    return e / distributed.sum_([e.sum().detach().clone()])[0]
