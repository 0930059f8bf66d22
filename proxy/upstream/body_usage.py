"""Usage of a non-streamed answer, read on the side while the relay passes it on, in bounded memory."""

from __future__ import annotations

import json
import re
import struct

from ..policy.types import Usage
from .formats import WireFormat

MAX_WHOLE_JSON = 8 * 1024 * 1024  # JSON answers up to this are parsed whole; larger ones only by their tail
TAIL_BYTES = 64 * 1024  # where a large answer's `usage` object is looked for (OpenAI puts it last)
_WAV_HEAD_BYTES = 4096  # enough for the RIFF header and the chunks before `data`
_WAV_TYPES = frozenset({"audio/wav", "audio/wave", "audio/x-wav", "audio/vnd.wave"})
_B64_IMAGE = re.compile(rb'"b64_json"\s*:')  # one per image in a large images answer
_CARRY = len(b'"b64_json":') - 1  # kept between chunks: a key split across two is seen once, never twice


class BodyUsage:
    """Feed the answer's chunks; then `usage` (the provider's, read in its wire format, or None) and `seconds` (a
    WAV's length)."""

    def __init__(self, content_type: str, fmt: WireFormat) -> None:
        self._format = fmt
        self._json = content_type == "application/json"
        self._wav = content_type in _WAV_TYPES
        self._kept = bytearray()  # the whole JSON while small, then its tail; a WAV's head
        self._whole = True
        self._b64_images = 0
        self._carry = b""
        self._total = 0

    def feed(self, chunk: bytes) -> None:
        self._total += len(chunk)
        if self._wav and len(self._kept) < _WAV_HEAD_BYTES:
            self._kept += chunk[: _WAV_HEAD_BYTES - len(self._kept)]
        if not self._json:
            return
        scanned = self._carry + chunk
        self._b64_images += len(_B64_IMAGE.findall(scanned))
        self._carry = scanned[-_CARRY:]
        self._kept += chunk
        if len(self._kept) > MAX_WHOLE_JSON:
            self._whole = False
        if not self._whole and len(self._kept) > 2 * TAIL_BYTES:
            del self._kept[:-TAIL_BYTES]  # amortised: trimmed once per TAIL_BYTES received

    def usage(self) -> Usage | None:
        if not self._json:
            return None
        if self._whole:
            try:
                answer = json.loads(self._kept)
            except (ValueError, RecursionError):  # a malformed or hostile upstream body
                return None
            return self._format.usage_of(answer) if isinstance(answer, dict) else None
        usage = self._format.usage_in_tail(bytes(self._kept))
        if not self._b64_images:
            return usage
        return Usage(usage.input_tokens, usage.output_tokens, self._b64_images) if usage else Usage(images=self._b64_images)

    def seconds(self) -> float | None:
        return wav_seconds(bytes(self._kept), self._total) if self._wav else None


def wav_seconds(head: bytes, total_bytes: int) -> float | None:
    """The length of a PCM WAV from its header and its size: the audio bytes after the `data` chunk header
    over the byte rate (streamed WAVs declare no real data size, so the bytes received count). None if the
    header is not a WAV's."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    byte_rate, offset = 0, 12
    while offset + 8 <= len(head):
        chunk_id, size = head[offset : offset + 4], struct.unpack_from("<I", head, offset + 4)[0]
        if chunk_id == b"fmt " and offset + 16 <= len(head):
            byte_rate = struct.unpack_from("<I", head, offset + 16)[0]
        if chunk_id == b"data":
            audio_bytes = max(0, total_bytes - (offset + 8))
            return audio_bytes / byte_rate if byte_rate > 0 else None
        offset += 8 + size + (size & 1)  # chunks are padded to even sizes
    return None
