"""One exception hierarchy for the whole product.

The CLI maps these to exit codes and one-line messages; the HTTP app maps them to
problem JSON. Third-party exceptions are translated into these at the binding boundary
so workers never have to know which backend raised.
"""

from __future__ import annotations


class EdgepipeError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `code` names it in JSON."""

    exit_code = 1
    code = "error"


class ConfigError(EdgepipeError):
    """The configuration is invalid; the message names the key."""

    exit_code = 2
    code = "config_error"


class ValidationError(EdgepipeError):
    """An input (event, message, argument) is invalid; `field` names the culprit."""

    exit_code = 3
    code = "validation_error"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class BindingError(EdgepipeError):
    """A binding (DB, queue, KV, archive) failed or is unreachable."""

    exit_code = 4
    code = "binding_error"


class MessageTooLarge(ValidationError):
    """A queue message body exceeds the size limit."""


class NotFound(EdgepipeError):
    exit_code = 5
    code = "not_found"


class TransientError(BindingError):
    """A failure worth retrying (throttling, connection reset, lock timeout)."""

    code = "transient_error"


class DataError(BindingError):
    """A backend refused a value (a constraint, an out-of-range number, text it cannot
    store): the input is poison, and retrying it can never succeed."""

    code = "data_error"


class RedoBatch(EdgepipeError):
    """A check left to a batch's commit found what the batch was handled with out of date
    (the archive watermark moved): the commit fails, its transaction rolls back whole, and
    the worker handles the batch again."""


class IntegrityError(EdgepipeError):
    """Stored data does not check out (checksum, row count, invariant)."""

    exit_code = 6
    code = "integrity_error"
