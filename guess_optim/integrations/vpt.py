"""Visual prompt tuning (VPT; Jia et al., "Visual Prompt Tuning", ECCV 2022) of Hugging Face ViT models.

The backbone (a ``ViTModel`` or the ``vit`` of a ``ViTForImageClassification``) is frozen and kept in eval mode;
only learnable prompt tokens (:class:`guess_optim.PromptTokens`) and the classification head train. Paper A.6 tunes
the prompts of a ViT-B/16 with guessed gradients: the prompts are a guess point, so ``wt`` builds their guess from
the modules that consume them (the first block's ``layernorm_before`` and, through the residual stream, the next
LayerNorm).

Token layout (VPT §3.2), with ``P`` prompts, ``N`` patches and hidden size ``D``:

* shallow: ``[CLS, prompts, patches]`` is fed to the first block; the prompt positions then evolve like any token.
* deep: before every block ``i`` the ``P`` positions after ``CLS`` are *replaced* by that block's own fresh prompts
  (block 0 receives its prompts after the embeddings, as in shallow mode).

The head reads the ``CLS`` token of the final LayerNorm, as ``ViTForImageClassification`` does. The encoder blocks are
re-run here, one by one, on the extended sequence (no monkey-patching of the Hugging Face modules): with
``num_prompt_tokens=0``, or with the prompts masked out of attention, the result equals the plain ViT.

Example::

    from transformers import ViTForImageClassification
    from guess_optim import attach
    from guess_optim.integrations.vpt import VisualPromptTuning, VPTConfig

    vit = ViTForImageClassification.from_pretrained("google/vit-base-patch16-224-in21k", num_labels=200)
    model = VisualPromptTuning(vit, VPTConfig(num_prompt_tokens=50, deep=True))
    handle = attach(model, "wt", head=model.classifier, seed=0)
    loss = model(pixel_values, labels=labels).loss      # [B, 3, 224, 224], [B]
    loss.backward()                                     # estimates in the prompts' and the head's .grad only
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guess_optim import PromptTokens
from guess_optim._checks import check_choice, check_float, check_int
from guess_optim._io import atomic_write

__all__ = ["VPTConfig", "VisualPromptTuning", "get_vpt_model", "vit_lora_target_modules"]

_INSTALL_HINT = 'pip install "guess-optim[hf]"'
_FORMAT = "guess_optim.vpt/1"


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"visual prompt tuning of Hugging Face ViT models needs transformers: {_INSTALL_HINT}"
        ) from err
    return transformers


@dataclass
class VPTConfig:
    """Configuration of :class:`VisualPromptTuning` (field names follow VPT's ``MODEL.PROMPT`` options).

    Raises:
        ValueError: on an invalid value (checked in ``__post_init__``).
    """

    num_prompt_tokens: int = field(
        default=10, metadata={"help": "Number of prompt tokens P (per block when deep). 0 gives the plain ViT."}
    )
    deep: bool = field(
        default=False,
        metadata={"help": "VPT-deep: fresh prompts before every block, replacing the previous block's prompt "
                          "positions. False is VPT-shallow: prompts inserted once, after the embeddings."},
    )
    prompt_dropout: float = field(
        default=0.1, metadata={"help": "Dropout probability on the prompt tokens (training mode only), in [0, 1)."}
    )
    init: str = field(
        default="vpt",
        metadata={"help": "Prompt initialization: 'vpt' (Xavier uniform on [-v, v], v = sqrt(6 / (3 * patch_size**2 + "
                          "hidden_size)), as in VPT's code), 'normal' (std 0.02) or 'zeros'."},
    )
    train_head: bool = field(
        default=True, metadata={"help": "Train the classification head with the prompts (VPT does)."}
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Replace the head by a fresh nn.Linear(hidden_size, num_labels). Required for a ViTModel "
                          "(no head); None keeps the ViTForImageClassification's own classifier."},
    )

    def __post_init__(self) -> None:
        check_int("num_prompt_tokens", self.num_prompt_tokens, low=0)
        if not isinstance(self.deep, bool):
            raise ValueError(f"Invalid deep: {self.deep!r}; expected a bool")
        check_float("prompt_dropout", self.prompt_dropout, low=0.0, high=1.0, high_strict=True)
        check_choice("init", self.init, ("vpt", "normal", "zeros"))
        if not isinstance(self.train_head, bool):
            raise ValueError(f"Invalid train_head: {self.train_head!r}; expected a bool")
        check_int("num_labels", self.num_labels, low=1, none_ok=True)


def _backbone_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.ModuleList]:
    """``(backbone, its head or None, encoder blocks)`` of a ViTModel / ViTForImageClassification (transformers
    5.x: ``backbone.layers``; 4.x: ``backbone.encoder.layer``)."""
    backbone, head = model, None
    if isinstance(getattr(model, "vit", None), nn.Module):
        backbone, head = model.vit, getattr(model, "classifier", None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not (isinstance(layers, nn.ModuleList) and isinstance(getattr(backbone, "embeddings", None), nn.Module)
            and isinstance(getattr(backbone, "layernorm", None), nn.Module)):
        raise TypeError(
            f"expected a Hugging Face ViTModel or ViTForImageClassification, got {type(model).__name__} "
            "(no embeddings / encoder layers / layernorm found)"
        )
    return backbone, head, layers


def vit_lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the attention projections of a Hugging Face ViT, for ``peft.LoraConfig(target_modules=...)``.

    ``["q_proj", "k_proj", "v_proj"]`` in transformers 5.x, ``["query", "key", "value"]`` in 4.x.

    Raises:
        TypeError: no known projection names in ``model``.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for names in (["q_proj", "k_proj", "v_proj"], ["query", "key", "value"]):
        if set(names) <= leaves:
            return names
    raise TypeError(f"no ViT attention projections (q_proj/k_proj/v_proj or query/key/value) in {type(model).__name__}")


class VisualPromptTuning(nn.Module):
    """A frozen Hugging Face ViT with learnable prompt tokens and a trainable head (VPT, Jia et al. 2022; paper A.6).

    The backbone's parameters get ``requires_grad=False`` (in place, like ``peft``) and the backbone stays in eval
    mode (no dropout) even when ``.train()`` is called on the wrapper; the prompts (and their dropout) and the head
    follow the wrapper's mode. With guessed gradients, attach to the wrapper with ``head=wrapper.classifier``: the
    backbone gets no estimate and its weights stay bit-identical.

    Input shape: ``pixel_values`` ``[B, C, H, W]`` (``H, W`` the backbone's ``image_size`` unless
    ``interpolate_pos_encoding``), ``labels`` ``[B]`` (int64 classes) or ``[B, num_labels]`` (float, multi-label).
    Output: a ``transformers`` ``ImageClassifierOutput`` with ``logits`` ``[B, num_labels]`` and ``loss`` (scalar,
    when ``labels`` is given).

    Args:
        model: a ``ViTForImageClassification`` or ``ViTModel`` (any ``transformers`` version with the ViT layout).
        config: the :class:`VPTConfig`. (default: ``VPTConfig()``)

    Attributes:
        vit: the frozen backbone (``ViTModel``).
        prompts: ``nn.ModuleList`` of :class:`~guess_optim.PromptTokens` (one for shallow, one per block for deep,
            empty when ``num_prompt_tokens == 0``), each ``[P, D]``.
        classifier: the head, ``nn.Linear(D, num_labels)``.
        prompt_dropout: dropout applied to the prompt tokens.

    Raises:
        TypeError: ``model`` is not a Hugging Face ViT.
        ValueError: ``model`` has no usable head and ``config.num_labels`` is None.
        ImportError: transformers is not installed (with the install hint).
    """

    def __init__(self, model: nn.Module, config: VPTConfig | None = None):
        super().__init__()
        _require_transformers()
        config = VPTConfig() if config is None else config
        if not isinstance(config, VPTConfig):
            raise TypeError(f"config must be a VPTConfig, got {type(config).__name__}")
        backbone, head, layers = _backbone_parts(model)
        self.vpt_config = config
        self.config = backbone.config  # the ViTConfig, for code that reads model.config
        hidden = int(self.config.hidden_size)
        ref = next(backbone.parameters())
        if config.num_labels is not None:
            head = nn.Linear(hidden, config.num_labels)
            with torch.no_grad():  # as transformers initializes ViT heads
                nn.init.trunc_normal_(head.weight, std=float(getattr(self.config, "initializer_range", 0.02)))
                head.bias.zero_()
            head.to(device=ref.device, dtype=ref.dtype)
        elif head is None or isinstance(head, nn.Identity):
            raise ValueError(
                f"{type(model).__name__} has no classification head; pass VPTConfig(num_labels=...) to add one"
            )
        self.vit = backbone
        self.classifier = head
        self.vit.requires_grad_(False)
        self.classifier.requires_grad_(config.train_head)
        patch = self.config.patch_size
        patch = patch if isinstance(patch, int) else math.isqrt(int(patch[0]) * int(patch[1]))
        count = 0 if config.num_prompt_tokens == 0 else (len(layers) if config.deep else 1)
        self.prompts = nn.ModuleList(
            PromptTokens(config.num_prompt_tokens, hidden, init=config.init, patch_size=patch) for _ in range(count)
        ).to(device=ref.device, dtype=ref.dtype)
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        self._layers = list(layers)  # a plain list: the blocks stay registered under vit only
        self._layer_takes_mask = "attention_mask" in inspect.signature(layers[0].forward).parameters
        self.train(model.training)

    @property
    def num_prompt_tokens(self) -> int:
        return self.vpt_config.num_prompt_tokens

    @property
    def num_labels(self) -> int:
        return int(self.classifier.out_features) if isinstance(self.classifier, nn.Linear) else int(
            self.config.num_labels)

    def train(self, mode: bool = True) -> VisualPromptTuning:
        """Set the prompts and head to ``mode``; the backbone always stays in eval mode (VPT freezes it)."""
        super().train(mode)
        self.vit.eval()
        return self

    # ------------------------------------------------------------------------------------------------ forward
    def _insert(self, hidden: Tensor, index: int) -> Tensor:
        """Put prompt set ``index`` after CLS: insert (block 0) or replace the previous prompts (deep, later)."""
        prompts = self.prompt_dropout(self.prompts[index](hidden.shape[0]))
        rest = hidden[:, 1:] if index == 0 else hidden[:, 1 + self.num_prompt_tokens:]
        return torch.cat((hidden[:, :1], prompts, rest), dim=1)

    def forward_features(
        self, pixel_values: Tensor, *, interpolate_pos_encoding: bool = False, mask_prompts: bool = False
    ) -> Tensor:
        """The final LayerNorm's tokens ``[B, 1 + P + N, D]``: ``[CLS, prompts, patches]``.

        Args:
            pixel_values: ``[B, C, H, W]``.
            interpolate_pos_encoding: passed to the ViT embeddings (other resolutions). (default: ``False``)
            mask_prompts: keep the prompts out of every token's attention (an additive ``-inf``-like mask on their
                key positions), so CLS and patch tokens equal the plain ViT's. For ablations and tests; needs
                transformers 5.x blocks, which take an attention mask. (default: ``False``)

        Raises:
            ValueError: ``mask_prompts`` with blocks that take no attention mask (transformers 4.x).
        """
        weight = self.vit.embeddings.patch_embeddings.projection.weight
        pixel_values = pixel_values.to(weight.dtype)
        kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
        hidden = self.vit.embeddings(pixel_values, **kwargs)
        p = self.num_prompt_tokens if len(self.prompts) else 0
        mask = None
        if mask_prompts and p:
            if not self._layer_takes_mask:
                raise ValueError("mask_prompts needs ViT blocks that take attention_mask (transformers >= 5)")
            seq = hidden.shape[1] + p
            mask = torch.zeros(hidden.shape[0], 1, seq, seq, dtype=hidden.dtype, device=hidden.device)
            mask[..., 1:1 + p] = torch.finfo(hidden.dtype).min
        for i, layer in enumerate(self._layers):
            if p and (i == 0 or self.vpt_config.deep):
                hidden = self._insert(hidden, i if self.vpt_config.deep else 0)
            out = layer(hidden, mask) if self._layer_takes_mask else layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.vit.layernorm(hidden)

    def forward(
        self, pixel_values: Tensor, labels: Tensor | None = None, interpolate_pos_encoding: bool = False
    ) -> Any:
        """Classify ``pixel_values`` ``[B, C, H, W]``; with ``labels``, also the loss.

        The loss follows ``ViTForImageClassification``: ``config.problem_type`` if set, else regression (MSE) for
        one label, cross-entropy for integer labels ``[B]``, and ``BCEWithLogits`` for float labels
        ``[B, num_labels]``.

        Returns:
            ``ImageClassifierOutput(loss=..., logits=[B, num_labels])``.
        """
        from transformers.modeling_outputs import ImageClassifierOutput

        tokens = self.forward_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        logits = self.classifier(tokens[:, 0])
        loss = None if labels is None else self._loss(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        problem = getattr(self.config, "problem_type", None)
        if problem is None:
            if logits.shape[-1] == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
        if problem == "single_label_classification":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    # --------------------------------------------------------------------------------------- saving/loading
    def _saved_names(self) -> list[str]:
        return [n for n in self.state_dict() if n.startswith(("prompts.", "classifier."))]

    def _metadata(self) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "num_prompt_tokens": str(self.num_prompt_tokens),
            "deep": str(self.vpt_config.deep),
            "hidden_size": str(self.config.hidden_size),
        }

    def save_prompts(self, path: str | os.PathLike) -> None:
        """Save only the prompts and the head (the backbone is the pretrained one), atomically.

        ``*.safetensors`` is written with ``safetensors``, any other name with ``torch.save``. The file holds the
        tensors ``prompts.{i}.weight`` (``[P, D]``) and ``classifier.weight/bias``, and the VPT shape in its metadata.
        A crash mid-write leaves ``path`` as it was.
        """
        path = os.fspath(path)
        names = set(self._saved_names())
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.state_dict().items() if n in names}
        if path.endswith(".safetensors"):
            from safetensors.torch import save

            data = save(tensors, metadata=self._metadata())
            atomic_write(path, lambda f: f.write(data))
        else:
            atomic_write(path, lambda f: torch.save({"state_dict": tensors, "metadata": self._metadata()}, f))

    def load_prompts(self, path: str | os.PathLike) -> None:
        """Load prompts and head saved by :meth:`save_prompts` into this model (the backbone is untouched).

        Raises:
            ValueError: the file's VPT shape (number of prompts, deep/shallow, hidden size), tensor names or shapes do
                not match this model.
        """
        path = os.fspath(path)
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            tensors, metadata = blob["state_dict"], blob.get("metadata", {})
        mine = self._metadata()
        for key in ("num_prompt_tokens", "deep", "hidden_size"):
            if key in metadata and metadata[key] != mine[key]:
                raise ValueError(f"{path!r} was saved with {key}={metadata[key]}, but this model has {key}={mine[key]}")
        names = set(self._saved_names())
        expected = {n: t.shape for n, t in self.state_dict().items() if n in names}
        if set(tensors) != set(expected):
            raise ValueError(
                f"{path!r} holds tensors {sorted(tensors)}, expected {sorted(expected)} (prompts and head only)"
            )
        for n, t in tensors.items():
            if t.shape != expected[n]:
                raise ValueError(f"{path!r}: {n} has shape {tuple(t.shape)}, expected {tuple(expected[n])}")
        self.load_state_dict(tensors, strict=False)

    def trainable_parameters(self) -> dict[str, float]:
        """Counts of parameters: ``prompts``, ``head`` (when trained), ``trainable``, ``total`` and
        ``trainable_percent``."""
        prompts = sum(p.numel() for p in self.prompts.parameters())
        head = sum(p.numel() for p in self.classifier.parameters() if p.requires_grad)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"prompts": prompts, "head": head, "trainable": trainable, "total": total,
                "trainable_percent": 100.0 * trainable / max(total, 1)}

    def extra_repr(self) -> str:
        c = self.vpt_config
        return f"num_prompt_tokens={c.num_prompt_tokens}, deep={c.deep}, prompt_dropout={c.prompt_dropout}"


def get_vpt_model(model: nn.Module, config: VPTConfig | None = None, **kwargs: Any) -> VisualPromptTuning:
    """``VisualPromptTuning(model, config)``; ``kwargs`` build the :class:`VPTConfig` when ``config`` is None.

    Raises:
        ValueError: both ``config`` and ``kwargs`` given, or an invalid config value.
    """
    if config is not None and kwargs:
        raise ValueError("pass either a VPTConfig or its fields as keyword arguments, not both")
    return VisualPromptTuning(model, config if config is not None else VPTConfig(**kwargs))
