"""The paper-reproduction experiments (guess_optim.reproduce) at tiny sizes: structure and sanity of their records.

Every experiment runs in about a second here; the checks are the invariants of its numbers (cosines in [-1, 1],
accuracies in [0, 1], backprop's relative one-step reduction exactly 1, the oracle's cosine exactly the requested
one, effective ranks in [1, min(shape)]), the files it writes, and that the same seed gives identical numbers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from guess_optim.reproduce import (
    EXPERIMENTS,
    BiasConfig,
    CosineConfig,
    DownstreamDepthConfig,
    OneStepConfig,
    SelfSharpeningConfig,
    SubspaceConfig,
    SweepConfig,
    Table1Config,
    effective_rank,
    main,
    matched_cosine_guess,
    projection_cosine,
    run_bias,
    run_cosine,
    run_downstream_depth,
    run_one_step,
    run_self_sharpening,
    run_subspace,
    run_sweep,
    run_table1,
)

TINY = {"batch_size": 32}
EPOCHS = {"batch_size": 400}  # experiments counted in epochs: 10 steps per epoch of mnist-5k
COS_TOL = 1e-6  # the oracle's measured cosine vs the requested one


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster on a shared 2-core machine, and the same reduction order in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flat_numbers(x):
    """Every number in a nested record (None for JSON nulls)."""
    if isinstance(x, dict):
        for v in x.values():
            yield from flat_numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from flat_numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def check_files(record, tmp_path, name):
    assert record["files"] == [str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}.png")]
    on_disk = json.loads((tmp_path / f"{name}.json").read_text())
    assert on_disk["experiment"] == name
    assert on_disk["results"] == record["results"]
    assert set(on_disk) >= {"config", "versions", "seconds", "paper"}
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # the text table the command prints (regression: `guess-optim reproduce <name>` printed no numbers)
    table = EXPERIMENTS[name].summary(on_disk)
    lines = table.splitlines()
    assert len(lines) >= 4 and any(set(line) <= {"-", " "} for line in lines)
    assert any(ch.isdigit() for line in lines[3:] for ch in line)


def in_unit(values, low=0.0):
    values = list(values)
    return values and all(v is not None and low - 1e-12 <= v <= 1 + 1e-12 for v in values)


# ------------------------------------------------------------------------------------------------------ experiments
COSINE = CosineConfig(depth=3, width=16, steps=4, every=2, repeats=1, **TINY)


def test_cosine_record_files_and_determinism(tmp_path):
    rng = torch.get_rng_state()
    rec = run_cosine(COSINE, out_dir=tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), rng), "the experiment must not touch the global RNG"
    check_files(rec, tmp_path, "cosine")
    res = rec["results"]
    assert res["steps"] == [0, 2, 4]
    assert set(res["curves"]) == set(COSINE.methods)
    for curve in res["curves"].values():
        assert len(curve) == 3 and in_unit(curve, low=-1)
    assert res["ratio_to_directional"]["directional"] == 1.0
    assert run_cosine(COSINE, progress=False)["results"] == res


ONE_STEP = OneStepConfig(depth=3, width=16, steps=4, checkpoints=2, repeats=1, **TINY)


@pytest.mark.parametrize("scale", ["gradient", "raw"])
def test_one_step_backprop_is_exactly_one(tmp_path, scale):
    cfg = OneStepConfig(**{**ONE_STEP.__dict__, "scale": scale})
    rec = run_one_step(cfg, out_dir=tmp_path, progress=False)
    check_files(rec, tmp_path, "one-step")
    res = rec["results"]
    assert res["checkpoints"] == [0, 4]
    assert res["relative"]["backprop"] == [1.0, 1.0]
    assert res["relative_mean"]["backprop"] == 1.0
    assert all(len(r) == len(cfg.step_sizes) for rs in res["reduction"].values() for r in rs)
    assert all(eta in cfg.step_sizes for etas in res["best_step_size"].values() for eta in etas)
    assert in_unit(res["cosine"].values(), low=-1)
    assert run_one_step(cfg, progress=False)["results"] == res


def test_one_step_always_includes_backprop():
    assert OneStepConfig(methods=("wt",)).methods == ("backprop", "wt")


TABLE1 = Table1Config(configs=((2, 16), (3, 8)), methods=("backprop", "wt", "directional"), seeds=2, epochs=1,
                      **EPOCHS)


def test_table1_accuracies(tmp_path):
    rec = run_table1(TABLE1, out_dir=tmp_path, progress=False)
    check_files(rec, tmp_path, "table1")
    cells = rec["results"]["mnist-5k"]
    assert list(cells) == ["2x16", "3x8"]
    for cell in cells.values():
        assert set(cell) == {"backprop", "wt", "directional"}
        for v in cell.values():
            assert len(v["train"]) == 2 and in_unit(v["train"] + v["test"])
            assert in_unit([v["train_mean"], v["test_mean"]]) and v["train_std"] >= 0
    assert run_table1(TABLE1, progress=False)["results"] == rec["results"]


BIAS = BiasConfig(depth=3, width=16, methods=("directional", "wt"), warmup_steps=2, examples=4, max_guesses=8,
                  chunk=4, repeats=2, steps=6, eval_every=3, **TINY)


def test_bias_oracle_matches_requested_cosine(tmp_path):
    rec = run_bias(BIAS, out_dir=tmp_path, progress=False)
    check_files(rec, tmp_path, "bias")
    res = rec["results"]
    assert res["averaging"]["guesses"] == [1, 2, 4, 8]
    for curve in res["averaging"]["mean"].values():
        assert in_unit(curve, low=-1)
    cos = res["cos_theta"]
    assert 0 < cos <= 1
    assert abs(res["oracle_cosine_check"]["min"] - cos) < COS_TOL
    assert abs(res["oracle_cosine_check"]["max"] - cos) < COS_TOL
    assert set(res["adamw"]) == {"backprop", "wt", "oracle", "oracle+bias"}
    assert len(res["sgd"]) == 4
    assert in_unit(res["final_train_acc"].values())
    assert run_bias(BIAS, progress=False)["results"] == res


def test_bias_fixed_cos_theta():
    res = run_bias(BiasConfig(**{**BIAS.__dict__, "cos_theta": 0.3, "max_guesses": 1, "repeats": 1}),
                   progress=False)["results"]
    assert res["cos_theta"] == 0.3
    check = res["oracle_cosine_check"]
    assert abs(check["min"] - 0.3) < COS_TOL and abs(check["max"] - 0.3) < COS_TOL


SHARP = SelfSharpeningConfig(depth=3, width=16, powers=(0.5, 2.0), steps=8, measure_every=4, cosine_every=2, **TINY)


def test_self_sharpening_effective_rank_bounds(tmp_path):
    rec = run_self_sharpening(SHARP, out_dir=tmp_path, progress=False)
    check_files(rec, tmp_path, "self-sharpening")
    runs = rec["results"]["runs"]
    assert list(runs) == ["wt p=0.5", "wt p=2", "self-sharpening uniform", "self-sharpening symmetric-uniform"]
    for r in runs.values():
        assert r["steps"] == [0, 4, 8]
        assert in_unit(r["cosine"], low=-1) and len(r["cosine"]) == 2
        for rank, shape in zip(r["layer_ranks"], r["layer_shapes"], strict=True):
            assert 1 - 1e-9 <= rank <= min(shape) + 1e-9
        assert all(1 <= e <= max(min(s) for s in r["layer_shapes"]) for e in r["effective_rank"])
        assert in_unit(r["train_acc"] + r["test_acc"])
    assert run_self_sharpening(SHARP, progress=False)["results"] == rec["results"]


DOWN = DownstreamDepthConfig(depth=4, width=16, epochs=1, measure_every=5, cosine_every=2, seeds=2,
                             references=("backprop",), **EPOCHS)


def test_downstream_depth(tmp_path):
    rec = run_downstream_depth(DOWN, out_dir=tmp_path, progress=False)
    check_files(rec, tmp_path, "downstream-depth")
    runs = rec["results"]["runs"]
    assert list(runs) == ["downstream l=1", "downstream l=2", "backprop"]
    for name, r in runs.items():
        assert in_unit(r["train_acc"] + r["test_acc"])
        assert (r["cosine"] == []) == (name == "backprop")
        assert in_unit(r["cosine"], low=-1) or name == "backprop"
    assert run_downstream_depth(DOWN, progress=False)["results"] == rec["results"]


SUB = SubspaceConfig(depths=(3,), width=16, ks=(1, 4, 16, 999), epochs=(0, 1), pca_examples=64, grad_examples=32,
                     **TINY)


def test_subspace(tmp_path):
    rec = run_subspace(SUB, out_dir=tmp_path, progress=False)
    check_files(rec, tmp_path, "subspace")
    per = rec["results"]["curves"]["depth 3"]
    assert list(per) == ["epoch 0", "epoch 1"]
    for layers in per.values():
        assert list(layers) == ["input", "hidden 1", "hidden 2"]
        for c in layers.values():
            assert c["ks"] == [1, 4, 16]  # 999 exceeds every dimension: dropped
            assert in_unit(c["pca"]) and in_unit(c["random"])
    assert run_subspace(SUB, progress=False)["results"] == rec["results"]


def test_projection_cosine_full_and_empty_basis():
    g = torch.randn(5, 7, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    assert torch.allclose(projection_cosine(g, q), torch.ones(5, dtype=torch.float64))
    g[2] = 0
    assert projection_cosine(g, q[:, :3])[2] == 0


SWEEP = SweepConfig(width=16, methods=("backprop", "wt"), optimizers=("adamw", "sgd"), lrs=(1e-2, 1e-3), epochs=1,
                    **EPOCHS)


def test_sweep_best_lr(tmp_path):
    rec = run_sweep(SWEEP, out_dir=tmp_path, progress=False)
    check_files(rec, tmp_path, "sweep")
    res = rec["results"]
    for method in ("backprop", "wt"):
        for opt in ("adamw", "sgd"):
            runs = res["runs"][method][opt]
            assert set(runs) == {"0.01", "0.001"}
            best = res["best"][method][opt]
            assert best["lr"] in (1e-2, 1e-3)
            assert best["train_acc"] == max(r["train_acc"][-1] for r in runs.values())
            assert all(in_unit(r["train_acc"]) for r in runs.values())
    assert run_sweep(SWEEP, progress=False)["results"] == res


# --------------------------------------------------------------------------------------------- pure functions
def _cos(a: dict, b: dict) -> float:
    x = torch.cat([a[k].double().flatten() for k in b])
    y = torch.cat([b[k].double().flatten() for k in b])
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cos_theta", [0.001, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("biased", [False, True])
def test_matched_cosine_guess_has_the_requested_cosine(dtype, cos_theta, biased):
    gen = torch.Generator().manual_seed(0)
    grad = {"w": torch.randn(30, 20, dtype=dtype, generator=gen), "b": torch.randn(30, dtype=dtype, generator=gen)}
    bias = {"w": torch.randn(30, 20, dtype=dtype, generator=gen)} if biased else None  # "b" missing: zeros
    guess = matched_cosine_guess(grad, cos_theta, gen, bias_from=bias)
    assert {k: (v.shape, v.dtype) for k, v in guess.items()} == {k: (v.shape, v.dtype) for k, v in grad.items()}
    assert abs(_cos(guess, grad) - cos_theta) < COS_TOL
    g = torch.cat([v.double().flatten() for v in grad.values()])
    e = torch.cat([v.double().flatten() for v in guess.values()])
    # "projection" scale: the component along g is g itself, so |ĝ| = |g| / cos θ
    assert math.isclose(float(e @ g / (g @ g)), 1.0, rel_tol=1e-5)
    if biased and cos_theta < 1:  # the orthogonal part points along the bias' orthogonal part
        r = torch.cat([bias["w"].double().flatten(), torch.zeros(30, dtype=torch.float64)])
        r_perp, e_perp = r - (r @ g) / (g @ g) * g, e - (e @ g) / (g @ g) * g
        assert float(r_perp @ e_perp / (r_perp.norm() * e_perp.norm())) > 1 - 1e-5


def test_matched_cosine_guess_norm_scale_zero_gradient_and_errors():
    gen = torch.Generator().manual_seed(1)
    grad = {"w": torch.randn(50, dtype=torch.float64, generator=gen)}
    guess = matched_cosine_guess(grad, 0.1, gen, scale="norm")
    assert math.isclose(float(guess["w"].norm()), float(grad["w"].norm()), rel_tol=1e-12)
    assert abs(_cos(guess, grad) - 0.1) < COS_TOL
    zero = matched_cosine_guess({"w": torch.zeros(4)}, 0.5, gen)
    assert torch.equal(zero["w"], torch.zeros(4))
    # a bias parallel to g has no orthogonal part: a random orthogonal direction is used instead
    par = matched_cosine_guess(grad, 0.2, gen, bias_from={"w": 3 * grad["w"]})
    assert abs(_cos(par, grad) - 0.2) < COS_TOL
    for bad in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="Invalid cos_theta"):
            matched_cosine_guess(grad, bad, gen)
    with pytest.raises(ValueError, match="Invalid scale"):
        matched_cosine_guess(grad, 0.5, gen, scale="unit")


def test_matched_cosine_guess_is_seeded_and_spares_the_global_rng():
    grad = {"w": torch.randn(40, 3)}
    state = torch.get_rng_state()
    a = matched_cosine_guess(grad, 0.3, torch.Generator().manual_seed(7))
    b = matched_cosine_guess(grad, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a["w"], b["w"]) and torch.equal(torch.get_rng_state(), state)


def test_effective_rank_bounds():
    assert math.isclose(effective_rank(torch.eye(6)), 6.0, rel_tol=1e-12)
    assert math.isclose(effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))), 1.0, rel_tol=1e-6)
    w = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    assert 1 <= effective_rank(w) <= 7
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(torch.ones(3))


# ----------------------------------------------------------------------------------------------------- command line
def test_main_writes_files(tmp_path, capsys):
    rc = main(["cosine", "--out-dir", str(tmp_path), "--no-progress", "--depth", "2", "--width", "8", "--steps", "2",
               "--every", "2", "--repeats", "1", "--batch-size", "16", "--methods", "directional,wt"])
    assert rc == 0
    assert (tmp_path / "cosine.json").is_file() and (tmp_path / "cosine.png").is_file()
    out = capsys.readouterr().out
    assert "mean cosine" in out and "x directional" in out  # the results table
    assert f"wrote 2 files to {tmp_path}: cosine.json (" in out and "cosine.png (" in out
    rec = json.loads((tmp_path / "cosine.json").read_text())
    assert rec["config"]["methods"] == ["directional", "wt"] and rec["config"]["width"] == 8


BAD_FLAGS = [
    (["cosine", "--steps", "0"], "Invalid steps: 0; expected an int >= 1"),
    (["cosine", "--methods", "wt,foo"], "Invalid methods"),
    (["cosine", "--methods", "backprop"], "Invalid methods"),
    (["cosine", "--lr", "-1"], "Invalid lr"),
    (["cosine", "--dataset", "imagenet"], "Invalid dataset"),
    (["cosine", "--steps", "many"], "invalid int value"),
    (["cosine", "--threads", "0"], "Invalid threads"),
    (["one-step", "--step-sizes", "1e-3,-1"], "Invalid step_sizes"),
    (["one-step", "--scale", "unit"], "Invalid scale"),
    (["table1", "--configs", "3x128,6"], "expected 2 values joined by 'x'"),
    (["table1", "--datasets", "mnist,imagenet"], "Invalid datasets"),
    (["table1", "--optimizer", "lbfgs"], "Invalid optimizer"),
    (["bias", "--cos-theta", "1.5"], "Invalid cos_theta"),
    (["bias", "--momentum", "1"], "Invalid momentum"),
    (["self-sharpening", "--powers", "0,1"], "Invalid powers"),
    (["self-sharpening", "--distributions", "cauchy"], "Invalid distributions"),
    (["downstream-depth", "--layers", "0,1"], "Invalid layers"),
    (["subspace", "--epochs", "3,1"], "Invalid epochs"),
    (["subspace", "--depths", "1"], "Invalid depths"),
    (["sweep", "--optimizers", "adamw,rmsprop"], "Invalid optimizers"),
    (["nonsense"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_main_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--no-progress"] if argv != ["nonsense"] else argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_main_prog_name_in_errors(capsys):
    with pytest.raises(SystemExit):
        main(["cosine", "--repeats", "0"], prog="guess-optim reproduce")
    err = capsys.readouterr().err
    assert err.startswith("usage: guess-optim reproduce") and "Invalid repeats: 0" in err


def test_config_keeps_data_dir_json_ready(tmp_path):
    assert CosineConfig(data_dir=tmp_path).data_dir == str(tmp_path)
    with pytest.raises(ValueError, match="Invalid data_dir"):
        CosineConfig(data_dir=3)


def test_config_round_trips_through_json():
    cfg = Table1Config(configs=((3, 16),), methods=("wt",))
    again = Table1Config(**json.loads(json.dumps(cfg.__dict__)))
    assert again == cfg and again.configs == ((3, 16),)


# ------------------------------------------------------------------------------------------------- follow-up (2025)
def test_follow_up_record_files_and_labels_from_the_registry(tmp_path, capsys):
    """``guess-optim reproduce follow-up`` at a tiny size (two steps per run): every part of the record, the files,
    the printed table, labels and colours from the estimator registry, and the same numbers from the same seed."""
    from guess_optim.estimators import METHODS
    from guess_optim.reproduce import FollowUpConfig, run_follow_up

    methods = ("backprop", "wt", "wt-perp:rank=1", "wt-precond")
    argv = ["follow-up", "--datasets", "mnist1d", "--mlps", "3x8", "--cosine-mlps", "3x8", "--methods",
            ",".join(methods), "--seeds", "2", "--epochs", "1", "--batch-size", "2000", "--eval-every", "1",
            "--cosine-steps", "1", "--cosine-every", "1", "--cosine-batch-size", "32", "--bv-guesses", "8",
            "--bv-per-step", "4", "--bv-single", "2", "--out-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wt-perp:rank=1" in printed and "follow-up.json" in printed and "follow-up.png" in printed
    rec = json.loads((tmp_path / "follow-up.json").read_text())
    rec["files"] = [str(tmp_path / "follow-up.json"), str(tmp_path / "follow-up.png")]
    check_files(rec, tmp_path, "follow-up")
    res = rec["results"]
    assert res["methods"]["wt-perp:rank=1"] == {"method": "wt-perp", "options": {"rank": 1},
                                                "label": METHODS["wt-perp"].plot_label() + " (rank=1)",
                                                "color": METHODS["wt-perp"].color}
    r = res["mnist1d"]
    assert r["steps"] == 2 and r["mlp"] == "3x8"
    for m in methods:
        t = r["training"][m]
        assert t["eval_steps"] == [0, 1, 2] and len(t["test"]) == 2 and in_unit(t["train"] + t["test"])
    guessed = methods[1:]
    assert set(r["cosine"]["mean"]) == set(guessed) and r["cosine"]["steps"] == [0, 1] and not r["cosine"]["skipped"]
    assert all(in_unit(r["cosine"]["total"][m], low=-1) for m in guessed)
    assert set(r["cosine"]["per_layer"]["wt"]) == {"layers.1", "layers.3", "layers.5"}
    assert set(r["bias_variance"]) == set(guessed)
    for m in guessed:
        row = r["bias_variance"][m]["total"]
        assert row["variance"] >= 0 and row["bias"] >= 0 and row["norm"] > 0
    cfg = FollowUpConfig(**{**rec["config"], "methods": ("backprop", "wt-perp:rank=1"), "seeds": 1})
    again = run_follow_up(cfg, progress=False)["results"]["mnist1d"]
    assert again["training"]["wt-perp:rank=1"]["train_acc"][0] == r["training"]["wt-perp:rank=1"]["train_acc"][0]
    assert again["cosine"]["total"] == {"wt-perp:rank=1": r["cosine"]["total"]["wt-perp:rank=1"]}
    assert again["bias_variance"] == {"wt-perp:rank=1": r["bias_variance"]["wt-perp:rank=1"]}


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"methods": ("wt-perp:rank=0",)}, r"Invalid rank"),
    ({"methods": ("wt-perp:rank",)}, r"name:option=value"),
    ({"methods": ("nope",)}, r"Unknown method"),
    ({"methods": ("wt-perp:nope=1",)}, r"has no option 'nope'"),
    ({"mlps": ((4, 128),)}, r"Invalid mlps"),
    ({"epochs": 0}, r"Invalid epochs"),
])
def test_follow_up_bad_config(kwargs, pattern):
    from guess_optim.reproduce import FollowUpConfig

    with pytest.raises(ValueError, match=pattern):
        FollowUpConfig(**kwargs)


def test_follow_up_skips_a_method_over_its_exact_budget_on_the_cosine_mlp():
    from guess_optim.reproduce.follow_up import FollowUpConfig, _cosine_along_backprop

    cfg = FollowUpConfig(datasets=("mnist1d",), mlps=((3, 8),), cosine_mlps=((3, 8),), cosine_steps=1,
                         cosine_batch_size=16)
    from guess_optim.data import load_dataset

    out = _cosine_along_backprop(cfg, load_dataset("mnist1d"), 0, 3, 8,
                                 {"wt": ("wt", {}), "wt-precond:exact_budget=1": ("wt-precond", {"exact_budget": 1})})
    assert list(out["mean"]) == ["wt"] and "wt-precond:exact_budget=1" in out["skipped"]


def test_follow_up_parts_run_alone_and_bias_variance_uses_the_training_weights(tmp_path):
    """``--parts bias-variance`` trains its own copy of the first seed's backprop model: the same numbers as the full
    run's bias/variance part; the plot and the table leave the parts not run blank."""
    from guess_optim.reproduce import FollowUpConfig, run_follow_up

    base = {"datasets": ("mnist1d",), "mlps": ((3, 8),), "cosine_mlps": ((3, 8),), "methods": ("backprop", "wt"),
            "seeds": 1, "epochs": 1, "batch_size": 2000, "cosine_steps": 1, "cosine_every": 1,
            "cosine_batch_size": 32, "bv_guesses": 8, "bv_per_step": 4, "bv_single": 1}
    full = run_follow_up(FollowUpConfig(**base), progress=False)["results"]["mnist1d"]
    rec = run_follow_up(FollowUpConfig(**base, parts=("bias-variance",)), out_dir=tmp_path, progress=False)
    alone = rec["results"]["mnist1d"]
    assert "training" not in alone and "cosine" not in alone
    assert alone["bias_variance"] == full["bias_variance"]
    assert (tmp_path / "follow-up.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wt" in EXPERIMENTS["follow-up"].summary(rec)
    with pytest.raises(ValueError, match=r"Invalid parts"):
        FollowUpConfig(**base, parts=("nope",))
