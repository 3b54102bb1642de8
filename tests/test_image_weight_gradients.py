"""The weight gradient on a tiny ResNet (BatchNorm, SGD with momentum) against slow references.

As ``tests/test_weight_gradients.py`` does for text, in float64: the engine's fast path (a central
difference along u = P ∇L_val(θ')) against a per-example loop (one backward per example) and
against the exact derivative of L_val(θ'(w)) through a differentiable SGD-momentum step. The
references run every forward on copies of the BatchNorm buffers after the one forward of the
real step, so that all of them see the running statistics the engine's validation pass sees.
"""

import pytest
import torch
from torch.func import functional_call

from datamanip.engine import example_reward_gradients, trainable
from datamanip.lookahead import lookahead
from datamanip.manipulations.base import Batch, Step
from tests.models import tiny_resnet

B, V, SIZE = 6, 4, 16


def make_batches(seed=0):
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        pixels = torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 2, (n,), generator=g)
        return Batch(torch.arange(n), labels, {"pixel_values": pixels})

    return batch(B), batch(V)


def make_setup(warm_steps=3):
    """A tiny ResNet in train mode and an SGD-momentum optimiser with a momentum buffer."""
    model = tiny_resnet().double()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for s in range(warm_steps):
        train, _ = make_batches(100 + s)
        opt.zero_grad()
        logits = model(**train.inputs).logits
        torch.nn.functional.cross_entropy(logits, train.labels).backward()
        opt.step()
    return model, opt


def losses_at(model, params, batch):
    """[batch] losses at ``params``, on copies of the buffers (the statistics stay put)."""
    state = params | {n: b.clone() for n, b in model.named_buffers()}
    logits = functional_call(model, state, (), batch.inputs).logits
    return torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none")


def val_loss_at(model, params, val):
    model.eval()
    try:
        return losses_at(model, params, val).mean()
    finally:
        model.train()


def reference_setup():
    """The setup after the real step's forward, which moves the running statistics once."""
    model, opt = make_setup()
    train, val = make_batches()
    with torch.no_grad():
        model(**train.inputs)
    names, params = trainable(model)
    return model, opt, train, val, names, params


def per_example_weight_grads(w):
    model, opt, train, val, names, params = reference_setup()
    theta = dict(zip(names, params))
    g = torch.autograd.grad((w * losses_at(model, theta, train)).sum(), params)
    new_params, precond = lookahead(opt, params, list(g))
    leaves = [p.detach().requires_grad_() for p in new_params]
    g_val = torch.autograd.grad(val_loss_at(model, dict(zip(names, leaves)), val), leaves)
    out = torch.zeros(len(w), dtype=torch.float64)
    for i in range(len(w)):
        g_i = torch.autograd.grad(losses_at(model, theta, train)[i], params)
        out[i] = sum((pc * gv * gi).sum() for pc, gv, gi in zip(precond, g_val, g_i))
    return out


def exact_weight_grads(w):
    """d L_val(θ'(w)) / dw through torch's SGD-momentum update written out differentiably."""
    model, opt, train, val, names, params = reference_setup()
    w = w.clone().requires_grad_()
    loss = (w * losses_at(model, dict(zip(names, params)), train)).sum()
    g = torch.autograd.grad(loss, params, create_graph=True)
    group = opt.param_groups[0]
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    new = {}
    for name, p, gp in zip(names, params, g):
        buffer = opt.state[p]["momentum_buffer"] * momentum + (gp + wd * p)
        new[name] = p - lr * buffer
    (grad,) = torch.autograd.grad(val_loss_at(model, new, val), w)
    return grad


@pytest.fixture
def w():
    return torch.softmax(torch.randn(B, dtype=torch.float64, generator=torch.Generator()), 0)


def test_fast_path_matches_per_example_loop_and_exact_derivative(w):
    model, opt = make_setup()
    train, val = make_batches()
    phi = w.clone().requires_grad_()
    step = Step(train, model)
    (fast,), _ = example_reward_gradients(model, opt, step, phi, [phi], [val])

    slow = per_example_weight_grads(w)
    exact = exact_weight_grads(w)
    assert slow.abs().max() > 0
    torch.testing.assert_close(slow, exact, rtol=1e-9, atol=1e-12 * exact.abs().max().item())
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9 * slow.abs().max().item())


def test_reward_gradient_leaves_running_statistics_to_the_real_step(w):
    """The extra forwards at θ ± εu must not move BatchNorm's statistics, nor break the real
    step's backward (autograd saved the statistics of the training forward)."""
    model, opt = make_setup()
    train, val = make_batches()
    phi = w.clone().requires_grad_()
    step = Step(train, model)
    example_reward_gradients(model, opt, step, phi, [phi], [val])
    (phi.detach() * step.example_losses()).sum().backward()  # the θ step's backward

    reference, _ = make_setup()
    with torch.no_grad():
        reference(**train.inputs)  # the real step's one forward
    for (name, buffer), expected in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(buffer, expected), name
