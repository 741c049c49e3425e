"""Guess points wherever a trainable parameter meets the batch, seen op by op during the guessing forward.

The guessing forward runs under :class:`GuessingMode`, a ``TorchFunctionMode`` that sees every torch function the
model calls. It keeps track of which tensors derive from the batch (the model's inputs and what is computed from
them; with the position of their batch dim) and which derive from trainable parameters alone, and treats an op that
consumes a trainable parameter outside the fast paths (the module hooks of :mod:`guess_optim.handle`) as follows:

* **parameter-only** (no input derives from the batch: ``weight_norm``, a parametrization, a tied weight transposed,
  position embeddings of ``(1, L)`` position ids, a prompt embedded once): the op runs with a reverse graph from the
  parameters, so that an estimate formed later for its output is pulled back to them exactly by autograd;
* **a guess point** (it meets the batch): the guess is added to its output's tangent, and the estimate of what it
  consumed is the local VJP of that one op (paper A.4's "backward of one layer", for any op), pulled back through the
  parameter-only ops in front of it;
* in **weight space** (``directional``, or ``raw_parameters="directional"``): each trainable parameter the op consumes
  is given a tangent ``V`` for the op (a weight perturbation), so forward-mode AD measures its effect wherever it goes.

Ops run with grad disabled (the model's own ``no_grad`` regions) see only their inputs' values: constants, as in
backprop. An op whose forward-AD formula drops a tangent (``scatter_reduce(reduce="prod")`` on PyTorch 2.x) is an
error, not noise in every layer before it.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._rng import capture_rng, cuda_devices
from .contexts import primal
from .errors import GuessingNotSupportedError
from .graph import out_of_place
from .guesses import zero_padding
from .records import OpRecord, Slot, WeightRecord
from .rowwise import refuse_row_mixing

if TYPE_CHECKING:
    from .step import GuessingStep

__all__ = ["UNKNOWN", "GuessingMode", "Rows", "Tracker", "from_rows", "to_rows"]

_METADATA = {Tensor.dim, Tensor.size, Tensor.numel, Tensor.__len__, Tensor.stride, Tensor.element_size,
             Tensor.is_contiguous, Tensor.data_ptr, Tensor.is_floating_point, Tensor.is_complex, Tensor.nelement,
             Tensor.ndimension, Tensor.get_device, Tensor.storage_offset, Tensor.untyped_storage}
_ENGINE = {"_make_dual", "_unpack_dual"}
_RNN_OPS = {"lstm", "gru", "rnn_tanh", "rnn_relu"}
_METADATA_GETTERS = {getattr(Tensor, n).__get__ for n in (
    "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "is_leaf", "grad_fn", "grad", "layout",
    "is_sparse", "is_quantized", "is_meta", "data", "_version") if hasattr(Tensor, n)}
_PERMUTES = {"transpose", "swapaxes", "swapdims", "transpose_", "swapaxes_", "swapdims_"}
_TRANSPOSE_GETTERS = {Tensor.T.__get__, Tensor.mT.__get__}


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, Tensor))
    return out


def _name(func: Any) -> str:
    return getattr(func, "__name__", repr(func))


_EMBEDDINGS = (F.embedding, torch.embedding)


def _embedding_scales_by_frequency(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is F.embedding:
        return bool(kwargs.get("scale_grad_by_freq", args[5] if len(args) > 5 else False))
    return bool(kwargs.get("scale_grad_by_freq", args[3] if len(args) > 3 else False))


def _embedding_padding(func: Any, args: tuple, kwargs: dict) -> tuple[Tensor | None, int | None]:
    """``(ids, padding_idx)`` of an embedding op, ``padding_idx`` non-negative or ``None`` (no padding row);
    ``(None, None)`` for any other op."""
    if func is F.embedding:  # (input, weight, padding_idx=None, ...): a negative index counts from the end
        ids = kwargs.get("input", args[0] if args else None)
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        pad = kwargs.get("padding_idx", args[2] if len(args) > 2 else None)
        return primal(ids), (pad + weight.shape[0] if pad is not None and pad < 0 else pad)
    if func is torch.embedding:  # (weight, indices, padding_idx=-1, ...): a negative index is no padding row
        pad = kwargs.get("padding_idx", args[2] if len(args) > 2 else -1)
        return primal(kwargs.get("indices", args[1] if len(args) > 1 else None)), (pad if pad >= 0 else None)
    return None, None


def _drops_tangent_on_purpose(func: Any) -> bool:
    name = _name(func)
    return "detach" in name or name.startswith("new_") or name.endswith("_like") or func in _METADATA_GETTERS


class Rows(NamedTuple):
    """Where the batch's ``N`` rows are in a tensor: along dim ``dim`` (``None``: unknown), and with ``fold`` rows per
    example folded into dim 0 (``[B·L, D]`` from ``x.view(-1, D)`` of ``[B, L, D]``: ``fold = L``)."""

    dim: int | None = 0
    fold: int = 1


UNKNOWN = Rows(None, 1)
ROWS = Rows(0, 1)
_RESHAPES = {"view", "reshape", "flatten", "view_as", "reshape_as", "contiguous", "unflatten", "_reshape_alias"}


def to_rows(t: Tensor, rows: Rows, n: int) -> Tensor:
    """``t`` seen as ``[N, *S]``, one row per example (a view where possible)."""
    if rows.dim:
        t = t.movedim(rows.dim, 0)
    return t.reshape(n, rows.fold, *t.shape[1:]) if rows.fold > 1 else t


def from_rows(u: Tensor, rows: Rows, shape: torch.Size) -> Tensor:
    """The inverse of :func:`to_rows`: ``u`` (``[N, *S]``) back in the layout of a tensor of ``shape``."""
    if not rows.dim:
        return u.reshape(shape) if rows.fold > 1 else u
    d = rows.dim  # (the rows' dim first, as to_rows moved it)
    return u.reshape(shape[d], *shape[:d], *shape[d + 1:]).movedim(0, d)


class Tracker:
    """Which live tensors derive from the batch (with where their rows are, :class:`Rows`, and whether they carry a
    tangent) and which from trainable parameters alone (with those parameters). Weak references: the forward's
    tensors die as they would in a plain forward."""

    def __init__(self, rows: int):
        self.rows = rows
        self._batch: dict[int, tuple[weakref.ref, Rows, bool]] = {}
        self._derived: dict[int, tuple[weakref.ref, tuple[Tensor, ...]]] = {}

    def batch(self, t: Tensor) -> tuple[Rows, bool] | None:
        entry = self._batch.get(id(t))
        return (entry[1], entry[2]) if entry is not None and entry[0]() is t else None

    def mark(self, t: Any, rows: Rows = ROWS, hot: bool = True) -> Any:
        if isinstance(t, Tensor):
            self._batch[id(t)] = (weakref.ref(t), rows, hot)
        return t

    def derived(self, t: Tensor) -> tuple[Tensor, ...] | None:
        entry = self._derived.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def mark_derived(self, t: Tensor, params: tuple[Tensor, ...]) -> None:
        self._derived[id(t)] = (weakref.ref(t), params)

    def lost(self) -> list[Tensor]:
        """The live tensors that carry guesses (a tangent) but no longer a batch dim (a reduction over the batch)."""
        out = []
        for ref, rows, hot in self._batch.values():
            t = ref()
            if t is not None and hot and rows.dim is None and (t.is_floating_point() or t.is_complex()) and (
                    fwAD.unpack_dual(t).tangent is not None):
                out.append(t)
        return out

    def clear(self) -> None:
        self._batch.clear()
        self._derived.clear()

    def out_rows(self, func: Any, args: tuple, kwargs: dict, rows: Rows, shape: torch.Size, out: Tensor) -> Rows:
        """Where the rows are in an op's output, from its batch input's (``rows``, in a tensor of ``shape``)."""
        n, dim, fold = self.rows, rows.dim, rows.fold
        if dim is None or out.dim() == 0:
            return UNKNOWN
        name = _name(func)
        if name in _PERMUTES or func in _TRANSPOSE_GETTERS or name in ("t", "t_", "permute", "movedim", "moveaxis"):
            # folded rows move with their dim: qkv.reshape(B·nW, L, 3, h, d).permute(2, 0, 3, 1, 4) (Swin windows)
            moved = _permuted(name, func, args, kwargs, dim, len(shape))
            return Rows(moved, fold) if moved is not None else UNKNOWN
        if name == "stack":  # a new dim at `dim`: the rows move past it when it comes first (stack([a, b], 0))
            new = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if not isinstance(new, int):
                return UNKNOWN
            moved = dim + (new % out.dim() <= dim)
            return Rows(moved, fold) if out.shape[moved] == n * fold else UNKNOWN
        if name in ("unsqueeze", "unsqueeze_", "squeeze", "squeeze_"):
            moved = _squeezed(name, args, kwargs, dim, shape, out)
            return Rows(moved, fold) if moved is not None and out.shape[moved] == n * fold else UNKNOWN
        if fold > 1 and dim != 0:  # folded rows off dim 0: kept in place, or on dim 0 once the dims before are gone
            if out.dim() == len(shape) and out.shape[dim] == n * fold:  # (element-wise ops, a slice of another dim)
                return Rows(dim, fold)
            return Rows(0, fold) if out.shape[0] == n * fold else UNKNOWN  # qkv[0] of [3, B·nW, h, L, d]
        if fold > 1 or dim == 0:
            if dim == 0 and out.shape[0] == n * fold:
                return Rows(0, fold)
            if out.shape[0] == n:
                return Rows(0, 1)
            if dim == 0 and name in _RESHAPES and out.shape[0] % n == 0:
                # a reshape keeps the row-major order, so each example's values stay one block of out.shape[0] / n
                # rows: x.view(-1, D) of [B, L, D], windows x.reshape(B * w, L // w, D)
                return Rows(0, out.shape[0] // n)
            return UNKNOWN
        if out.dim() == len(shape) and out.shape[dim] == n:
            return Rows(dim, 1)
        return Rows(0, 1) if out.shape[0] == n else UNKNOWN


def _einsum_places(args: tuple, kwargs: dict, tracker: Tracker) -> list[int | None] | None:
    """Where each batch operand's rows land in an ``einsum``'s output (``None``: summed over), from its equation."""
    equation = args[0] if args and isinstance(args[0], str) else kwargs.get("equation")
    operands = args[1:] if len(args) > 1 else kwargs.get("operands", ())
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if not isinstance(equation, str) or "..." in equation:
        return None
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    subscripts = inputs.split(",")
    if len(subscripts) != len(operands):
        return None
    if "->" not in equation:  # implicit output: the letters seen once, in alphabetical order
        output = "".join(sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
    places = []
    for letters, t in zip(subscripts, operands, strict=True):
        entry = tracker.batch(t) if isinstance(t, Tensor) else None
        if entry is None or entry[0].dim is None or entry[0].dim >= len(letters):  # (folded rows: the same letter)
            continue
        letter = letters[entry[0].dim]
        places.append(output.index(letter) if letter in output else None)
    return places


def _contraction_places(func: Any, args: tuple, kwargs: dict, tracker: Tracker) -> list[int | None] | None:
    """For an op that contracts or lays out its operands' dims by its own arguments (``einsum``, ``tensordot``,
    ``inner``, ``outer``, ``kron``, ``F.linear`` whose weight is a batch tensor), where each batch operand's rows land
    in the output (``None``: contracted); ``None`` for other ops. Two batch operands of ``tensordot``/``inner``/
    ``outer``/``kron``/``linear`` always land on different dims (``einsum("bd,cd->bc", h, h)``: attention across the
    batch)."""
    name = _name(func)
    if name == "einsum":
        return _einsum_places(args, kwargs, tracker)
    if name in ("tensordot", "inner", "outer", "ger", "kron"):
        rowed = [t for t in _tensors(args, kwargs) if tracker.batch(t) is not None]
        return list(range(len(rowed))) if len(rowed) > 1 else None
    if name == "linear":
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        if isinstance(weight, Tensor) and tracker.batch(weight) is not None:
            return [0, -1]  # the input's rows stay on dim 0, the weight's become the output's last dim
    return None


_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_RANDOM = {"rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "bernoulli", "bernoulli_", "normal",
           "normal_", "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "multinomial",
           "poisson"}


def _dropout_args(func: Any, args: tuple, kwargs: dict) -> tuple[float, bool]:
    """``(p, training)`` of an ``F.dropout``-family call."""
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return float(p), bool(training)


def _sdpa_dropout(args: tuple, kwargs: dict) -> float:
    return float(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0))


def _refuse_dropout_inside(func: Any, args: tuple, kwargs: dict, k: int) -> None:
    """With ``num_guesses=K``, an op that draws dropout inside itself (attention dropout of ``nn.MultiheadAttention``,
    alpha dropout, ``F.scaled_dot_product_attention`` reading parameters) draws other masks for each copy of the batch,
    while every copy shares the first copy's loss gradient: a biased estimate. Refused, naming the fix
    (``F.scaled_dot_product_attention``'s on activations is shared instead: :meth:`GuessingMode._tiled_attention`)."""
    name = _name(func)
    if name == "scaled_dot_product_attention":  # (reading parameters: an op-level guess point, not shared)
        p = _sdpa_dropout(args, kwargs)
    elif func is F.multi_head_attention_forward:
        p = kwargs.get("dropout_p", args[10] if len(args) > 10 else 0.0)
        p = p if kwargs.get("training", args[13] if len(args) > 13 else True) else 0.0
    elif func in (F.alpha_dropout, F.feature_alpha_dropout):
        p, training = _dropout_args(func, args, kwargs)
        p = p if training else 0.0
    else:
        return
    if p:
        raise GuessingNotSupportedError(
            f"{name!r} draws dropout (p={p}) inside itself with num_guesses={k}: each copy of the batch would draw its "
            "own mask while all share the first copy's loss gradient (a biased estimate). Use num_guesses=1 (average "
            "guesses over steps), or set that dropout to 0 while guessing (F.dropout and "
            "F.scaled_dot_product_attention's dropout_p are shared by the K copies)."
        )


def _squeezed(name: str, args: tuple, kwargs: dict, bdim: int, shape: torch.Size, out: Tensor) -> int | None:
    """Where the rows' dim ``bdim`` of a tensor of ``shape`` lands after ``unsqueeze``/``squeeze``."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if name.startswith("unsqueeze"):
        if not isinstance(dim, int):
            return None
        return bdim + (dim % out.dim() <= bdim)
    dims = range(len(shape)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    removed = {d % len(shape) for d in dims if shape[d] == 1} if len(shape) else set()
    return None if bdim in removed else bdim - sum(d < bdim for d in removed)


def _dims(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list[Any]:
    return [args[1 + i] if len(args) > 1 + i else kwargs.get(n) for i, n in enumerate(names)]


def _permuted(name: str, func: Any, args: tuple, kwargs: dict, bdim: int, ndim: int) -> int | None:
    try:
        if name in _PERMUTES:
            a, b = (d % ndim for d in _dims(args, kwargs, ("dim0", "dim1")))
            return b if bdim == a else a if bdim == b else bdim
        if func == Tensor.mT.__get__:
            last = {ndim - 2: ndim - 1, ndim - 1: ndim - 2}
            return last.get(bdim, bdim)
        if func in _TRANSPOSE_GETTERS or name in ("t", "t_"):
            return ndim - 1 - bdim
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            dims = kwargs.get("dims", dims)
            return [d % ndim for d in dims].index(bdim)
        src, dst = (d % ndim if isinstance(d, int) else None for d in _dims(args, kwargs, ("source", "destination")))
        if src is None or dst is None:
            return None
        order = [d for d in range(ndim) if d != src]
        order.insert(dst, src)
        return order.index(bdim)
    except (TypeError, ValueError, IndexError):
        return None


class GuessingMode(TorchFunctionMode):
    """The ``TorchFunctionMode`` of a guessing forward (module docstring)."""

    def __init__(self, step: GuessingStep):
        super().__init__()
        self.step = step
        self.tracker = step.tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        step = self.step
        if step.k > 1 and not step.closed and not step.handle._internal and _name(func) in _RANDOM:
            return self._shared_draw(func, args, kwargs)
        if not torch.is_grad_enabled():  # the model's own no_grad region: constants, as in backprop
            args, kwargs = tree_map(primal, (args, kwargs))
            out = func(*args, **kwargs)
            if not step.closed and not step.handle._internal:  # still the batch's values (not its tangents)
                entry = next((e for t in _tensors(args, kwargs) for e in (self.tracker.batch(t),) if e), None)
                if entry is not None:
                    for o in tree_flatten(out)[0]:
                        self.tracker.mark(o, entry[0], False)
            return out
        if (step.closed or step.handle._internal or func in _METADATA or func in _METADATA_GETTERS
                or _name(func) in _ENGINE):
            return func(*args, **kwargs)
        tracker, trainable, active = self.tracker, step.trainable, step.fast_active
        params: list[Tensor] = []
        rows, shape, batch_in, hot = UNKNOWN, None, False, False
        batched: list[tuple[Rows, torch.Size, bool]] = []  # each batch input's (rows, shape, hot): mixing is refused
        for t in _tensors(args, kwargs):
            p = trainable.get(id(t))
            if p is not None and p is t:
                if id(t) not in active:
                    params.append(t)
                continue
            entry = tracker.batch(t)
            if entry is not None:
                if not batch_in:
                    rows, shape = entry[0], t.shape
                batch_in, hot = True, hot or entry[1]
                batched.append((entry[0], t.shape, entry[1]))
            elif tracker.derived(t) is not None:
                params.append(t)
        if batch_in:
            refuse_row_mixing(func, args, kwargs, lambda t: (tracker.batch(t) or (None,))[0], step.k,
                              self._batchnorm_owner)
            # (before a guess point too: copies drawing other masks would carry other values into the guesses)
            if step.k > 1 and func in _DROPOUTS and not params:
                p, training = _dropout_args(func, args, kwargs)
                if training and p > 0:
                    out = self._tiled_dropout(func, args, kwargs, rows)
                    self._propagate(func, args, kwargs, out, rows, shape, hot)
                    return out
            if step.k > 1 and not params and _name(func) == "scaled_dot_product_attention" and _sdpa_dropout(
                    args, kwargs):
                out = self._tiled_attention(args, kwargs, rows)
                self._propagate(func, args, kwargs, out, rows, shape, hot)
                return out
            if step.k > 1 and not step.replaying:
                _refuse_dropout_inside(func, args, kwargs, step.k)
        if params and func in _EMBEDDINGS and _embedding_scales_by_frequency(func, args, kwargs):
            raise GuessingNotSupportedError(
                "embedding with scale_grad_by_freq=True: its gradient divides by each token's count in the batch, "
                "which mixes the examples. Set scale_grad_by_freq=False, or use method='backprop'"
            )
        if params and any(t.is_complex() for t in params):
            raise GuessingNotSupportedError(
                f"{_name(func)!r} reads a complex-valued tensor made of trainable parameters (view_as_complex): "
                "guessed gradients do not support complex values (the estimate would be missing or noise). Use "
                "method='backprop' for this model"
            )
        if params and batch_in and _name(func) == "__setitem__":
            raise GuessingNotSupportedError(
                "a parameter written in place into a batch tensor (h[...] = p): forward-mode guesses do not see "
                "in-place writes of parameters into activations. Build the tensor out of place (torch.cat, "
                "torch.where, index_put) or use method='backprop'"
            )
        if not params:
            out = func(*args, **kwargs)
            if batch_in:
                if len(batched) > 1:
                    self._refuse_mixing(func, args, kwargs, out, batched)
                self._propagate(func, args, kwargs, out, rows, shape, hot)
            return out
        if not batch_in and not any(fwAD.unpack_dual(t).tangent is not None for t in _tensors(args, kwargs)):
            return self._parameter_only(func, args, kwargs, params)
        if step.weight_space_ops:
            out = self._weight_op(func, args, kwargs, params, batch_in)
            if batch_in:
                self._propagate(func, args, kwargs, out, rows, shape, False)
            return out
        return self._guess_point(func, args, kwargs, params, rows, shape)

    def _shared_draw(self, func, args, kwargs) -> Any:
        """A random draw with one row per example of the repeated batch (``torch.rand(N, 1, 1, 1)``, ``bernoulli_``:
        stochastic depth, noise injection) with ``num_guesses=K``: the ``K`` copies get the first copy's values (what
        a plain forward draws under the same seed), as for dropout (:meth:`_tiled_dropout`)."""
        out = func(*args, **kwargs)
        n, b = self.step.rows, self.step.batch
        for o in tree_flatten(out)[0]:
            if isinstance(o, Tensor) and o.dim() and o.shape[0] == n:
                with torch.no_grad():
                    first = primal(o)[:b]
                    primal(o)[b:].copy_(first.repeat(self.step.k - 1, *([1] * (o.dim() - 1))))
        return out

    def _tiled_dropout(self, func, args, kwargs, rows: Rows) -> Tensor:
        """Dropout with ``num_guesses=K``: the first copy of the batch draws its mask and the ``K`` copies share it, so
        every copy's directional derivative is taken through the very mask of the output the loss sees (the head's
        output is cut back to the first copy): the average estimates the gradient for that mask, as with ``K = 1``.
        (Drawn independently per copy, the copies' tangents went through other masks than the loss's: biased.)"""
        x = args[0] if args else kwargs["input"]
        if rows.dim is None or x.shape[rows.dim] != self.step.rows * rows.fold:
            raise GuessingNotSupportedError(
                f"{_name(func)!r} with num_guesses={self.step.k} on a tensor whose batch rows the engine cannot tell "
                f"apart (shape {tuple(x.shape)}): the K copies of the batch would draw different dropout masks while "
                "sharing the first copy's loss gradient (a biased estimate). Use num_guesses=1, or apply the dropout "
                "with the batch on a dim of its own."
            )
        first = primal(x).narrow(rows.dim, 0, self.step.batch * rows.fold)  # (each example's folded rows together)
        p, training = _dropout_args(func, args, kwargs)
        mask = func(torch.ones_like(first), p, training)  # kept / (1 - p), or 0
        reps = [1] * x.dim()
        reps[rows.dim] = self.step.k
        return x * mask.repeat(*reps)

    def _tiled_attention(self, args: tuple, kwargs: dict, rows: Rows) -> Tensor:
        """``F.scaled_dot_product_attention`` with ``dropout_p > 0`` and ``num_guesses=K``, as the math backend computes
        it (``softmax(q kᵀ · scale + mask)``, dropout, ``@ v``), with the attention dropout shared by the ``K`` copies
        of the batch (:meth:`_tiled_dropout`)."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        given = dict(zip(names, args, strict=False)) | kwargs
        q, k, v = given["query"], given["key"], given["value"]
        mask, causal, scale = given.get("attn_mask"), given.get("is_causal", False), given.get("scale")
        if given.get("enable_gqa", False) and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        scores = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        if causal:
            keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            mask = primal(mask)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, -1)
        weights = self._tiled_dropout(F.dropout, (weights, float(given["dropout_p"]), True), {}, rows)
        return weights @ v

    def _batchnorm_owner(self, args: tuple, kwargs: dict) -> str | None:
        """The module whose running statistics or affine parameters a refused ``batch_norm`` call reads: its name and
        type, for the message."""
        handle = self.step.handle
        seen = {id(t) for t in (*args, *kwargs.values()) if isinstance(t, Tensor)}
        for name, m in handle.model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and any(
                    id(t) in seen for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))):
                return f"{name!r} ({type(m).__name__})"
        return None

    def _refuse_mixing(self, func, args, kwargs, out, batched: list) -> None:
        """An op that mixes the examples of the batch while the guesses flow through it (a value computed across the
        batch from the guesses, recombined with per-example values; or two batch inputs whose rows land on different
        dims of the output, as in ``h @ h.T``): each example's directional derivative would carry the others'
        guesses, and the average estimate would be wrong. Refused, naming the op."""
        if not any(h for _, _, h in batched):
            return
        first = out if isinstance(out, Tensor) else next((o for o in tree_flatten(out)[0] if isinstance(o, Tensor)),
                                                         None)
        if first is None or not first.is_floating_point() and not first.is_complex():
            return
        lost = [r for r, _, h in batched if r.dim is None and h]
        places = {self.tracker.out_rows(func, args, kwargs, r, shp, first)
                  for r, shp, _ in batched if r.dim is not None}
        contracted = _contraction_places(func, args, kwargs, self.tracker)
        if contracted is not None:  # einsum, tensordot, inner, outer, kron, F.linear: from the op's own dims
            places = set(contracted)
            lost = [None] if None in places and len(places) > 1 else []
        if (lost and places) or len(places) > 1:
            raise GuessingNotSupportedError(
                f"{_name(func)!r} mixes the examples of the batch: it combines "
                + ("a value computed across the batch from the guesses (a batch statistic such as x - x.mean(0), or "
                   "a BatchNorm that uses batch statistics in eval mode: track_running_stats=False) with per-example "
                   "values" if lost else "tensors whose batch rows land on different dims of its output (attention "
                   "across the batch, h @ h.T)")
                + ". Each example's directional derivative would carry the other examples' guesses: the estimate "
                "would be wrong. Make the statistic a constant (.detach()), keep examples apart, or use "
                "method='backprop'. An input whose dim 0 only happens to equal the batch size (a memory bank, a "
                "support set) is taken for the batch: register it as a buffer, or give it a leading dim of 1."
            )

    def _propagate(self, func, args, kwargs, out, rows, shape, hot) -> None:
        tracker = self.tracker
        for o in tree_flatten(out)[0] if not isinstance(out, Tensor) else (out,):
            if not isinstance(o, Tensor):
                continue
            if hot and o.is_complex() and fwAD.unpack_dual(o).tangent is not None:
                raise GuessingNotSupportedError(
                    f"{_name(func)!r} makes a complex-valued tensor of the guessed activations: guessed gradients do "
                    "not support complex values (the estimate would be noise). Use method='backprop' for this model"
                )
            # h.detach(): a constant, no longer carrying guesses; inside a custom autograd.Function's forward
            # (forward-mode AD off there), its jvp gives the output's tangent
            on_purpose = _drops_tangent_on_purpose(func) or not torch._C._is_fwd_grad_enabled()
            r = tracker.out_rows(func, args, kwargs, rows, shape, o)
            if r.dim is None and _name(func) in _RNN_OPS and o.dim() and sum(s == self.step.rows for s in o.shape) == 1:
                r = Rows(list(o.shape).index(self.step.rows), 1)  # an RNN's (layers, B, H) state
            tracker.mark(o, r, hot and not on_purpose)
            if hot and o.is_floating_point() and fwAD.unpack_dual(o).tangent is None and not on_purpose:
                raise GuessingNotSupportedError(
                    f"{_name(func)!r} dropped the tangent of its input: its forward-mode AD formula returns none "
                    "(a PyTorch limitation, e.g. scatter_reduce(reduce='prod')), so every guess before it would be "
                    "pure noise. Replace the op by an equivalent (e.g. exp(scatter_add(log ...))), call .detach() if "
                    "its output is meant to be a constant, or use method='backprop'."
                )

    def _parameter_only(self, func, args, kwargs, params: list[Tensor]) -> Any:
        """Run with a reverse graph from the trainable parameters it reads (they are frozen during the forward)."""
        trainable = self.step.trainable
        real = [t for t in params if id(t) in trainable]
        name = _name(func)
        inplace = name.endswith("_") and not name.endswith("__") and any(a is t for t in real for a in args[:1])
        if not inplace:
            for p in real:
                p.requires_grad_(True)
        try:
            out = func(*args, **kwargs)
        finally:
            for p in real if not inplace else ():
                p.requires_grad_(False)
        sources = dict.fromkeys(real)
        for t in params:
            for p in self.tracker.derived(t) or ():
                sources[p] = None
        outs = tree_flatten(out)[0]
        if (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))) and args and isinstance(
                args[0], Tensor):
            outs.append(args[0])  # written in place (w[:3] = p): the target now derives from the parameters
        for o in outs:
            if isinstance(o, Tensor) and o.requires_grad:
                self.tracker.mark_derived(o, tuple(sources))
        return out

    def _weight_op(self, func, args, kwargs, params: list[Tensor], batch_in: bool) -> Any:
        """Weight space: each trainable parameter the op reads (or tensor computed from them alone: a normed or
        parametrized weight, whose estimate is then pulled back to them exactly) gets weight-perturbation tangents
        ``V`` for this use, one per guess block of ``num_guesses``; the estimate is ``(Σ_b d_b) V``. The blocks' effects
        are measured on their own rows (one call of the op per block) where the op keeps the rows on dim 0; elsewhere
        (an op that moves the rows) the blocks share the first ``V``."""
        step, k = self.step, self.step.k
        stacks: dict[int, tuple[Tensor, Tensor]] = {}
        broadcast = {}
        for t in params:
            sources = self.tracker.derived(t) if id(t) not in step.trainable else None
            if sources is not None and t.numel() > sum(p.numel() for p in sources):
                broadcast[id(t)] = self._broadcast_tangent(t, sources)  # (a cls token expanded to the batch)
            elif id(t) not in stacks:
                v = step.weight_guesses(t)
                pad = _embedding_padding(func, args, kwargs)[1]
                if pad is not None:  # backprop's gradient of the padding row is zero: so is its guess
                    v[:, pad] = 0
                stacks[id(t)] = (t, v)
        if step.replaying:  # the blocks' V laid out as the first forward did (one V for all blocks, or one each)
            layout = self._block_layout(func, args, kwargs) if k > 1 and batch_in and not broadcast else None
            self._weight_records(stacks, per_block=k == 1 or layout is not None)
            if layout is None:
                return func(*args, **kwargs)
            target, outs, out_spec = layout[4:7]  # (the op already ran once there)
            return target.copy_(outs[0]) if target is not None else tree_unflatten(outs, out_spec)
        if k > 1 and batch_in and not broadcast:
            out = self._per_block(func, args, kwargs, stacks)
            if out is not None:
                self._weight_records(stacks, per_block=True)
                return out
        self._weight_records(stacks, per_block=k == 1)
        swap = {i: fwAD.make_dual(t.detach(), v[0]) for i, (t, v) in stacks.items()}
        swap.update(broadcast)
        args, kwargs = tree_map(lambda a: swap.get(id(a), a) if isinstance(a, Tensor) else a, (args, kwargs))
        return func(*args, **kwargs)

    def _broadcast_tangent(self, t: Tensor, sources: tuple[Tensor, ...]) -> Tensor:
        """A tensor computed from parameters alone but larger than them (a parameter expanded to the batch): the
        parameters get their own weight guesses ``V``, and ``t`` the tangent they give it, ``J V``, by double backward
        through the parameter-only ops (no second forward-AD level). With ``num_guesses=K`` and ``t`` expanded to the
        ``K`` repeated blocks along dim 0, each block gets its own ``V`` (``K`` double backwards); otherwise the blocks
        share one."""
        step, k = self.step, self.step.k
        stacks = [step.weight_guesses(p) for p in sources]
        per_block = k > 1 and t.dim() > 0 and t.shape[0] == step.rows
        for p, v in zip(sources, stacks, strict=True):
            v = v if per_block else v[:1].expand(k, *v.shape[1:])
            record = WeightRecord(None, {"weight": p}, (), stacks={"weight": v})
            step.add_record(record)
            step.handle.captured(step.op_name(None, [p]), record, None)
        if step.replaying:
            return t
        u = torch.zeros_like(t, requires_grad=True)
        frozen = [p for p in sources if not p.requires_grad]  # trainable parameters are frozen during the forward
        for p in frozen:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(t, sources, u, create_graph=True, retain_graph=True, allow_unused=True)
                pairs = [(g, v) for g, v in zip(grads, stacks, strict=True) if g is not None and g.requires_grad]
                blocks = []
                for j in range((k if per_block else 1) if pairs else 0):
                    last = j == (k - 1 if per_block else 0)
                    jv = torch.autograd.grad([g for g, _ in pairs], u, [v[j] for _, v in pairs], retain_graph=not last)
                    blocks.append(jv[0].detach())
        finally:
            for p in frozen:
                p.requires_grad_(False)
        value = t.detach().contiguous() if 0 in t.stride() else t.detach()  # an expanded view: a dual needs memory
        if not pairs:
            return fwAD.make_dual(value, torch.zeros_like(value))
        if per_block:
            b = step.batch
            tangent = torch.cat([blk[j * b:(j + 1) * b] for j, blk in enumerate(blocks)])
        else:
            tangent = blocks[0]
        return fwAD.make_dual(value, tangent)

    def _weight_records(self, stacks: dict[int, tuple[Tensor, Tensor]], per_block: bool) -> None:
        step = self.step
        for i, (t, v) in stacks.items():
            v = v if per_block else v[:1].expand(step.k, *v.shape[1:])
            if i in step.trainable:
                record = WeightRecord(None, {"weight": t}, (), stacks={"weight": v})
            else:
                sources = self.tracker.derived(t)
                record = WeightRecord(None, {str(j): p for j, p in enumerate(sources)}, (), stacks={"source": v},
                                      source=t)
            step.add_record(record)
            step.handle.captured(step.op_name(None, [t]), record, None)

    def _block_layout(self, func, args, kwargs) -> tuple | None:
        """The op run once (out of place) with where the rows are in its inputs and floating outputs, or ``None``
        where they cannot be told apart (also what the ``store="recompute"`` replay checks, to lay out the weight
        guesses as the first forward did): ``(leaves, spec, rowed, replay, target, outs, out_spec, out_rows)``.

        An in-place op (timm's LayerScale ``x.mul_(gamma)``, ``h += bias``) runs out of place, its blocks on the
        input's values before it changes, and its result is written back into ``target`` (run in place, the blocks
        ran it again on the changed target)."""
        tracker, n = self.tracker, self.step.rows
        leaves, spec = tree_flatten((args, kwargs))
        rowed = {i: tracker.batch(t)[0] for i, t in enumerate(leaves)
                 if isinstance(t, Tensor) and tracker.batch(t) is not None}
        rnn = _name(func) in _RNN_OPS
        if rnn:  # the hidden state nn.RNN makes itself (zeros of (layers, N, H)): its rows are on dim 1
            rowed.update({i: Rows(1, 1) for i, t in enumerate(leaves) if i not in rowed and isinstance(t, Tensor)
                          and t.dim() == 3 and t.is_floating_point() and t.shape[1] == n})
        if not rowed or any(r.dim is None or leaves[i].shape[r.dim] != n * r.fold for i, r in rowed.items()):
            return None
        first = next(iter(rowed))
        replay, replay_kwargs, inplace = out_of_place(func, kwargs)
        target = args[0] if inplace and args and isinstance(args[0], Tensor) else None
        if inplace and target is None:
            return None
        outs, out_spec = tree_flatten(replay(*args, **replay_kwargs))
        out_rows = {}
        for i, o in enumerate(outs):
            if isinstance(o, Tensor) and o.is_floating_point():
                r = tracker.out_rows(func, args, kwargs, rowed[first], leaves[first].shape, o)
                if rnn and r.dim is None and o.dim() and sum(s == n for s in o.shape) == 1:
                    r = Rows(list(o.shape).index(n), 1)
                if r.dim is None or o.shape[r.dim] != n * r.fold:
                    return None
                out_rows[i] = r
        return leaves, spec, rowed, replay, target, outs, out_spec, out_rows

    def _per_block(self, func, args, kwargs, stacks: dict[int, tuple[Tensor, Tensor]]) -> Any:
        """The op with each block's ``V`` on that block's rows (wherever the rows are: a moved or folded batch dim);
        ``None`` where they cannot be told apart (:meth:`_block_layout`)."""
        n, k = self.step.rows, self.step.k
        layout = self._block_layout(func, args, kwargs)
        if layout is None:
            return None
        leaves, spec, rowed, replay, target, outs, out_spec, out_rows = layout
        size, tangents = n // k, {i: [] for i in out_rows}
        for j in range(k):
            block = list(leaves)
            for i, r in rowed.items():
                block[i] = primal(leaves[i]).narrow(r.dim, j * size * r.fold, size * r.fold)
            for i, t in enumerate(leaves):
                if isinstance(t, Tensor) and id(t) in stacks:
                    block[i] = fwAD.make_dual(t.detach(), stacks[id(t)][1][j])
            a, kw = tree_unflatten(block, spec)
            block_outs = tree_flatten(replay(*a, **({**kw, "inplace": False} if "inplace" in kw else kw)))[0]
            for i in out_rows:
                tangent = fwAD.unpack_dual(block_outs[i]).tangent
                tangents[i].append(torch.zeros_like(primal(block_outs[i])) if tangent is None else tangent)
        for i, r in out_rows.items():
            value, existing = fwAD.unpack_dual(outs[i])
            tangent = torch.cat(tangents[i], dim=r.dim)
            outs[i] = fwAD.make_dual(value.detach(), tangent if existing is None else existing + tangent)
        if target is not None:
            return target.copy_(outs[0])
        return tree_unflatten(outs, out_spec)

    def _guess_point(self, func, args, kwargs, params: list[Tensor], rows: Rows, shape: Any) -> Any:
        """An op where trainable parameters (or what was computed from them alone) meet the batch: run it on their
        values, add a guess to each floating output's tangent, record its local VJP."""
        step, tracker = self.step, self.tracker
        name = step.op_name(func, params)
        if func is F.multi_head_attention_forward and rows.dim == 0:
            raise GuessingNotSupportedError(
                f"{name}: nn.MultiheadAttention with batch_first=False received a tensor whose dim 0 is the batch, "
                "so it attends across the examples of the batch (and guessed gradients need dim 0 to be the batch). "
                "Construct it with nn.MultiheadAttention(..., batch_first=True)."
            )
        fn, oop_kwargs, inplace = out_of_place(func, kwargs)
        sources = list(dict.fromkeys(params))
        slots = {id(t): Slot(i) for i, t in enumerate(sources)}
        values = {id(t): t.detach() for t in sources}
        before = primal(args[0]).detach().clone() if inplace and isinstance(args[0], Tensor) else None
        template = tree_map(lambda a: slots.get(id(a), primal(a)) if isinstance(a, Tensor) else a,
                            ((before, *args[1:]) if before is not None else args, oop_kwargs))
        run_args, run_kwargs = tree_map(lambda a: values.get(id(a), a) if isinstance(a, Tensor) else a,
                                        (args, kwargs))
        rng = capture_rng(cuda_devices(sources))  # its estimate re-runs the op: on the same dropout masks
        out = func(*run_args, **run_kwargs)
        leaves, spec = tree_flatten(out)
        record = OpRecord(None, {}, (), func=fn, args=template[0], kwargs=template[1], sources=sources,
                          source_params=[(t,) if id(t) in step.trainable else tracker.derived(t) for t in sources],
                          rng=rng)
        node, edges = step.op_site(func, tuple(dict.fromkeys(id(p) for ps in record.source_params for p in ps)))
        graph = step.graph
        padding = _embedding_padding(func, args, kwargs)  # its padding positions get no guess (guesses.zero_padding)
        for i, o in enumerate(leaves):
            if not isinstance(o, Tensor) or not o.is_floating_point():
                continue
            b = tracker.out_rows(func, args, kwargs, rows, shape, o) if shape is not None else Rows(0, 1)
            if b.dim is None and sum(s == step.rows for s in o.shape) == 1:  # an RNN's (layers, B, H) state
                b = Rows(list(o.shape).index(step.rows), 1)
            if b.dim is None or o.shape[b.dim] != step.rows * b.fold:
                raise GuessingNotSupportedError(
                    f"{name} returned a tensor of shape {tuple(o.shape)} without the batch ({step.rows} rows) on a "
                    "known dim: guessed gradients need each example's values apart (dim 0 the batch; a sequence-first "
                    "tensor, e.g. nn.MultiheadAttention(batch_first=False), is the usual cause: use batch_first=True; "
                    "or an op before it took the batch's rows apart and put them together again, as torch.stack of "
                    "h.unbind(0) reordered, diff(dim=0) or chunks of dim 0 swapped: keep examples apart; or a packed "
                    "sequence, nn.utils.rnn.pack_padded_sequence: run the RNN on the padded batch and mask instead)"
                )
            first = not record.outputs  # the graph follows an op's first output
            u = step.draw_guess(o, b, name, node if first else None, edges if first else None)
            u = zero_padding(u, *padding) if first else u
            record.outputs.append(i)
            record.guesses.append(u)
            record.rows.append(tuple(b))
            if step.replaying:
                tracker.mark(o, b, False)
                continue
            if inplace and i == 0 and o is args[0]:
                o.add_(fwAD.make_dual(torch.zeros_like(primal(o)), u.to(o.dtype, copy=True)))  # the caller's tensor
            else:
                value, tangent = fwAD.unpack_dual(o)
                value = value.detach() if tangent is not None else value
                value = value.contiguous() if 0 in value.stride() else value
                # (a copy of the kept guess: an in-place op after it updates the tangent in place)
                leaves[i] = fwAD.make_dual(value, (u.clone() if tangent is None else tangent + u).to(value.dtype))
            tracker.mark(leaves[i], b, True)
        record.params = {str(j): p for j, p in enumerate(dict.fromkeys(p for ps in record.source_params for p in ps))}
        if node is not None:
            step.release_graph(node)
        step.add_record(record, guessed=bool(record.outputs))
        step.handle.captured(name, record, graph, node)
        return tree_unflatten(leaves, spec)


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` by its definition, ``v · g / ‖v‖`` (norms over every dim but ``dim``): the fused
    kernel has no forward-AD formula on the CPU."""
    return v * (g / torch.norm_except_dim(v, 2, dim))
