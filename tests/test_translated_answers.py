"""What every translated chat call does with a provider answer it cannot read: the gateway's 502, never a
traceback (a body nested past Python's stack once escaped the Bedrock translation as a RecursionError)."""

from __future__ import annotations

import pytest

from proxy.errors import ApiError
from proxy.upstream.formats import anthropic_translate, converse, gemini

TRANSLATIONS = [anthropic_translate.ChatTranslation("m", False), gemini.ChatTranslation("m", False),
                converse.ChatTranslation("m", False)]


@pytest.mark.parametrize("translation", TRANSLATIONS, ids=["anthropic", "gemini", "bedrock"])
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000, b"not json", b"[1]", b""],
                         ids=["deep-array", "deep-object", "not-json", "array", "empty"])
def test_an_unreadable_answer_is_the_gateways_502(translation: object, body: bytes) -> None:
    with pytest.raises(ApiError) as failed:
        translation.answer(body)  # type: ignore[attr-defined]
    assert failed.value.status == 502 and failed.value.code == "upstream_error"
