"""Integrations with training frameworks, imported lazily (``import guidewrap`` loads none of them).

- :mod:`guidewrap.integrations.transformers`: :func:`guide_trainer` / :class:`GuidanceCallback`
  for the Hugging Face ``Trainer``.
- Accelerate needs no integration module: ``accelerator.prepare(GuidedModel(...))`` works as is
  (see ``examples/accelerate_loop.py``).
"""

__all__: list[str] = []
