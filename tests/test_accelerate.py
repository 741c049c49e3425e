"""Guessed gradients under DDP and Accelerate (2 CPU processes, gloo) and under mixed precision (bf16 autocast,
fp16 with a GradScaler).

Seeds in a distributed run: process ``r`` attaches with ``seed + r`` (as ``GuessedGradientCallback`` does), so each
process draws, for its shard, the guesses a single process with that seed draws for the same examples. The
all-reduced estimate must then equal the average of per-shard single-process estimates.

Where to attach under DDP: to the inner module, before or after wrapping (both are tested) — the engine's forward
hooks run inside DDP's forward, and the estimates are returned by an autograd Function to the parameters, so DDP's
gradient hooks all-reduce them like backprop's gradients.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from guess_optim import NonFiniteEstimateWarning, attach

SEED = 10
WORLD = 2
STEPS = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.LayerNorm(16) if norm else nn.Identity(), nn.Linear(16, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` global batches of 8 examples: ``[STEPS, 8, 8]`` inputs and ``[STEPS, 8]`` labels."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 8, generator=g), torch.randint(0, 3, (STEPS, 8), generator=g)


def shard(t: torch.Tensor, rank: int, parts: int = WORLD) -> torch.Tensor:
    return t.chunk(parts)[rank]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    """One process: raw DDP (attach before and after wrapping), then Accelerate with gradient accumulation."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    xs, ys = data()
    results = {}
    for order in ("before", "after"):
        model = mlp()
        if order == "before":
            handle = attach(model, "wt", seed=SEED + rank)
            ddp = nn.parallel.DistributedDataParallel(model)
        else:
            ddp = nn.parallel.DistributedDataParallel(model)
            handle = attach(ddp.module, "wt", seed=SEED + rank)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        grads = []
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(shard(xs[step], rank)), shard(ys[step], rank)).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        handle.remove()
        results[order] = {"grads": grads, "params": [p.detach().clone() for p in model.parameters()]}

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = mlp()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    inner = accelerator.unwrap_model(model)
    handle = attach(inner, "wt", seed=SEED + rank)
    grads = []
    for step in range(2):  # 2 optimizer steps of 2 micro-batches; micro-batch m of step s is xs[s + m]
        for micro in range(2):
            with accelerator.accumulate(model):
                x, y = shard(xs[step + micro], rank), shard(ys[step + micro], rank)
                accelerator.backward(F.cross_entropy(model(x), y))
                if accelerator.sync_gradients:
                    grads.append([p.grad.clone() for p in inner.parameters()])
                opt.step()
                opt.zero_grad()
    handle.remove()
    results["accelerate"] = {"grads": grads, "params": [p.detach().clone() for p in inner.parameters()],
                             "distributed": str(accelerator.distributed_type)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def per_shard_estimate(batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> list[torch.Tensor]:
    """Single process, seed ``SEED + rank``: the estimate of the micro-batches of shard ``rank`` (loss / count)."""
    model = mlp()
    with attach(model, "wt", seed=SEED + rank):
        for x, y in batches:
            (F.cross_entropy(model(shard(x, rank)), shard(y, rank)) / len(batches)).backward()
    return [p.grad for p in model.parameters()]


def test_ddp_and_accelerate_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    xs, ys = data()
    expected = [torch.stack(g).mean(0) for g in zip(*(per_shard_estimate([(xs[0], ys[0])], r) for r in range(WORLD)),
                                                     strict=True)]
    for order in ("before", "after"):
        for r in range(WORLD):
            for got, want in zip(ranks[r][order]["grads"][0], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # every step's estimate is all-reduced: the replicas stay identical
        for a, b in zip(ranks[0][order]["params"], ranks[1][order]["params"], strict=True):
            assert torch.equal(a, b)
        assert all(not torch.equal(a, b) for a, b in zip(ranks[0][order]["params"], mlp().parameters(),
                                                         strict=True))
    acc = [r["accelerate"] for r in ranks]
    assert acc[0]["distributed"].endswith("MULTI_CPU")
    micro = [(xs[0], ys[0]), (xs[1], ys[1])]
    expected = [torch.stack(g).mean(0) for g in zip(*(per_shard_estimate(micro, r) for r in range(WORLD)),
                                                     strict=True)]
    for r in range(WORLD):
        for got, want in zip(acc[r]["grads"][0], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(acc[0]["params"], acc[1]["params"], strict=True):
        assert torch.equal(a, b)


def toy_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return x, x[:, :3].argmax(1)


def train_mixed(dtype: torch.dtype, steps: int, scaler: torch.amp.GradScaler | None = None, method: str = "wt",
                norm: bool = False, on_nonfinite: str = "skip"):
    model = mlp(norm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = toy_problem()
    losses = []
    with attach(model, method, seed=0, on_nonfinite=on_nonfinite) as handle:
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            losses.append(loss.item())
            if scaler is None:
                loss.backward()
                assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in model.parameters())
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        skipped = handle.skipped_steps
    return losses, skipped, scaler


def test_bf16_autocast():
    losses, skipped, _ = train_mixed(torch.bfloat16, 40)
    assert skipped == 0
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_bf16_autocast_layernorm_between_linears():
    """Regression: under CPU autocast, layer_norm of a bf16 dual tensor returns a float32 tangent (PyTorch 2.14);
    the engine casts tangents to their value's dtype."""
    losses, skipped, _ = train_mixed(torch.bfloat16, 2, norm=True)
    assert skipped == 0


def test_bf16_autocast_vision_transformer_with_prompts():
    """Works: the ViT's residual stream stays float32 under CPU autocast (float32 position embeddings and prompts),
    so its LayerNorms see float32 inputs."""
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    from guess_optim.integrations.vpt import VisualPromptTuning, VPTConfig

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, num_labels=3))
    model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=2, deep=True)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    with attach(model, "wt", head=model.classifier, seed=0), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=y)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
    for p in (*model.prompts.parameters(), *model.classifier.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_fp16_grad_scaler():
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler (device-generic, CPU) needs torch >= 2.3")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6)
    losses, skipped, scaler = train_mixed(torch.float16, 40, scaler)
    assert skipped == 0 and scaler.get_scale() == 2.0**8
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_fp16_overflow_backs_off_grad_scaler_with_backprop():
    """The reference behaviour: with backprop, an overflowing scale gives inf gradients, the GradScaler skips the
    step and backs off."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    _, _, scaler = train_mixed(torch.float16, 5, scaler, method="backprop")
    assert scaler.get_scale() < 2.0**24


def test_fp16_overflow_backs_off_grad_scaler_with_guesses():
    """With on_nonfinite="propagate" an overflowed estimate reaches p.grad as backprop's would, so the GradScaler
    skips the step and backs off its scale (with the default "skip", p.grad stays None instead)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteEstimateWarning)
        _, skipped, scaler = train_mixed(torch.float16, 5, scaler, on_nonfinite="propagate")
    assert scaler.get_scale() < 2.0**24
    assert skipped >= 1
