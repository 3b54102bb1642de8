"""How far a text augmenter has moved from the data: its distributions at the masked positions.

For each augmenter folder (a fine-tuned one, or a run's final ``augmenter``), over the whole
low-data training set with the run's masking (max(⌊L/7⌋, 2) positions, the same positions for
every folder), it prints:

- the probability the augmenter gives the original token, on average;
- the entropy of its distribution (nats; ln 30,522 = 10.3 is uniform);
- the share of positions whose most likely token is the most frequent one (what samples.jsonl
  shows), and that token;
- the share of categorical samples (what training sees, through Gumbel-softmax at τ = 1) that
  are the most frequent sampled token, and that token.

    python examples/augmenter_drift.py --data-dir ../shared/data \
        runs/sst5-stage/augmenter_finetuned runs/sst5/learned/seed_0/augmenter
"""

import argparse
from collections import Counter

import torch
from transformers import AutoTokenizer

from datamanip.augment_run import encode_subsets
from datamanip.augmenter import load_augmenter
from datamanip.config import RunConfig, resolve
from datamanip.experiment import load_subsets
from datamanip.manipulations.text_augment import TextAugmentation


@torch.no_grad()
def drift(folder: str, train, num_labels: int) -> dict:
    augmenter, tokenizer = load_augmenter(folder, num_labels)
    augmentation = TextAugmentation(
        augmenter, list(tokenizer.all_special_ids), tokenizer.mask_token_id, learned=False
    )
    augmenter.eval()
    original_p, entropy, modes, sampled = [], [], Counter(), Counter()
    for start in range(0, len(train), 32):
        batch = train.batch(torch.arange(start, min(start + 32, len(train))))
        generator = torch.Generator().manual_seed(start)  # the same masks for every folder
        rows, cols, logits = augmentation.masked_logits(batch, generator)
        logp = torch.log_softmax(logits.double(), -1)  # [masked, vocab]
        original = batch.inputs["input_ids"][rows, cols]
        original_p.append(logp.gather(1, original[:, None]).exp().flatten())
        entropy.append(-(logp.exp() * logp).sum(-1))
        modes.update(logp.argmax(-1).tolist())
        draws = torch.multinomial(logp.exp(), 1, generator=generator).flatten()
        sampled.update(draws.tolist())
    total = sum(modes.values())
    mode, mode_count = modes.most_common(1)[0]
    draw, draw_count = sampled.most_common(1)[0]
    return {
        "positions": total,
        "p_original": torch.cat(original_p).mean().item(),
        "entropy": torch.cat(entropy).mean().item(),
        "mode": tokenizer.convert_ids_to_tokens(mode),
        "mode_share": mode_count / total,
        "sample": tokenizer.convert_ids_to_tokens(draw),
        "sample_share": draw_count / total,
    }


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The low-data set of the run being examined (SPEC §5 defaults for SST-5)."""
    parser.add_argument("--dataset", default="sst5")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=2)


def low_data_splits(args, tokenizer):
    """``(config, train, val, num_labels)``: the run's training and validation sets, encoded."""
    config = resolve(
        RunConfig(
            command="augment",
            dataset=args.dataset,
            data_dir=args.data_dir,
            per_class=args.per_class,
            val_per_class=args.val_per_class,
            method="learned",  # the augment settings do not depend on the method
        )
    )
    subsets, num_labels = load_subsets(config)
    train, val, _, _ = encode_subsets(tokenizer, subsets, config.max_length)
    return config, train, val, num_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="augmenter folders")
    add_data_arguments(parser)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.folders[0])
    _, train, _, num_labels = low_data_splits(args, tokenizer)
    print(
        "| augmenter | p(original token) | entropy (nats) | most likely token, share | "
        "most frequent sample, share |"
    )
    print("|---|---|---|---|---|")
    for folder in args.folders:
        d = drift(folder, train, num_labels)
        mode = f"{d['mode']} {100 * d['mode_share']:.0f}%"
        sample = f"{d['sample']} {100 * d['sample_share']:.1f}%"
        print(f"| `{folder}` | {d['p_original']:.3f} | {d['entropy']:.2f} | {mode} | {sample} |")


if __name__ == "__main__":
    main()
