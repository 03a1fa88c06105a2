"""The one exception family of the workbench: bad input gets a clear, one-line reason."""


class WorkbenchError(Exception):
    """Base class; the CLI prints ``str(err)`` on one line and exits non-zero."""
