"""Engine bug: with num_guesses=K>1 and head=, the head's output is cut back to the user's B rows, but code after the
head inside forward still sees the K*B rows of the repeated inputs (transformers' GenericForSequenceClassification,
used by LlamaForSequenceClassification & co., pools the score's output with logits[arange(input_ids.shape[0]), last]).

Expected: the estimate (as with num_guesses=1). Got: IndexError: index 2 is out of bounds for dimension 0 with size 2.
Run: PYTHONPATH=. python tests/repro/head_cut_back_then_pooled.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from guess_optim import attach


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.score = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, ids, labels=None):
        logits = self.score(self.emb(ids))  # [B, L, 3]
        pooled = logits[torch.arange(ids.shape[0]), -1]  # batch size read from the (repeated) input
        return F.cross_entropy(pooled, labels)


model = Classifier()
ids, labels = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 2])
for k in (1, 4):
    model.zero_grad()
    with attach(model, "activation", seed=0, num_guesses=k, head=model.score):
        try:
            model(ids, labels=labels).backward()
            print(f"num_guesses={k}: ok, |grad| =", float(model.score.weight.grad.norm()))
        except Exception as e:  # noqa: BLE001
            print(f"num_guesses={k}: {type(e).__name__}: {e}")
