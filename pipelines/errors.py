"""The error type for problems the user can fix (bad data, bad parameters, no server)."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a stack trace."""
