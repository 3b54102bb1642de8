"""The lookahead: the step the real optimiser would take, computed without taking it.

SPEC §2 step 1: θ'(φ) = θ + Δ(φ), where Δ is the step of the run's own optimiser (AdamW with bias
correction and decoupled weight decay for text models, SGD with momentum for image models) on the
manipulated batch. :func:`lookahead` reads the optimiser's state and returns θ' together with the
optimiser's preconditioner P = ∂Δ/∂g, the derivative of the step with respect to the batch
gradient g. The reward gradient of any manipulation is then ∇L_val(θ')ᵀ P ∂g/∂φ.

For SGD (with or without momentum) Δ is affine in g, so P is exact. For Adam, Δ also depends on g
through the second moment v; P treats v (and so 1/(√v̂ + ε)) as fixed during the step, as the
reference code does. ``tests/test_weight_gradients.py`` measures how close this is to the exact
derivative through v.
"""

import torch
from torch import Tensor

from datamanip.errors import DatamanipError


def lookahead(
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    grads: list[Tensor],
    precond_into_grads: bool = False,
    rows: dict[int, Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor | float]]:
    """Returns θ' = θ + Δ and the preconditioner P = ∂Δ/∂g, leaving the optimiser untouched.

    Args:
        optimizer: the run's optimiser; its param groups must hold ``params``.
        params: the model parameters θ, in any order.
        grads: the batch gradient for each parameter (detached).
        precond_into_grads: write each tensor P into its gradient's buffer (the gradients are
            lost), so that θ', P and g are never all held at once.
        rows: for parameter ``params[k]``, the rows ``rows[k]`` alone: its gradient holds only
            those rows, and so do its θ' and P (:mod:`datamanip.embedding_rows`).

    Returns:
        ``(new_params, precond)``: detached tensors θ', and per parameter either a tensor or a
        float P such that a small change dg of the gradient moves θ' by P * dg.
    """
    new_params, precond = [], []
    for grad, (new, p) in zip(grads, _steps(optimizer, params, grads, rows or {})):
        new_params.append(new)
        if precond_into_grads and torch.is_tensor(p):
            p = grad.copy_(p)
        precond.append(p)
    return new_params, precond


def _steps(optimizer, params, grads, rows):
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    settings = _param_settings(optimizer)
    for k, (param, grad) in enumerate(zip(params, grads)):
        group = settings.get(id(param))
        if group is None:
            raise DatamanipError(
                "a model parameter is not in the optimiser; build it from model.parameters()"
            )
        state = optimizer.state.get(param, {})
        param = param.detach()
        if k in rows:  # the parameter and its per-element state on the kept rows
            shape = param.shape
            param = param[rows[k]]
            state = {n: s[rows[k]] if _per_element(s, shape) else s for n, s in state.items()}
        if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
            new, p = _adam(
                param,
                grad,
                state,
                group,
                decoupled=isinstance(optimizer, torch.optim.AdamW),
            )
        elif isinstance(optimizer, torch.optim.SGD):
            new, p = _sgd(param, grad, state, group)
        else:
            raise NotImplementedError(
                f"lookahead supports SGD, Adam and AdamW, not {type(optimizer).__name__}; "
                "build the optimiser as torch.optim.SGD, Adam or AdamW"
            )
        yield new, p


def _per_element(value, shape) -> bool:
    return torch.is_tensor(value) and value.shape == shape


def _param_settings(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _adam(param: Tensor, grad: Tensor, state: dict, group: dict, decoupled: bool):
    """One Adam/AdamW step as torch computes it (amsgrad and maximize unsupported)."""
    if group.get("amsgrad") or group.get("maximize"):
        raise NotImplementedError("lookahead does not support amsgrad or maximize; turn them off")
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    step = float(state["step"]) + 1 if "step" in state else 1.0
    if "exp_avg" in state:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    else:  # before the first step
        exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    if wd and not decoupled:
        grad = grad + wd * param
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step) ** 0.5

    # P first, in one buffer: with d = √v̂ + ε the step is −lr/bias1 · m/d and P = ∂Δ/∂g =
    # −lr (1 − β1) / (bias1 d); written as b2/(√v + ε b2) with b2 = √(1 − β2^t), it takes four
    # in-place passes. Then θ' = θ (1 − lr wd) + P m / (1 − β1), the step torch's AdamW takes.
    v = torch.mul(exp_avg_sq, beta2).addcmul_(grad, grad, value=1 - beta2)
    precond = v.sqrt_().add_(eps * bias2_sqrt).reciprocal_()
    precond.mul_(-lr * (1 - beta1) * bias2_sqrt / bias1)
    m = exp_avg.lerp(grad, 1 - beta1)
    new = param * (1 - lr * wd) if (wd and decoupled) else param.clone()
    new.addcmul_(precond, m, value=1 / (1 - beta1))
    del m

    # Where the gradient is exactly zero (embedding rows the batch never touched) every
    # per-example gradient is zero too, and 1/d can be 1/eps = 1e8: zero P there (SPEC §8).
    return new, precond.masked_fill_(grad == 0, 0.0)


def _sgd(param: Tensor, grad: Tensor, state: dict, group: dict):
    """One SGD step as torch computes it (momentum, dampening, nesterov, weight decay)."""
    if group.get("maximize"):
        raise NotImplementedError("lookahead does not support maximize; turn it off")
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    wd, nesterov = group["weight_decay"], group["nesterov"]
    d_grad = grad + wd * param if wd else grad
    if not momentum:
        return param - lr * d_grad, -lr

    buf = state.get("momentum_buffer")
    if buf is None:
        new_buf, slope = d_grad, 1.0  # torch's first step copies the gradient into the buffer
    else:
        new_buf, slope = buf * momentum + d_grad * (1 - dampening), 1 - dampening
    if nesterov:
        return param - lr * (d_grad + momentum * new_buf), -lr * (1 + momentum * slope)
    return param - lr * new_buf, -lr * slope
