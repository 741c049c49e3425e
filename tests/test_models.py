"""Tests of guess_optim.models: layer structure, shapes, argument checks, forward-mode AD."""

import pytest
import torch
from torch import nn

from guess_optim.models import ACTIVATIONS, MLP, MODELS, ConvNet, build_model


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.layers if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (1, [(784, 10)]),
        (2, [(784, 128), (128, 10)]),
        (3, [(784, 128), (128, 128), (128, 10)]),
        (5, [(784, 128)] + [(128, 128)] * 3 + [(128, 10)]),
    ],
)
def test_mlp_layers_per_depth(depth, expected):
    model = MLP(784, 10, depth=depth)
    assert _linear_shapes(model) == expected
    kinds = [type(m) for m in model.layers]
    # Flatten, then Linear alternating with ReLU, ending on a Linear.
    assert kinds == [nn.Flatten] + [nn.Linear, nn.ReLU] * (depth - 1) + [nn.Linear]
    assert len(model.layers) == 2 * depth


def test_mlp_default_is_paper_config_and_param_count():
    model = MLP(784, 10)
    assert (model.depth, model.width, model.activation) == (3, 128, "relu")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == (784 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10) == 118282


def test_mlp_forward_matches_manual_computation():
    torch.manual_seed(0)
    model = MLP(12, 3, depth=3, width=7, activation="tanh")
    x = torch.randn(5, 3, 4)
    l1, l2, l3 = (m for m in model.layers if isinstance(m, nn.Linear))
    h = torch.tanh(l1(x.reshape(5, 12)))
    h = torch.tanh(l2(h))
    expected = l3(h)
    out = model(x)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_activations(activation):
    model = MLP(4, 2, depth=3, width=6, activation=activation)
    acts = [m for m in model.layers if not isinstance(m, (nn.Linear, nn.Flatten))]
    assert len(acts) == 2
    assert all(type(a) is ACTIVATIONS[activation] for a in acts)
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_mlp_uses_pytorch_default_init():
    torch.manual_seed(1)
    model = MLP(784, 10, depth=2, width=64)
    for lin in (m for m in model.layers if isinstance(m, nn.Linear)):
        bound = 1.0 / lin.in_features**0.5  # kaiming_uniform(a=sqrt(5)) and bias bound
        assert lin.weight.abs().max() <= bound
        assert lin.bias.abs().max() <= bound
        assert lin.weight.std() > 0.4 * bound  # not zeros or a constant


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"depth": 0}, "depth"),
        ({"depth": 2.5}, "depth"),
        ({"width": 0}, "width"),
        ({"activation": "sigmoid"}, "sigmoid"),
        ({"in_features": -1}, "in_features"),
        ({"num_classes": 0}, "num_classes"),
        ({"depth": True}, "depth"),
    ],
)
def test_mlp_bad_arguments(kwargs, fragment):
    args = {"in_features": 784, "num_classes": 10} | kwargs
    with pytest.raises(ValueError, match=fragment):
        MLP(**args)


def test_mlp_bad_activation_lists_valid_names():
    with pytest.raises(ValueError) as info:
        MLP(4, 2, activation="swish")
    for name in ACTIVATIONS:
        assert name in str(info.value)


@pytest.mark.parametrize(("shape", "classes"), [((1, 28, 28), 10), ((3, 32, 32), 100), ((1, 8, 8), 10)])
def test_convnet_shapes_and_params(shape, classes):
    model = ConvNet(shape[0], classes)
    kinds = [type(m) for m in model.layers]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten,
                     nn.Linear]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == (shape[0] * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 16 * classes + classes)
    assert model(torch.randn(2, *shape)).shape == (2, classes)


def test_convnet_bad_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        ConvNet(0, 10)
    with pytest.raises(ValueError, match="num_classes"):
        ConvNet(3, 0)


def test_build_model():
    mlp = build_model("mlp", (1, 28, 28), 10, depth=4, width=32, activation="gelu")
    assert isinstance(mlp, MLP)
    assert _linear_shapes(mlp) == [(784, 32), (32, 32), (32, 32), (32, 10)]
    assert isinstance(mlp.layers[2], nn.GELU)
    conv = build_model("convnet", (3, 32, 32), 100)
    assert isinstance(conv, ConvNet) and conv.layers[0].in_channels == 3
    assert conv(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(ValueError) as info:
        build_model("resnet", (1, 28, 28), 10)
    assert all(name in str(info.value) for name in MODELS)
    with pytest.raises(ValueError, match="C, H, W"):
        build_model("convnet", (784,), 10)


@pytest.mark.parametrize("name", MODELS)
def test_forward_mode_jvp_matches_backward(name):
    """The library differentiates with torch.func.jvp: every layer must support forward-mode AD."""
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def loss(p):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    _, jvp = torch.func.jvp(loss, (params,), (tangents,))
    grads = torch.func.grad(loss)(params)
    expected = sum((grads[k] * tangents[k]).sum() for k in params)
    torch.testing.assert_close(jvp, expected, rtol=1e-4, atol=1e-5)
