"""Runner names and their matrix-product floors, read from the estimator registry.

A *runner* is one way to take a training step: a method of :data:`guess_optim.METHODS`, optionally with a store
suffix (``wt@recompute``: ``attach(..., store="recompute")``; ``wt@release``: the same, stepping each parameter in
backward with :class:`~guess_optim.optim.OptimizerInBackward` and ``gradient_release=True``), or a peer of
:data:`~guess_optim.bench.peers.PEERS` (no suffix). The baseline is the registry's method whose ``space`` is
``"backprop"``.

**Floor.** A backprop step costs three layer-sized matrix products per layer: the forward, the input gradient and the
weight gradient. A guessed step costs, per layer:

* activation space: the primal, the tangent (``W ẋ``) and the weight estimate (``(d u) xᵀ``), plus the estimator's
  ``guess_matmuls`` (``wt``: ``W_{i+1}ᵀ ε``; ``downstream``: the next layer's forward for its mask and the pullback);
* weight space: the primal, ``W ẋ`` and ``V x`` (the estimate ``(Σ d) V`` is element-wise), plus ``guess_matmuls``;
* a peer: its :attr:`~guess_optim.bench.peers.Peer.products` (MeZO: two forwards).

A store that replays the forward during backward (``recompute``) adds the primal again, and in activation space the
guess again. With a frozen backbone (prompt tuning) backprop needs no weight gradients (2 products per layer) and every
runner costs 2 as well (primal and tangent, or two forwards: guesses and estimates touch only the small trained
modules), plus 1 for a replayed forward; a method that reads the graph (``wt``, ``mixing``, ...) adds 1 for the
primal forward that discovers it (on a transformer a chain captures activations, so it is discovered every step),
and 1 more for the replay's. The floor of a runner is its product count over backprop's: ``1.0`` means no
work beyond backprop's matrix products. Element-wise work, random numbers, the optimizer and Python are not counted,
so small layers sit far above their floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .. import METHODS
from .peers import PEERS, Peer

__all__ = [
    "DEFAULT_STORE",
    "STORES",
    "RunnerName",
    "Store",
    "backprop_runner",
    "floor_ratio",
    "guessed_methods",
    "parse_runner",
    "products",
    "with_stores",
]


@dataclass(frozen=True)
class Store:
    """What a runner's ``@suffix`` changes.

    Attributes:
        attach: keyword arguments for :func:`guess_optim.attach`.
        replays_forward: a second forward runs during backward (it adds products to the floor).
        summary: one line for help texts.
        in_backward: the optimizer steps each parameter inside ``backward()``
            (:class:`~guess_optim.optim.OptimizerInBackward`) instead of ``optimizer.step()`` after it.
    """

    attach: Mapping[str, Any] = field(default_factory=dict)
    replays_forward: bool = False
    summary: str = ""
    in_backward: bool = False


DEFAULT_STORE = "activations"
STORES: Mapping[str, Store] = MappingProxyType({
    "activations": Store({"store": "activations"}, False, "keep each guess point's input and guess (default)"),
    "recompute": Store({"store": "recompute"}, True, "keep the batch only; replay the forward during backward"),
    "release": Store({"store": "recompute", "gradient_release": True}, True,
                     "as recompute, and step each parameter in backward as soon as its estimate is complete",
                     in_backward=True),
})
"""Store suffix → :class:`Store`. Adding a suffix is one entry here; runners, floors and the CLI read this table."""


@dataclass(frozen=True)
class RunnerName:
    """A parsed runner name.

    Attributes:
        name: as given (``"wt@recompute"``).
        method: the method or peer name (``"wt"``).
        store: a key of :data:`STORES`.
        space: ``"backprop"``, ``"weight"`` or ``"activation"`` (from the registry), or ``"peer"``.
    """

    name: str
    method: str
    store: str
    space: str

    @property
    def peer(self) -> Peer | None:
        """The :class:`~guess_optim.bench.peers.Peer`, for a peer."""
        return PEERS.get(self.method)


def parse_runner(runner: str) -> RunnerName:
    """Read ``METHOD``, ``METHOD@STORE`` or a peer name.

    Raises:
        ValueError: unknown method, store or peer, a store suffix on backprop or on a peer.
    """
    method, _, suffix = runner.partition("@") if isinstance(runner, str) else ("", "", "")
    store = suffix or DEFAULT_STORE
    if method in PEERS and not suffix:
        return RunnerName(runner, method, store, "peer")
    cls = METHODS.get(method)
    if cls is not None and store in STORES and not (cls.space == "backprop" and suffix):
        return RunnerName(runner, method, store, cls.space)
    methods = [m for m, c in METHODS.items() if c.space != "backprop"]
    raise ValueError(
        f"Invalid runner: {runner!r}; expected {backprop_runner()!r}, a method of {methods} optionally with "
        f"{' or '.join('@' + s for s in STORES)}, or a peer of {list(PEERS)}"
    )


def backprop_runner() -> str:
    """The name of the registry's backprop method (the one whose ``space`` is ``"backprop"``).

    Raises:
        RuntimeError: no registered method has ``space == "backprop"``.
    """
    for name, cls in METHODS.items():
        if cls.space == "backprop":
            return name
    raise RuntimeError("no estimator with space 'backprop' is registered: the benchmark has no baseline")


def guessed_methods() -> tuple[str, ...]:
    """Every registered method except backprop, in registration order."""
    return tuple(name for name, cls in METHODS.items() if cls.space != "backprop")


def with_stores(runners: tuple[str, ...]) -> tuple[str, ...]:
    """``runners``, each activation-space method followed by its other stores (``wt`` → ``wt``, ``wt@recompute``).

    Weight-space methods and peers keep nothing per activation, so only their default store is listed.
    """
    out: list[str] = []
    for r in runners:
        parsed = parse_runner(r)
        stores = STORES if parsed.space == "activation" and parsed.store == DEFAULT_STORE else ()
        out += [r, *(f"{parsed.method}@{s}" for s in stores if s != DEFAULT_STORE)]
    return tuple(dict.fromkeys(out))


def products(runner: str, *, frozen: bool = False) -> int:
    """Layer-sized matrix products per layer of one step of ``runner`` (module docstring, "Floor").

    Raises:
        ValueError: unknown runner.
    """
    r = parse_runner(runner)
    if r.space == "backprop":
        return 2 if frozen else 3
    replay = int(STORES[r.store].replays_forward)
    if frozen:
        discovers = r.peer is None and METHODS[r.method].needs is not None
        return 2 + replay + discovers * (1 + replay)
    if r.peer is not None:
        return r.peer.products
    g = METHODS[r.method].guess_matmuls
    if r.space == "weight":  # primal, W ẋ, V x, the guess; a replay: + the primal
        return 3 + g + replay
    return 3 + g + replay * (1 + g)  # primal, tangent, estimate, the guess; a replay: + the primal, + the guess


def floor_ratio(runner: str, *, frozen: bool = False) -> float:
    """The floor of ``runner``'s step time as a fraction of a backprop step (module docstring, "Floor").

    Read from the registry (``METHODS[method].space`` and ``.guess_matmuls``), so a newly registered estimator has a
    floor without any change here.

    Args:
        runner: a method of :data:`guess_optim.METHODS`, optionally with a store suffix (``"wt@recompute"``), or a
            peer (``"mezo"``, ``"torchzero-fg"``).
        frozen: the layers are frozen and only a few parameters at the input and output train (prompt tuning).
            (default: ``False``)

    Returns:
        ``products(runner) / products(backprop)``: e.g. ``1.0`` for ``activation``, ``4/3`` for ``wt``, ``2.0`` for
        ``wt@recompute``, ``2/3`` for ``mezo``; with ``frozen``, ``1.0`` for ``directional``, ``activation`` and the
        peers, ``1.5`` for ``wt`` (the graph discovered by a primal forward every step), ``2.5`` for ``wt@recompute``
        (the replay and its discovery).

    Raises:
        ValueError: unknown runner.
    """
    return products(runner, frozen=frozen) / products(backprop_runner(), frozen=frozen)
