"""The char-RNN application: the character-level language models of the classic
lesson, their data, training and sampling, and the ``fused-rnn`` command.

It is a user of the library, not part of it: it imports only ``fused_rnn``'s public
API (tests/test_imports.py checks), so it shows what training code written against
the package looks like.

- :mod:`fused_rnn.app.models`: the models (3-char, n-char, sequence, one-hot, stateful)
- :mod:`fused_rnn.app.data`: vocabulary, text loading, the default corpus, batching
- :mod:`fused_rnn.app.train`, :mod:`fused_rnn.app.sample`: ``fused-rnn train`` / ``sample``
- :mod:`fused_rnn.app.checkpoint`: atomic checkpoints that load with ``weights_only=True``
- :mod:`fused_rnn.app.cli`: the command line
"""
