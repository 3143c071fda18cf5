"""What can stop a node, as the user should hear it.

Kept apart from the modules that load torch, so the CLI can refuse a bad address or
parameter in a second instead of after the model libraries have loaded.
"""

from __future__ import annotations


class NodeError(Exception):
    """A generation cannot go on; the message tells the user what to do."""


class NoVerifierError(NodeError):
    """No verifier for the target model could be found or would take the session."""


class VerifiersBusy(NoVerifierError):
    """Every verifier that could serve said BUSY for longer than the node would wait.

    `retry_after`: the soonest a verifier said it could take the session (seconds)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class VocabularyMismatch(NodeError):
    """The verifier's target and the local draft model do not share a vocabulary."""


class BootstrapError(NodeError):
    """A bootstrap address is malformed or no bootstrap peer can be reached."""
