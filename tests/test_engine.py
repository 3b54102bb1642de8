"""The engine's training loop against a hand-written one, and its bookkeeping."""

import torch
from accelerate import Accelerator

from datamanip.engine import TrainConfig, epoch_order, take_step, train
from datamanip.manipulations import LearnedWeighting, NoManipulation
from datamanip.text import EncodedSplit
from tests.models import tiny_classifier


def tiny_split(n: int, seed: int) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    ids = [
        [1]
        + torch.randint(
            5, 100, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g
        ).tolist()
        + [2]
        for _ in range(n)
    ]
    return EncodedSplit(ids, torch.randint(0, 2, (n,), generator=g), 0, 0)


def test_plain_steps_equal_a_hand_written_loop():
    data = tiny_split(12, 0)
    model_a, model_b = tiny_classifier(), tiny_classifier()
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-3)
    manipulation = NoManipulation(data.labels, 2)
    accelerator = Accelerator(cpu=True)
    for positions in epoch_order(12, seed=0, epoch=0).split(4):
        batch = data.batch(positions)
        take_step(model_a, opt_a, manipulation, batch, [], False, accelerator)

        opt_b.zero_grad()
        logits = model_b(**batch.inputs).logits
        torch.nn.functional.cross_entropy(logits, batch.labels).backward()
        opt_b.step()
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


def test_warmup_epochs_train_plainly_and_do_not_count_as_best():
    train_data, val_data = tiny_split(16, 1), tiny_split(6, 2)
    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manipulation = LearnedWeighting(train_data.labels, 2, w_init=1.0)
    records = []
    config = TrainConfig(epochs=3, batch_size=8, warmup_epochs=2, seed=0, log_every=1)
    result = train(
        model,
        opt,
        manipulation,
        train_data,
        val_data,
        config,
        Accelerator(cpu=True),
        metrics=records.append,
    )
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["manipulated"] for r in epochs] == [False, False, True]
    assert result.best_epoch == 2  # the only epoch with the manipulation on
    assert "reward_loss" not in records[0] and "reward_loss" in records[-2]
    assert not torch.allclose(manipulation.weights, torch.ones(16))  # moved in epoch 2 only
