"""The one exception type that means "the user can fix this".

The CLI prints a UserError as a single line (no traceback unless --debug) and exits 2.
Anything else is a bug in termtune and keeps its traceback.
"""


class UserError(Exception):
    """Bad config, bad data, a missing file, a refused combination: one line, names what and where."""


class Detached(Exception):
    """The command returned on purpose while its work goes on elsewhere (a SageMaker job after --detach or
    Ctrl-C): the CLI prints the message, which says how to follow or stop it, and exits 0."""
