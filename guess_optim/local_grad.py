"""Derivatives through one module: local VJPs (the estimate of a guess point's parameters) and weight-space JVPs.

The estimate of an activation-space guess at module ``i`` is the VJP through that single module of the grad-output
``d_b u_b`` (paper A.4: "the ``.backward()`` of one layer"): an outer product for a Linear, ``convolution_backward``
on the saved input for a convolution, a one-module ``torch.autograd.grad`` for the rest. The weight-space JVP of a
module along parameter tangents ``V`` is the module evaluated with ``V`` in place of its parameters: every module type
of :data:`~guess_optim.attach.GUESS_POINT_TYPES` is linear in its parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .contexts import own_autograd

__all__ = ["has_product_tangent", "local_vjp", "power_singular_values", "product_tangent", "weight_space_jvp"]

Internal = Callable[[], AbstractContextManager]
"""A context manager factory under which the engine calls modules itself (their hooks then stand aside)."""


def _is_zero_padded_conv(m: nn.Module) -> bool:
    return type(m) in (nn.Conv1d, nn.Conv2d) and m.padding_mode == "zeros"


def has_product_tangent(m: nn.Module) -> bool:
    """Whether ``m``'s output tangent is computed apart from its primal (exact types: a subclass may change
    ``forward``)."""
    return type(m) is nn.Linear or _is_zero_padded_conv(m)


def product_tangent(m: nn.Module, tangent: Tensor) -> Tensor:
    """The output tangent of a Linear or zero-padded convolution ``m`` for the input tangent ``ẋ``: ``ẋ Wᵀ`` (no
    bias) or ``conv(ẋ, W)``. Forward-mode AD through ``F.linear`` costs about twice a primal and a tangent matmul done
    apart (it materializes the weight's zero tangent), and through a convolution about 1.3 times."""
    if type(m) is nn.Linear:
        return F.linear(tangent, m.weight)
    conv = F.conv1d if type(m) is nn.Conv1d else F.conv2d
    return conv(tangent, m.weight, None, m.stride, m.padding, m.dilation, m.groups)


def local_vjp(module: nn.Module, params: dict[str, Tensor], inputs: tuple, grad_out: Tensor,
              internal: Internal) -> dict[str, Tensor]:
    """``∂<grad_out, module(*inputs)>/∂θ`` for the parameters ``params`` of the single module ``module``.

    Args:
        module: the guess point's module.
        params: ``{local name: parameter}``, those to differentiate.
        inputs: the module's positional inputs (primals) as in the forward.
        grad_out: the grad-output, of the module output's shape ``[N, *S]``.
        internal: entered while the module is called here (its hooks stand aside).

    Returns:
        ``{local name: gradient}``, each of its parameter's shape (zeros where the output does not depend on it).
    """
    if type(module) is nn.Linear and len(inputs) == 1:
        x = inputs[0]
        go = grad_out.reshape(-1, grad_out.shape[-1])
        out = {}
        if "weight" in params:
            out["weight"] = go.T.to(x.dtype) @ x.reshape(-1, x.shape[-1])
        if "bias" in params:
            out["bias"] = go.sum(0)
        return out
    if type(module) is nn.Embedding and len(inputs) == 1 and set(params) == {"weight"}:
        # the lookup's VJP: rows of grad_out added at their ids (never the module's max_norm renorm), none for padding
        ids, w = inputs[0].reshape(-1), params["weight"]
        g = torch.zeros_like(w).index_add_(0, ids, grad_out.reshape(-1, w.shape[1]).to(w.dtype))
        if module.padding_idx is not None:
            g[module.padding_idx] = 0
        return {"weight": g}
    if (_is_zero_padded_conv(module) and not isinstance(module.padding, str) and len(inputs) == 1
            and inputs[0].dim() == module.weight.dim()):
        return _conv_weight_grads(module, params, inputs[0], grad_out)
    names = list(params)
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    with internal(), own_autograd():
        y = functional_call(module, leaves, inputs)
        gs = torch.autograd.grad(y, [leaves[n] for n in names], grad_out, allow_unused=True)
    return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, gs, strict=True)}


