"""How ``tpru serve`` refuses: one exception type and the OpenAI error shape every refusal and failure uses."""

from __future__ import annotations


class ClientError(Exception):
    """A request the server refuses (or a failure it reports): ``{"error": {"message", "type", "param", "code"}}``.

    Example:
        >>> ClientError(400, "n must be 1", param="n").body()["error"]["param"]
        'n'
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_body(errors: list[dict]) -> dict:
    """A readable 400 body from pydantic errors (malformed JSON included)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_body("the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")),
                          code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        return error_body("the request body must be one JSON object (sent with Content-Type: application/json)",
                          code="invalid_json")
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return error_body(f"{loc or 'body'}: {first.get('msg', 'invalid')}{more}", param=loc or None,
                      code="invalid_field")


__all__ = ["ClientError", "error_body", "validation_body"]
