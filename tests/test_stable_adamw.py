"""Tests for guess_optim.optim.StableAdamW (project issue 3).

The float64 reference below is written from the issue's equations with *textbook* debiasing
(m / (1 - β₁^t), v / (1 - β₂^t)) and a per-parameter step counter, so it also checks that the
implementation's folded β̂ debiasing is the same algorithm.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from guess_optim.optim import StableAdamW, stable_adamw

__all__: list[str] = []

# Per-dtype tolerances, kept in one place. Values are kwargs for torch.testing.assert_close.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),  # float64 run vs float64 reference
    torch.float32: dict(rtol=1e-5, atol=1e-6),  # float32 run vs float64 reference / external impl
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),  # bf16 foreach vs single-tensor (both compute in fp32)
}
BF16_TRACKING_RTOL = 0.05  # ||Δθ_bf16 - Δθ_fp32|| / ||Δθ_fp32|| after 30 steps
CLIP_RATIO_RTOL = 1e-4  # measured step ratio vs 1/RMS in the clipping test

FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])


# --------------------------------------------------------------------------- float64 reference
def reference_step(theta, g, state, *, lr, betas, eps, weight_decay, maximize):
    """One float64 StableAdamW step for one tensor; returns (new theta, RMS). ``state`` is mutated."""
    beta1, beta2 = betas
    g = -g if maximize else g
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = beta1 * state.get("m", torch.zeros_like(g)) + (1 - beta1) * g
    v = state["v"] = beta2 * state.get("v", torch.zeros_like(g)) + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    rms = math.sqrt((g * g / torch.clamp(v_hat, min=eps**2)).mean().item())
    eta = lr / max(1.0, rms)
    return theta * (1 - eta * weight_decay) - eta * m_hat / (v_hat.sqrt() + eps), rms


# Param groups for the reference test: an empty group, a parameter that never gets a gradient
# (group 0, index 2), one that gets a gradient only on even steps (group 2, index 1), and gradient
# spikes at steps 20 and 35 so that RMS > 1 and clipping is exercised.
GROUPS = [
    dict(shapes=[(6, 5), (5,), (4,)], lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, maximize=False),
    dict(shapes=[], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, maximize=False),
    dict(shapes=[(3, 4, 2), (7,)], lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.0, maximize=True),
    dict(shapes=[(1,), (2, 3)], lr=5e-3, betas=(0.0, 0.5), eps=1e-3, weight_decay=1.0, maximize=False),
]
NEVER, SOMETIMES, SPIKES = (0, 2), (2, 1), {20: 30.0, 35: 10.0}


def make_grads(steps: int, seed: int = 0) -> list[dict[tuple[int, int], torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(1, steps + 1):
        grads = {}
        for gi, spec in enumerate(GROUPS):
            for pi, shape in enumerate(spec["shapes"]):
                g = torch.randn(shape, generator=gen, dtype=torch.float64) * SPIKES.get(s, 1.0)
                skip = (gi, pi) == NEVER or ((gi, pi) == SOMETIMES and s % 2)
                grads[gi, pi] = None if skip else g
        out.append(grads)
    return out


def hyper(spec):
    return {k: v for k, v in spec.items() if k != "shapes"}


@FOREACH
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference_for_50_steps(dtype, foreach):
    gen = torch.Generator().manual_seed(1)
    init = {(gi, pi): torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            for gi, spec in enumerate(GROUPS) for pi, shape in enumerate(spec["shapes"])}
    params = {k: v.clone().requires_grad_() for k, v in init.items()}
    ref = {k: v.double() for k, v in init.items()}
    ref_state: dict = {k: {} for k in init}
    groups = [dict(params=[params[gi, pi] for pi in range(len(spec["shapes"]))], **hyper(spec))
              for gi, spec in enumerate(GROUPS)]
    opt = StableAdamW(groups, foreach=foreach)
    max_rms = 0.0
    for step_grads in make_grads(50):
        for k, g in step_grads.items():
            params[k].grad = None if g is None else g.to(dtype)
        opt.step()
        for k, g in step_grads.items():
            if g is not None:
                g64 = g.to(dtype).double()  # the run's (rounded) gradient, in float64
                ref[k], rms = reference_step(ref[k], g64, ref_state[k], **hyper(GROUPS[k[0]]))
                max_rms = max(max_rms, rms)
        for k, p in params.items():
            torch.testing.assert_close(p.detach().double(), ref[k], **TOL[dtype])
    assert max_rms > 2.0, "the gradient spikes should trigger update clipping"
    assert torch.equal(params[NEVER].detach(), init[NEVER]) and params[NEVER] not in opt.state
    assert opt.state[params[SOMETIMES]]["step"] == ref_state[SOMETIMES]["t"] == 25
    for k, p in params.items():  # the state holds the bias-corrected moments m̂, v̂
        if k != NEVER:
            b1, b2 = GROUPS[k[0]]["betas"]
            t = ref_state[k]["t"]
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), ref_state[k]["m"] / (1 - b1**t),
                                       **TOL[dtype])


@FOREACH
def test_matches_torch_optimi_stableadamw(foreach):
    optimi = pytest.importorskip("optimi")
    gen = torch.Generator().manual_seed(2)
    shapes = [[(8, 6), (6,)], [(5, 5, 2)]]
    hyper_groups = [dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05),
                    dict(lr=1e-2, betas=(0.85, 0.95), eps=1e-8, weight_decay=0.0)]
    init = [[torch.randn(s, generator=gen) for s in group] for group in shapes]
    ours = [[p.clone().requires_grad_() for p in group] for group in init]
    theirs = [[p.clone().requires_grad_() for p in group] for group in init]
    opt = StableAdamW([dict(params=ps, **h) for ps, h in zip(ours, hyper_groups, strict=True)],
                      foreach=foreach)
    # torch-optimi with its extras off: decoupled (lr-scaled) weight decay, no Kahan summation, no Triton.
    # It spells betas as per-group beta1/beta2.
    ext_groups = [dict(params=ps, lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                       weight_decay=h["weight_decay"]) for ps, h in zip(theirs, hyper_groups, strict=True)]
    ext = optimi.StableAdamW(ext_groups, lr=1.0, decouple_lr=False, kahan_sum=False, foreach=False,
                             triton=False)
    for s in range(40):
        for a, b in zip(sum(ours, []), sum(theirs, []), strict=True):
            a.grad = torch.randn(a.shape, generator=gen) * (25.0 if s in (15, 30) else 1.0)
            b.grad = a.grad.clone()
        opt.step()
        ext.step()
        for a, b in zip(sum(ours, []), sum(theirs, []), strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float32])


@FOREACH
def test_clipping_makes_the_step_smaller_than_adamw(foreach):
    """Constant gradients (RMS = 1, plain AdamW) then a 100x spike: RMS > 1 and the step shrinks by 1/RMS."""
    g0 = torch.linspace(-1.0, 1.0, 64).reshape(8, 8) + 0.05
    a, b = torch.zeros(8, 8, requires_grad=True), torch.zeros(8, 8, requires_grad=True)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)
    opt, adamw = StableAdamW([a], foreach=foreach, **kw), torch.optim.AdamW([b], foreach=foreach, **kw)
    state: dict = {}
    ref = torch.zeros(8, 8, dtype=torch.float64)
    for s in range(11):
        g = g0 * (100.0 if s == 10 else 1.0)
        before_a, before_b = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        ref, rms = reference_step(ref, g.double(), state, **kw, maximize=False)
        if s < 10:
            torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float32])
    step_ours, step_adamw = (a.detach() - before_a).norm(), (b.detach() - before_b).norm()
    assert rms > 2.0
    assert step_ours < 0.5 * step_adamw
    assert (step_ours / step_adamw).item() == pytest.approx(1.0 / rms, rel=CLIP_RATIO_RTOL)


@FOREACH
def test_weight_decay_uses_the_clipped_rate(foreach):
    p = torch.full((4, 4), 2.0, requires_grad=True)
    lr, wd, eps = 0.1, 0.5, 1e-6
    opt = StableAdamW([p], lr=lr, weight_decay=wd, eps=eps, foreach=foreach)
    state: dict = {}
    expected = p.detach().double()
    grads = [torch.full((4, 4), 0.01)] * 10 + [torch.full((4, 4), 10.0)]  # the last step has RMS ≈ 3.2
    for g in grads:
        p.grad = g
        opt.step()
        previous = expected
        expected, rms = reference_step(expected, g.double(), state, lr=lr, betas=(0.9, 0.99), eps=eps,
                                       weight_decay=wd, maximize=False)
    assert rms > 3
    torch.testing.assert_close(p.detach().double(), expected, **TOL[torch.float32])
    # Decaying with the unclipped lr, θ(1 - lr λ) instead of θ(1 - η λ), would land measurably elsewhere.
    unclipped_decay = expected + previous * (lr / rms - lr) * wd
    assert (p.detach().double() - unclipped_decay).abs().min() > 1e-2


# --------------------------------------------------------------------------- PyTorch conventions
def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def _groups(model):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=weights, weight_decay=0.1), dict(params=biases, weight_decay=0.0, lr=3e-3)]


def _train(model, opt, sched, steps, offset=0):
    gen = torch.Generator().manual_seed(1234)
    data = [torch.randn(32, 5, generator=gen) for _ in range(offset + steps)][offset:]
    dtype = next(model.parameters()).dtype
    for batch in data:
        x, y = batch[:, :4].to(dtype), batch[:, 4:].to(dtype)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()


@FOREACH
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_resume_is_bit_identical(dtype, foreach):
    def fresh():
        model = _mlp(dtype)
        opt = StableAdamW(_groups(model), lr=1e-2, foreach=foreach)
        return model, opt, lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)

    model, opt, sched = fresh()
    _train(model, opt, sched, 20)

    model2, opt2, sched2 = fresh()
    _train(model2, opt2, sched2, 10)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf)
    del model2, opt2, sched2
    buf.seek(0)
    ckpt = torch.load(buf)
    model3, opt3, sched3 = fresh()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    sched3.load_state_dict(ckpt["sched"])
    for p in model3.parameters():  # load_state_dict keeps float32 moments for bf16 params
        assert opt3.state[p]["exp_avg"].dtype == opt3.state[p]["exp_avg_sq"].dtype == torch.float32
    _train(model3, opt3, sched3, 10, offset=10)

    for p, q in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(opt3.state[q][key]))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt3.param_groups]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_and_single_tensor_paths_agree(dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [(9, 7), (7,), (0, 3), (3, 3, 3)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    runs = {fe: [p.clone().requires_grad_() for p in init] for fe in (False, True)}
    opts = {fe: StableAdamW([dict(params=ps[:2], weight_decay=0.1),
                             dict(params=ps[2:], lr=3e-2, maximize=True)], lr=1e-2, foreach=fe)
            for fe, ps in runs.items()}
    for s in range(25):
        grads = [torch.randn(sh, generator=gen).to(dtype) * (20.0 if s == 12 else 1.0) for sh in shapes]
        for fe, ps in runs.items():
            for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
                p.grad = None if (i == 1 and s % 3 == 0) else g.clone()  # differing per-param step counts
            opts[fe].step()
        for p, q in zip(runs[False], runs[True], strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[dtype])
            assert p.dtype == dtype


@FOREACH
def test_bfloat16_run_tracks_float32_run(foreach):
    gen = torch.Generator().manual_seed(4)
    init = [(0.1 * torch.randn(s, generator=gen)).bfloat16().float() for s in [(16, 8), (8,)]]
    p32 = [p.clone().requires_grad_() for p in init]
    p16 = [p.bfloat16().requires_grad_() for p in init]
    o32 = StableAdamW(p32, lr=1e-2, foreach=foreach)
    o16 = StableAdamW(p16, lr=1e-2, foreach=foreach)
    for _ in range(30):
        grads = [torch.randn(p.shape, generator=gen) for p in init]
        for a, b, g in zip(p32, p16, grads, strict=True):
            a.grad, b.grad = g.clone(), g.bfloat16()
        o32.step()
        o16.step()
    for a, b, p0 in zip(p32, p16, init, strict=True):
        assert b.dtype == torch.bfloat16 and o16.state[b]["exp_avg"].dtype == torch.float32
        d32, d16 = a.detach() - p0, b.detach().float() - p0
        assert ((d16 - d32).norm() / d32.norm()).item() < BF16_TRACKING_RTOL


@FOREACH
def test_maximize_equals_minimizing_the_negated_gradient(foreach):
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(5, 4, generator=gen), torch.randn(4, generator=gen)]
    pmax, pmin = [p.clone().requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]
    omax = StableAdamW(pmax, lr=1e-2, maximize=True, foreach=foreach)
    omin = StableAdamW(pmin, lr=1e-2, foreach=foreach)
    for s in range(10):
        grads = [torch.randn(p.shape, generator=gen) * (30.0 if s == 5 else 1.0) for p in init]
        for a, b, g in zip(pmax, pmin, grads, strict=True):
            a.grad, b.grad = g.clone(), -g
        omax.step()
        omin.step()
        assert all(torch.equal(a.grad, g) for a, g in zip(pmax, grads, strict=True)), "grads must not change"
    assert all(torch.equal(a, b) for a, b in zip(pmax, pmin, strict=True))


@FOREACH
def test_params_without_grad_are_skipped_and_get_no_state(foreach):
    model = _mlp()
    frozen = model[2].bias
    opt = StableAdamW(model.parameters(), lr=1e-2, foreach=foreach)
    before = frozen.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    assert all(opt.state[p]["step"] == 3 for p in model.parameters() if p is not frozen)
    StableAdamW(model.parameters(), foreach=foreach).load_state_dict(opt.state_dict())


def test_closure_loss_is_returned():
    p = torch.ones(3, requires_grad=True)
    opt = StableAdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(3.0)
    assert (p < 1).all()


def test_pure_function_updates_in_place():
    p, g = torch.ones(4), torch.full((4,), 0.5)
    m, v = torch.zeros(4), torch.zeros(4)
    stable_adamw([p], [g], [m], [v], [1], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.0)
    torch.testing.assert_close(m, g)  # at t = 1 the bias-corrected moments are g and g²
    torch.testing.assert_close(v, g * g)
    torch.testing.assert_close(p, torch.full((4,), 0.9), **TOL[torch.float32])  # θ - lr · g/(|g|+ε)


SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda epoch: 0.95),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3), lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[3]),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_drive_the_group_hyperparameters(name):
    """Every scheduler runs and sets the same lr (and beta1, where it cycles momentum) as on torch's AdamW."""
    runs = []
    for cls in (StableAdamW, torch.optim.AdamW):
        model = _mlp(seed=7)
        opt = cls(_groups(model), lr=1e-2, betas=(0.9, 0.99))
        sched = SCHEDULERS[name](opt)
        history = []
        for _ in range(12):
            opt.zero_grad()
            model(torch.ones(4, 4)).pow(2).mean().backward()
            opt.step()
            if name == "ReduceLROnPlateau":
                sched.step(1.0)
            else:
                sched.step()
            history.append([(g["lr"], g["betas"][0]) for g in opt.param_groups])
        assert all(torch.isfinite(p).all() for p in model.parameters())
        runs.append(history)
    assert runs[0] == runs[1]
    assert len({h[0][0] for h in runs[0]}) > 1, "the schedule should change lr"


