"""The error catalogue: every error the gateway returns has a stable code, an HTTP status and a type."""

from __future__ import annotations

from typing import Any, Mapping

# code -> (HTTP status, OpenAI-style error type)
CATALOGUE: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "unsupported_parameter": (400, "invalid_request_error"),
    "missing_credentials": (401, "authentication_error"),
    "invalid_api_key": (401, "authentication_error"),
    "invalid_token": (401, "authentication_error"),
    "token_expired": (401, "authentication_error"),
    "invalid_admin_token": (401, "authentication_error"),
    "invalid_webhook_signature": (401, "authentication_error"),
    "insufficient_credits": (402, "billing_error"),
    "provider_not_authorized": (403, "permission_error"),
    "forbidden": (403, "permission_error"),
    "admin_required": (403, "permission_error"),
    "invalid_asset_signature": (403, "permission_error"),
    "not_found": (404, "not_found_error"),
    "model_not_found": (404, "not_found_error"),
    "admin_api_disabled": (404, "not_found_error"),
    "key_not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "key_exists": (409, "conflict_error"),
    "key_managed_by_policy": (409, "conflict_error"),
    "edit_conflict": (409, "conflict_error"),
    "asset_exists": (409, "conflict_error"),
    "asset_url_expired": (410, "not_found_error"),
    "payload_too_large": (413, "invalid_request_error"),
    "idempotency_key_reused": (422, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "rate_limit": (429, "rate_limit_error"),
    "concurrency_limit": (429, "rate_limit_error"),
    "headers_too_large": (431, "invalid_request_error"),
    "internal_error": (500, "server_error"),
    "upstream_error": (502, "upstream_error"),
    "generation_unavailable": (503, "upstream_error"),
    "store_unavailable": (503, "server_error"),
    "auth_unavailable": (503, "server_error"),
    "overloaded": (503, "server_error"),
    "upstream_timeout": (504, "upstream_error"),
}


class ApiError(Exception):
    """An error that becomes a JSON response: `{"error": {"code", "message", "type", ...details}}`."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **details: Any,
    ) -> None:
        if code not in CATALOGUE:
            raise ValueError(f"unknown error code {code!r}; add it to proxy.errors.CATALOGUE")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status, self.type = CATALOGUE[code]
        self.headers = dict(headers or {})
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "type": self.type, **self.details}}
