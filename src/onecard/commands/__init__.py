"""One module per job's CLI commands; each exposes ``register(app)``."""

from onecard.errors import NotBuiltYetError


def not_built(command: str, issue: int) -> NotBuiltYetError:
    """The one-line refusal for a job that does not exist yet (never a fake result)."""
    return NotBuiltYetError(f"'onecard {command}' is not implemented yet (tracked in issue {issue})")
