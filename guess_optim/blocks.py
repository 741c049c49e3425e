"""With ``num_guesses=K``, the guessing forward sees the batch repeated ``K`` times along its rows: ``K`` *blocks*
of the user's ``B`` examples, each carrying its own guesses. Block ``k``'s directional derivative is formed from block
``k``'s rows and the loss's ``∂L/∂z`` of the user's batch, so every block must compute what the user's batch computes:
an op that moves values between rows across blocks (a scan or sort along the batch, ``x.flip(0)``,
``x[torch.randperm(N)]``) makes each block's estimate carry the others' guesses, and the average wrong, with no error
anywhere.

:func:`refuse_block_mixing` refuses those ops, naming the op and the fix. An index that maps every block onto itself
the same way (``x[torch.arange(N)]``, ``logits[torch.arange(N), lengths]``) is what ``K`` copies of the user's forward
do, and passes. With ``K = 1`` nothing is checked: the one directional derivative is exact for any op, mixing or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .contexts import primal
from .errors import GuessingNotSupportedError

__all__ = ["refuse_block_mixing"]

# ops that move values along one dim of their first input: (index of dim in args, its keyword, default)
_ALONG = {
    "cumsum": (1, "dim", None), "cumprod": (1, "dim", None), "cummax": (1, "dim", None), "cummin": (1, "dim", None),
    "logcumsumexp": (1, "dim", None), "sort": (1, "dim", -1), "argsort": (1, "dim", -1), "topk": (2, "dim", -1),
    "kthvalue": (2, "dim", -1),
}
_INDEXED = {  # ops that read or write rows by an index tensor: (dim index in args, keyword, index tensor's position)
    "index_select": (1, "dim", 2), "gather": (1, "dim", 2), "take_along_dim": (2, "dim", 1),
    "scatter": (1, "dim", 2), "scatter_add": (1, "dim", 2), "scatter_reduce": (1, "dim", 2),
    "index_add": (1, "dim", 2), "index_copy": (1, "dim", 2), "index_fill": (1, "dim", 2), "index_reduce": (1, "dim", 2),
}
_FLATTENING = {"take", "put", "put_"}
_WRITES = {"__setitem__", "index_put", "scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy",
           "index_reduce"}

_FIX = ("Use num_guesses=1 (average guesses over steps instead), or keep the op within each example (a dim other "
        "than the batch's).")


def _name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    return name[:-1] if name.endswith("_") and not name.endswith("__") and name not in _FLATTENING else name


def _dim(args: tuple, kwargs: dict, at: int, key: str, default: Any) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[at] if len(args) > at and not isinstance(args[at], bool) else default


def _refuse(func: Any, what: str, k: int) -> None:
    raise GuessingNotSupportedError(
        f"{getattr(func, '__name__', repr(func))!r} {what} along the batch dim while the batch is repeated "
        f"num_guesses={k} times (one block of rows per guess): rows of different guess blocks would mix, and every "
        f"estimate would carry the other blocks' guesses (a wrong average, not noise). {_FIX}"
    )


def _block_consistent(index: Tensor, size: int, k: int) -> bool:
    """Whether ``index`` (its dim 0 along the rows, values rows of a dim of ``size``) maps each of the ``k`` blocks of
    ``size // k`` rows onto itself, the same way in every block."""
    index = primal(index)
    if index.dim() == 0 or index.shape[0] % k or size % k:
        return False
    block = size // k
    index = index.detach().long().remainder(size).reshape(k, index.shape[0] // k, -1)
    offsets = torch.arange(k, device=index.device).mul_(block).view(k, 1, 1)
    local = index - offsets
    return bool(((local >= 0) & (local < block)).all() and (local == local[:1]).all())


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


def refuse_block_mixing(func: Any, args: tuple, kwargs: dict, rows_of: Callable[[Any], Any], k: int) -> None:
    """Raise :class:`~guess_optim.errors.GuessingNotSupportedError` if ``func`` moves values between rows of different
    guess blocks (module docstring).

    Args:
        func, args, kwargs: the op as the guessing forward sees it.
        rows_of: where the batch's rows are in a tensor (a :class:`~guess_optim.ops.Rows`), ``None`` for a tensor
            that is not the batch's.
        k: ``num_guesses`` (nothing is checked for 1).
    """
    if k <= 1 or not args:
        return
    name = _name(func)
    writes = name in _WRITES
    target = args[0]
    rows = rows_of(target) if isinstance(target, Tensor) else None
    if rows is None and writes:  # a write into a fresh tensor of rows of the batch: the source's rows
        at = 2 if name in ("__setitem__", "index_put") else 3
        source = kwargs.get("src", kwargs.get("source", kwargs.get("values", args[at] if len(args) > at else None)))
        rows = rows_of(source) if isinstance(source, Tensor) else None
    if rows is None or rows.dim is None or not isinstance(target, Tensor):
        return
    ndim, bdim = target.dim(), rows.dim
    if bdim >= ndim:
        return
    size = target.shape[bdim]
    if name in _ALONG:
        dim = _dim(args, kwargs, *_ALONG[name])
        if isinstance(dim, int) and dim % ndim == bdim:
            _refuse(func, "scans or sorts the rows", k)
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
            if not _block_consistent(index, size, k):
                _refuse(func, "moves rows by an index", k)
    elif name in ("__getitem__", "__setitem__", "index_put"):
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        item = _item_at(tuple(index) if name == "index_put" else index, bdim, ndim)
        if isinstance(item, (list, range)):
            item = torch.as_tensor(list(item))
        if isinstance(item, Tensor) and item.dtype != torch.bool and item.dim() > 0 and (
                not _block_consistent(item, size, k)):
            _refuse(func, "selects or writes rows by an index", k)
