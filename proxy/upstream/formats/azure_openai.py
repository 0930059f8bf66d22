"""Azure OpenAI (kind `azure_openai`): OpenAI's wire format (dialect `openai`: bodies, usage, streams and errors
are OpenAI's, the functions below re-exported from openai.py) addressed by deployment, with Azure's credentials.

- URL: `<base_url>/openai/deployments/<deployment>/<route>?api-version=<api_version>`, where the deployment is the
  model's `upstream_model` and `base_url` the resource's endpoint (`https://<resource>.openai.azure.com`). The
  Responses API is not per deployment: `<base_url>/openai/responses?api-version=...`, the deployment in `model`.
- Credential: `api-key: <key>`; or an Entra ID access token, `Authorization: Bearer <token>`, when the config
  names a scheme (`auth_scheme: Bearer`), the token read from `api_key_file` and re-read when it changes.
"""

from __future__ import annotations

from urllib.parse import quote

from .openai import (  # noqa: F401  (OpenAI's format, re-exported: this module is the adapter)
    RESPONSES_ROUTE, dialect, ends_stream, error_body, error_event, event_usage, is_injected_usage_event,
    is_output_event, keepalive, may_carry_usage, prepare, usage_in_tail, usage_of,
)

example_base_url = "https://my-resource.openai.azure.com"
API_VERSION = "2024-10-21"  # the latest GA data-plane version when written; providers.<name>.api_version overrides


def url(base_url: str, route: str, upstream_model: str, stream: bool) -> str:
    """`/v1/chat/completions` -> `<base_url>/openai/deployments/<deployment>/chat/completions` (the provider adds
    `?api-version=`, the same for every call)."""
    if route == RESPONSES_ROUTE:
        return f"{base_url}/openai/responses"
    return f"{base_url}/openai/deployments/{quote(upstream_model, safe='')}{route.removeprefix('/v1')}"


def credential_headers(credential: str, header: str | None, scheme: str | None) -> dict[str, str]:
    """`api-key: <key>`; with a scheme (Entra: `Bearer`), `Authorization: <scheme> <token>` unless `header` says."""
    if scheme:
        return {header or "Authorization": f"{scheme} {credential}"}
    return {header or "api-key": credential}
