"""One exception type for mistakes a user can fix.

The CLI prints a `TiltlmError` as a single line (``error: <problem>; <fix>``) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class TiltlmError(Exception):
    """A problem with the user's input (config, names, files, rewards) whose message names the fix."""
