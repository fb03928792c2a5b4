"""Exceptions raised by sparsify. Each message says what is wrong and how to fix it."""


class SparsifyError(Exception):
    """Base class of every error sparsify raises on purpose."""


class TraceError(SparsifyError):
    """The model could not be traced into a graph."""


class PruneError(SparsifyError):
    """A pruning request was invalid or surgery failed; the model was left unchanged."""


class InexactPruneError(PruneError):
    """Pruning would change what the network computes, and the caller did not allow it."""
