"""draftsmith: train, evaluate, export and serve-check draft models for speculative decoding."""

__version__ = "0.1.0"
