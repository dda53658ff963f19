"""Integrations of selora with other libraries.

Each submodule imports its library on import, so importing this package costs
nothing and needs none of them:

- :mod:`selora.integrations.peft`: spectral adapters as the PEFT method ``SELORA``.
- :mod:`selora.integrations.trainer`: a ``transformers.Trainer`` that saves
  only the adapter of a model adapted with :func:`selora.inject`.
"""
