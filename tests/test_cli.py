"""The ``guess-optim`` command: train and cosine on tiny settings, JSON output, errors and exit codes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from guess_optim import METHODS
from guess_optim.cli import build_optimizer, derive_seeds, main

TINY = ["--dataset", "digits", "--depth", "2", "--width", "16", "--batch-size", "128"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(tmp_path, *extra, name="out.json"):
    out = tmp_path / name
    code = main(["train", *TINY, "--epochs", "2", "--quiet", "--out", str(out), *extra])
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_train_writes_every_field(tmp_path, capsys):
    code, r = train(tmp_path, "--track-cosine", "3")
    assert code == 0
    for key in (
        "method",
        "dataset",
        "depth",
        "width",
        "epochs",
        "train_accuracy",
        "test_accuracy",
        "final_train_loss",
        "mean_cosine",
        "seconds",
        "skipped_steps",
        "config",
        "versions",
        "history",
        "seeds",
    ):
        assert key in r, key
    assert (r["method"], r["dataset"], r["depth"], r["width"], r["epochs"]) == ("wt", "digits", 2, 16, 2)
    assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
    assert math.isfinite(r["final_train_loss"]) and r["seconds"] > 0 and r["skipped_steps"] == 0
    assert -1 <= r["mean_cosine"] <= 1
    assert r["config"]["lr"] == 1e-3 and r["config"]["optimizer"] == "adamw" and r["config"]["seed"] == 0
    assert r["versions"]["torch"] == torch.__version__ and "guess_optim" in r["versions"]
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert r["history"][-1]["train_accuracy"] == r["train_accuracy"]
    assert r["seeds"] == derive_seeds(0)
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "cosine" in out and "test acc" in out


def test_one_seed_derivation_for_train_and_the_reproductions():
    """Regression: the CLI and the reproductions derived seeds with two different helpers."""
    from guess_optim._seeds import derive_seed
    from guess_optim.reproduce import _common

    assert derive_seeds(5) == {"init": 5, "loader": derive_seed(5, 1), "guesses": derive_seed(5, 2)}
    assert _common.derive_seed is derive_seed
    assert len({derive_seed(5, k) for k in range(100)}) == 100
    assert all(0 <= derive_seed(s, k) < 2**62 for s in (0, 2**40) for k in range(10))


def test_train_is_deterministic_and_tracking_off(tmp_path):
    _, a = train(tmp_path, "--track-cosine", "0", name="a.json")
    _, b = train(tmp_path, "--track-cosine", "0", name="b.json")
    assert a["mean_cosine"] is None and all(h["mean_cosine"] is None for h in a["history"])
    strip = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]  # noqa: E731
    assert strip(a) == strip(b)


def test_train_resume(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    assert main(["train", *TINY, "--epochs", "1", "--quiet", "--checkpoint-dir", ckpt]) == 0
    code, r = train(tmp_path, "--checkpoint-dir", ckpt, "--resume")
    assert code == 0 and r["epochs"] == 2 and len(r["history"]) == 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "stable-adamw"])
def test_train_optimizers(tmp_path, optimizer):
    if optimizer == "stable-adamw":
        pytest.importorskip("guess_optim.optim", reason="StableAdamW not available")
        from guess_optim import optim

        if not hasattr(optim, "StableAdamW"):
            pytest.skip("guess_optim.optim.StableAdamW not available")
    extra = ["--optimizer", optimizer, "--lr", "0.01"] + (["--momentum", "0.9"] if optimizer == "sgd" else [])
    code, r = train(tmp_path, *extra)
    assert code == 0 and r["optimizer"] == optimizer and 0 <= r["test_accuracy"] <= 1


def test_build_optimizer_types():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer("adamw", params, lr=0.1), torch.optim.AdamW)
    sgd = build_optimizer("sgd", params, lr=0.1, momentum=0.5, weight_decay=0.1)
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["weight_decay"] == 0.1
    assert build_optimizer("adamw", params, lr=0.1).defaults["weight_decay"] == 0.0  # not torch's 0.01
    with pytest.raises(ValueError, match="Invalid optimizer"):
        build_optimizer("lbfgs", params, lr=0.1)


def test_missing_dataset_exit_code_2(tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--download" in err and "not found" in err and "Traceback" not in err


BAD_FLAGS = [
    ["train", "--epochs", "0"],
    ["train", "--method", "nope"],
    ["train", "--dataset", "imagenet"],
    ["train", "--lr", "-1"],
    ["train", "--lr", "nan"],
    ["train", "--track-cosine", "-2"],
    ["train", "--resume"],
    ["train", "--optimizer", "adamw", "--momentum", "0.9"],
    ["cosine", "--methods", "wt,nope"],
    ["cosine", "--every", "0"],
    [],
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=lambda a: " ".join(a) or "no-command")
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


COSINE = ["--dataset", "digits", "--depth", "3", "--width", "16", "--steps", "6", "--every", "3", "--repeats", "1",
          "--no-progress"]


def test_cosine_table_and_json(tmp_path, capsys):
    code = main(["cosine", *COSINE, "--out-dir", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "cosine.json").read_text())
    assert r["experiment"] == "cosine" and (tmp_path / "cosine.png").is_file()
    guessed = [m for m, cls in METHODS.items() if cls.space != "backprop"]
    assert r["config"]["methods"] == guessed
    res = r["results"]
    assert res["steps"] == [0, 3, 6]
    assert all(abs(c) <= 1 + 1e-12 for curve in res["curves"].values() for c in curve)
    assert set(res["per_layer"]["wt"]) == {"layers.1", "layers.3", "layers.5"}
    assert set(res["mean"]) == set(guessed)
    assert res["ratio_to_directional"]["directional"] == 1.0
    assert res["mean"]["directional"] > 0  # (g.V)V has a non-negative cosine with g
    out = capsys.readouterr().out
    for name in guessed:
        assert name in out
    assert "x directional" in out and "wrote 2 files" in out and "cosine.json" in out


def test_cosine_without_directional_has_no_ratio(tmp_path):
    assert main(["cosine", *COSINE, "--methods", "wt,activation", "--out-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "cosine.json").read_text())
    assert r["config"]["methods"] == ["wt", "activation"]
    assert r["results"]["ratio_to_directional"] == {"wt": None, "activation": None}


def test_cosine_is_the_reproduce_command(tmp_path, capsys):
    """Regression: guess-optim cosine and guess-optim reproduce cosine were two implementations with different
    defaults (6x1024, 200 steps vs 6x256, 300 steps). Now one command: same flags, defaults and numbers."""
    from guess_optim.reproduce import build_parser

    for argv in (["cosine", "--help"], ["reproduce", "cosine", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    alias, full = capsys.readouterr().out.split("usage: guess-optim reproduce cosine")
    assert alias.startswith("usage: guess-optim cosine")
    assert alias.split("options:")[1] == full.split("options:")[1]
    defaults = vars(build_parser().parse_args(["cosine"]))
    assert (defaults["depth"], defaults["width"], defaults["steps"], defaults["every"]) == (6, 256, 300, 25)
    assert main(["cosine", *COSINE, "--methods", "wt", "--out-dir", str(tmp_path / "a")]) == 0
    assert main(["reproduce", "cosine", *COSINE, "--methods", "wt", "--out-dir", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "cosine.json").read_text()) for d in ("a", "b"))
    assert a["results"] == b["results"] and a["config"] == b["config"]


def test_cosine_out_flag_points_to_out_dir(capsys):
    assert main(["cosine", "--out", "cos.json"]) == 2
    assert "--out-dir" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train"], ["cosine"]])
def test_device_without_cuda_is_a_clear_error(command, monkeypatch, capsys):
    """Regression: ``--device cuda`` on a machine without a GPU ended in a raw traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        main([*command, "--device", "cuda"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "Invalid device: 'cuda'; CUDA is not available" in err and "Traceback" not in err


def test_reproduce_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--help"])
    assert exit_info.value.code == 0
    assert "usage: guess-optim reproduce" in capsys.readouterr().out


def test_train_with_gradient_release_and_recompute(tmp_path):
    """--gradient-release steps each parameter inside backward (tracking turned off by default); with the plain
    optimizer step it trains to the same result (element-wise AdamW)."""
    code, r = train(tmp_path, "--store", "recompute", "--gradient-release", name="released.json")
    assert code == 0 and r["mean_cosine"] is None and r["config"]["gradient_release"] is True
    _, plain = train(tmp_path, "--store", "recompute", "--track-cosine", "0", name="plain.json")
    assert [h["train_loss"] for h in r["history"]] == pytest.approx([h["train_loss"] for h in plain["history"]],
                                                                      rel=1e-4)


@pytest.mark.parametrize("extra, match", [
    (["--gradient-release", "--method", "backprop"], "guessed methods"),
    (["--gradient-release", "--track-cosine", "5"], "--track-cosine 0"),
    (["--store", "recompute", "--method", "backprop"], "--store applies to guessed methods"),
])
def test_train_gradient_release_errors(tmp_path, capsys, extra, match):
    """Regression: these refusals exited with code 1 and a bare message, after the data was loaded."""
    with pytest.raises(SystemExit) as info:
        train(tmp_path, *extra)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "guess-optim train: error: " in err and match in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("command", [["cosine"], ["reproduce", "cosine"]])
@pytest.mark.parametrize("where, message", [("file", "is an existing file, not a directory"),
                                            ("/proc/nope/out", "cannot create the directory '/proc/nope/out'")])
def test_reproduce_out_dir_is_checked_before_the_run(tmp_path, monkeypatch, capsys, command, where, message):
    """Regression: an unusable --out-dir was only noticed by finish(), after the whole experiment: the results were
    lost in a FileExistsError / FileNotFoundError traceback."""
    from guess_optim.reproduce import cosine

    def no_run(*args, **kwargs):
        raise AssertionError("the experiment ran")

    monkeypatch.setattr(cosine, "load", no_run)
    if where == "file":
        where = tmp_path / "file"
        where.write_text("not a directory\n")
    with pytest.raises(SystemExit) as info:
        main([*command, *COSINE, "--out-dir", str(where)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"guess-optim {' '.join(command)}: error: --out-dir: " in err and message in err
    with pytest.raises(ValueError, match="Invalid out_dir: .*" + message):  # the Python API too
        cosine.run_cosine(cosine.CosineConfig(dataset="digits"), out_dir=where)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A last.pt of ``wt`` with AdamW on the TINY MLP (2 x 16), one epoch."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    assert main(["train", *TINY, "--epochs", "1", "--quiet", "--track-cosine", "0", "--checkpoint-dir", str(ckpt)]) == 0
    return ckpt / "last.pt"


@pytest.mark.parametrize("extra, differs, hint", [
    (["--optimizer", "sgd"], "does not fit this optimizer: it was written with AdamW, this trainer has SGD",
     "--optimizer"),
    (["--gradient-release"], "it was written with AdamW, this trainer has OptimizerInBackward(AdamW)",
     "--gradient-release"),
    (["--method", "activation"], "was written by method 'wt', not 'activation'", "--method"),
    (["--width", "32"], "was written for another model: layers.1.weight is [16, 64] there, [32, 64] here",
     "--width"),
    (["--depth", "3"], "not in the checkpoint: layers.5.weight, layers.5.bias", "--depth"),
    # Regression: torch's load_state_dict restored the saved lr: the other --lr was ignored silently
    (["--lr", "0.01"], "was written with --lr 0.001, not 0.01", "the optimizer state restores them"),
    (["--weight-decay", "0.1"], "was written with --weight-decay 0, not 0.1", "run without --resume"),
    (["--gradient-release", "--lr", "0.01"], "this trainer has OptimizerInBackward(AdamW)", "--gradient-release"),
])
def test_resume_with_other_flags_is_a_clear_error(tmp_path, capsys, checkpoint, extra, differs, hint):
    """Regression: resuming with another --optimizer (KeyError: 'momentum' inside the first step), --method
    (ValueError traceback) or --width (state_dict size-mismatch traceback). Now a message naming the checkpoint and
    what differs, exit code 2, before anything is loaded, trained or written."""
    before = checkpoint.read_bytes()
    code, r = train(tmp_path, "--track-cosine", "0", "--checkpoint-dir", str(checkpoint.parent), "--resume", *extra)
    err = capsys.readouterr().err
    assert code == 2 and r is None and "Traceback" not in err
    assert f"guess-optim train: error: cannot --resume: the checkpoint at {str(checkpoint)!r}" in err
    assert differs in err and hint in err
    assert checkpoint.read_bytes() == before


def test_resume_from_an_unreadable_or_foreign_file_is_a_clear_error(tmp_path, capsys, checkpoint):
    """Regression: a damaged last.pt ended in torch.load's traceback ('Unsupported operand 103')."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for content, differs in [(b"garbage\n", "cannot be read (UnpicklingError"), (b"", "cannot be read (EOFError)"),
                             (checkpoint.read_bytes()[:1000], "cannot be read (RuntimeError")]:
        (ckpt / "last.pt").write_bytes(content)
        code, r = train(tmp_path, "--checkpoint-dir", str(ckpt), "--resume")
        err = capsys.readouterr().err
        assert code == 2 and r is None and "Traceback" not in err, err
        path = str(ckpt / "last.pt")
        assert f"guess-optim train: error: cannot --resume: the checkpoint at {path!r} {differs}" in err
        assert "run without --resume to start afresh" in err and (ckpt / "last.pt").read_bytes() == content
    torch.save({"model": {}}, ckpt / "last.pt")
    code, _ = train(tmp_path, "--checkpoint-dir", str(ckpt), "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "is not a checkpoint of GuessedGradientTrainer (it has no method, epoch" in err


def test_resume_a_checkpoint_without_the_optimizer_type(tmp_path, capsys, checkpoint):
    """Checkpoints written before the optimizer type was recorded: the optimizer state's structure is compared."""
    state = torch.load(checkpoint, weights_only=True)
    del state["optimizer_type"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(state, ckpt / "last.pt")
    code, _ = train(tmp_path, "--track-cosine", "0", "--checkpoint-dir", str(ckpt), "--resume", "--optimizer", "sgd")
    err = capsys.readouterr().err
    assert code == 2 and "does not fit this optimizer: hyper-parameters" in err and "(another optimizer type)" in err
    code, r = train(tmp_path, "--track-cosine", "0", "--checkpoint-dir", str(ckpt), "--resume")
    assert code == 0 and r["epochs"] == 2


@pytest.mark.parametrize("where, message", [
    ("file", "--checkpoint-dir: '{file}' is an existing file, not a directory"),
    ("/proc/nope/x.json", "--out: cannot create the directory '/proc/nope': No such file or directory"),
    ("dir", "--out: '{dir}' is a directory; give a file name"),
])
def test_unusable_output_locations_are_errors_before_training(tmp_path, monkeypatch, capsys, where, message):
    """Regression: --checkpoint-dir naming a file (FileExistsError traceback after the first epoch) and an --out
    that cannot be created (FileNotFoundError traceback)."""
    import guess_optim.cli as cli

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(cli, "load_dataset", no_training)
    (tmp_path / "file").write_text("x\n")
    paths = {"file": str(tmp_path / "file"), "dir": str(tmp_path)}
    flag = ["--checkpoint-dir", paths["file"]] if where == "file" else ["--out", paths.get(where, where)]
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--quiet", *flag])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "guess-optim train: error: " + message.format(**paths) in err


def test_convnet_on_a_sequence_dataset_is_an_error_up_front(monkeypatch, capsys):
    """Regression: --model convnet --dataset mnist1d loaded the data, then ended in build_model's ValueError."""
    import guess_optim.cli as cli

    monkeypatch.setattr(cli, "load_dataset", lambda *a, **k: pytest.fail("the dataset was loaded"))
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "convnet", "--dataset", "mnist1d", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "guess-optim train: error: --model convnet is a 2-D ConvNet for the image datasets (mnist-5k, digits" in err
    assert "--dataset mnist1d holds 1-D sequences: use --model mlp" in err


@pytest.mark.parametrize("content, message", [
    ("{}", "not the results of guess-optim bench --out (no command, started, seconds, machine, load, time, memory"),
    ('{"schema": "guess_optim.bench/0"}', "not the results of guess-optim bench --out of this version (schema "),
    ("[1, 2]", "not the results of guess-optim bench --out (a JSON list, not an object)"),
    ("x = 1\n", "not a JSON file (Expecting value: line 1 column 1 (char 0))"),
])
def test_bench_from_json_that_is_not_a_result(tmp_path, capsys, content, message):
    """Regression: valid JSON that is not a bench result ended in KeyError: 'targets'; a non-JSON file in a bare
    'Expecting value: line 1 column 1'."""
    path = tmp_path / "results.json"
    path.write_text(content)
    assert main(["bench", "--from-json", str(path), "--markdown", str(tmp_path / "report.md"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"guess-optim bench: error: --from-json {path}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "report.md").exists()