BAD_HYPERPARAMETERS = [
    (dict(lr=-1e-3), r"Invalid lr: -0\.001; expected a finite number >= 0"),
    (dict(lr=float("nan")), r"Invalid lr: nan; expected a finite number >= 0"),
    (dict(lr=float("inf")), r"Invalid lr: inf; expected a finite number >= 0"),
    (dict(lr="1e-3"), r"Invalid lr: '1e-3'; expected a finite number >= 0"),
    (dict(lr=torch.tensor(1e-3)), r"Invalid lr: tensor\(.*expected a finite number >= 0"),
    (dict(betas=(1.0, 0.99)), r"Invalid beta1 in betas=\(1\.0, 0\.99\): 1\.0; expected a finite number >= 0 and < 1"),
    (dict(betas=(-0.1, 0.99)), r"Invalid beta1 .*: -0\.1; expected a finite number >= 0 and < 1"),
    (dict(betas=(0.9, 1.5)), r"Invalid beta2 .*: 1\.5; expected a finite number >= 0 and < 1"),
    (dict(betas=(0.9, float("nan"))), r"Invalid beta2 .*: nan; expected a finite number >= 0 and < 1"),
    (dict(betas=(0.9,)), r"Invalid betas: \(0\.9,\); expected a pair \(beta1, beta2\)"),
    (dict(betas=0.9), r"Invalid betas: 0\.9; expected a pair"),
    (dict(eps=-1e-8), r"Invalid eps: -1e-08; expected a finite number >= 0"),
    (dict(eps=float("inf")), r"Invalid eps: inf; expected a finite number >= 0"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay: -0\.1; expected a finite number >= 0"),
    (dict(weight_decay=float("nan")), r"Invalid weight_decay: nan; expected a finite number >= 0"),
    (dict(maximize="yes"), r"Invalid maximize: 'yes'; expected a bool"),
    (dict(foreach=1), r"Invalid foreach: 1; expected None or a bool"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_HYPERPARAMETERS,
                         ids=[str(k) for k, _ in BAD_HYPERPARAMETERS])
def test_invalid_hyperparameters_raise_value_error(kwargs, message):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        StableAdamW([p], **kwargs)
    with pytest.raises(ValueError, match=message):  # per-group values are validated too
        StableAdamW([dict(params=[p], **kwargs)])
    opt = StableAdamW([p])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group(dict(params=[torch.zeros(3, requires_grad=True)], **kwargs))
    assert len(opt.param_groups) == 1


def test_boundary_hyperparameters_are_accepted():
    p = torch.zeros(2, requires_grad=True)
    StableAdamW([p], lr=0, betas=(0.0, 0.0), eps=0.0, weight_decay=0)


@pytest.mark.parametrize("case", ["sparse", "complex"])
def test_unsupported_inputs_raise(case):
    if case == "sparse":
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.zeros(3).to_sparse()
    else:
        p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
        p.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="StableAdamW supports neither"):
        StableAdamW([p]).step()


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_on_both_paths(dtype):
    gen = torch.Generator().manual_seed(6)
    shapes = [(33, 17), (17,), (4, 4, 4)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    runs = {("cpu", False): None, ("cuda", False): None, ("cuda", True): None, ("cuda", None): None}
    for device, fe in runs:
        ps = [p.to(device, copy=True).requires_grad_() for p in init]
        runs[device, fe] = (ps, StableAdamW([dict(params=ps[:2], weight_decay=0.1), dict(params=ps[2:])],
                                            lr=1e-2, foreach=fe))
    for s in range(20):
        grads = [torch.randn(sh, generator=gen).to(dtype) * (30.0 if s == 10 else 1.0) for sh in shapes]
        for (device, _), (ps, opt) in runs.items():
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.to(device)
            opt.step()
    cpu = runs["cpu", False][0]
    for ps, opt in runs.values():
        for p, q in zip(cpu, ps, strict=True):
            torch.testing.assert_close(p.detach(), q.detach().cpu(), **TOL[dtype])
            assert opt.state[q]["exp_avg"].device == q.device
    # Checkpoint on CUDA round-trips bit-identically.
    ps, opt = runs["cuda", True]
    fresh_ps = [p.detach().clone().requires_grad_() for p in ps]
    fresh = StableAdamW([dict(params=fresh_ps[:2], weight_decay=0.1), dict(params=fresh_ps[2:])], lr=1e-2,
                        foreach=True)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    for p, q in zip(ps, fresh_ps, strict=True):
        p.grad = q.grad = torch.ones_like(p)
    opt.step()
    fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, fresh_ps, strict=True))
