"""Properties of the deterministic reply generator (pure; no server)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_batch import tokens
from qwen_batch.emulator.generate import Generation, Thinking, detect_language, draft_text, generate
from qwen_batch.emulator.usage import input_tokens

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60)
seeds = st.integers(0, 2**63 - 1)
fast = settings(max_examples=60, deadline=None)


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@fast
@given(texts, seeds, st.floats(0, 1.99))
def test_the_same_request_gives_the_same_reply(text: str, seed: int, temperature: float) -> None:
    params = {"seed": seed, "temperature": temperature}
    assert generate("qwen-turbo", _messages(text), params, max_tokens=1500) == generate("qwen-turbo", _messages(text), dict(params), max_tokens=1500)


@fast
@given(texts, seeds)
def test_another_seed_gives_another_reply(text: str, seed: int) -> None:
    one = generate("qwen-turbo", _messages(text), {"seed": seed}, max_tokens=1500)
    other = generate("qwen-turbo", _messages(text), {"seed": seed ^ 1}, max_tokens=1500)
    assert one.text != other.text


@fast
@given(texts, seeds, st.integers(1, 200))
def test_max_tokens_cuts_a_prefix_with_finish_reason_length(text: str, seed: int, max_tokens: int) -> None:
    full = generate("qwen-turbo", _messages(text), {"seed": seed}, max_tokens=1500)
    cut = generate("qwen-turbo", _messages(text), {"seed": seed}, max_tokens=max_tokens)
    assert full.text.startswith(cut.text)
    assert cut.output_tokens <= max_tokens
    if full.output_tokens > max_tokens:
        assert cut.finish_reason == "length" and cut.output_tokens >= max_tokens - 1
    else:
        assert cut == full


@fast
@given(texts, seeds, st.data())
def test_a_stop_string_ends_the_text_just_before_it(text: str, seed: int, data: st.DataObject) -> None:
    full = generate("qwen-turbo", _messages(text), {"seed": seed}, max_tokens=1500).text
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start : start + data.draw(st.integers(1, 6))]
    reply = generate("qwen-turbo", _messages(text), {"seed": seed, "stop": [stop]}, max_tokens=1500)
    assert reply.text == full[: full.index(stop)]
    assert stop not in reply.text and reply.finish_reason == "stop"


@fast
@given(texts, seeds, st.integers(1, 400))
def test_output_tokens_are_the_token_count_of_the_text(text: str, seed: int, max_tokens: int) -> None:
    reply = generate("qwen-turbo", _messages(text), {"seed": seed}, max_tokens=max_tokens)
    assert reply.output_tokens == tokens.count_text(reply.text)


@fast
@given(st.lists(texts, min_size=1, max_size=4))
def test_chatml_usage_is_content_plus_five_per_message_plus_three(contents: list[str]) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    raw = input_tokens(messages, "qwen-turbo", "raw-2024q1")
    assert raw == sum(tokens.count_text(c) for c in contents)
    # Joining role and content may merge a token at the seam, so allow that one per message.
    chatml = input_tokens(messages, "qwen-turbo", "chatml")
    assert chatml == tokens.count_messages(messages)
    assert raw + 5 * len(messages) + 3 - len(messages) <= chatml <= raw + 5 * len(messages) + 3


def test_replies_have_a_realistic_length_spread() -> None:
    lengths = sorted(generate("qwen-turbo", _messages(f"Question {i}?"), {}, max_tokens=1500).output_tokens for i in range(200))
    assert lengths[0] >= 8 and lengths[-1] <= 700
    assert 50 <= lengths[100] <= 130
    assert lengths[180] > 2 * lengths[20]


def test_the_reply_follows_the_prompt_language() -> None:
    assert detect_language("如何做西红柿炒鸡蛋？") == "zh"
    assert detect_language("日本の首都はどこですか") == "ja"
    assert detect_language("How do I cook eggs?") == "en"
    chinese = draft_text("qwen-turbo", _messages("介绍一下杭州"), {})
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in chinese) > len(chinese) / 2


# ----- thinking -------------------------------------------------------------------------

budgets = st.integers(1, 150)


def _thought(text: str, seed: int, budget: int, *, max_tokens: int = 1500, **options: Any) -> Generation:
    return generate("qwen3-32b", _messages(text), {"seed": seed}, max_tokens=max_tokens,
                    thinking=Thinking(budget, **options))


@fast
@given(texts, seeds, budgets)
def test_thinking_budget_caps_the_reasoning_exactly_and_keeps_a_prefix_of_the_thought(
    text: str, seed: int, budget: int
) -> None:
    free = _thought(text, seed, 10_000)
    capped = _thought(text, seed, budget)
    assert free.reasoning.startswith(capped.reasoning)
    assert capped.reasoning_tokens == tokens.count_text(capped.reasoning, "qwen3-32b")
    if free.reasoning_tokens >= budget:
        assert capped.reasoning_tokens == budget
    else:
        assert capped.reasoning == free.reasoning


@fast
@given(texts, seeds, budgets, st.integers(1, 60))
def test_max_tokens_caps_only_the_answer_and_output_tokens_count_both(
    text: str, seed: int, budget: int, max_tokens: int
) -> None:
    whole = _thought(text, seed, budget)
    cut = _thought(text, seed, budget, max_tokens=max_tokens)
    assert cut.reasoning == whole.reasoning  # max_tokens leaves the thought alone
    assert len(cut.token_ids) <= max_tokens and whole.text.startswith(cut.text)
    assert cut.output_tokens == cut.reasoning_tokens + tokens.count_text(cut.text, "qwen3-32b")
    assert cut.finish_reason == ("length" if len(whole.token_ids) > max_tokens else "stop")


@fast
@given(texts, seeds, budgets)
def test_a_thinking_reply_is_a_pure_function_of_the_request(text: str, seed: int, budget: int) -> None:
    assert _thought(text, seed, budget) == _thought(text, seed, budget)
    plain = generate("qwen3-32b", _messages(text), {"seed": seed}, max_tokens=1500)
    assert _thought(text, seed, budget).text == plain.text and plain.reasoning_ids == ()


def test_reasoning_lengths_vary_and_often_exceed_a_small_budget() -> None:
    lengths = [_thought(f"Question {i}?", 1, 10_000).reasoning_tokens for i in range(100)]
    assert len(set(lengths)) > 30
    assert 20 < sum(n > 50 for n in lengths) < 80
    assert min(lengths) >= 8 and max(lengths) <= 600


def test_the_think_directive_fixes_the_thought_and_overflow_leaves_no_answer() -> None:
    forced = _thought("hi", 1, 10_000, forced_tokens=333)
    assert forced.reasoning_tokens == 333 and forced.finish_reason == "stop" and forced.text
    overflow = _thought("hi", 1, 40, forced_tokens=333, overflow=True)
    assert (overflow.text, overflow.token_ids, overflow.finish_reason) == ("", (), "length")
    assert overflow.reasoning_tokens == 40 and overflow.output_tokens == 40
    assert forced.reasoning.startswith(overflow.reasoning)
