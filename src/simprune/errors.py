"""The one exception type users see: a one-line message naming the problem and the fix."""


class SimpruneError(Exception):
    """Bad input or an unmet request. The CLI prints ``error: <message>`` and exits 2."""
