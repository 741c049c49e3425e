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
from guess_optim.bench import cli as bench_cli
from guess_optim.bench import peers as bench_peers


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

    assert {m["runner"] for m in r["memory"]} == {"backprop", "wt@recompute", "wt@release"}
    for m in r["memory"]:
        in_backward = bench.STORES[bench.parse_runner(m["runner"]).store].in_backward  # p.grad freed by each step
        assert m["step_bytes"] >= 0 and m["weights_bytes"] > 0 and (m["grad_bytes"] > 0) != in_backward
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
    assert floor_ratio("backprop", frozen=True) == floor_ratio("activation", frozen=True) == floor_ratio(
        "directional", frozen=True) == floor_ratio("mezo", frozen=True) == 1.0
    assert floor_ratio("activation@recompute", frozen=True) == pytest.approx(1.5)
    # a method reading the graph discovers it by a primal forward every step (a transformer's chains capture
    # activations), and the recompute replay once more
    assert floor_ratio("wt", frozen=True) == pytest.approx(1.5)
    assert floor_ratio("wt@recompute", frozen=True) == floor_ratio("wt@release", frozen=True) == pytest.approx(2.5)


@pytest.mark.parametrize("runner", ["sgd", "wt@stash", "mezo@recompute", "backprop@recompute", ""])
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

    monkeypatch.setattr(bench_peers, "_torchzero", missing)
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
        "time": [{**row, "runner": "activation", "ratio": 0.95}, {**row, "runner": "wt", "ratio": 1.6},
                 {**row, "runner": "directional", "ratio": 1.2}, {**row, "runner": "torchzero-fg", "ratio": 2.4}],
        "memory": [],
    }
    by = {(t["target"], t["config"]): t for t in evaluate_targets(results)}

    def name(kind, runner, config):
        return next(t.name for t in bench.TARGETS if (t.kind, t.runner, t.config) == (kind, runner, config))

    act = name("time", "activation", "mlp-d6-w1024-b128")
    wt = name("time", "wt", "mlp-d6-w1024-b128")
    fg = name("no-slower", "directional", None)
    assert by[(act, "mlp-d6-w1024-b128")]["met"] is True
    assert by[(wt, "mlp-d6-w1024-b128")]["met"] is False
    assert by[(fg, "mlp-d6-w1024-b128")]["measured"] == pytest.approx(0.5)
    assert by[(fg, "mlp-d6-w1024-b128")]["met"] is True
    # targets on other configurations are not measured here: one row each, without a configuration
    assert (name("time", "wt", "mlp-d3-w128-b128"), None) in by
    memory = [t for t in evaluate_targets(results) if t["target"] in {t.name for t in bench.TARGETS
                                                                      if t.kind == "memory"}]
    assert memory and all(t["met"] is None and t["config"] is None for t in memory)


# ------------------------------------------------------------------------------------ floors from the registry
def test_a_registered_estimator_gets_a_floor_and_joins_every_runner_without_a_bench_change():
    from dataclasses import dataclass

    from guess_optim import Estimator, register_estimator, unregister_estimator

    @dataclass(frozen=True)
    class ThreeMatmuls(Estimator):  # an activation-space guess costing 3 layer-sized products (say, a rank-3 sketch)
        name = "bench-test-three-matmuls"
        summary = "test only"
        needs = "next"
        guess_matmuls = 3

        def guess(self, site):
            return torch.randn(site.output.shape, generator=site.generator)

    register_estimator(ThreeMatmuls)
    try:
        assert floor_ratio(ThreeMatmuls.name) == pytest.approx((3 + 3) / 3)
        # recompute replays the primal and the guess: 3 + 3 + 1 + 3
        assert floor_ratio(f"{ThreeMatmuls.name}@recompute") == pytest.approx(10 / 3)
        assert floor_ratio(ThreeMatmuls.name, frozen=True) == 1.5  # (needs the graph: discovered every step)
        assert {ThreeMatmuls.name, f"{ThreeMatmuls.name}@recompute"} <= set(bench.every_runner())
        assert ThreeMatmuls.name in bench.suite("quick")[0].runners
    finally:
        unregister_estimator(ThreeMatmuls.name)
    with pytest.raises(ValueError, match="Invalid runner"):
        floor_ratio(ThreeMatmuls.name)
    assert ThreeMatmuls.name not in bench.every_runner()


def test_runner_lists_follow_the_registry_and_the_targets():
    from guess_optim import METHODS

    guessed = {m for m, c in METHODS.items() if c.space != "backprop"}
    assert {bench.parse_runner(r).method for r in bench.every_runner()} == guessed | set(bench.PEERS)
    # a method whose guess costs many backprop steps (wt-perp: 41) is timed at its default store only
    assert "wt@recompute" in bench.every_runner() and "wt-perp" in bench.every_runner()
    assert not any(r.startswith("wt-perp@") for r in bench.every_runner())
    assert bench.backprop_runner() == "backprop"
    named = {t.runner for t in bench.TARGETS} | {t.other for t in bench.TARGETS if t.other}
    assert named <= set(bench.core_runners())
    cases = {c.config.label: c for c in bench.suite("full")}  # every target configuration, with its runner
    for t in bench.TARGETS:
        if t.config is not None:
            assert t.runner in (cases[t.config].memory if t.kind == "memory" else cases[t.config].runners), t.name


