"""The language models sparsify prunes: an offline code corpus, model configs and the training loop (issue #20)."""
