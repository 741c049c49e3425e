"""Ops that move values between the examples' rows along the batch dim, refused while guessing.

Each example's directional derivative ``d_b = <∂L/∂z_b, ż_b>`` is formed from its own output row, so example ``b``'s
output must depend on example ``b``'s activations only. An op that moves values between rows along the batch dim
breaks that in a way the statistics check of :mod:`guess_optim.ops` (a value computed across the batch recombined
with per-example values) does not see, because its output still has one row per example: a scan or sort along the
batch (``cumsum(0)``, ``sort(0)``), a reordering (``flip(0)``, ``roll``, ``x[torch.randperm(B)]``, manifold mixup), a
normalization across the batch in one op (``softmax(h, 0)``, ``F.normalize(h, dim=0)``, a ``layer_norm`` whose
normalized dims include the batch's), a matrix function of a matrix that has the batch among its two last dims
(``torch.linalg.qr(h)``), a ``batch_norm`` that normalizes with the batch's statistics (a BatchNorm of any kind in
training mode, or with ``track_running_stats=False``: called, not merely defined; BatchNorm modules are refused
before they run by the handle's pre-hook). Each example's estimate would carry the others' guesses: a wrong average,
with no error (with ``num_guesses=K`` the batch is repeated ``K`` times and the rows of different guesses mix too).

:func:`refuse_row_mixing` refuses those ops, naming the op and the fix. An index that maps every row onto itself
(``x[torch.arange(B)]``, ``logits[torch.arange(B), lengths]``) passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .contexts import primal
from .errors import GuessingNotSupportedError

__all__ = ["refuse_batch_norm", "refuse_row_mixing"]

# ops that move values along one dim of their first input: (index of dim in args, its keyword, default)
_ALONG = {
    "cumsum": (1, "dim", None), "cumprod": (1, "dim", None), "cummax": (1, "dim", None), "cummin": (1, "dim", None),
    "logcumsumexp": (1, "dim", None), "sort": (1, "dim", -1), "argsort": (1, "dim", -1), "topk": (2, "dim", -1),
    "kthvalue": (2, "dim", -1), "softmax": (1, "dim", None), "log_softmax": (1, "dim", None),
    "softmin": (1, "dim", None), "gumbel_softmax": (4, "dim", -1), "normalize": (2, "dim", 1), "glu": (1, "dim", -1),
}
_SOFTMAX = {"softmax", "log_softmax", "softmin"}  # dim=None: torch's legacy implicit dim
_MATRIX = {"inverse", "pinverse", "det", "logdet", "slogdet", "matrix_exp", "matrix_power", "cholesky", "qr", "svd",
           "lu", "linalg_inv", "linalg_pinv", "linalg_qr", "linalg_svd", "linalg_eigh", "linalg_cholesky", "inv",
           "pinv", "eigh", "eig", "eigvals", "eigvalsh", "svdvals", "solve", "lstsq", "matrix_norm", "cond"}
_INDEXED = {  # ops that read or write rows by an index tensor: (dim index in args, keyword, index tensor's position)
    "index_select": (1, "dim", 2), "gather": (1, "dim", 2), "take_along_dim": (2, "dim", 1),
    "scatter": (1, "dim", 2), "scatter_add": (1, "dim", 2), "scatter_reduce": (1, "dim", 2),
    "index_add": (1, "dim", 2), "index_copy": (1, "dim", 2), "index_fill": (1, "dim", 2), "index_reduce": (1, "dim", 2),
}
_FLATTENING = {"take", "put", "put_"}
_WRITES = {"__setitem__", "index_put", "scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy",
           "index_reduce"}

_CHECKED = {*_ALONG, *_MATRIX, *_INDEXED, *_FLATTENING, *_WRITES, "msort", "flipud", "flip", "roll", "layer_norm",
            "batch_norm", "__getitem__", "__setitem__", "index_put"}

_FIX = ("Keep the op within each example (a dim other than the batch's), make its result a constant (.detach()), or "
        "use method='backprop' for this model.")


def _name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    return name[:-1] if name.endswith("_") and not name.endswith("__") and name not in _FLATTENING else name


def _dim(args: tuple, kwargs: dict, at: int, key: str, default: Any) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[at] if len(args) > at and not isinstance(args[at], bool) else default


def _refuse(func: Any, what: str, k: int) -> None:
    repeated = f" (with num_guesses={k}, the rows of different guesses too)" if k > 1 else ""
    error = GuessingNotSupportedError(
        f"{getattr(func, '__name__', repr(func))!r} {what} along the batch dim: it moves values between the examples "
        f"of the batch{repeated}, so each example's directional derivative would carry the others' guesses and the "
        f"average estimate would be wrong. {_FIX}"
    )
    error._guess_optim_noted = True  # not the repeated-batch note: num_guesses=1 would not help
    raise error


def _keeps_rows(index: Tensor, size: int) -> bool:
    """Whether ``index`` (its dim 0 along the rows; values: rows of a dim of ``size``) maps every row onto itself."""
    index = primal(index).detach()
    if index.dim() == 0 or index.shape[0] != size:
        return False
    rows = torch.arange(size, device=index.device).view(size, *([1] * (index.dim() - 1)))
    return bool((index.long().remainder(size) == rows).all())


def _item_at(index: Any, dim: int, ndim: int) -> Any:
    """The entry of a ``__getitem__``/``__setitem__`` index that applies to input dim ``dim`` (``None``: none does, or
    the index cannot be read)."""
    items = index if isinstance(index, tuple) else (index,)

    def width(item: Any) -> int:
        if item is None:
            return 0
        if isinstance(item, Tensor) and item.dtype == torch.bool:
            return item.dim()
        return 1

    at = 0
    for j, item in enumerate(items):
        if item is Ellipsis:
            at += ndim - sum(width(i) for i in items[j + 1:] if i is not Ellipsis) - at
            continue
        w = width(item)
        if at <= dim < at + w:
            return item
        at += w
    return None


def _batch_statistics(func: Any, args: tuple, kwargs: dict) -> tuple[bool, bool]:
    """``(training, running statistics given)`` of a ``batch_norm`` call (``F.batch_norm`` or ``torch.batch_norm``,
    whose running mean sit at different positions)."""
    functional = func is torch.nn.functional.batch_norm
    at = 1 if functional else 3
    running = kwargs.get("running_mean", args[at] if len(args) > at else None)
    training = kwargs.get("training", args[5] if len(args) > 5 else False)
    return bool(training), running is not None


def refuse_batch_norm(owner: str | None, training: bool, k: int) -> None:
    """Raise :class:`~guess_optim.errors.GuessingNotSupportedError` for a BatchNorm (``owner``: its name, or ``None``
    for a bare ``batch_norm`` call) that normalizes with the batch's statistics."""
    who = f"the BatchNorm {owner}" if owner else "a batch_norm"
    why = ("is in training mode" if training else
           "has track_running_stats=False, so it normalizes with the batch's statistics even in eval mode")
    repeated = f" (with num_guesses={k}, the rows of different guesses too)" if k > 1 else ""
    error = GuessingNotSupportedError(
        f"{who} {why}: it mixes the examples of a batch{repeated}, which breaks the per-example directional "
        "derivatives of guessed gradients (frozen or not): the average estimate would be wrong. Put it in eval mode "
        "(bn.eval(), with track_running_stats=True), or use GroupNorm/LayerNorm instead."
    )
    error._guess_optim_noted = True
    raise error


