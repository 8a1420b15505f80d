class UserError(Exception):
    """A problem the user can fix (bad path, bad checkpoint, bad option). The CLI prints it on one line, exit 2."""
