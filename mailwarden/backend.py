"""The one error type a check's backend raises when it cannot answer (down, slow, answering nonsense).

Each backend names itself (``redis``, ``ldap``, ``dns`` ...) so the fail mode configured for that
dependency applies, and the log line and metrics say which one failed.
"""


class BackendError(Exception):
    backend = "backend"

    def __init__(self, message: str, backend: str | None = None) -> None:
        super().__init__(message)
        if backend is not None:
            self.backend = backend
