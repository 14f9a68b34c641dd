"""Exceptions the engine raises. Each names the problem in words a user can act on."""


class MedSAMError(Exception):
    """Base class of every error the engine raises on purpose."""


class ImageError(MedSAMError, ValueError):
    """The image cannot be segmented as given (wrong shape, dtype, NaN, constant...)."""


class BoxError(MedSAMError, ValueError):
    """A box prompt is unusable (NaN, zero area, wrong length)."""


class CheckpointError(MedSAMError):
    """Model weights are missing, corrupt, or belong to another model."""


class ReadError(MedSAMError, OSError):
    """An image file is missing, unreadable or in a format we do not know."""


class WriteError(MedSAMError, OSError):
    """A file cannot be written as asked (unsupported format, labels that do not fit it)."""


class BatchError(MedSAMError, ValueError):
    """The batch as a whole cannot run (bad prompts file, unknown model, no dask, unwritable output...)."""


class PromptError(BatchError):
    """One row of a prompts file is unusable (a bad value in a column, a name used twice)."""


class OptionTypeError(MedSAMError, TypeError):
    """An option has the wrong type; the message names the option and the type it needs."""


class SessionError(MedSAMError, ValueError):
    """The session cannot be opened or used as asked (bad input, index, status...)."""


class ModelError(MedSAMError, ValueError):
    """A model cannot be built as asked (unknown name, bad option, embedding of another model)."""


class UnknownModelError(ModelError, KeyError):
    """No model is registered under this name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
