"""Errors as the API answers them: ApiError (OpenAI's error object), and the one table that says
which HTTP status and code each of the runtime's own errors becomes. Handlers raise ApiError for
what they check themselves, and api_error(exc) for what the layers below raise; an error nobody
expected is a 500 with one log line (guard.Guard), never a traceback on the wire."""

from __future__ import annotations

from starlette.responses import JSONResponse

from ..errors import ContextOverflowError, LostWorkerError, ModelLoadError, RuntimeFailure, TemplateError
from ..prompts.reasoning import ReasoningError
from ..prompts.tools import ToolError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """Anthropic's error shape (the /v1/messages endpoints)."""
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "invalid_request_error"
                                                                           if self.status < 500 else "api_error"),
                                           "message": self.message}}


_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# The runtime's errors, most specific first: (class, HTTP status, code, OpenAI error type).
STATUS_OF: tuple[tuple[type, int, str, str], ...] = (
    (ContextOverflowError, 400, "context_length_exceeded", "invalid_request_error"),
    (TemplateError, 400, "template_error", "invalid_request_error"),
    (ToolError, 400, "invalid_value", "invalid_request_error"),
    (ReasoningError, 400, "invalid_value", "invalid_request_error"),
    (ModelLoadError, 500, "model_error", "server_error"),
    (LostWorkerError, 503, "worker_lost", "server_error"),
    (RuntimeFailure, 500, "generation_failed", "server_error"),
)


def api_error(exc: Exception, param: str | None = None, code: str | None = None) -> ApiError:
    """The ApiError a runtime error becomes (STATUS_OF); param: the request field it concerns
    (the error's own `param` when it has one); code: a more precise code than the table's."""
    for cls, status, default_code, type_ in STATUS_OF:
        if isinstance(exc, cls):
            return ApiError(status, str(exc), getattr(exc, "param", None) or param, code or default_code, type_)
    return ApiError(500, "the server failed on this request", None, "internal_error", "server_error")


def error_response(exc: ApiError, close: bool = False, path: str = "") -> JSONResponse:
    """close: end the connection after this answer (a refused request whose body was not read:
    what follows it on the connection is not a request to serve, RFC 9112 §6.1, §9.6). path: the
    request's, whose API decides the error's shape (OpenAI's, or Anthropic's on /v1/messages)."""
    body = exc.anthropic_body() if anthropic_path(path) else exc.body()
    return JSONResponse(body, status_code=exc.status, headers={"Connection": "close"} if close else None)
