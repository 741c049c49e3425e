"""Visual prompt tuning of Hugging Face ViTs (guess_optim/integrations/vpt.py) and LoRA through peft, with guesses."""

from __future__ import annotations

import copy
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

from guess_optim import attach  # noqa: E402
from guess_optim.integrations.vpt import (  # noqa: E402
    VisualPromptTuning,
    VPTConfig,
    get_vpt_model,
    vit_lora_target_modules,
)

HINT = 'pip install "guess-optim[hf]"'


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw) -> ViTConfig:
    base = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return ViTConfig(**{**base, **kw})


def tiny_vit(seed: int = 0, **kw) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_config(**kw))


def batch(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


BAD_CONFIGS = [
    ({"num_prompt_tokens": -1}, "num_prompt_tokens"),
    ({"num_prompt_tokens": 2.0}, "num_prompt_tokens"),
    ({"num_prompt_tokens": True}, "num_prompt_tokens"),
    ({"deep": 1}, "deep"),
    ({"prompt_dropout": 1.0}, "prompt_dropout"),
    ({"prompt_dropout": -0.1}, "prompt_dropout"),
    ({"init": "xavier"}, "init"),
    ({"train_head": "yes"}, "train_head"),
    ({"num_labels": 0}, "num_labels"),
]


@pytest.mark.parametrize(("kwargs", "pattern"), BAD_CONFIGS)
def test_config_rejects_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=f"Invalid {pattern}"):
        VPTConfig(**kwargs)


def test_bad_models_and_arguments():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="num_labels"):
        VisualPromptTuning(ViTModel(tiny_config(), add_pooling_layer=False), VPTConfig())
    with pytest.raises(TypeError, match="ViTModel or ViTForImageClassification"):
        VisualPromptTuning(torch.nn.Linear(3, 3), VPTConfig())
    with pytest.raises(TypeError, match="VPTConfig"):
        VisualPromptTuning(tiny_vit(), {"num_prompt_tokens": 2})
    with pytest.raises(ValueError, match="either"):
        get_vpt_model(tiny_vit(), VPTConfig(), deep=True)


@pytest.mark.parametrize("deep", [False, True])
def test_shapes_and_parameter_counts(deep):
    vit = tiny_vit()
    model = get_vpt_model(vit, num_prompt_tokens=5, deep=deep)
    x, y = batch()
    tokens = model.forward_features(x)
    assert tokens.shape == (4, 1 + 5 + 16, 32)
    out = model(x, labels=y)
    assert out.logits.shape == (4, 3) and out.loss.shape == ()
    assert len(model.prompts) == (3 if deep else 1)
    counts = model.trainable_parameters()
    assert counts["prompts"] == 5 * 32 * len(model.prompts)
    assert counts["head"] == 3 * 32 + 3
    assert counts["trainable"] == counts["prompts"] + counts["head"]
    assert counts["total"] == sum(p.numel() for p in vit.parameters()) + counts["prompts"]


def test_no_prompts_equals_plain_vit():
    vit = tiny_vit().eval()
    x, _ = batch()
    with torch.no_grad():
        expected = vit(x).logits
        model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=0))
        assert len(model.prompts) == 0
        assert torch.equal(model(x).logits, expected)
    # a ViTModel with a fresh head: the features are the plain last_hidden_state
    torch.manual_seed(0)
    base = ViTModel(tiny_config()).eval()
    with torch.no_grad():
        hidden = base(x).last_hidden_state
        wrapped = VisualPromptTuning(base, VPTConfig(num_prompt_tokens=0, num_labels=7))
        assert torch.equal(wrapped.forward_features(x), hidden)
        assert wrapped(x).logits.shape == (4, 7)


@pytest.mark.parametrize("deep", [False, True])
def test_masked_prompts_equal_plain_vit(deep):
    vit = tiny_vit().eval()
    x, _ = batch()
    with torch.no_grad():
        hidden = vit.vit(x).last_hidden_state
        model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=4, deep=deep)).eval()
        tokens = model.forward_features(x, mask_prompts=True)
        unmasked = model.forward_features(x)
    p = 4
    torch.testing.assert_close(tokens[:, :1], hidden[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1 + p:], hidden[:, 1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, :1], hidden[:, :1], atol=1e-3)  # the prompts do act when attended to


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_enter_every_block_when_deep(deep):
    model = VisualPromptTuning(tiny_vit(), VPTConfig(num_prompt_tokens=2, deep=deep)).eval()
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 1:3].clone()))
             for layer in model.vit.layers]
    x, _ = batch()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for i, prompts in enumerate(seen):
        own = model.prompts[i if deep else 0].weight.expand(4, -1, -1)
        if deep or i == 0:
            assert torch.equal(prompts, own)
        else:  # shallow: the prompt positions evolved through the blocks
            assert not torch.allclose(prompts, own)
    if deep:
        assert not torch.equal(model.prompts[0].weight, model.prompts[1].weight)


