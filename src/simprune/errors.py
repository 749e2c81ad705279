"""The one exception type users see: a one-line message naming the problem and the fix."""


class SimpruneError(Exception):
    """Bad input or an unmet request. The CLI prints ``error: <message>`` and exits 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; the message says where the last good checkpoint is. The CLI
    prints ``interrupted; <message>`` and exits 130."""
