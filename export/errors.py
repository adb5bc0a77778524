"""The one exception type the export commands raise for a problem the user can fix."""


class ExportError(Exception):
    """A model or repository problem, reported to the user without a traceback."""
