"""Text transformers in the test matrix: BERT, GPT-2 and Llama-style models from tiny configs built here, fully
fine-tuned and through ``peft`` (LoRA, prompt tuning, prefix tuning, P-tuning).

For each model and setting:

1. **Unbiased.** The average of many ``activation`` guesses (``directional``: slow set) matches backprop's gradient
   per trainable parameter (float64, dropout 0; ``tests/unbiased.py``), with the loss computed inside ``forward``
   (``labels=``, ``head=`` the module producing the logits) and outside it from ``logits`` (no ``head=``: the whole
   ``ModelOutput`` leaves through the boundary).
2. **Trains.** Every method lowers the loss of a small synthetic task with AdamW (slow set; the default set:
   ``activation`` and ``wt`` on GPT-2).
3. **Hugging Face Trainer.** ``Trainer(..., callbacks=[GuessedGradientCallback("wt")])`` trains a few steps (default
   set: BERT; slow set: every family and a prompt-tuned model).
4. **Structured methods run** (``wt``, ``mixing``, ``downstream``): one step, an estimate for every trainable parameter.

How the unbiasedness checks stay affordable. The error of an averaged ``activation`` estimate of one parameter grows
with the activation gradients of *every* guess point (they all enter the shared directional derivative) relative to
that parameter's own gradient; in a transformer those differ by 10-50x (query/key vs. value/output projections, the
logits). A fully fine-tuned model is therefore checked in **groups** of parameters of comparable gradient (each group
trainable on its own, the rest frozen, every parameter in exactly one group): the same check, for a few seconds instead
of tens of minutes. Weights are initialised with ``initializer_range`` 0.2 (instead of 0.02, under which the attention
is uniform and query/key get gradients 1e-5 of the others'). BERT's ``key.bias`` is not checked: a bias added to every
key shifts all scores of a query equally and softmax ignores it, so its gradient is zero up to rounding (1e-17).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from unbiased import averaged, backprop, compare

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from guess_optim import METHODS, attach, handle_of  # noqa: E402
from guess_optim.integrations.hf import GuessedGradientCallback, find_head  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers attribute

VOCAB, LENGTH, BATCH, HIDDEN, CLASSES, PAD = 32, 5, 2, 16, 3, 0
INIT = 0.2
STRUCTURALLY_ZERO = r"attention\.self\.key\.bias"  # BERT: softmax is shift invariant (module docstring)
GUESSED = [m for m in METHODS if m != "backprop"]
STRUCTURED = ["wt", "mixing", "downstream"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread_quiet():
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------------ models
def bert(classes: int = CLASSES, init: float = INIT) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * HIDDEN,
        max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, num_labels=classes, pad_token_id=PAD, initializer_range=init))


def gpt2(init: float = INIT) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_inner=2 * HIDDEN, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=PAD, initializer_range=init))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


def llama(attn: str = "sdpa", classifier: bool = False, classes: int = CLASSES, init: float = INIT) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, attention_dropout=0.0, num_labels=classes,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=1, initializer_range=init, attn_implementation=attn)
    model = (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)
    assert model.config._attn_implementation == attn
    return model


FAMILIES: dict[str, tuple[Callable[[], nn.Module], str]] = {  # name -> (builder, peft task type)
    "bert": (bert, "SEQ_CLS"),
    "gpt2": (gpt2, "CAUSAL_LM"),
    "llama-sdpa": (lambda: llama("sdpa"), "CAUSAL_LM"),
    "llama-eager": (lambda: llama("eager"), "CAUSAL_LM"),
    "llama-cls": (lambda: llama("sdpa", classifier=True), "SEQ_CLS"),
}
LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}  # llama: q_proj, v_proj


def peft_config(setting: str, family: str, task: str):
    if setting == "lora":
        return peft.LoraConfig(task_type=task, r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False,
                               target_modules=LORA_TARGETS.get(family, ["q_proj", "v_proj"]),
                               fan_in_fan_out=family == "gpt2")  # transformers' Conv1D stores W transposed
    if setting == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    if setting == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3)
    if setting == "ptuning":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=HIDDEN)
    raise ValueError(setting)


def build(family: str, setting: str = "full", dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny model of ``family`` in training mode (dropout 0), fully trainable or wrapped by ``peft``."""
    builder, task = FAMILIES[family]
    model = builder()
    if setting != "full":
        torch.manual_seed(1)  # LoRA's B (init_lora_weights=False: not zero, so A has a gradient) and the prompts
        model = peft.get_peft_model(model, peft_config(setting, family, task))
    return model.to(dtype).train()


