"""The one exception type the extension raises for problems a user can fix."""


class DeltaError(ValueError):
    """A setting, file or model pairing the extension cannot use.

    The message names the problem and the way out; hosts show it in the UI and return it as an API error.
    """
