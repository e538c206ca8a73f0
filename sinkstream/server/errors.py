"""Errors the server answers with, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

# status -> OpenAI error type
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error", 507: "server_error"}


class ApiError(Exception):
    """An error with an HTTP status; raised anywhere in the server, rendered by the app."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one OpenAI error: the deepest field that failed, its path as `param`.

    pydantic puts union members into the path ("content.function-after[_utf8(), str]"); they are dropped,
    and the messages of the members that failed at the same place are joined ("a string or a list").
    """
    def path(err: dict) -> list[str]:
        return [str(p) for p in err.get("loc", ()) if p not in ("body", "header", "path", "query")
                and not (isinstance(p, str) and ("[" in p or "(" in p))]

    if not errors:
        return ApiError(400, "invalid request", code="invalid_value")
    if errors[0].get("type") == "json_invalid":
        return ApiError(400, "the body is not valid JSON", code="invalid_json")
    deepest = path(max(errors, key=lambda err: len(path(err))))
    msgs = list(dict.fromkeys(err.get("msg", "invalid value") for err in errors if path(err) == deepest))
    where = ".".join(deepest)
    return ApiError(400, f"{where + ': ' if where else ''}{' or '.join(msgs)}", param=where or None,
                    code="invalid_value")
