"""Cost of one training step: plain, learned weighting, a per-example loop, learned text
augmentation, and learned weighting and learned augmentation on images.

Measured side by side in one run on the same model and batch (MiniLM shapes, batch 25,
validation 20, length 48; SPEC §8), variants interleaved so machine noise hits them alike.
Peak memory is measured per variant in a fresh process: the extra resident memory of one step
over the memory held before it (model, optimiser state), sampled every millisecond, with large
allocations returned to the system on free (MALLOC_MMAP_THRESHOLD_) so that the resident size
follows the live tensors.

    python benchmarks/step_cost.py            # prints a table, then the ratio lines
    python benchmarks/step_cost.py --steps 12

The augmentation rows use their own setup (SPEC §5 low-data: batch 8, validation 10, length
48), the classifier and a MiniLM-shaped augmenter, each against a plain step on that batch:
the learned step at K = 4 and K = 1, the exact double backward, the first-order path with the
whole word embedding shifted (before ``EmbeddingOffset``), and the step without its reward
gradient (the floor of any implementation).

The image rows use ResNet-18 (random initialisation) with SGD and momentum, batch 20, validation
20, 32×32 images (SPEC §5 CIFAR imbalanced), each against a plain step on that batch. The image
augmenter's rows: ``fixed`` (the θ step on the batch and one augmented copy, no reward) and
``learned`` with K = 4 and K = 1 augmented copies in the lookahead.

The last lines are ``weighting_step_ratio=R``, ``weighting_memory_ratio=M``,
``augment_floor_ratio=F`` (the learned augmentation step before its reward gradient: what no
implementation of SPEC §4 at K = 4 can go below), ``augment_step_ratio=R``,
``image_weighting_step_ratio=R`` and ``image_augment_step_ratio=R`` (K = 4).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import torch

BATCH, VAL, LENGTH = 25, 20, 48
AUGMENT_BATCH, AUGMENT_VAL = 8, 10
IMAGE_BATCH, IMAGE_VAL, IMAGE_SIZE = 20, 20, 32


class Setup:
    """The packaged MiniLM, an AdamW with state, a fixed batch and validation set."""

    def __init__(self, model_name: str = "minilm"):
        from accelerate import Accelerator

        from datamanip.experiment import build_optimizer
        from datamanip.manipulations import LearnedWeighting, NoManipulation
        from datamanip.manipulations.base import Batch
        from datamanip.models import load_text_classifier

        torch.manual_seed(0)
        self.model, _ = load_text_classifier(model_name, num_labels=2)
        self.model.train()
        self.optimizer = build_optimizer(self.model, 4e-5, 0.01)
        self.accelerator = Accelerator(cpu=True)
        g = torch.Generator().manual_seed(0)

        def batch(n):
            ids = torch.randint(1000, 20000, (n, LENGTH), generator=g)
            mask = torch.ones(n, LENGTH, dtype=torch.long)
            return Batch(
                torch.arange(n),
                torch.randint(0, 2, (n,), generator=g),
                {"input_ids": ids, "attention_mask": mask},
            )

        self.batch, self.val = batch(BATCH), [batch(VAL)]
        labels = self.batch.labels
        self.plain = NoManipulation(labels, 2)
        self.weighting = LearnedWeighting(labels, 2)

    def step(self, variant: str) -> None:
        from datamanip.engine import take_step

        if variant == "loop":
            return per_example_loop_step(self)
        manipulation = self.weighting if variant == "weighting" else self.plain
        take_step(
            self.model,
            self.optimizer,
            manipulation,
            self.batch,
            self.val,
            variant == "weighting",
            self.accelerator,
        )


def per_example_loop_step(s: Setup) -> None:
    """The original code's shape: one backward per example for the weight gradients."""
    from datamanip.engine import trainable, validation_gradient
    from datamanip.lookahead import lookahead
    from datamanip.manipulations.base import Step

    names, params = trainable(s.model)
    step = Step(s.batch, s.model, twice_differentiable=False)
    losses = step.example_losses()
    w = torch.full((BATCH,), 1.0 / BATCH)
    grads = torch.autograd.grad((w * losses).sum(), params, retain_graph=True)
    new_params, precond = lookahead(s.optimizer, params, list(grads))
    _, val_grads = validation_gradient(
        s.model, dict(zip(names, new_params)), s.val, s.accelerator.autocast
    )
    directions = [p * v for p, v in zip(precond, val_grads)]
    weight_grads = torch.zeros(BATCH)
    for i in range(BATCH):
        g_i = torch.autograd.grad(
            losses[i], params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        weight_grads[i] = sum((d * g).sum() for d, g in zip(directions, g_i))
    s.optimizer.zero_grad(set_to_none=True)
    (w * losses).sum().backward()
    s.optimizer.step()


class ExactPath:
    """The augmentation with only ``lookahead_loss``: the engine's double-backward path."""

    def __init__(self, augmentation):
        self.inner = augmentation
        self.name, self.uses_reward = augmentation.name, True

    def lookahead_loss(self, step):
        return self.inner.lookahead_loss(step)

    def reward_step(self, step, grads):
        return self.inner.reward_step(step, grads)

    def train_loss(self, step):
        return self.inner.train_loss(step)


def augment_floor_step(s: "AugmentSetup") -> None:
    """What a learned augmentation step costs before its reward gradient: the augmenter's
    samples, the lookahead (a forward and a backward of the K copies), the validation gradient
    at θ', and the θ step on the real batch and a fresh sample. Every part is one the method
    takes (SPEC §4); only the difference at θ ± εu and the φ step are left out."""
    from datamanip.engine import function_lookahead
    from datamanip.manipulations.base import Step

    augmentation = s.manipulations["augment"]
    step = Step(s.batch, s.model, twice_differentiable=False)
    step.example_losses()
    loss_at, _ = augmentation.lookahead_function(step)
    function_lookahead(s.model, s.optimizer, loss_at, s.val, nullcontext, embeds_tokens=True)
    s.optimizer.zero_grad(set_to_none=True)
    augmentation.train_loss(step).backward()
    s.optimizer.step()


class AugmentSetup:
    """MiniLM classifier and MiniLM augmenter, batch 8, validation 10, length 48."""

    def __init__(self):
        from accelerate import Accelerator

        from datamanip.augmenter import load_augmenter
        from datamanip.experiment import build_optimizer
        from datamanip.manipulations import NoManipulation
        from datamanip.manipulations.base import Batch
        from datamanip.manipulations.text_augment import TextAugmentation
        from datamanip.models import load_text_classifier

        torch.manual_seed(0)
        self.model, tokenizer = load_text_classifier("minilm", num_labels=2)
        self.model.train()
        self.optimizer = build_optimizer(self.model, 4e-5, 0.01)
        self.accelerator = Accelerator(cpu=True)
        augmenter, _ = load_augmenter("minilm", 2)
        g = torch.Generator().manual_seed(0)

        def batch(n):
            ids = torch.randint(1000, 20000, (n, LENGTH), generator=g)
            ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
            mask = torch.ones(n, LENGTH, dtype=torch.long)
            return Batch(
                torch.arange(n),
                torch.randint(0, 2, (n,), generator=g),
                {"input_ids": ids, "attention_mask": mask},
            )

        self.batch, self.val = batch(AUGMENT_BATCH), [batch(AUGMENT_VAL)]
        special = list(tokenizer.all_special_ids)
        self.manipulations = {
            "plain8": NoManipulation(self.batch.labels, 2),
            "augment": TextAugmentation(augmenter, special, tokenizer.mask_token_id),
            "augment_k1": TextAugmentation(
                augmenter, special, tokenizer.mask_token_id, num_samples=1
            ),
        }
        self.manipulations["augment_exact"] = ExactPath(self.manipulations["augment"])
        # The same first-order path with the whole word embedding shifted, as before the offset
        whole = TextAugmentation(augmenter, special, tokenizer.mask_token_id)
        whole.embeds_tokens = False
        self.manipulations["augment_whole"] = whole

    def step(self, variant: str) -> None:
        from datamanip.engine import take_step

        if variant == "augment_floor":
            return augment_floor_step(self)
        take_step(
            self.model,
            self.optimizer,
            self.manipulations[variant],
            self.batch,
            self.val,
            variant != "plain8",
            self.accelerator,
        )


class ImageSetup:
    """ResNet-18 from its config, SGD with momentum (state after the warm-up), 32×32 images."""

    def __init__(self):
        from accelerate import Accelerator

        from datamanip.experiment import build_optimizer
        from datamanip.image_transforms import ImageAugmenter
        from datamanip.manipulations import LearnedWeighting, NoManipulation
        from datamanip.manipulations.base import Batch
        from datamanip.manipulations.image_augment import ImageAugmentation
        from datamanip.models import load_image_classifier

        torch.manual_seed(0)
        self.model = load_image_classifier("resnet18", num_labels=2)
        self.model.train()
        self.optimizer = build_optimizer(self.model, 1e-3, 0.01, "sgd")
        self.accelerator = Accelerator(cpu=True)
        g = torch.Generator().manual_seed(0)

        def batch(n):
            pixels = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
            labels = torch.randint(0, 2, (n,), generator=g)
            return Batch(torch.arange(n), labels, {"pixel_values": pixels})

        self.batch, self.val = batch(IMAGE_BATCH), [batch(IMAGE_VAL)]
        labels = self.batch.labels
        self.manipulations = {
            "image_plain": NoManipulation(labels, 2),
            "image_weighting": LearnedWeighting(labels, 2),
            "image_fixed": ImageAugmentation(ImageAugmenter(), learned=False),
            "image_augment": ImageAugmentation(ImageAugmenter(), num_samples=4),
            "image_augment_k1": ImageAugmentation(ImageAugmenter(), num_samples=1),
        }

    def step(self, variant: str) -> None:
        from datamanip.engine import take_step

        take_step(
            self.model,
            self.optimizer,
            self.manipulations[variant],
            self.batch,
            self.val,
            variant not in ("image_plain", "image_fixed"),
            self.accelerator,
        )


def time_variants(steps: int, variants: list[str], setup=None) -> dict[str, list[float]]:
    setup = setup or Setup()
    for v in variants:  # warm-up: optimiser state, allocator, lazy inits
        setup.step(v)
    times = {v: [] for v in variants}
    for _ in range(steps):
        for v in variants:
            start = time.perf_counter()
            setup.step(v)
            times[v].append(time.perf_counter() - start)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def extra_peak_memory(variant: str) -> int:
    """In this process: peak resident memory of one step above the memory held before it."""
    setup = Setup()
    setup.step(variant)
    setup.optimizer.zero_grad(set_to_none=True)
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    setup.step(variant)
    done.set()
    sampler.join()
    return max(peak[0], rss_bytes()) - base


def memory_in_fresh_process(variant: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", variant],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description="seconds and memory per training step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--no-loop", action="store_true", help="skip the slow per-example loop")
    parser.add_argument("--no-augment", action="store_true", help="skip the augmentation rows")
    parser.add_argument("--no-images", action="store_true", help="skip the image rows")
    parser.add_argument("--images-only", action="store_true", help="only the image rows")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps({"extra_bytes": extra_peak_memory(args.memory_of)}))
        return

    if args.images_only:
        for name, ratio in print_image_rows(args.steps).items():
            print(f"{name}={ratio:.2f}")
        return
    variants = ["plain", "weighting"] + ([] if args.no_loop else ["loop"])
    times = time_variants(args.steps, variants)
    memory = {v: memory_in_fresh_process(v) for v in ("plain", "weighting")}
    plain = statistics.median(times["plain"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH}, "
        f"validation {VAL}, length {LENGTH}; median of {args.steps} steps"
    )
    print(f"{'step':<34}{'s/step':>9}{'× plain':>9}{'extra peak MB':>15}{'× plain':>9}")
    labels = {
        "plain": "plain training step",
        "weighting": "learned weighting (batched)",
        "loop": "per-example loop (reference shape)",
    }
    for v in variants:
        t = statistics.median(times[v])
        mem = memory.get(v)
        mem_text = (
            f"{mem / 2**20:>15.0f}{mem / memory['plain']:>9.2f}" if mem else f"{'-':>15}{'-':>9}"
        )
        print(f"{labels[v]:<34}{t:>9.3f}{t / plain:>9.2f}{mem_text}")
    augment = {}
    if not args.no_augment:
        augment_variants = [
            "plain8",
            "augment",
            "augment_k1",
            "augment_exact",
            "augment_whole",
            "augment_floor",
        ]
        augment = time_variants(args.steps, augment_variants, AugmentSetup())
        plain8 = statistics.median(augment["plain8"])
        print(f"augmentation: batch {AUGMENT_BATCH}, validation {AUGMENT_VAL}, length {LENGTH}")
        labels = {
            "plain8": "plain training step (batch 8)",
            "augment": "learned augmentation, K=4",
            "augment_k1": "learned augmentation, K=1",
            "augment_exact": "  K=4, exact double backward",
            "augment_whole": "  K=4, whole embedding shifted",
            "augment_floor": "  K=4, before the reward gradient",
        }
        for v in augment_variants:
            t = statistics.median(augment[v])
            print(f"{labels[v]:<34}{t:>9.3f}{t / plain8:>9.2f}")
    image_ratios = {} if args.no_images else print_image_rows(args.steps)
    if "loop" in times:
        print(f"loop_step_ratio={statistics.median(times['loop']) / plain:.2f}")
    print(f"weighting_step_ratio={statistics.median(times['weighting']) / plain:.2f}")
    print(f"weighting_memory_ratio={memory['weighting'] / memory['plain']:.2f}")
    if augment:
        print(f"augment_floor_ratio={statistics.median(augment['augment_floor']) / plain8:.2f}")
        print(f"augment_step_ratio={statistics.median(augment['augment']) / plain8:.2f}")
    for name, ratio in image_ratios.items():
        print(f"{name}={ratio:.2f}")


def print_image_rows(steps: int) -> dict[str, float]:
    """Times the image variants, prints their rows, and returns the weighting and augmentation
    (K = 4) step ratios."""
    variants = [
        "image_plain",
        "image_weighting",
        "image_fixed",
        "image_augment",
        "image_augment_k1",
    ]
    times = time_variants(steps, variants, ImageSetup())
    plain = statistics.median(times["image_plain"])
    print(
        f"images: ResNet-18, SGD momentum, batch {IMAGE_BATCH}, validation {IMAGE_VAL}, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}; median of {steps} steps"
    )
    labels = {
        "image_plain": "plain training step (images)",
        "image_weighting": "learned weighting (images)",
        "image_fixed": "fixed augmentation (images)",
        "image_augment": "learned augmentation, K=4 (images)",
        "image_augment_k1": "learned augmentation, K=1 (images)",
    }
    for v in variants:
        t = statistics.median(times[v])
        print(f"{labels[v]:<36}{t:>9.3f}{t / plain:>9.2f}")
    return {
        "image_weighting_step_ratio": statistics.median(times["image_weighting"]) / plain,
        "image_augment_step_ratio": statistics.median(times["image_augment"]) / plain,
    }


if __name__ == "__main__":
    main()
