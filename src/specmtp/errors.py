"""The one error type a user sees: a clear, one-line message naming the offending input."""


class SpecMTPError(ValueError):
    """Bad user input (a path, a checkpoint, a preset, a request). The CLI prints it without a traceback."""
