"""The error every checkpoint reader raises (kept free of torch, so that processes that only resolve a model's
name or read its tokenizer do not import it)."""


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and, where there is one, the key."""
