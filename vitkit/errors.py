"""The one exception type that reaches users as a single line, never a traceback."""


class VitkitError(Exception):
    """A problem with the user's input: the message names it and says how to fix it.

    The command line prints ``vitkit: error: <message>`` and exits with status 2.
    """

    exit_code = 2
