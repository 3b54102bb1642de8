"""How close the fast weight gradients are to the double-backward ones on the real MiniLM.

The tests check the fast path on a tiny BERT; this measures it at full size, in float32, on
real SST-2 sentences: after a few AdamW steps, the per-example weight gradients of one batch
from the central-difference path against the double-backward path (same first-order
quantity, exact up to rounding), for a few difference steps r.

    python benchmarks/weight_gradient_accuracy.py --data-dir ../shared/data
"""

import argparse

import torch
from accelerate import Accelerator

import datamanip.engine as engine
from datamanip.data import build_subsets, load_source
from datamanip.experiment import build_optimizer
from datamanip.manipulations.base import Step, twice_differentiable
from datamanip.models import load_text_classifier
from datamanip.text import encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    subsets = build_subsets(
        load_source("sst2", data_dir=args.data_dir), imbalance=0.05, val_per_class=10, data_seed=0
    )
    model, tokenizer = load_text_classifier("minilm", 2)
    model.train()
    opt = build_optimizer(model, 4e-5, 0.01)
    train = encode(tokenizer, subsets.train.inputs, subsets.train.labels, 64)
    val = encode(tokenizer, subsets.val.inputs, subsets.val.labels, 64)
    val_batches = [val.batch(torch.arange(len(val)))]
    accelerator = Accelerator(cpu=True)
    from datamanip.manipulations import NoManipulation

    plain = NoManipulation(train.labels, 2)
    for k in range(3):  # AdamW state that is not trivial
        batch = train.batch(torch.arange(k * args.batch, (k + 1) * args.batch))
        engine.take_step(model, opt, plain, batch, [], False, accelerator)

    batch = train.batch(torch.arange(100, 100 + args.batch))
    w = torch.full((args.batch,), 1.0 / args.batch, requires_grad=True)
    torch.manual_seed(1)
    step = Step(batch, model)
    with twice_differentiable():
        losses = step.example_losses()
    (exact,), _ = engine.reward_gradients(model, opt, (w * losses).sum(), [w], val_batches)

    print(f"{'r':>8}{'max error / max |grad|':>26}{'cosine':>10}")
    original = engine.difference_scale
    for factor in (0.2, 0.06, 0.02):

        def scale(params, directions, factor=factor):
            return original(params, directions) * factor / 0.06

        engine.difference_scale = scale
        torch.manual_seed(1)
        step = Step(batch, model, twice_differentiable=False)
        step.example_losses()
        (fast,), _ = engine.example_reward_gradients(model, opt, step, w, [w], val_batches)
        engine.difference_scale = original
        err = ((fast - exact).abs().max() / exact.abs().max()).item()
        cos = torch.nn.functional.cosine_similarity(fast, exact, dim=0).item()
        r = factor * torch.finfo(torch.float32).eps ** (1 / 3)
        print(f"{r:>8.1e}{err:>26.2e}{cos:>10.5f}")


if __name__ == "__main__":
    main()