def is_causal(family: str) -> bool:
    return FAMILIES[family][1] == "CAUSAL_LM"


def lm_head(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head


# -------------------------------------------------------------------------------------------------------- data
def text_batch(seed: int = 0, batch: int = BATCH, length: int = LENGTH, padded: bool = True) -> dict[str, torch.Tensor]:
    """Token ids; with ``padded``, the last token of the second example is padding (attention mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        ids[1:, -1], mask[1:, -1] = PAD, 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "classes": torch.randint(0, CLASSES, (batch,), generator=g)}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (what ``labels=`` computes inside ``forward``); the
    logits of prompt tokens in front (prompt tuning, P-tuning) are dropped."""
    logits = logits[:, -labels.shape[1]:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def make_run(family: str, loss: str, data: dict) -> Callable[[nn.Module], torch.Tensor]:
    """``run(model) -> loss``: ``"labels"`` computes it inside ``forward``, ``"logits"`` from the returned logits."""
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    if is_causal(family):
        if loss == "labels":
            return lambda m: m(**inputs, labels=data["labels"]).loss
        return lambda m: next_token_loss(m(**inputs).logits, data["labels"])
    if loss == "labels":
        return lambda m: m(**inputs, labels=data["classes"]).loss
    return lambda m: F.cross_entropy(m(**inputs).logits, data["classes"])


def head_for(model: nn.Module, family: str, loss: str) -> nn.Module | None:
    """``head=`` for a loss computed inside ``forward``: ``lm_head``, or the ``classifier``/``score`` (what the HF
    callback finds); none for a loss computed from the returned logits."""
    if loss != "labels":
        return None
    return lm_head(model) if is_causal(family) else find_head(model)


# ------------------------------------------------------------------------------------------------ unbiasedness
Groups = list[tuple[str, int]]
"""``(pattern, guesses)``: the parameters whose name matches ``pattern`` are checked together (the rest frozen), with
the average of ``guesses`` guesses."""

GROUPS: dict[str, Groups] = {  # full fine-tuning: parameters of comparable gradient (module docstring)
    "bert": [(r"embeddings\.(word|position|token)", 40000), (r"LayerNorm", 60000),
             (r"layer\.0\.attention\.self\.(query|key)", 40000), (r"layer\.1\.attention\.self\.(query|key)", 40000),
             (r"self\.value|attention\.output\.dense", 40000), (r"intermediate|layer\.\d+\.output\.dense", 40000),
             (r"pooler|classifier", 20000)],
    "gpt2": [(r"wte", 80000), (r"wpe", 20000), (r"ln_", 60000), (r"c_attn", 40000), (r"attn\.c_proj", 40000),
             (r"h\.0\.mlp", 60000), (r"h\.1\.mlp", 80000)],
    "llama": [(r"embed_tokens", 40000), (r"lm_head|score|model\.norm", 40000), (r"layernorm", 60000),
              (r"layers\.0\.self_attn\.(q|k)_proj", 40000), (r"layers\.1\.self_attn\.(q|k)_proj", 40000),
              (r"v_proj|o_proj", 40000), (r"layers\.0\.mlp", 60000), (r"layers\.1\.mlp", 100000)],
    "lora": [(r"query|q_proj", 40000), (r"value|v_proj|classifier|score", 40000)],
    "gpt2-lora": [(r"h\.0\.", 40000), (r"h\.1\.", 80000)],  # c_attn: q, k and v in one Conv1D
    "prompt": [(r"prompt_encoder", 40000)],  # prompt tuning, prefix tuning, P-tuning
    "prompt-classifier": [(r"prompt_encoder", 40000), (r"classifier|score", 20000)],  # and the classifier's head
}


@dataclass
class Case:
    family: str
    setting: str = "full"
    loss: str = "labels"
    groups: Groups = field(default_factory=list)
    subset: str = ""  # a name: only the groups' parameters are checked (the others stay frozen)
    directional: Groups = field(default_factory=list)  # the slow directional check: a few groups (none: not checked)
    padded: bool = True  # the second example ends with a padding token

    def __post_init__(self):
        if not self.groups:  # prompt learning: the prompt encoder, and a classifier's head (peft trains it too)
            self.groups = GROUPS["prompt" if is_causal(self.family) else "prompt-classifier"]

    @property
    def id(self) -> str:
        return f"{self.family}-{self.setting}-{self.loss}" + (f"-{self.subset}" if self.subset else "")


def _pick(groups: Groups, *patterns: str) -> Groups:
    return [g for g in groups if g[0] in patterns]


def _cases() -> list:
    out = []

    def add(case: Case, *marks):
        out.append(pytest.param(case, marks=marks, id=case.id))

    slow = pytest.mark.slow
    llama_attention = [r"layers\.0\.self_attn\.(q|k)_proj", r"layers\.1\.self_attn\.(q|k)_proj", r"v_proj|o_proj"]
    # default set: Conv1D (op-level guess points) and the position embeddings of (1, L) position ids; LoRA; prompts
    add(Case("gpt2", groups=[(r"wpe", 20000), (r"h\.1\.attn\.c_proj", 20000)], subset="conv1d-positions"))
    add(Case("bert", "lora", groups=[(g, 20000) for g, _ in GROUPS["lora"]], subset="lora",
             directional=[(r"query", 40000), (r"value", 80000), (r"classifier", 10000)]))
    add(Case("llama-sdpa", "prompt", "logits", groups=[(r"prompt_encoder", 30000)], subset="prompt",
             directional=[(r"prompt_encoder", 20000)]))
    # slow set: every parameter of every model, in groups
    add(Case("bert", groups=GROUPS["bert"], directional=[(r"layer\.1\.attention\.self\.(query|key)", 40000)]), slow)
    add(Case("gpt2", groups=GROUPS["gpt2"], directional=[(r"ln_f", 10000), (r"h\.1\.attn\.c_proj", 20000)]), slow)
    add(Case("gpt2", loss="logits", groups=_pick(GROUPS["gpt2"], r"wte"), subset="tied"), slow)
    add(Case("llama-sdpa", groups=GROUPS["llama"],
             directional=[(r"layers\.1\.self_attn\.(q|k)_proj", 40000), (r"model\.norm", 10000)]), slow)
    add(Case("llama-eager", loss="logits", groups=_pick(GROUPS["llama"], *llama_attention), subset="attention"), slow)
    add(Case("llama-cls", loss="logits", groups=_pick(GROUPS["llama"], r"embed_tokens", r"lm_head|score|model\.norm"),
             subset="embeddings-head"), slow)
    add(Case("bert", "lora", "logits", groups=GROUPS["lora"]), slow)
    add(Case("gpt2", "lora", groups=GROUPS["gpt2-lora"]), slow)
    add(Case("llama-sdpa", "lora", groups=GROUPS["lora"], directional=[(r"q_proj", 60000), (r"v_proj", 60000)]), slow)
    add(Case("llama-eager", "lora", "logits", groups=GROUPS["lora"]), slow)
    add(Case("llama-cls", "lora", "logits", groups=GROUPS["lora"]), slow)
    for family, setting, loss in [("bert", "prompt", "labels"), ("bert", "prompt", "logits"),
                                  ("bert", "ptuning", "labels"), ("llama-sdpa", "prefix", "labels"),
                                  ("llama-sdpa", "prefix", "logits"), ("llama-sdpa", "ptuning", "logits")]:
        directional = [(r"prompt_encoder", 20000)] if loss == "labels" or setting == "ptuning" else []
        add(Case(family, setting, loss, directional=directional), slow)
    for setting in ("prompt", "ptuning"):
        # peft passes inputs_embeds, so the classifier pools the last position whatever the padding: not padded (a
        # padding token there has a zero embedding, and RMSNorm amplifies it by 1/sqrt(eps): a loss that ill-conditioned
        # needs millions of guesses)
        add(Case("llama-cls", setting, "logits", padded=False), slow)
    return out


CASES = _cases()


def check_unbiased(case: Case, method: str, groups: Groups, *, subset: bool, per_step: int = 20000) -> dict:
    """Average each group's guesses (the group's parameters trainable, the others frozen) and compare with backprop,
    per parameter. Unless ``subset``, every trainable parameter (but :data:`STRUCTURALLY_ZERO`) is in exactly one
    group."""
    model = build(case.family, case.setting)
    run = make_run(case.family, case.loss, text_batch(padded=case.padded))
    head = head_for(model, case.family, case.loss)
    names = [n for n, p in model.named_parameters() if p.requires_grad and not re.search(STRUCTURALLY_ZERO, n)]
    owners = {n: [g for g, _ in groups if re.search(g, n)] for n in names}
    if subset:
        names = [n for n in names if owners[n]]
    assert names and all(len(owners[n]) == 1 for n in names), {n: owners[n] for n in names if len(owners[n]) != 1}
    assert all(any(owners[n] == [g] for n in names) for g, _ in groups), "a group without parameters"
    params = dict(model.named_parameters())
    rows: dict = {}
    for group, guesses in groups:
        for n, p in params.items():
            p.requires_grad_(n in names and owners[n] == [group])
        k = math.ceil(guesses / math.ceil(guesses / per_step))  # at most per_step per backward, in equal steps
        est = averaged(model, run, method=method, guesses=guesses, per_step=k, head=head)
        rows.update(compare(est, backprop(model, run)))
    assert set(rows) == set(names)
    return rows


@pytest.mark.parametrize("case", CASES)
def test_activation_guesses_average_to_the_gradient(case):
    check_unbiased(case, "activation", case.groups, subset=bool(case.subset))


def _directional_cases() -> list:
    out = []
    for param in CASES:
        case = param.values[0]
        if case.directional:
            out.append(pytest.param(case, marks=pytest.mark.slow, id=case.id))
    return out


@pytest.mark.parametrize("case", _directional_cases())
def test_directional_guesses_average_to_the_gradient(case):
    """Weight-space guesses, on a few groups of each model (not all: a parameter outside the Linear fast path is
    measured one guess block at a time, e.g. 20,000 guesses of Llama's four RMSNorm weights take three minutes)."""
    check_unbiased(case, "directional", case.directional, subset=True, per_step=5000)


# ------------------------------------------------------------------------------------------------ engine bugs
def _k_guesses_step(family, setting, loss):
    model = build(family, setting)
    run = make_run(family, loss, text_batch())
    with attach(model, "activation", seed=0, num_guesses=4, head=head_for(model, family, loss)):
        run(model).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


K_GUESSES = [("llama-cls", "full"), ("llama-cls", "lora"), ("llama-cls", "prompt"), ("llama-sdpa", "prompt"),
             ("llama-sdpa", "ptuning")]


@pytest.mark.parametrize(("family", "setting"), K_GUESSES, ids=[f"{f}-{s}" for f, s in K_GUESSES])
def test_labels_with_num_guesses_is_a_clear_error(family, setting):
    """With ``num_guesses=K>1`` the batch is repeated ``K`` times but ``labels=`` is not, and the head's output is cut
    back to the batch: a decoder classifier that pools after the head with the repeated batch size, and peft's prompt
    learning of a causal LM (labels concatenated before the model), fail inside transformers/peft. The error says why
    and what to do."""
    with pytest.raises((IndexError, RuntimeError)) as error:
        _k_guesses_step(family, setting, "labels")
    notes = "\n".join(getattr(error.value, "__notes__", []))
    assert "num_guesses=4" in notes and "compute the loss outside forward" in notes, notes


@pytest.mark.parametrize(("family", "setting"), K_GUESSES, ids=[f"{f}-{s}" for f, s in K_GUESSES])
def test_loss_outside_forward_with_num_guesses(family, setting):
    """The fix the error names: the loss outside ``forward`` takes ``num_guesses=K``."""
    _k_guesses_step(family, setting, "logits")


@pytest.mark.parametrize("family", ["bert", "llama-cls"])
def test_prefix_tuning_of_sequence_classifiers_is_refused_by_peft(family):
    """peft 0.21 looks for a ``past_key_values`` argument, which transformers 5 renamed (``cache``): peft itself
    refuses, without guesses."""
    model = build(family, "prefix")
    with pytest.raises(ValueError, match="past key values"):
        make_run(family, "logits", text_batch())(model)


# ------------------------------------------------------------------------------------------------------ training
def task(family: str, n: int = 64, seed: int = 0, length: int = 6) -> dict[str, torch.Tensor]:
    """A small synthetic task: for a classifier, does token 3 appear (half the sequences have it); for a causal LM,
    next-token prediction on counting sequences ``s, s+1, s+2, ...`` (mod the vocabulary, tokens 2 and up)."""
    g = torch.Generator().manual_seed(seed)
    if is_causal(family):
        start = torch.randint(0, VOCAB - 2, (n, 1), generator=g)
        ids = (start + torch.arange(length)) % (VOCAB - 2) + 2
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    ids = torch.randint(4, VOCAB, (n, length), generator=g)
    labels = torch.arange(n) % 2
    where = torch.randint(0, length, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def task_loss(model: nn.Module, data: dict) -> torch.Tensor:
    return model(**data).loss


def train(family: str, setting: str, method: str, *, steps: int, lr: float, batch: int = 16, seed: int = 0):
    """AdamW on :func:`task` with guesses of ``method`` (loss computed inside ``forward``, ``head=`` as the HF
    callback finds it); returns the loss on the whole task before and after (plain forward, no grad)."""
    model = build(family, setting, dtype=torch.float32)
    data = task(family)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    head = lm_head(model) if is_causal(family) else find_head(model)
    with torch.no_grad():
        before = float(task_loss(model, data))
    with attach(model, method, seed=seed, head=head) as handle:
        for _ in range(steps):
            i = torch.randint(0, len(data["input_ids"]), (batch,), generator=g)
            opt.zero_grad()
            task_loss(model, {k: v[i] for k, v in data.items()}).backward()
            opt.step()
        assert handle.skipped_steps == 0
    with torch.no_grad():
        after = float(task_loss(model, data))
    return before, after


@pytest.mark.parametrize("method", ["activation", "wt"])
def test_guesses_train_gpt2(method):
    """Default set: a few dozen AdamW steps of ``activation`` and ``wt`` lower GPT-2's next-token loss."""
    before, after = train("gpt2", "full", method, steps=40, lr=3e-3)
    assert after < 0.97 * before, (before, after)


TRAINING = [("bert", "full"), ("gpt2", "full"), ("llama-sdpa", "full"), ("llama-cls", "full"),
            ("llama-sdpa", "lora"), ("bert", "prompt")]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "setting"), TRAINING, ids=[f"{f}-{s}" for f, s in TRAINING])
@pytest.mark.parametrize("method", GUESSED)
def test_every_method_trains(family, setting, method):
    before, after = train(family, setting, method, steps=300, lr=3e-3)
    assert after < 0.95 * before, (before, after)


# ------------------------------------------------------------------------------------------- Hugging Face Trainer
class TaskDataset(torch.utils.data.Dataset):
    def __init__(self, family: str, n: int = 32):
        self.data = task(family, n)

    def __len__(self):
        return len(self.data["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


class Watch(TrainerCallback):
    """Whether guesses were attached when the optimizer stepped, and whether every trainable ``p.grad`` was set."""

    def __init__(self):
        self.attached, self.complete = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.attached.append(handle_of(model) is not None)
        self.complete.append(all(p.grad is not None and torch.isfinite(p.grad).all()
                                 for p in model.parameters() if p.requires_grad))


def run_trainer(family: str, setting: str, tmp_path, method: str = "wt"):
    model = build(family, setting, dtype=torch.float32)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             seed=0, dataloader_num_workers=0)
    guess, watch = GuessedGradientCallback(method), Watch()
    trainer = Trainer(model=model, args=args, train_dataset=TaskDataset(family), callbacks=[guess, watch])
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), trainer.state.log_history
    assert watch.attached == [True] * 3 and watch.complete == [True] * 3
    assert handle_of(model) is None and guess.handle is None
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items())  # every trainable parameter moved
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    return trainer


