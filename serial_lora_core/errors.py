"""The project's error classes. Both are ValueErrors, so callers that expect one keep working."""


class SerialLoraError(ValueError):
    """A model, adapter or argument does not fit Serial LoRA; the message says what to do."""


class SerialLoraFileError(SerialLoraError):
    """An adapter file is unreadable, corrupt, or does not match the model it is loaded into.

    Raised before anything is changed: the model is left exactly as it was.
    """
