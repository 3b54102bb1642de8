"""Which token does the reward ask the text augmenter for, position by position?

The φ step moves the augmenter's logits at a masked position j along −∂R/∂p_j, R being the
reward loss L_val(θ') and p_j the soft token. Since the classifier embeds p_j as p_j · E, that
gradient is E a_j (a_j = ∂R/∂x_j, x_j the position's input embedding): first order in the
token's embedding. Were the a_j alike from position to position, one token would be the
reward's favourite everywhere, and Adam's steps would drive the augmenter onto it (the collapse
of the README). This script measures it on real data for one batch: the token with the most
negative ∂R/∂p_j at each masked position, the share of positions won by the most frequent one,
and the mean pairwise cosine of the a_j.

    python examples/augment_reward_direction.py --data-dir ../shared/data \
        --classifier runs/sst5/learned/seed_0/model --augmenter runs/sst5-stage/augmenter_finetuned

It runs the engine's own reward path (:func:`datamanip.engine.function_reward_gradients`) with
the soft tokens themselves as φ, for a few batches of the low-data training set.
"""

import argparse
from collections import Counter

import torch
from augmenter_drift import add_data_arguments, low_data_splits  # examples/, beside this script
from transformers import AutoTokenizer

from datamanip.augmenter import load_augmenter
from datamanip.engine import function_reward_gradients
from datamanip.experiment import build_optimizer
from datamanip.manipulations.base import Step
from datamanip.manipulations.text_augment import TextAugmentation, gumbel_softmax
from datamanip.models import load_text_classifier


def reward_by_position(augmentation, classifier, optimizer, batch, val):
    """At each masked position: [masked, vocab] the φ step's push on the augmenter's
    probabilities, ∂R/∂p (K samples summed), and [masked, hidden] a_j."""
    step = Step(batch, classifier)
    augmentation.augmenter.eval()
    with torch.no_grad():
        rows, cols, logits = augmentation.masked_logits(batch, augmentation.generator)
    probs = gumbel_softmax(logits, augmentation.tau, augmentation.num_samples)
    probs.requires_grad_(True)  # the soft tokens are φ here

    def loss_at(params=None):
        return augmentation.classifier_loss(step, rows, cols, probs, params)

    (grad,), _ = function_reward_gradients(classifier, optimizer, loss_at, [probs], val)
    grad = grad.sum(0)  # [masked, vocab]
    # What a step on the logits does: d logit_v ∝ −p_v (g_v − ⟨p, g⟩) through the softmax.
    p = torch.softmax(logits.double(), -1)
    push = -p * (grad.double() - (p * grad.double()).sum(-1, keepdim=True))
    E = classifier.get_input_embeddings().weight.detach()
    # a_j from ∂R/∂p_j = E a_j: least squares over the vocabulary, E being 30,522 × hidden.
    a = torch.linalg.lstsq(E.double(), grad.double().T).solution.T  # [masked, hidden]
    return push, grad, a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--classifier", required=True, help="a run's model folder")
    parser.add_argument("--augmenter", required=True, help="a fine-tuned augmenter folder")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.classifier)
    config, train, val_enc, num_labels = low_data_splits(args, tokenizer)
    classifier, _ = load_text_classifier(args.classifier, num_labels)
    classifier.train()
    optimizer = build_optimizer(classifier, config.lr, config.weight_decay)
    augmenter, aug_tokenizer = load_augmenter(args.augmenter, num_labels)
    augmentation = TextAugmentation(
        augmenter, list(aug_tokenizer.all_special_ids), aug_tokenizer.mask_token_id, seed=0
    )
    val = [val_enc.batch(torch.arange(len(val_enc)))]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))

    winners, raised, cosines = Counter(), Counter(), []
    for positions in order.split(config.batch_size)[: args.batches]:
        batch = train.batch(positions)
        push, grad, a = reward_by_position(augmentation, classifier, optimizer, batch, val)
        # the reward's favourite over the whole vocabulary, and the token whose probability
        # the φ step raises most (only tokens the augmenter already writes can move much)
        winners.update(tokenizer.convert_ids_to_tokens(grad.argmin(-1).tolist()))
        raised.update(tokenizer.convert_ids_to_tokens(push.argmax(-1).tolist()))
        unit = torch.nn.functional.normalize(a, dim=-1)
        sim = unit @ unit.T
        off = ~torch.eye(len(a), dtype=torch.bool)
        cosines.append(sim[off].mean().item())
    total = sum(winners.values())
    print(f"masked positions: {total}")
    for name, counts in (("the reward's favourite token", winners), ("raised most", raised)):
        top = ", ".join(f"{t} {c}" for t, c in counts.most_common(5))
        print(f"{name}: {top} (of {total})")
    print(f"mean pairwise cosine of the a_j, per batch: {', '.join(f'{c:.2f}' for c in cosines)}")


if __name__ == "__main__":
    main()