def test_backbone_frozen_and_in_eval_mode():
    vit = tiny_vit()
    model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=3, prompt_dropout=0.5)).train()
    assert model.training and model.prompt_dropout.training and model.classifier.training
    assert not any(m.training for m in model.vit.modules())
    assert not any(p.requires_grad for p in model.vit.parameters())
    assert all(p.requires_grad for p in model.prompts.parameters())
    model.prompt_dropout.p = 0.0  # then training-mode outputs are deterministic: the backbone has no dropout
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)
    model.eval().train()
    assert not model.vit.training
    frozen_head = VisualPromptTuning(tiny_vit(), VPTConfig(train_head=False))
    assert not any(p.requires_grad for p in frozen_head.classifier.parameters())


@pytest.mark.parametrize(("method", "train_head"), [("wt", True), ("directional", True), ("activation", False)])
def test_guessed_training_touches_only_prompts_and_head(method, train_head):
    model = VisualPromptTuning(tiny_vit(), VPTConfig(num_prompt_tokens=3, deep=True, train_head=train_head)).train()
    backbone = copy.deepcopy(model.vit.state_dict())
    head = copy.deepcopy(model.classifier.state_dict())
    prompts = [p.detach().clone() for p in model.prompts.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = batch()
    with attach(model, method, head=model.classifier, seed=0):
        for _ in range(3):
            opt.zero_grad()
            model(x, labels=y).loss.backward()
            assert all(p.grad is None for p in model.vit.parameters())
            for p in model.prompts.parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
            opt.step()
    for k, v in model.vit.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert all(not torch.equal(a, b) for a, b in zip(model.prompts.parameters(), prompts, strict=True))
    changed = any(not torch.equal(v, head[k]) for k, v in model.classifier.state_dict().items())
    assert changed == train_head


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_and_load_prompts_round_trip(tmp_path, suffix):
    vit = tiny_vit()
    fresh_vit = copy.deepcopy(vit)
    model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=2, deep=True, num_labels=5)).eval()
    with torch.no_grad():
        for p in model.prompts.parameters():
            p.normal_()
    path = tmp_path / f"prompts{suffix}"
    model.save_prompts(path)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # the atomic write leaves no temporary file
    other = VisualPromptTuning(fresh_vit, VPTConfig(num_prompt_tokens=2, deep=True, num_labels=5)).eval()
    other.load_prompts(path)
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, other(x).logits)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == ["classifier.bias", "classifier.weight", "prompts.0.weight",  # noqa: SIM118
                                        "prompts.1.weight", "prompts.2.weight"]
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        VisualPromptTuning(copy.deepcopy(fresh_vit), VPTConfig(num_prompt_tokens=3, deep=True)).load_prompts(path)
    with pytest.raises(ValueError, match="deep"):
        VisualPromptTuning(copy.deepcopy(fresh_vit), VPTConfig(num_prompt_tokens=2)).load_prompts(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_prompts_get_an_ordinary_files_mode(tmp_path, suffix):
    """Regression: the atomic write went through mkstemp and left the file readable by its owner only (0600)."""
    model = VisualPromptTuning(tiny_vit(), VPTConfig(num_prompt_tokens=2))
    path = tmp_path / f"prompts{suffix}"
    old = os.umask(0o022)
    try:
        model.save_prompts(path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_save_failure_leaves_previous_file(tmp_path, monkeypatch):
    model = VisualPromptTuning(tiny_vit(), VPTConfig(num_prompt_tokens=2))
    path = tmp_path / "prompts.pt"
    model.save_prompts(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_prompts(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["prompts.pt"]


@pytest.mark.slow
def test_vit_b16_architecture_one_guessed_step():
    """ViT-B/16 as in the paper's A.6 (``ViTConfig()`` defaults, random weights): VPT builds and one ``wt`` step
    writes finite estimates into the prompts and the head only (12-20 s on one shared CPU thread: marked slow)."""
    torch.manual_seed(0)
    start = time.perf_counter()
    vit = ViTForImageClassification(ViTConfig(num_labels=200))
    model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=10, deep=True)).train()
    assert model.trainable_parameters()["prompts"] == 12 * 10 * 768
    x = torch.randn(2, 3, 224, 224)
    y = torch.tensor([3, 150])
    with attach(model, "wt", head=model.classifier, seed=0):
        model(x, labels=y).loss.backward()
    assert all(p.grad is None for p in model.vit.parameters())
    for p in (*model.prompts.parameters(), *model.classifier.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    print(f"ViT-B/16 VPT-deep guessed step: {time.perf_counter() - start:.1f} s")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers attribute
def test_lora_through_peft_gets_estimates():
    peft = pytest.importorskip("peft")
    vit = tiny_vit()
    targets = vit_lora_target_modules(vit)
    assert targets in (["q_proj", "k_proj", "v_proj"], ["query", "key", "value"])
    model = peft.get_peft_model(vit, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     modules_to_save=["classifier"]))
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 3 * 3  # A and B, q/k/v, 3 blocks
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = batch()
    # plain LoRA needs no raw_parameters: lora_A/lora_B are nn.Linear guess points, the base layers are frozen
    with attach(model, "wt", head=model.base_model.model.classifier, seed=0):
        for step in range(3):
            opt.zero_grad()
            model(pixel_values=x, labels=y).loss.backward()
            assert all(p.grad is None for n, p in model.named_parameters() if n in base)
            for n, p in lora.items():
                assert p.grad is not None and torch.isfinite(p.grad).all(), n
                if "lora_B" in n or step > 0:  # at init lora_B = 0, so lora_A's gradient is 0 (as with backprop)
                    assert p.grad.abs().sum() > 0, (n, step)
            opt.step()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_missing_transformers_gives_install_hint(monkeypatch):
    vit = tiny_vit()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=HINT.replace("[", r"\[").replace("]", r"\]")):
        VisualPromptTuning(vit, VPTConfig())


# ---------------------------------------------------------------------------------------------- examples/vpt.py
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "vpt.py")
TINY = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64}


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("torchvision")
    import importlib.util

    spec = importlib.util.spec_from_file_location("guess_optim_example_vpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """``split/class/img.png``: 3 classes, 4 train and 2 test images each, 20x20 RGB (resized by the transforms)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("test", 2)):
        for c in ("acadian_flycatcher", "bobolink", "cardinal"):
            os.makedirs(root / split / c)
            for i in range(count):
                pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_example_trains_from_image_folder_and_saved_model(example, image_folder, tmp_path):
    torch.manual_seed(0)
    saved = tmp_path / "tiny-vit"
    ViTForImageClassification(ViTConfig(**TINY, num_labels=10)).save_pretrained(saved)
    out = tmp_path / "result.json"
    result = example.main(["--dataset", "cub200", "--data-dir", str(image_folder), "--model", str(saved),
                           "--local-files-only", "--method", "wt", "--deep", "--num-prompts", "2", "--epochs", "2",
                           "--batch-size", "4", "--workers", "0", "--lr", "0.01", "--warmup-epochs", "1",
                           "--out", str(out)])
    assert result["classes"] == 3 and len(result["history"]) == 2
    assert 0.0 <= result["test_top1"] <= 1.0 and result["history"][-1]["step"] == 6
    import json

    assert json.loads(out.read_text())["test_top1"] == result["test_top1"]
    train_tf, eval_tf = example.transforms(16)
    from PIL import Image

    image = Image.new("L", (40, 30))  # grayscale, not square: both transforms give [3, 16, 16]
    assert train_tf(image).shape == eval_tf(image).shape == (3, 16, 16)


