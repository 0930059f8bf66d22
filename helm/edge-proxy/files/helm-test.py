# Run by `helm test` (templates/tests/test-connection.yaml) inside the gateway's image: standard library only.
import json
import os
import sys
import urllib.error
import urllib.request

base = os.environ["BASE_URL"]


def get(path, key=None):
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


status, body = get("/readyz")
print("readyz", status, body)
if status != 200:
    sys.exit("readyz is not 200")
key = os.environ.get("EDGE_PROXY_API_KEY")
status, body = get("/v1/models", key or "sk_helm_test_not_a_key")
print("GET /v1/models", status)
if key and status != 200:
    sys.exit(f"an authenticated call failed: {status} {body}")
if not key and (status != 401 or body["error"]["code"] != "invalid_api_key"):
    sys.exit(f"a made-up key was not refused with 401 invalid_api_key: {status} {body}")
print("ok")
