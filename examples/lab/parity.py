"""The paper's parity task: is the number of ones in a bit string odd? Transformers are poor at it,
RNNs solve it; guidance lets an RNN guide a Transformer.

Example:
    >>> task = ParityTask(min_len=2, max_len=8)
    >>> b = task.sample(4, seed=0)
    >>> b["input_ids"].shape[0], set(b["labels"].tolist()) <= {0, 1}
    (4, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParityTask", "ParityTransformer", "ParityRNN"]

PAD = 2  # tokens: 0, 1, PAD


@dataclass
class ParityTask:
    """Bit strings of length ``min_len``..``max_len`` (right-padded); label = number of ones mod 2."""

    min_len: int = 2
    max_len: int = 50

    def sample(
        self, batch: int, seed: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``input_ids`` (n, T), ``attention_mask`` (n, T) and ``labels`` (n,)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
        lengths = torch.randint(self.min_len, self.max_len + 1, (batch,), generator=g)
        total = int(lengths.max())
        bits = torch.randint(0, 2, (batch, total), generator=g)
        mask = torch.arange(total)[None, :] < lengths[:, None]
        ids = torch.where(mask, bits, torch.full_like(bits, PAD))
        labels = (bits * mask).sum(1) % 2
        return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


class ParityTransformer(nn.Module):
    """One Transformer encoder layer over bit embeddings, mean-pooled over real positions (the paper's target).

    Example:
        >>> b = ParityTask(max_len=6).sample(3, seed=1)
        >>> ParityTransformer(d_model=8, heads=2)(b["input_ids"], b["attention_mask"]).shape
        torch.Size([3, 2])
    """

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 1, max_len: int = 512) -> None:
        super().__init__()
        self.emb = nn.Embedding(3, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = nn.Identity()  # names the pooled vector the head reads (a layer guidance can pair)
        self.head = nn.Linear(d_model, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        t = input_ids.shape[1]
        h = self.emb(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head(self.pool((h * w).sum(1) / w.sum(1).clamp_min(1.0)))


class ParityRNN(nn.Module):
    """One tanh RNN layer reading the sequence; classifies from the last real position (the paper's guide).

    Example:
        >>> b = ParityTask(max_len=6).sample(3, seed=1)
        >>> ParityRNN(hidden=8)(b["input_ids"], b["attention_mask"]).shape
        torch.Size([3, 2])
    """

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(3, hidden)
        self.rnn = nn.RNN(hidden, hidden, batch_first=True)
        self.readout = nn.Identity()  # names the last real position's state (the paper's guide feature)
        self.head = nn.Linear(hidden, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.rnn(self.emb(input_ids))[0]
        last = attention_mask.sum(1).clamp_min(1) - 1
        return self.head(self.readout(h[torch.arange(len(h)), last]))
