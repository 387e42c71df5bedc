"""Language-modelling pieces shared by the examples: an RNN LM that returns ``{"loss", "logits"}``,
a tiny GPT-2 built from a config, and a character-level corpus from any local text.

Examples:
    >>> import torch
    >>> corpus = CharCorpus("abcabcabcabc" * 20, seq_len=8)
    >>> model = RNNLanguageModel(corpus.vocab_size, emb=8, hidden=8, layers=2)
    >>> out = model(**corpus.batch(4, seed=0))
    >>> sorted(out), out["logits"].shape
    (['logits', 'loss'], torch.Size([4, 8, 3]))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .copy_paste import CausalTransformer, StackedRNN

__all__ = [
    "RNNLanguageModel",
    "LSTMLanguageModel",
    "CharCorpus",
    "tiny_gpt2",
    "BUILTIN_TEXT",
    "perplexity",
    "python_docs_text",
]

IGNORE = -100

# A small public-domain text (opening of Lewis Carroll's "Alice's Adventures in Wonderland"),
# for offline smoke runs; real runs pass a local text file.
BUILTIN_TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?' So she was "
    "considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), "
    "whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the "
    "daisies, when suddenly a White Rabbit with pink eyes ran close by her. There was nothing so very remarkable "
    "in that; nor did Alice think it so very much out of the way to hear the Rabbit say to itself, 'Oh dear! "
    "Oh dear! I shall be late!' (when she thought it over afterwards, it occurred to her that she ought to have "
    "wondered at this, but at the time it all seemed quite natural); but when the Rabbit actually took a watch "
    "out of its waistcoat-pocket, and looked at it, and then hurried on, Alice started to her feet, for it "
    "flashed across her mind that she had never before seen a rabbit with either a waistcoat-pocket, or a watch "
    "to take out of it, and burning with curiosity, she ran across the field after it, and fortunately was just "
    "in time to see it pop down a large rabbit-hole under the hedge. "
)


def python_docs_text() -> str:
    """A real English text that every CPython install has offline: the reference documentation
    behind ``help()`` (``pydoc_data.topics``, about 465,000 characters), topics in sorted order.

    Examples:
        >>> text = python_docs_text()
        >>> len(text) > 100_000
        True
    """
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


class RNNLanguageModel(nn.Module):
    """Next-token model: a stack of separate tanh RNN layers; returns ``{"loss", "logits"}``.

    ``labels`` follow the Hugging Face convention (same as ``input_ids``; shifted inside,
    ``-100`` ignored), so it trains under ``transformers.Trainer`` unchanged.

    Examples:
        >>> import torch
        >>> lm = RNNLanguageModel(vocab_size=10, emb=8, hidden=8, layers=2)
        >>> ids = torch.randint(0, 10, (2, 5))
        >>> lm(ids, labels=ids)["loss"].shape
        torch.Size([])
    """

    def __init__(self, vocab_size: int, emb: int = 64, hidden: int = 128, layers: int = 4) -> None:
        super().__init__()
        self.body = StackedRNN(vocab_size, emb=emb, hidden=hidden, layers=layers)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.body(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
            )
        return out


class LSTMLanguageModel(nn.Module):
    """Embedding, ``layers`` separate LSTMs (each one hookable layer and one block), linear head over
    the vocabulary; ``attention_mask`` is accepted and unused (right padding leaves real positions as
    they are).

    Examples:
        >>> import torch
        >>> LSTMLanguageModel(vocab=10, hidden=8, layers=2)(torch.randint(0, 10, (2, 5))).shape
        torch.Size([2, 5, 10])
    """

    def __init__(self, vocab: int, hidden: int = 128, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.lstms = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.emb(input_ids)
        for lstm in self.lstms:
            h = lstm(h)[0]
        return self.head(h)


def tiny_gpt2(vocab_size: int, n_layer: int = 4, n_embd: int = 64, n_head: int = 4, n_positions: int = 256) -> Any:
    """An untrained GPT-2 (``GPT2LMHeadModel``) built from a config, no download, dropout off.

    Examples:
        >>> model = tiny_gpt2(vocab_size=11, n_layer=1, n_embd=8, n_head=2)
        >>> type(model).__name__
        'GPT2LMHeadModel'
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


class CharCorpus:
    """Character-level tokens of a text, cut into fixed-length windows; 90/10 train/test split.

    Examples:
        >>> corpus = CharCorpus("hello world " * 30, seq_len=6)
        >>> corpus.vocab_size, len(corpus.train) > len(corpus.test) > 0
        (8, True)
    """

    def __init__(self, text: str, seq_len: int = 64) -> None:
        if len(text) < 4 * (seq_len + 1):
            raise ValueError(f"text too short ({len(text)} characters) for windows of {seq_len}")
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in text])
        windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
        split = max(1, len(windows) // 10)
        self.train, self.test = windows[:-split], windows[-split:]
        self.seq_len = seq_len

    def batch(self, size: int, seed: int | None = None, split: str = "train") -> dict[str, Tensor]:
        """Random windows as ``{"input_ids", "labels"}``."""
        data = self.train if split == "train" else self.test
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        rows = torch.randint(0, len(data), (size,), generator=gen)
        ids = data[rows]
        return {"input_ids": ids, "labels": ids.clone()}

    def dataset(self, split: str = "train") -> list[dict[str, Tensor]]:
        """Every window as a list of examples (what ``Trainer`` and ``DataLoader`` take)."""
        data = self.train if split == "train" else self.test
        return [{"input_ids": row, "labels": row.clone()} for row in data]


def perplexity(mean_loss: float) -> float:
    """``exp`` of a mean next-token cross-entropy (capped to stay finite).

    Examples:
        >>> round(perplexity(0.0), 3)
        1.0
    """
    return math.exp(min(mean_loss, 50.0))


def text_models(vocab: int, d: int) -> dict[str, Any]:
    """The studies' four language-model factories over a vocabulary of ``vocab``, width ``d``: a 4-layer
    tanh RNN, a 4-layer causal Transformer, a 4-block GPT-2 and a 4-layer LSTM (the matching and
    strength studies build every target and guide from these).

    Examples:
        >>> sorted(text_models(10, 8))
        ['gpt2', 'lstm', 'rnn', 'transformer']
    """
    return {
        "rnn": lambda: StackedRNN(vocab, emb=d, hidden=d, layers=4),
        "transformer": lambda: CausalTransformer(vocab, d_model=d, layers=4, heads=4),
        "gpt2": lambda: tiny_gpt2(vocab, n_layer=4, n_embd=d, n_head=4, n_positions=64),
        "lstm": lambda: LSTMLanguageModel(vocab, hidden=d, layers=4),
    }
