"""The error type for mistakes a user can fix: a stage reports one as a single line, without a
traceback, and exits with status 2 (pipeline.stage)."""


class PipelineError(Exception):
    """Bad input or configuration: reported as one line, without a traceback, with exit status 2."""
