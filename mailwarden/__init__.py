"""mailwarden core: configuration, logging, metrics, Redis connections, service lifecycle and the CLI.

The capabilities (policyd, milters, quarantine, phishhook) build on this package; it imports none of them.
"""

__version__ = "0.1.0"