def _conv_weight_grads(m: nn.Module, params: dict[str, Tensor], x: Tensor, grad_out: Tensor) -> dict[str, Tensor]:
    """The weight (and bias) gradient of a convolution from its input alone: no forward to re-run."""
    _, g_w, g_b = torch.ops.aten.convolution_backward(
        grad_out.to(x.dtype), x, x.new_empty(1).expand(m.weight.shape),
        [m.out_channels] if "bias" in params else None, m.stride, m.padding, m.dilation, False,
        [0] * (x.dim() - 2), m.groups, (False, "weight" in params, "bias" in params))
    return {n: g for n, g in (("weight", g_w), ("bias", g_b)) if n in params}


def weight_space_jvp(module: nn.Module, inputs: tuple, stacks: dict[str, Tensor], rows: int,
                     internal: Internal, dim: int = 0, out_dim: int = 0) -> Tensor:
    """The output tangent of weight perturbations ``V_j``, one per guess block of rows: the module evaluated with
    ``V_j`` in place of its parameters (and zeros for its other parameters) on block ``j`` of its inputs.

    Args:
        module: a guess point of a type linear in its parameters.
        inputs: its positional inputs (primals), with ``rows`` rows = ``K`` blocks of the batch.
        stacks: ``{local name: V}``, each ``[K, *param.shape]``.
        rows: the number of rows (``K`` times the batch). An int input equal to ``rows`` is a batch size
            (``PromptTokens(batch_size)``) and becomes the block's size.
        internal: entered while the module is called here.
        dim, out_dim: the dim of the rows in the inputs and in the output (1 for sequence-first tensors).

    Returns:
        The tangent, of the output's shape.
    """
    k = next(iter(stacks.values())).shape[0]
    if dim or out_dim:  # the blocks along another dim: computed on rows moved to dim 0, then moved back
        moved = tuple(a.movedim(dim, 0) if isinstance(a, Tensor) and a.dim() > dim else a for a in inputs)
        return weight_space_jvp(module, moved, stacks, rows, internal).movedim(0, out_dim)
    if type(module) is nn.Linear and len(inputs) == 1 and "weight" in stacks:  # all K blocks in one batched product
        x = inputs[0]
        xk = x.reshape(k, -1, x.shape[-1])
        out = torch.bmm(xk, stacks["weight"].transpose(1, 2).to(x.dtype))
        if "bias" in stacks:
            out = out + stacks["bias"].to(x.dtype)[:, None]
        return out.reshape(*x.shape[:-1], out.shape[-1])
    if type(module) is nn.Embedding and len(inputs) == 1:  # a lookup of V: never the module's max_norm renorm
        ids = inputs[0].reshape(k, -1)
        out = torch.stack([F.embedding(ids[j], stacks["weight"][j]) for j in range(k)])
        return out.reshape(*inputs[0].shape, out.shape[-1])
    chunks = [
        torch.chunk(a, k, dim=0) if isinstance(a, Tensor)
        else [a // k if isinstance(a, int) and not isinstance(a, bool) and a == rows else a] * k
        for a in inputs
    ]
    zeros = {n: torch.zeros_like(p) for n, p in module.named_parameters(recurse=False) if n not in stacks}
    blocks = []
    with internal():
        for j in range(k):
            params = {**zeros, **{n: v[j] for n, v in stacks.items()}}
            blocks.append(functional_call(module, params, tuple(c[j] for c in chunks)))
    return torch.cat(blocks, dim=0)


def power_singular_values(weight: Tensor, power: float) -> Tensor:
    """``U diag(S^p) Vᵀ`` of ``weight`` (paper §3, Fig. 4: sharpening ``Wᵀ`` guesses by dominant directions)."""
    low = weight.dtype in (torch.float16, torch.bfloat16)
    u, s, vh = torch.linalg.svd(weight.float() if low else weight, full_matrices=False)
    return ((u * s.pow(power)) @ vh).to(weight.dtype)
