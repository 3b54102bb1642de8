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


def run_weighting(config: TrainConfig, manipulation=None, on_epoch_end=None):
    """Learned weighting on tiny data with ``config``: (manipulation, log records, result)."""
    train_data, val_data = tiny_split(16, 1), tiny_split(6, 2)
    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manipulation = manipulation or LearnedWeighting(train_data.labels, 2, w_init=1.0)
    records = []
    result = train(
        model,
        opt,
        manipulation,
        train_data,
        val_data,
        config,
        Accelerator(cpu=True),
        metrics=records.append,
        on_epoch_end=on_epoch_end,
    )
    return manipulation, records, result


def test_warmup_epochs_train_plainly_and_do_not_count_as_best():
    config = TrainConfig(epochs=3, batch_size=8, warmup_epochs=2, seed=0, log_every=1)
    manipulation, records, result = run_weighting(config)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["manipulated"] for r in epochs] == [False, False, True]
    assert result.best_epoch == 2  # the only epoch with the manipulation on
    assert "reward_loss" not in records[0] and "reward_loss" in records[-2]
    assert not torch.allclose(manipulation.weights, torch.ones(16))  # moved in epoch 2 only


def test_reward_every_k_updates_only_the_weights_of_reward_steps():
    # 16 examples in batches of 4: steps 0-3 per epoch; with k = 3, reward steps 0, 3, 6.
    config = TrainConfig(epochs=2, batch_size=4, seed=0, log_every=1, reward_every=3)
    manipulation, records, _ = run_weighting(config)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["reward_steps"] for r in epochs] == [2, 1]
    rewarded = torch.cat(
        [epoch_order(16, 0, 0).split(4)[0], epoch_order(16, 0, 0).split(4)[3]]
        + [epoch_order(16, 0, 1).split(4)[2]]
    )
    moved = (manipulation.weights != 1.0).nonzero().flatten()
    assert set(moved.tolist()) <= set(rewarded.tolist())
    # w_decay 5 moves every rewarded weight (1 / 5 − grad, never 1 again).
    assert set(moved.tolist()) == set(rewarded.tolist())


def test_manipulate_until_trains_plainly_after_the_fraction():
    snapshots = []
    manipulation = LearnedWeighting(tiny_split(16, 1).labels, 2, w_init=1.0)
    config = TrainConfig(epochs=2, batch_size=8, seed=0, log_every=1, manipulate_until=0.5)
    _, records, _ = run_weighting(
        config, manipulation, on_epoch_end=lambda e: snapshots.append(manipulation.weights.clone())
    )
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["manipulated"] for r in epochs] == [True, False]
    assert [r["reward_steps"] for r in epochs] == [2, 0]
    assert torch.equal(snapshots[0], snapshots[1])  # no weight moved in the plain half


def test_plain_half_after_manipulate_until_equals_plain_training():
    """After the cut-off the θ step is the plain mean loss: proportion weighting that stops
    after epoch 0 ends where proportion for epoch 0 and plain training for epoch 1 end."""
    from datamanip.manipulations import ProportionWeighting

    train_data, val_data = tiny_split(16, 1), tiny_split(6, 2)
    final = []
    for until in (0.5, None):
        model = tiny_classifier()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        accelerator = Accelerator(cpu=True)
        if until is not None:
            config = TrainConfig(epochs=2, batch_size=8, seed=0, manipulate_until=until)
            manipulation = ProportionWeighting(train_data.labels, 2)
            train(model, opt, manipulation, train_data, val_data, config, accelerator)
        else:
            for epoch, m in enumerate(
                (ProportionWeighting(train_data.labels, 2), NoManipulation(train_data.labels, 2))
            ):
                for positions in epoch_order(16, 0, epoch).split(8):
                    batch = train_data.batch(positions)
                    take_step(model, opt, m, batch, [], False, accelerator)
        final.append(dict(model.named_parameters()))
    for name, a in final[0].items():
        torch.testing.assert_close(a, final[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_val_batch_size_draws_distinct_validation_subsets():
    from datamanip.engine import reward_validation

    val_data = tiny_split(10, 3)
    full = [val_data.batch(torch.arange(10))]
    draws = [reward_validation(val_data, full, 4, seed, "cpu") for seed in range(5)]
    for batches in draws:
        assert len(batches) == 1 and len(batches[0].labels) == 4
        assert len(set(batches[0].positions.tolist())) == 4
    assert len({tuple(b[0].positions.tolist()) for b in draws}) > 1  # fresh subsets
    again = reward_validation(val_data, full, 4, 3, "cpu")  # a step's subset is its seed's
    assert torch.equal(again[0].positions, draws[3][0].positions)
    assert reward_validation(val_data, full, None, 0, "cpu") is full
    assert reward_validation(val_data, full, 10, 0, "cpu") is full


def test_ren_trains_plainly_on_a_step_without_its_reward_step():
    from datamanip.manipulations import RenWeighting
    from datamanip.manipulations.base import Step

    data = tiny_split(8, 1)
    model = tiny_classifier()
    ren = RenWeighting(data.labels, 2)
    first = Step(data.batch(torch.arange(4)), model)
    ren.reward_step(first, [torch.tensor([-1.0, 0.0, 0.0, 0.0])])
    assert torch.allclose(ren.train_loss(first), first.example_losses()[0])
    second = Step(data.batch(torch.arange(4, 8)), model)
    assert torch.allclose(ren.train_loss(second), second.example_losses().mean())


def test_manipulate_until_counts_the_steps_after_warm_up():
    from datamanip.engine import step_plan

    # 4 epochs of 5 steps, 2 of them warm-up: 10 steps after it, the first 5 manipulated.
    config = TrainConfig(epochs=4, warmup_epochs=2, manipulate_until=0.5, reward_every=2)
    plans = [step_plan(config, s, 5, uses_reward=True) for s in range(20)]
    assert [m for m, _ in plans] == [False] * 10 + [True] * 5 + [False] * 5
    assert [s for s, (_, r) in enumerate(plans) if r] == [10, 12, 14]
    # Without a reward (proportion), warm-up does not apply: the first half of all steps.
    plain = [step_plan(config, s, 5, uses_reward=False) for s in range(20)]
    assert [m for m, _ in plain] == [True] * 10 + [False] * 10 and not any(r for _, r in plain)
