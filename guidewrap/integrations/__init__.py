"""Integrations with training frameworks, imported lazily (``import guidewrap`` loads none of them).

- :mod:`guidewrap.integrations.transformers`: :func:`guide_trainer` / :class:`GuidanceCallback`
  for the Hugging Face ``Trainer`` (and its subclasses: TRL's ``SFTTrainer``; peft models train as is).
- :mod:`guidewrap.integrations.recurrent_lm`: a Hugging Face recurrent causal LM (LSTM/GRU/RNN),
  registered with the Auto classes as ``model_type="recurrent_lm"`` (for ``run_clm.py``).
- :mod:`guidewrap.integrations.lightning`: :class:`GuidanceCallback` for PyTorch Lightning.
- Accelerate needs no integration module: ``accelerator.prepare(GuidedModel(...))`` works as is
  (see ``examples/accelerate_loop.py``).
"""

__all__: list[str] = []