def refuse_row_mixing(func: Any, args: tuple, kwargs: dict, rows_of: Callable[[Any], Any], k: int,
                      owner: Callable[[tuple, dict], str | None] | None = None) -> None:
    """Raise :class:`~guess_optim.errors.GuessingNotSupportedError` if ``func`` moves values between the examples' rows
    along the batch dim (module docstring).

    Args:
        func, args, kwargs: the op as the guessing forward sees it.
        rows_of: where the batch's rows are in a tensor (a :class:`~guess_optim.ops.Rows`), ``None`` for a tensor
            that is not the batch's.
        k: ``num_guesses`` (for the message).
        owner: names the module of a refused ``batch_norm`` call (its arguments → e.g. ``"'block.bn2'
            (BatchNorm2d)"``), for the message.
    """
    name = _name(func)
    if not args or (name not in _CHECKED and name.removeprefix("linalg_") not in _MATRIX):
        return  # most ops: one set lookup
    writes = name in _WRITES
    target = args[0]
    rows = rows_of(target) if isinstance(target, Tensor) else None
    if rows is None and writes:  # a write into a fresh tensor of rows of the batch: the source's rows
        at = 2 if name in ("__setitem__", "index_put") else 3
        source = kwargs.get("src", kwargs.get("source", kwargs.get("values", args[at] if len(args) > at else None)))
        rows = rows_of(source) if isinstance(source, Tensor) else None
    if rows is None or rows.dim is None or not isinstance(target, Tensor):
        return
    if not (target.is_floating_point() or target.is_complex()) and not writes:
        return  # sorting the batch's lengths or labels moves no guess (an index it makes is checked where it is used)
    ndim, bdim = target.dim(), rows.dim
    if bdim >= ndim:
        return
    size = target.shape[bdim]
    if name in _ALONG:
        dim = _dim(args, kwargs, *_ALONG[name])
        if dim is None and name in _SOFTMAX:
            dim = 0 if ndim in (0, 1, 3) else 1
        if isinstance(dim, int) and dim % ndim == bdim:
            _refuse(func, "scans, sorts or normalizes the rows", k)
    elif name == "batch_norm":  # statistics over every dim but the channels' (dim 1)
        training, running = _batch_statistics(func, args, kwargs)
        if bdim != 1 and (training or not running):
            refuse_batch_norm(owner(args, kwargs) if owner is not None else None, training, k)
    elif name == "layer_norm":
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape", ())
        if bdim >= ndim - len(shape if isinstance(shape, (list, tuple, torch.Size)) else (shape,)):
            _refuse(func, "normalizes over dims that include", k)
    elif name.removeprefix("linalg_") in _MATRIX or name in _MATRIX:
        if bdim >= ndim - 2 and ndim >= 2:
            _refuse(func, "is a matrix function of a matrix whose rows or columns run", k)
    elif name in ("msort", "flipud"):
        if bdim == 0:
            _refuse(func, "reorders the rows", k)
    elif name in ("flip", "roll"):
        dims = kwargs.get("dims", (args[2] if len(args) > 2 else None) if name == "roll" else args[1:])
        if dims is None:  # roll without dims: the flattened tensor
            _refuse(func, "shifts the flattened values", k)
        flat = [d for d in (dims if isinstance(dims, (list, tuple)) else (dims,)) for d in (
            d if isinstance(d, (list, tuple)) else (d,))]
        if any(isinstance(d, int) and d % ndim == bdim for d in flat):
            _refuse(func, "reorders the rows", k)
    elif name in _FLATTENING:
        _refuse(func, "indexes the flattened values", k)
    elif name in _INDEXED:
        at, key, where = _INDEXED[name]
        dim = _dim(args, kwargs, at, key, None)
        index = kwargs.get("index", args[where] if len(args) > where else None)
        if isinstance(dim, int) and dim % ndim == bdim and isinstance(index, Tensor):
            if name in ("gather", "take_along_dim", "scatter", "scatter_add", "scatter_reduce") and index.dim() > bdim:
                index = index.movedim(bdim, 0)
            if not _keeps_rows(index, size):
                _refuse(func, "moves rows by an index", k)
    elif name in ("__getitem__", "__setitem__", "index_put"):
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        item = _item_at(tuple(index) if name == "index_put" else index, bdim, ndim)
        if isinstance(item, (list, range)):
            item = torch.as_tensor(list(item))
        if isinstance(item, Tensor) and item.dtype != torch.bool and item.dim() > 0 and not _keeps_rows(item, size):
            _refuse(func, "selects or writes rows by an index", k)
