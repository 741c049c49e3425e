"""Engine bug: with num_guesses=K>1, a `labels=` keyword argument is not repeated (it is assumed to be used only after
the head), but peft's prompt tuning / P-tuning of a causal LM uses it before the model runs:
labels = torch.cat((full((batch_size, num_virtual_tokens), -100), labels), dim=1) with batch_size = K*B.

Expected: the estimate (as with num_guesses=1). Got: RuntimeError: Sizes of tensors must match except in dimension 1.
Expected size 8 but got size 2 for tensor number 1 in the list.
Run: PYTHONPATH=. python tests/repro/labels_used_before_the_head.py   (the second half shows the same with peft)
"""

import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import attach


class PromptedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lm_head = nn.Embedding(10, 4), nn.Linear(4, 10)

    def forward(self, input_ids, labels=None):
        prefix = torch.full((input_ids.shape[0], 1), -100)  # as peft does, from the (repeated) input's batch size
        labels = torch.cat((prefix, labels), dim=1)
        logits = self.lm_head(self.emb(torch.cat((input_ids[:, :1], input_ids), 1)))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
model = PromptedLM()
for k in (1, 4):
    with attach(model, "activation", seed=0, num_guesses=k, head=model.lm_head):
        try:
            model(ids, labels=ids).backward()
            print(f"num_guesses={k}: ok")
        except Exception as e:  # noqa: BLE001
            print(f"num_guesses={k}: {type(e).__name__}: {e}")

try:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    raise SystemExit(0) from None
torch.manual_seed(0)
llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
model = peft.get_peft_model(llama, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
ids = torch.randint(2, 32, (2, 5))
for k in (1, 4):
    with attach(model, "activation", seed=0, num_guesses=k, head=model.get_base_model().lm_head):
        try:
            model(input_ids=ids, labels=ids).loss.backward()
            print(f"peft prompt tuning, num_guesses={k}: ok")
        except Exception as e:  # noqa: BLE001
            print(f"peft prompt tuning, num_guesses={k}: {type(e).__name__}: {e}")
