"""StableAdamW: AdamW with per-tensor update clipping (Wortsman et al., 2023, arXiv 2304.13013).

The paper's self-sharpening runs and its optimizer sweep (Singhal et al., arXiv 2312.04709, App. A.3) use
this optimizer. :func:`stable_adamw` holds the math; :class:`StableAdamW` only keeps state and calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from guess_optim._checks import check_float

__all__ = ["StableAdamW", "stable_adamw"]


def _beta_hat(beta: float, step: int) -> float:
    """Step-dependent decay that makes the moving average bias-corrected: beta(1-beta^(t-1))/(1-beta^t)."""
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta**step)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Moments of 16-bit float parameters live in float32; other dtypes keep their own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _validate(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first invalid hyper-parameter of ``group`` and its expected range."""
    for key in ("lr", "eps", "weight_decay"):
        check_float(key, group[key], low=0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2) of floats in [0, 1)")
    for i, beta in enumerate(betas, start=1):
        check_float(f"beta{i} in betas={betas!r}", beta, low=0.0, high=1.0, high_strict=True)
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"Invalid maximize: {group['maximize']!r}; expected a bool")
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise ValueError(f"Invalid foreach: {group['foreach']!r}; expected None or a bool")


def stable_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    foreach: bool = False,
) -> None:
    """Apply one StableAdamW update in place; see :class:`StableAdamW` for the equations.

    Args:
        params: Parameters to update in place (any shape; float64, float32, bfloat16 or float16).
        grads: Their (guessed or backprop) gradients, same shapes; not modified.
        exp_avgs: Bias-corrected first moments m̂, updated in place; float32 for 16-bit params.
        exp_avg_sqs: Bias-corrected second moments v̂, updated in place; same dtype as ``exp_avgs``.
        steps: Per-tensor step number t >= 1 of this update (already incremented by the caller).
        lr: Learning rate before clipping.
        beta1: First-moment decay in [0, 1).
        beta2: Second-moment decay in [0, 1).
        eps: Added to sqrt(v̂) in the denominator; eps**2 floors v̂ in the RMS.
        weight_decay: Decoupled weight-decay coefficient λ.
        maximize: Ascend instead of descend (default: False).
        foreach: Use the multi-tensor ``torch._foreach_*`` path (default: False, the reference path).
    """
    if not params:
        return
    impl = _multi_tensor if foreach else _single_tensor
    impl(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
         weight_decay=weight_decay, maximize=maximize)


def _single_tensor(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                   maximize) -> None:
    for param, grad, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        g = grad.to(m.dtype)
        if maximize:
            g = -g
        b1, b2 = _beta_hat(beta1, t), _beta_hat(beta2, t)
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        rms = g.square().div_(v.clamp_min(eps * eps)).mean().sqrt().item()
        eta = lr / max(1.0, rms)  # max(1, nan) == 1 for empty tensors
        work = param if param.dtype == m.dtype else param.to(m.dtype)
        if weight_decay != 0:
            work.mul_(1.0 - eta * weight_decay)
        work.addcdiv_(m, v.sqrt().add_(eps), value=-eta)
        if work is not param:
            param.copy_(work)


