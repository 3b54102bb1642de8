"""The weight update and normalisation rules of SPEC §3, on the real manipulation objects."""

import pytest
import torch

from datamanip.manipulations import LearnedWeighting, ProportionWeighting, RenWeighting
from datamanip.manipulations.base import Batch, Step, linear_normalise
from tests.models import tiny_classifier


def test_linear_normalise():
    w = torch.tensor([2.0, -1.0, 1.0, 1.0])
    assert torch.allclose(linear_normalise(w), torch.tensor([0.5, 0.0, 0.25, 0.25]))
    assert torch.equal(linear_normalise(torch.tensor([1e-9, -3.0])), torch.zeros(2))


def test_softmax_normalisation_with_temperature():
    labels = torch.tensor([0, 1, 1])
    m = LearnedWeighting(labels, 2, norm="softmax", temperature=10.0)
    m.weights = torch.tensor([0.0, 10.0, 20.0])
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert torch.allclose(m.normalised(torch.arange(3)), expected)


def step_for(positions, labels):
    batch = Batch(positions, labels[positions], {})
    step = Step(batch, model=None)
    step._losses = torch.ones(len(positions), requires_grad=True)
    return step


def test_weight_update_rule():
    labels = torch.tensor([0, 1, 1, 0])
    m = LearnedWeighting(labels, 2, w_init=1.0, w_decay=5.0)
    step = step_for(torch.tensor([0, 2, 3]), labels)
    m.reward_step(step, [torch.tensor([-0.3, 0.1, 5.0])])
    # w ← max(w / w_decay − grad, 1e-5), only for the batch's examples
    assert torch.allclose(m.weights, torch.tensor([0.5, 1.0, 0.1, 1e-5]))


def test_weight_gradient_is_the_coefficient_derivative():
    """SPEC §3: ∂L_val/∂w_i = ∇L_val(θ')ᵀ Δ_i, the normalisation is not differentiated."""
    labels = torch.tensor([0, 1, 1])
    m = LearnedWeighting(labels, 2)
    m.weights = torch.tensor([1.0, 2.0, 1.0])
    coeffs, (w,) = m.lookahead_weights(step_for(torch.arange(3), labels))
    assert torch.allclose(coeffs, torch.tensor([0.25, 0.5, 0.25]))  # the lookahead uses ŵ
    d = torch.tensor([1.0, 0.0, -1.0])  # ∂L_val/∂c_i
    (grad,) = torch.autograd.grad((coeffs * d).sum(), w)
    assert torch.equal(grad, d)


def test_ren_weights_from_negative_gradient():
    labels = torch.tensor([0, 1, 1])
    m = RenWeighting(labels, 2)
    step = step_for(torch.arange(3), labels)
    m.reward_step(step, [torch.tensor([-3.0, 1.0, -1.0])])
    assert torch.allclose(m.weights, torch.tensor([0.75, 0.0, 0.25]))
    assert m.train_loss(step).item() == pytest.approx(1.0)


def test_proportion_is_inverse_class_frequency():
    labels = torch.tensor([0, 1, 1, 1])
    m = ProportionWeighting(labels, 2)
    step = step_for(torch.arange(4), labels)
    step._losses = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert m.train_loss(step).item() == pytest.approx(0.5)  # class 0 carries half the batch


def test_learned_weighting_moves_weights_on_a_real_model():
    """One engine step on a tiny BERT changes the batch's weights and nothing else."""
    from accelerate import Accelerator

    from datamanip.engine import take_step

    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    ids = torch.randint(5, 100, (6, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = Batch(torch.tensor([0, 1, 2]), labels[:3], {k: v[:3] for k, v in inputs.items()})
    val = [Batch(torch.arange(3), labels[3:], {k: v[3:] for k, v in inputs.items()})]
    m = LearnedWeighting(torch.cat([labels, labels]), 2, w_init=1.0, w_decay=5.0)
    loss, reward = take_step(model, opt, m, batch, val, True, Accelerator(cpu=True))
    assert reward is not None and loss > 0
    assert not torch.allclose(m.weights[:3], torch.full((3,), 0.2))  # the gradient moved them
    assert torch.equal(m.weights[3:], torch.ones(9))