# ------------------------------------------------------------------------------------------------- the console
def test_console_table_has_every_column_and_a_dash_where_not_measured():
    time_rows = [
        {"runner": "backprop", "time_s": 0.010, "ratio": 1.0, "ratio_iqr": 0.0, "floor": 1.0, "rounds": 18},
        {"runner": "wt", "time_s": 0.0125, "ratio": 1.25, "ratio_iqr": 0.04, "floor": 4 / 3, "rounds": 9},
    ]
    memory_rows = [{"runner": "backprop", "step_bytes": 2 * 2**20, "ratio": 1.0},
                   {"runner": "wt@recompute", "step_bytes": 2**20, "ratio": 0.5}]
    lines = bench.console_table("mlp-d6-w1024-b128", time_rows, memory_rows).splitlines()
    assert lines[0] == "mlp-d6-w1024-b128 (9 rounds)"
    assert lines[1].split() == ["runner", "ms/step", "time", "x", "bp", "IQR", "floor", "peak", "MiB", "peak", "x",
                                "bp"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}
    assert rows["backprop"] == ["10.0", "1.00", "0.00", "1.00", "2.0", "1.00"]
    assert rows["wt"] == ["12.5", "1.25", "0.04", "1.33", "–", "–"]
    assert rows["wt@recompute"] == ["–", "–", "–", "–", "1.0", "0.50"]


def test_the_console_prints_one_table_per_case_and_only_measured_targets(capsys):
    code = main(["--config", "mlp-d2-w8-b4", "--config", "mlp-d3-w8-b4", "--runners", "activation,wt",
                 "--rounds", "2", "--warmup", "0", "--no-memory", "--threads", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("floor: the matrix-product floor")
    headers = [ln for ln in out.splitlines() if ln.split()[:2] == ["runner", "ms/step"]]
    assert len(headers) == 2
    for label in ("mlp-d2-w8-b4", "mlp-d3-w8-b4"):
        assert f"{label} (2 rounds)" in out
    assert "issue" not in out
    assert "not measured" not in out and "target" not in out  # no target is about these configurations


def test_help_texts_say_what_is_measured(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out + bench.SUITE_NOTES["full"] + (bench.suite.__doc__ or "")
    assert "issue" not in text
    for runner in bench.every_runner():
        assert bench.parse_runner(runner).method in text


# ----------------------------------------------------------------------------------------------------- devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_exits_2_with_a_message(device, capsys):
    assert main(["--device", device, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "tpu"], "Invalid --device"), (["--device", "cpu:x"], "Invalid --device"),
    (["--rounds", "0"], "Invalid --rounds"), (["--warmup", "-1"], "Invalid --warmup"),
    (["--threads", "0"], "Invalid --threads"),
])
def test_bad_numbers_and_devices_exit_2(argv, message, capsys):
    assert main([*argv, "--quiet", "--no-memory"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, where, message", [
    ("--out", "dir", "--out: '{dir}' is a directory; give a file name"),
    ("--markdown", "dir", "--markdown: '{dir}' is a directory; give a file name"),
    ("--markdown", "file/x.md", "--markdown: '{file}' is an existing file, not a directory"),
    ("--plot-dir", "file", "--plot-dir: '{file}' is an existing file, not a directory"),
])
def test_unusable_outputs_exit_2_before_measuring(tmp_path, capsys, monkeypatch, flag, where, message):
    """Regression: --out/--markdown/--plot-dir were first written after the first case (minutes into a run), whose
    results were then lost in a traceback."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(bench_cli, "run", lambda *a, **k: pytest.fail("measured before the outputs were checked"))
    names = {"dir": str(tmp_path / "dir"), "file": str(tmp_path / "file")}
    assert main(["--config", "mlp-d2-w8-b4", "--no-memory", "--quiet", flag, str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_gpu_script_without_cuda_exits_2_naming_the_fix(tmp_path):
    """``benchmarks/run_gpu.sh`` on a machine without CUDA: exit 2 and what to do, before any benchmark runs (no
    results written)."""
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "run_gpu.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, check=False, timeout=300)
    assert done.returncode == 2
    assert "no Python with CUDA-enabled torch found" in done.stderr and "PYTHON=" in done.stderr
    assert not (tmp_path / "out" / "bench_cuda.json").exists()


def test_gpu_script_parses():
    import pathlib
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "run_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0


# ------------------------------------------------------------------------------------------------------ peers
def test_torchzero_peer_writes_its_forward_gradient_and_steps_the_shared_adamw(monkeypatch):
    pytest.importorskip("torchzero")
    from guess_optim.bench.runners import Runner, build

    built = build(Config("mlp", 4, 2, 8), torch.device("cpu"), 0)
    runner = Runner("torchzero-fg", built, seed=5)
    assert type(runner.optimizer) is torch.optim.AdamW
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (steps.append(self), original(self, *a, **k)))
    before = [p.detach().clone() for p in runner.params]

    # backprop's gradient at the same point, on a copy
    reference = Runner("backprop", built, seed=5)
    reference.model.load_state_dict(runner.model.state_dict())
    reference.loss().backward()
    grad = [p.grad for p in reference.params]

    runner.step()
    assert steps == [runner.optimizer]
    # torchzero's estimate (∇L·V) V, V ~ N(0, I) drawn from its generator seeded with the runner's seed
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen) for p in runner.params]
    d = sum((vi * gi).sum() for vi, gi in zip(v, grad, strict=True))
    for p, vi in zip(runner.params, v, strict=True):
        torch.testing.assert_close(p.grad, d * vi, rtol=1e-4, atol=1e-6)
    # and the step is AdamW's on that estimate: replay it on a copy of the weights
    copies = [b.clone().requires_grad_() for b in before]
    for c, p in zip(copies, runner.params, strict=True):
        c.grad = p.grad.clone()
    torch.optim.AdamW(copies, lr=bench.runners.LR, weight_decay=0.0).step()
    for c, p in zip(copies, runner.params, strict=True):
        torch.testing.assert_close(p.detach(), c.detach())
