"""A Hugging Face recurrent causal language model (LSTM, GRU or tanh RNN), so that scripts that build
their model through the Auto classes (the official ``run_clm.py``: ``--model_type``) can train an RNN,
the target the paper guides with a Transformer.

Importing this module registers ``model_type="recurrent_lm"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``; nothing else is needed (``pip install 'guidewrap[hf]'``). Saved models hold
plain tensors and a ``config.json``; loading them back needs this import (the class lives here).

Each recurrent layer is its own module (``model.layers.0``, ``model.layers.1``, ...), so guidance can
align every layer to a guide layer. ``attention_mask`` is accepted and, for right padding (the
Trainer's collators), needs no use: a causal recurrence never reads the padding after a real token.

Examples:
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> import guidewrap.integrations.recurrent_lm  # registers model_type "recurrent_lm"
    >>> config = AutoConfig.for_model("recurrent_lm", vocab_size=50, hidden_size=16, num_hidden_layers=2)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> ids = torch.randint(0, 50, (2, 7))
    >>> out = model(input_ids=ids, labels=ids)
    >>> out.logits.shape, out.loss.shape
    (torch.Size([2, 7, 50]), torch.Size([]))
    >>> [name for name, _ in model.named_children()], type(model.model.layers[0]).__name__
    (['model', 'lm_head'], 'LSTM')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import is_transformers_available

if not is_transformers_available():  # pragma: no cover - exercised only without the extra
    raise ImportError("guidewrap.integrations.recurrent_lm needs transformers: pip install 'guidewrap[hf]'")

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

__all__ = ["RecurrentLMConfig", "RecurrentLMModel", "RecurrentLMForCausalLM"]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@strict
class RecurrentLMConfig(PreTrainedConfig):
    """Configuration of :class:`RecurrentLMForCausalLM` (``model_type="recurrent_lm"``).

    Attributes:
        vocab_size: tokens in the vocabulary (``run_clm.py`` grows the embedding to the tokenizer's).
        hidden_size: width of the embedding and of every recurrent layer.
        num_hidden_layers: recurrent layers, each its own module (one guidance layer each).
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (tanh).
        dropout: dropout after the embedding and after every recurrent layer.
        tie_word_embeddings: the output projection shares the embedding's weights.

    Every field can be set from ``run_clm.py --config_overrides "hidden_size=256,cell=gru"``.

    Examples:
        >>> config = RecurrentLMConfig(vocab_size=100, hidden_size=32, cell="gru")
        >>> config.model_type, config.num_hidden_layers
        ('recurrent_lm', 2)
        >>> RecurrentLMConfig(cell="transformer")
        Traceback (most recent call last):
        ...
        guidewrap.errors.ConfigError: RecurrentLMConfig.cell must be one of 'lstm', 'gru', 'rnn', not 'transformer'
    """

    model_type = "recurrent_lm"

    vocab_size: int = 50257
    hidden_size: int = 256
    num_hidden_layers: int = 2
    cell: str = "lstm"
    dropout: float | int = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Checked here, not in a ``validate_*`` method, so the error is ours and not wrapped.
        if self.cell not in _CELLS:
            raise ConfigError(
                f"RecurrentLMConfig.cell must be one of {', '.join(map(repr, _CELLS))}, not {self.cell!r}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RecurrentLMConfig.{name} must be at least 1, not {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"RecurrentLMConfig.dropout must be in [0, 1), not {self.dropout}")
        super().__post_init__(**kwargs)


class RecurrentLMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading shared by the recurrent models (the Auto classes' base)."""

    config_class = RecurrentLMConfig
    base_model_prefix = "model"
    _no_split_modules: list[str] = []

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RNNBase):
            for name, param in module.named_parameters():
                if "weight" in name:
                    nn.init.xavier_uniform_(param)
                else:
                    nn.init.zeros_(param)


class RecurrentLMModel(RecurrentLMPreTrainedModel):
    """Embedding and the stack of recurrent layers; returns the last layer's hidden states.

    Examples:
        >>> import torch
        >>> model = RecurrentLMModel(RecurrentLMConfig(vocab_size=20, hidden_size=8, num_hidden_layers=3))
        >>> model(torch.randint(0, 20, (2, 5))).last_hidden_state.shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, config: RecurrentLMConfig) -> None:
        super().__init__(config)
        cell = _CELLS[config.cell]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(
            cell(config.hidden_size, config.hidden_size, batch_first=True) for _ in range(config.num_hidden_layers)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.dropout(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        states = [hidden]
        for layer in self.layers:
            hidden = self.dropout(layer(hidden)[0])
            states.append(hidden)
        keep = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states) if keep else None)


class RecurrentLMForCausalLM(RecurrentLMPreTrainedModel, GenerationMixin):
    """Recurrent causal language model: :class:`RecurrentLMModel` and a linear head over the vocabulary.

    ``labels`` follow the Hugging Face convention (same as ``input_ids``, shifted inside, ``-100``
    ignored); the loss is the library's causal-LM loss, so the Trainer's ``num_items_in_batch``
    normalisation under gradient accumulation applies. ``generate`` works (it re-reads the prefix at
    each step: there is no cache).

    Examples:
        >>> import torch
        >>> config = RecurrentLMConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, cell="gru")
        >>> model = RecurrentLMForCausalLM(config)
        >>> ids = torch.randint(0, 30, (3, 6))
        >>> float(model(input_ids=ids, labels=ids).loss.detach()) > 0
        True
        >>> model.lm_head.weight is model.model.embed_tokens.weight
        True
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RecurrentLMConfig) -> None:
        super().__init__(config)
        self.model = RecurrentLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


AutoConfig.register(RecurrentLMConfig.model_type, RecurrentLMConfig, exist_ok=True)
AutoModel.register(RecurrentLMConfig, RecurrentLMModel, exist_ok=True)
AutoModelForCausalLM.register(RecurrentLMConfig, RecurrentLMForCausalLM, exist_ok=True)
