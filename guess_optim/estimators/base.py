"""The estimator interface and its registry (one class per way to guess a gradient).

An estimator is a frozen dataclass whose fields are its options (``WT(power=2.0)``) and whose class attributes say
what the engine needs to know about it: its name, whether it is unbiased, the space it guesses in, what it needs from
the model's graph, its cost for the benchmark floor and its label for plots. The engine never switches on a name: it
asks the estimator for a guess at each guess point (:meth:`Estimator.guess`, from a :class:`~guess_optim.site.Site`)
or for each parameter (:meth:`Estimator.weight_guess`), and turns the measured directional derivative into an
estimate the same way for all of them (Singhal et al., "How to Guess a Gradient", arXiv 2312.04709, §2 and A.4).

Write your own::

    from dataclasses import dataclass
    from guess_optim import Estimator, register_estimator
    from guess_optim.guesses import normalize_rows

    @register_estimator
    @dataclass(frozen=True)
    class SignActivation(Estimator):
        name = "sign-activation"
        summary = "activation perturbation with Rademacher entries"
        unbiased = True

        def guess(self, site):
            u = torch.randn(site.output.shape, generator=site.generator, dtype=site.output.dtype,
                            device=site.output.device)
            return u.sign()

    attach(model, "sign-activation")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..site import Site

__all__ = [
    "METHODS",
    "Estimator",
    "get_estimator",
    "make_estimator",
    "register_estimator",
    "unregister_estimator",
]

Space = Literal["backprop", "weight", "activation"]
Needs = Literal["next", "post", "downstream"] | None
SPACES = ("backprop", "weight", "activation")
NEEDS = (None, "next", "post", "downstream")


@dataclass(frozen=True)
class Estimator:
    """Base class of every estimator; subclasses are frozen dataclasses whose fields are their options.

    Class attributes (set them on a subclass):

    * ``name`` (str): the ``method=`` string; unique in the registry.
    * ``summary`` (str): one line for help texts. ``label`` (str): for plot legends (default: ``name``).
      ``color`` (str or None): a matplotlib colour for plots. ``source`` (str): the paper section or reference.
    * ``space``: ``"activation"`` (a guess ``u`` at every guess point's output, ``[N, *S]``; the estimate of the
      guess point's parameters is the local VJP of ``d_b u_b`` through that single module), ``"weight"`` (a guess
      ``V`` of each parameter's shape, shared by the batch; the estimate is ``(Σ_b d_b) V``) or ``"backprop"``
      (plain autograd, the oracle).
    * ``unbiased`` (bool): whether ``E[ĝ] = ∇L``.
    * ``needs``: what the guess is built from besides the guess point's output: ``None`` (nothing),
      ``"next"`` (the next modules' outputs: ``site.next_outputs()``), ``"post"`` (the post-activations feeding the
      next modules: ``site.post_activations()``) or ``"downstream"`` (post-activations further down:
      ``site.downstream(l)``). The engine discovers the model's graph only for estimators that need it.
    * ``exact_head`` (bool): the output layer always gets its exact (local) gradient.
    * ``guess_matmuls`` (int): layer-sized matrix products per layer that the guess costs on top of the primal, the
      tangent and the estimate (the benchmark's floor: ``guess-optim bench``).
    * ``regenerable`` (bool): the guess depends only on ``site.output``'s shape, dtype and device, ``site.generator``
      and ``site.num_guesses``: the engine then keeps the generator's state instead of the guess and draws it again in
      the backward (memory: one guess alive at a time instead of all of them).
    * ``aliases`` (mapping): older :func:`~guess_optim.attach` keyword names of options (``{"wt_power": "power"}``).

    Activation-space subclasses implement :meth:`guess`; weight-space ones :meth:`weight_guess`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    label: ClassVar[str] = ""
    color: ClassVar[str | None] = None
    source: ClassVar[str] = ""
    space: ClassVar[Space] = "activation"
    unbiased: ClassVar[bool] = False
    needs: ClassVar[Needs] = None
    exact_head: ClassVar[bool] = False
    guess_matmuls: ClassVar[int] = 0
    regenerable: ClassVar[bool] = False
    aliases: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def guess(self, site: Site) -> Tensor:
        """The guess ``u`` at one guess point (activation space).

        Args:
            site: the guess point: ``site.output`` (its output's values, ``[N, *S]`` with ``N`` = batch x
                ``num_guesses``), ``site.generator`` (the handle's private generator: never use the global RNG), and
                what :attr:`needs` asks for.

        Returns:
            A tensor of ``site.output``'s shape (any dtype; cast by the engine). Row ``b`` is example ``b``'s guess.
        """
        raise NotImplementedError(f"estimator {self.name!r} guesses in {self.space} space; it has no guess(site)")

    def weight_guess(self, param: Tensor, generator: torch.Generator) -> Tensor:
        """The guess ``V`` for one parameter (weight space): a tensor of ``param``'s shape, shared by the batch."""
        raise NotImplementedError(f"estimator {self.name!r} guesses in {self.space} space; it has no weight_guess()")

    def weight_guesses(self, param: Tensor, generator: torch.Generator, k: int) -> Tensor:
        """``k`` independent weight-space guesses, stacked: ``[k, *param.shape]`` (one per guess block of
        ``num_guesses``). By default :meth:`weight_guess` ``k`` times; override to draw them at once."""
        return torch.stack([self.weight_guess(param, generator) for _ in range(k)])

    def options(self) -> dict[str, Any]:
        """The estimator's options, ``{field name: value}``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of the options (the dataclass fields)."""
        return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()

    @classmethod
    def plot_label(cls) -> str:
        """``label``, or ``name`` when the class sets none."""
        return cls.label or cls.name


_REGISTRY: dict[str, type[Estimator]] = {}

METHODS: Mapping[str, type[Estimator]] = MappingProxyType(_REGISTRY)
"""The registry, read-only and live: ``method=`` name → estimator class, in registration order (the built-ins
first: ``backprop``, ``directional``, ``activation``, ``mixing``, ``wt``, ``downstream``, ``self-sharpening``)."""


def register_estimator(cls: type[Estimator] | None = None, *, replace: bool = False) -> Any:
    """Add an estimator class to the registry (use as ``@register_estimator`` or ``@register_estimator(replace=True)``).

    Args:
        cls: a subclass of :class:`Estimator` (a frozen dataclass) with a non-empty ``name``.
        replace: allow replacing an estimator registered under the same name. (default: ``False``)

    Returns:
        ``cls`` (so it can decorate the class).

    Raises:
        TypeError: ``cls`` is not an :class:`Estimator` subclass.
        ValueError: empty name, unknown ``space``/``needs``, a duplicate name without ``replace=True``, or an
            activation-space class without :meth:`~Estimator.guess` (weight space: :meth:`~Estimator.weight_guess`).
    """

    def add(cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"register_estimator expects a subclass of guess_optim.Estimator, got {cls!r}")
        name = cls.name
        if not isinstance(name, str) or not name:
            raise ValueError(f"estimator class {cls.__qualname__} needs a non-empty class attribute `name`")
        if cls.space not in SPACES:
            raise ValueError(f"Invalid space of {name!r}: {cls.space!r}; expected one of {SPACES}")
        if cls.needs not in NEEDS:
            raise ValueError(f"Invalid needs of {name!r}: {cls.needs!r}; expected one of {NEEDS}")
        if cls.space == "activation" and cls.guess is Estimator.guess:
            raise ValueError(f"activation-space estimator {name!r} must implement guess(site)")
        if cls.space == "weight" and cls.weight_guess is Estimator.weight_guess:
            raise ValueError(f"weight-space estimator {name!r} must implement weight_guess(param, generator)")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not replace:
            raise ValueError(
                f"an estimator named {name!r} is already registered ({_REGISTRY[name].__qualname__}); choose another "
                "name or pass replace=True"
            )
        _REGISTRY[name] = cls
        return cls

    return add if cls is None else add(cls)


def unregister_estimator(name: str) -> type[Estimator]:
    """Remove an estimator from the registry and return its class (for tests and notebooks).

    Raises:
        ValueError: no estimator of that name.
    """
    cls = get_estimator(name)
    del _REGISTRY[name]
    return cls


def get_estimator(name: str) -> type[Estimator]:
    """The estimator class registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown method: {name!r}; expected one of {', '.join(map(repr, _REGISTRY))}") from None


def make_estimator(method: str | Estimator, **options: Any) -> Estimator:
    """An estimator instance from a registered name and its options, or an instance as it is.

    Options may use the names of :attr:`Estimator.aliases` (``wt_power=`` for ``wt``'s ``power``).

    Raises:
        ValueError: unknown name, an option the estimator does not have (the message lists those it has), options
            given with an instance, or an invalid option value (from the estimator).
        TypeError: ``method`` is neither a string nor an :class:`Estimator`.
    """
    if isinstance(method, Estimator):
        if options:
            raise ValueError(
                f"options {sorted(options)} were given with an Estimator instance ({method!r}); set them on the "
                "instance instead"
            )
        return method
    if isinstance(method, type) and issubclass(method, Estimator):
        raise TypeError(f"pass an instance ({method.__name__}()) or a registered name, not the class itself")
    if not isinstance(method, str):
        raise TypeError(f"method must be a registered name or a guess_optim.Estimator, got {type(method).__name__}")
    cls = get_estimator(method)
    known = cls.option_names()
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        field_name = cls.aliases.get(key, key)
        if field_name not in known:
            has = ", ".join(repr(k) for k in known) or "none"
            raise ValueError(f"method {method!r} has no option {key!r}; its options: {has}")
        kwargs[field_name] = value
    return cls(**kwargs)