def test_hf_trainer_with_the_callback_bert(tmp_path):
    run_trainer("bert", "full", tmp_path)


HF_SLOW = [("gpt2", "full"), ("llama-sdpa", "full"), ("llama-eager", "full"), ("llama-cls", "full"),
           ("llama-sdpa", "prompt"), ("bert", "prompt"), ("llama-cls", "lora"), ("llama-sdpa", "ptuning")]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "setting"), HF_SLOW, ids=[f"{f}-{s}" for f, s in HF_SLOW])
def test_hf_trainer_with_the_callback(family, setting, tmp_path):
    run_trainer(family, setting, tmp_path)


def test_find_head_of_language_models():
    """The callback's head of a causal LM is its ``lm_head`` (tied to the input embeddings for GPT-2), also inside a
    ``peft`` model; a classifier's stays its ``classifier``/``score``."""
    model = gpt2()
    assert find_head(model) is model.lm_head
    prompted = build("llama-sdpa", "prompt", dtype=torch.float32)
    assert find_head(prompted) is prompted.get_base_model().lm_head
    cls = build("llama-cls", "lora", dtype=torch.float32)
    assert find_head(cls) is cls.get_base_model().score


# ------------------------------------------------------------------------------------------- structured methods
SETTINGS = [pytest.param(family, setting, id=f"{family}-{setting}", marks=() if fast else pytest.mark.slow)
            for family, setting, fast in [
                ("bert", "full", True), ("gpt2", "full", True), ("llama-sdpa", "full", True),
                ("llama-cls", "full", True), ("llama-sdpa", "prompt", True), ("bert", "lora", False),
                ("bert", "prompt", False), ("bert", "ptuning", False), ("gpt2", "lora", False),
                ("llama-eager", "full", False), ("llama-sdpa", "lora", False), ("llama-sdpa", "prefix", False),
                ("llama-sdpa", "ptuning", False), ("llama-cls", "lora", False), ("llama-cls", "prompt", False),
                ("llama-cls", "ptuning", False)]]


@pytest.mark.parametrize("loss", ["labels", pytest.param("logits", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("family", "setting"), SETTINGS)
def test_structured_methods_run(family, setting, loss):
    """``wt``, ``mixing`` and ``downstream`` (and ``self-sharpening``) give every trainable parameter a finite estimate
    on every model and setting, with the loss inside ``forward`` (``head=``; default set) and outside it (slow)."""
    model = build(family, setting, dtype=torch.float32)
    data = text_batch()
    run, head = make_run(family, loss, data), head_for(model, family, loss)
    for method in (*STRUCTURED, "self-sharpening"):
        for p in model.parameters():
            p.grad = None
        with attach(model, method, seed=0, head=head) as handle:
            run(model).backward()
        assert handle.skipped_steps == 0
        bad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
        assert not bad, (method, bad)
