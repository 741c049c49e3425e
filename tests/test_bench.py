"""The benchmark: the quick suite runs end to end and its outputs have the documented structure.

No test asserts a speed or a memory saving: timings on shared machines are noise, and the targets are reported in
BENCHMARKS.md, never asserted.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from guess_optim import bench
from guess_optim.bench import Case, Config, evaluate_targets, floor_ratio, main, mezo_step, time_case


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_suite_writes_json_markdown_and_plot(tmp_path):
    out, md, plots = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md", tmp_path / "plots"
    code = main(["--suite", "quick", "--warmup", "1", "--rounds", "2", "--quiet", "--out", str(out),
                 "--markdown", str(md), "--plot-dir", str(plots)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["schema"] == bench.SCHEMA and r["suite"] == "quick"
    for key in ("cpu", "cores", "torch_threads", "platform", "device", "versions"):
        assert key in r["machine"], key
    assert r["machine"]["versions"]["torch"] == torch.__version__
    assert r["load"]["start"] is not None and r["seconds"] > 0
    errors = [s for s in r["skipped"] if "error" in s["reason"]]
    assert not errors, errors

    expected = {c.config.label: {"backprop", *c.runners} for c in bench.suite("quick")}
    unavailable = {(s["config"], s["runner"]) for s in r["skipped"]}
    for label, runners in expected.items():
        measured = {row["runner"] for row in r["time"] if row["config"] == label}
        assert measured == {n for n in runners if (label, n) not in unavailable}, label
    for row in r["time"]:
        for key in ("time_s", "ratio", "ratio_q1", "ratio_q3", "floor", "of_floor"):
            assert finite_positive(row[key]), (row["config"], row["runner"], key, row[key])
        assert row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"] and row["rounds"] >= 1
        if row["runner"] == "backprop":
            assert row["ratio"] == 1.0 and row["floor"] == 1.0

    assert {m["runner"] for m in r["memory"]} == {"backprop", "wt@recompute"}
    for m in r["memory"]:
        assert m["step_bytes"] >= 0 and m["weights_bytes"] > 0 and m["grad_bytes"] > 0
        assert m["ratio"] is None or math.isfinite(m["ratio"]) and m["ratio"] >= 0
        assert finite_positive(m["total_ratio"])

    assert {t["target"] for t in r["targets"]} == {t.name for t in bench.TARGETS}
    text = md.read_text()
    for heading in ("## Machine", "## Targets", "## Time per training step", "## Peak memory of a training step"):
        assert heading in text
    assert "| mlp-d3-w32-b16 | wt |" in text
    assert (plots / "cost_vs_size.png").stat().st_size > 0
    assert "](plots/cost_vs_size.png)" in text

    again = tmp_path / "again.md"  # re-rendered from the JSON without measuring
    assert main(["--from-json", str(out), "--markdown", str(again), "--quiet"]) == 0
    assert "## Time per training step" in again.read_text()


@pytest.mark.parametrize(("runner", "floor"), [
    ("backprop", 1.0), ("activation", 1.0), ("mixing", 1.0), ("wt", 4 / 3), ("downstream", 5 / 3),
    ("directional", 1.0), ("activation@recompute", 4 / 3), ("wt@recompute", 2.0), ("mezo", 2 / 3),
    ("torchzero-fg", 1.0),
])
def test_floor_counts_matrix_products_against_backprops_three(runner, floor):
    assert floor_ratio(runner) == pytest.approx(floor)


def test_floor_with_a_frozen_backbone_counts_two_products_per_layer():
    assert floor_ratio("backprop", frozen=True) == floor_ratio("wt", frozen=True) == floor_ratio("mezo", frozen=True)
    assert floor_ratio("wt@recompute", frozen=True) == pytest.approx(1.5)


@pytest.mark.parametrize("runner", ["sgd", "wt@stash", "mezo@recompute", ""])
def test_unknown_runner_is_refused(runner):
    with pytest.raises(ValueError, match="Invalid runner"):
        floor_ratio(runner)


def test_config_labels_round_trip():
    for config in (Config("mlp", 128, 6, 1024), Config("convnet", 32), Config("vpt-vit-b16", 8)):
        assert Config.parse(config.label) == config
    with pytest.raises(ValueError, match="Invalid configuration"):
        Config.parse("resnet-b8")


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["--runners", "bogus", "--no-memory", "--quiet"]) == 2
    assert "Invalid runner" in capsys.readouterr().err
    assert main(["--config", "mlp-d2", "--quiet"]) == 2


def test_missing_torchzero_is_skipped_with_a_message(monkeypatch):
    def missing():
        raise bench.Unavailable("torchzero is not installed (pip install torchzero; benchmark only)")

    monkeypatch.setattr(bench, "_torchzero", missing)
    rows, skipped = time_case(Case(Config("mlp", 4, 2, 8), ("wt", "torchzero-fg"), rounds=1), warmup=0)
    assert {r["runner"] for r in rows} == {"backprop", "wt"}
    assert skipped == [{"config": "mlp-d2-w8-b4", "runner": "torchzero-fg",
                        "reason": "torchzero is not installed (pip install torchzero; benchmark only)"}]


def test_mezo_restores_parameters_and_writes_g_times_z():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    g = mezo_step(params, lambda: nn.functional.cross_entropy(model(x), y), seed=123, eps=1e-3)
    for p, b in zip(params, before, strict=True):  # restored up to float32 rounding, by subtraction
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(123)
    for p in params:  # the estimate is g z with z regenerated from the seed
        torch.testing.assert_close(p.grad, g * torch.randn(p.shape, generator=gen))
    # g is the central difference of the loss along z
    gen = torch.Generator().manual_seed(123)
    z = [torch.randn(p.shape, generator=gen) for p in params]
    with torch.no_grad():
        for p, zi in zip(params, z, strict=True):
            p.add_(zi, alpha=1e-3)
        plus = nn.functional.cross_entropy(model(x), y)
        for p, zi in zip(params, z, strict=True):
            p.sub_(zi, alpha=2e-3)
        minus = nn.functional.cross_entropy(model(x), y)
    assert g == pytest.approx(float(plus - minus) / 2e-3, rel=1e-3, abs=1e-4)


def test_mezo_refuses_low_precision_and_bad_eps():
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="inexact in low precision"):
        mezo_step([p], lambda: p.float().sum(), seed=0)
    q = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid eps"):
        mezo_step([q], lambda: q.sum(), seed=0, eps=0.0)


def test_targets_are_met_missed_or_not_measured():
    row = {"config": "mlp-d6-w1024-b128"}
    results = {
        "time": [{**row, "runner": "activation", "ratio": 1.05}, {**row, "runner": "wt", "ratio": 1.6},
                 {**row, "runner": "directional", "ratio": 1.2}, {**row, "runner": "torchzero-fg", "ratio": 2.4}],
        "memory": [],
    }
    by = {(t["target"], t["config"]): t for t in evaluate_targets(results)}
    names = {t.name: t for t in bench.TARGETS}
    act = next(n for n in names if n.startswith("activation-space"))
    wt = next(n for n in names if n.startswith("wt step time"))
    fg = next(n for n in names if n.startswith("directional faster"))
    assert by[(act, "mlp-d6-w1024-b128")]["met"] is True
    assert by[(wt, "mlp-d6-w1024-b128")]["met"] is False
    assert by[(fg, "mlp-d6-w1024-b128")]["measured"] == pytest.approx(0.5)
    assert by[(fg, "mlp-d6-w1024-b128")]["met"] is True
    memory = [t for t in evaluate_targets(results) if "memory" in t["target"]]
    assert memory and all(t["met"] is None and t["config"] is None for t in memory)
