"""``usage.input_tokens`` in the emulator's two counting modes (reference section 9).

"chatml" (the service since Nov 2024) counts the chat template: ``tokens.count_messages``.
"raw-2024q1" (the seed's era) counts the content tokens only.
Both go through ``qwen_batch.tokens``, the one counting function shared with the client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import tokens


def input_tokens(messages: Sequence[Mapping[str, Any]], model: str, mode: str = "chatml") -> int:
    """Billed input tokens of a request whose prompt (if any) is already a trailing user message."""
    if mode == "raw-2024q1":
        return sum(tokens.count_text(m.get("content") or "", model) for m in messages)
    return tokens.count_messages(messages, model)