def test_example_random_init_and_hf_dataset(example, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    rows = [{"img": Image.new("RGB", (24, 24), color=(i * 40, 0, 0)), "y": i % 2} for i in range(6)]
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    result = example.main(["--dataset", "dogs", "--hf-dataset", "someone/dogs", "--image-column", "img",
                           "--label-column", "y", "--random-init", "--vit-config", '{"image_size": 16, '
                           '"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, '
                           '"intermediate_size": 64}', "--method", "directional", "--epochs", "1",
                           "--batch-size", "3", "--workers", "0", "--max-steps", "1"])
    assert calls == [("someone/dogs", "train"), ("someone/dogs", "test")]
    assert result["classes"] == 2 and result["history"][-1]["step"] == 1


def test_example_clear_errors(example, image_folder, tmp_path):
    with pytest.raises(SystemExit, match="could not load the pretrained ViT"):
        example.main(["--dataset", "cars", "--data-dir", str(image_folder), "--local-files-only",
                      "--model", "google/vit-base-patch16-224-in21k", "--workers", "0"])
    with pytest.raises(SystemExit, match="no 'train' split"):
        example.main(["--dataset", "cars", "--data-dir", str(tmp_path), "--random-init", "--workers", "0"])


@pytest.mark.parametrize("method", ["wt", pytest.param("mixing", marks=pytest.mark.slow)])
def test_recompute_matches_activations_on_deep_prompts(method, monkeypatch):
    """``store="recompute"`` replays each of a prompt's edges on its own (the ``Wᵀ`` guess drawn on the prompt's rows
    only), and so does the default store on a graph holding captured activations (a residual stream): the estimate
    equals the one pulled back through all edges at once (``Site._pulled_back``)."""
    from guess_optim.site import Site

    model = get_vpt_model(tiny_vit(), num_prompt_tokens=2, deep=True).double().train()
    x, y = batch()
    grads = []
    for store, streamed in (("activations", False), ("activations", True), ("recompute", True)):
        if not streamed:
            monkeypatch.setattr(Site, "_streamed_next_outputs", lambda self, power: None)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with attach(model, method, seed=5, store=store):
            F.cross_entropy(model(x.double()).logits, y).backward()
        monkeypatch.undo()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == set(grads[2]) and len(grads[0]) == 5
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads[2][n], g, rtol=1e-9, atol=1e-12)
