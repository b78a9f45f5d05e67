"""The error tree every part of tierlab raises, each class carrying its HTTP status.

One handler (``services.tier.infer.error_reply``) renders any of them as the Open Inference Protocol error body
``{"error": "<message>"}`` with the class's status, so the data plane never thinks about HTTP and a
client always gets a message that names the problem; a command line that stops on one exits with the
class's ``exit_code`` (1 unless given)::

    TierlabError (500)
    ├── ConfigError (500, exit 2)      what the user gave is wrong: a spec, manifest, deployment, setting
    │   ├── ChecksumMismatch (500)     a submodel file's sha256 differs from its manifest
    │   ├── StackNotUp (exit 3)        no stack is up, or a tier of it does not answer ready (make up, make status)
    │   └── MissingTool (exit 4)       this machine lacks what the command needs (Docker, an extra, a kernel feature)
    ├── BadRequest (400)
    │   ├── MalformedBody (400)        JSON or binary framing cannot be parsed
    │   ├── TensorMismatch (400)       wrong tensor name, datatype or shape for the model
    │   ├── BadParameter (400)         a pipeline parameter is missing, of the wrong type or out of range
    │   └── ModelNotLoaded (400)       the repository has the model, this tier has not loaded it
    ├── Unauthorized (401)             a control route without the stack's control token
    ├── NotFound (404)
    │   └── ModelNotFound (404)
    ├── RequestTimeout (408)           the request body did not arrive within the tier's body deadline
    ├── PayloadTooLarge (413)
    ├── DoesNotFit (507)               loading the model would not fit the tier's memory
    ├── Unavailable (503)              not ready yet, or more work than the tier admits (Retry-After)
    └── NextTierError (502)            the next tier refused, broke or answered an error
        └── NextTierTimeout (504)      the next tier did not answer within the forward timeout
"""

from __future__ import annotations

import re


class TierlabError(Exception):
    """Base of every error tierlab raises on purpose; ``status_code`` is what HTTP shows."""

    status_code: int = 500
    exit_code: int = 1  # what a command line that stops on this error exits with

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers the response for this error must carry."""
        return {}

    def to_json(self) -> dict[str, str]:
        """The Open Inference Protocol error body."""
        return {"error": self.message}


class ConfigError(TierlabError):
    """What the user gave is wrong: a manifest, deployment, spec or settings file, or a command's options."""

    exit_code = 2


class ChecksumMismatch(ConfigError):
    """A submodel file does not hash to the sha256 its manifest records."""


class StackNotUp(ConfigError):
    """No stack is up, or one of its tiers does not answer ready: ``make up``, ``make status``."""

    exit_code = 3


class MissingTool(ConfigError):
    """This machine lacks what the command needs: the Docker engine or SDK, a Python extra, a kernel feature."""

    exit_code = 4


class BadRequest(TierlabError):
    status_code = 400


class MalformedBody(BadRequest):
    """The request body is not valid V2 JSON or its binary framing does not add up."""


class TensorMismatch(BadRequest):
    """A tensor's name, datatype or shape does not match what the model takes."""


class BadParameter(BadRequest):
    """A request parameter (placement, exit_threshold, stage, …) is invalid."""


class ModelNotLoaded(BadRequest):
    """The model is in the tier's repository but not loaded (``POST /v2/repository/models/{name}/load``)."""


class Unauthorized(TierlabError):
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="tierlab"'}


class NotFound(TierlabError):
    status_code = 404


class ModelNotFound(NotFound):
    """The tier serves no model by that name."""


class RequestTimeout(TierlabError):
    """The client sent headers but not its whole body in time (a slow or stalled sender)."""

    status_code = 408


class PayloadTooLarge(TierlabError):
    status_code = 413


class DoesNotFit(TierlabError):
    """A model load refused because the tier's memory could not hold it (507 Insufficient Storage)."""

    status_code = 507


class Unavailable(TierlabError):
    """The tier cannot take the request now; the client may retry after ``retry_after_s``."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NextTierError(TierlabError):
    """Forwarding to the next tier failed; the message names the hop (``edge -> cloud``)."""

    status_code = 502


class NextTierTimeout(NextTierError):
    status_code = 504


# ----------------------------------------------------------------- where a request failed, and why
# The one writer of a hop's name (the forwarder, the loadgen's client) and its one reader (a record's
# failed hop): messages nest as they travel back, "mobile -> edge answered 504: edge -> cloud: no answer …",
# and the innermost hop is where the pipeline broke.
_HOP = re.compile(r"\b(loadgen|mobile|edge|cloud) -> (mobile|edge|cloud)\b")


def hop_name(sender: str, receiver: str) -> str:
    return f"{sender} -> {receiver}"


def failure_of(status: int, message: str, *, entry: str) -> tuple[str, str]:
    """(the hop that failed, the cause) of a failed request's ``status`` and error ``message``; an error the
    entry tier raised itself (or failing to reach it) is the hop ``loadgen -> <entry>``."""
    hops = _HOP.findall(message)
    hop = hop_name(*hops[-1]) if hops else hop_name("loadgen", entry)
    innermost = message.rsplit(f"{hop}", 1)[-1].lower()
    answered = re.match(r"\s*answered (\d{3})", innermost)  # the receiver's own status, as it sent it
    if answered:
        status = int(answered.group(1))
    if "no answer" in innermost or "budget ran out" in innermost:
        cause = "timeout"
    elif "cannot reach" in innermost:
        cause = "unreachable"
    elif status in (0, NextTierError.status_code, NextTierTimeout.status_code):
        cause = "bad answer"
    elif status == Unavailable.status_code:
        cause = "unavailable"
    elif 400 <= status < 500:
        cause = f"refused ({status})"
    else:
        cause = f"tier error ({status})"
    return hop, cause