def _multi_tensor(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                  maximize) -> None:
    buckets: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
    for i, (p, t) in enumerate(zip(params, steps, strict=True)):
        buckets.setdefault((p.device, p.dtype, t), []).append(i)
    for (device, _, t), idx in buckets.items():
        ps, ms, vs = [params[i] for i in idx], [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        state_dtype = ms[0].dtype
        gs = [grads[i].to(state_dtype) for i in idx]
        if maximize:
            gs = torch._foreach_neg(gs)
        b1, b2 = _beta_hat(beta1, t), _beta_hat(beta2, t)
        torch._foreach_lerp_(ms, gs, 1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
        ratios = torch._foreach_mul(gs, gs)
        torch._foreach_div_(ratios, torch._foreach_clamp_min(vs, eps * eps))
        sums = torch.stack(torch._foreach_norm(ratios, 1))  # L1 norm of a non-negative tensor = its sum
        numels = torch.tensor([g.numel() for g in gs], dtype=sums.dtype, device=device)
        etas = [lr / max(1.0, r) for r in sums.div_(numels).sqrt_().tolist()]  # one host sync per bucket
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_add_(denoms, eps)
        work = ps if ps[0].dtype == state_dtype else [p.to(state_dtype) for p in ps]
        if weight_decay != 0:
            torch._foreach_mul_(work, [1.0 - eta * weight_decay for eta in etas])
        torch._foreach_addcdiv_(work, ms, denoms, [-eta for eta in etas])
        if work is not ps:
            torch._foreach_copy_(ps, work)


class StableAdamW(Optimizer):
    r"""AdamW with per-tensor update clipping ("StableAdamW", Wortsman et al. 2023, arXiv 2304.13013).

    For every parameter tensor θ with gradient g (negated if ``maximize``) at its step t = 1, 2, ...::

        β̂ᵢ  = βᵢ (1 - βᵢ^(t-1)) / (1 - βᵢ^t)                  (β̂ᵢ = 0 at t = 1)
        m̂_t = β̂₁ m̂_{t-1} + (1 - β̂₁) g                          (bias-corrected first moment)
        v̂_t = β̂₂ v̂_{t-1} + (1 - β̂₂) g²                         (bias-corrected second moment)
        RMS  = sqrt(mean(g² / max(v̂_t, ε²)))                    (mean over the tensor's elements)
        η_t  = lr / max(1, RMS)
        θ    ← θ (1 - η_t λ) - η_t m̂_t / (sqrt(v̂_t) + ε)

    Folding the debiasing into β̂ (the reference gist's choice) keeps the bias-corrected m̂, v̂ in the state;
    it equals AdamW's m/(1-β₁^t), v/(1-β₂^t) in exact arithmetic, so with RMS <= 1 this *is* AdamW.

    Source and defaults: the reference implementation is M. Wortsman's gist ``StableAdamWUnfused``
    (gist.github.com/mitchellnw/d42e22a0b9ec02ceaf4f7b4457f51423): betas (0.9, 0.99), eps 1e-6, clip
    threshold 1, β̂ debiasing. ``lr`` and ``weight_decay`` defaults follow ``torch.optim.AdamW`` (the gist
    defaults to lr 2e-3, weight_decay 0.2).

    Where implementations in the wild differ:
      * Step counter: the gist, torch-optimi and pytorch-optimizer keep one counter per param group; this
        class keeps one per parameter (PyTorch's convention), so a tensor that skips steps (grad None) is
        debiased by its own count. They coincide when every parameter gets a gradient at every step.
      * Weight decay: torch-optimi, pytorch-optimizer and some copies of the gist decay with the clipped
        η_t (used here); other copies of the gist decay with the unclipped lr, θ(1 - lr λ).
      * eps: copies of the gist default to 1e-6 (used here, as in torch-optimi) or 1e-8 (pytorch-optimizer).

    Precision: moments of bfloat16/float16 parameters are kept in float32 and the update is computed in
    float32, then rounded once into the parameter (no Kahan summation); ``load_state_dict`` preserves this.

    Args:
        params: Parameters or param-group dicts; every hyper-parameter below can be set per group.
        lr: Learning rate before clipping, a finite float >= 0 (default: 1e-3).
        betas: Decay rates (β₁, β₂), each in [0, 1) (default: (0.9, 0.99)).
        eps: Denominator term ε, finite and >= 0 (default: 1e-6).
        weight_decay: Decoupled weight decay λ, finite and >= 0, scaled by the clipped η_t (default: 1e-2).
        maximize: Maximize the objective instead of minimizing it (default: False).
        foreach: Use the multi-tensor path; None picks it when all of a group's parameters are on CUDA
            (default: None).

    Raises:
        ValueError: On an invalid hyper-parameter, at construction or in ``add_param_group``.
        RuntimeError: In ``step`` on a sparse gradient or a complex parameter (not supported).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach)
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's hyper-parameters (merged with the defaults), then add it."""
        if isinstance(param_group, dict):
            _validate({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as ``Optimizer.load_state_dict`` does, keeping float32 moments of 16-bit params."""
        super().load_state_dict(state_dict)
        # The base class casts floating state to the parameter's dtype, which would round the float32
        # moments of bfloat16 parameters; reload those from the (unrounded) saved tensors.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params, strict=True):
            saved, state = state_dict["state"].get(pid, {}), self.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved and state[key].dtype != _state_dtype(p.dtype):
                    state[key] = saved[key].to(device=p.device, dtype=_state_dtype(p.dtype))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; parameters whose ``grad`` is None are skipped.

        Args:
            closure: Re-evaluates the model and returns the loss (default: None).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError("StableAdamW supports neither sparse gradients nor complex parameters")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=_state_dtype(p.dtype),
                                                      memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            foreach = group["foreach"]
            if foreach is None:
                foreach = bool(params) and all(p.is_cuda for p in params)
            beta1, beta2 = group["betas"]
            stable_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
                         beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                         maximize=group["maximize"], foreach=foreach)
        return loss
