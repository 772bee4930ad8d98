"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

Clients branch on the status (the ``openai`` package raises ``BadRequestError``
for 400, ``AuthenticationError`` for 401, ...) and show ``message``, so every
message says what was wrong and what to do, in one line.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from onecard.serve.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """Raised inside a route; rendered by the app's exception handler."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the key "
                         "the server was started with (--api-key)", "invalid_request_error", None, "invalid_api_key")


def not_ready(detail: str = "the engine is still loading the model; retry in a few seconds") -> APIError:
    return APIError(503, f"Server not ready: {detail}", "server_error", None, "engine_not_ready")


def unknown_model(requested: str, served: str) -> APIError:
    return bad_request(f"The model '{requested}' does not exist on this server; use '{served}' (see GET /v1/models)",
                       "model", "model_not_found")
