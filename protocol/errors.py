"""What a site says when it does not answer a request: a fixed code and a short category.

A site never sends an exception's text: a data error can quote a cell (a name, a record number),
a file path or a column. The coordinator receives only the code, the category and, for a policy
refusal, the rule that was broken with the counts involved (written from the policy's values, so
it holds nothing of the data). The full message stays in the site's own log.
"""

from __future__ import annotations

from enum import IntEnum

from fedmeta.common.errors import ConfigError, DataError, DeltaError, PolicyRefusal


class SiteErrorCode(IntEnum):
    """Flower ``Error`` codes of fedmeta's site replies (outside Flower's own range)."""

    POLICY_REFUSAL = 4100
    DATA_ERROR = 4200
    APP_REFUSED = 4300
    OUT_OF_MEMORY = 4400
    BAD_REQUEST = 4500
    INTERNAL_ERROR = 4600
    STALE_STATE = 4700
    TIMEOUT = 4800
    CANCELLED = 4900


CATEGORY = {
    SiteErrorCode.POLICY_REFUSAL: "policy refusal",
    SiteErrorCode.DATA_ERROR: "data error",
    SiteErrorCode.APP_REFUSED: "app refused",
    SiteErrorCode.OUT_OF_MEMORY: "out of memory",
    SiteErrorCode.BAD_REQUEST: "bad request",
    SiteErrorCode.INTERNAL_ERROR: "internal error",
    SiteErrorCode.STALE_STATE: "stale state: the node's cached θ differs from the coordinator's",
    SiteErrorCode.TIMEOUT: "request timeout: past the site's max_request_seconds",
    SiteErrorCode.CANCELLED: "cancelled: the request's message expired or its task was abandoned",
}


def classify(exc: BaseException) -> SiteErrorCode:
    """The code an exception raised while serving a request is reported under."""
    from fedmeta.common.deadline import DeadlineExceeded, RequestCancelled

    if isinstance(exc, PolicyRefusal):
        return SiteErrorCode.POLICY_REFUSAL
    if isinstance(exc, DeadlineExceeded):
        return SiteErrorCode.TIMEOUT
    if isinstance(exc, RequestCancelled):
        return SiteErrorCode.CANCELLED
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return SiteErrorCode.OUT_OF_MEMORY
    if isinstance(exc, DataError):
        return SiteErrorCode.DATA_ERROR
    if isinstance(exc, DeltaError):  # the compressed downlink's base is out of step: resend θ
        return SiteErrorCode.STALE_STATE
    if isinstance(exc, ConfigError | KeyError | ValueError | TypeError):
        return SiteErrorCode.BAD_REQUEST
    return SiteErrorCode.INTERNAL_ERROR


def reason(code: SiteErrorCode, exc: BaseException | None = None) -> str:
    """The text sent with ``code``: the category, plus the rule for a policy refusal."""
    if code is SiteErrorCode.POLICY_REFUSAL and exc is not None:
        return f"{CATEGORY[code]}: {exc}"
    return CATEGORY[code]


def one_line(text: str, limit: int = 200) -> str:
    """Text a site chose (a refusal's rule, its layout report), made safe for the coordinator's
    logs: printable characters only (no newline, carriage return or terminal escape that could
    forge or hide a log line), runs of white space as one space, at most ``limit`` characters."""
    kept = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(kept.split())[:limit]


def refusal_reason(error: object) -> str:
    """Why a site did not answer, as the coordinator logs it: a policy refusal's rule (made one
    safe line) or the fixed category of the code, never any other text of the site's."""
    code = int(getattr(error, "code", 0))
    text = str(getattr(error, "reason", "") or "")
    if code == SiteErrorCode.POLICY_REFUSAL and text.startswith(CATEGORY[SiteErrorCode.POLICY_REFUSAL]):
        return one_line(text)
    return describe(code)


def describe(code: int) -> str:
    """The category of a code received from a site (``site error N`` for an unknown one)."""
    try:
        return CATEGORY[SiteErrorCode(code)]
    except ValueError:
        return f"site error {code}"
