"""Sparse training inside training frameworks.

- :mod:`sparsetrain.integrations.huggingface`: ``SparseTrainer``, a Hugging Face
  ``transformers.Trainer`` that trains sparse (``pip install 'sparsetrain[huggingface]'``);
- :mod:`sparsetrain.integrations.lightning`: ``SparseTrainingCallback``, a Lightning callback
  (``pip install 'sparsetrain[lightning]'``).

Nothing is imported here: each framework is imported only by its own module. See
``docs/integrations.md``.
"""
