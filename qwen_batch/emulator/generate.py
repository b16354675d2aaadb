"""The emulator's "model": a reply that is a pure function of the request.

A draft is built from a word pool in the prompt's language (CJK in, CJK out), seeded by a
hash of the model, every message and every sampling parameter (``max_tokens``, ``stop`` and
the output-shape switches excluded). ``max_tokens`` and ``stop`` then cut that draft the
way a model's decoding loop would, so a smaller ``max_tokens`` gives a prefix of the same
reply, and a stop string ends the text just before it.

Token counts come from ``qwen_batch.tokens`` only (one encode per text), so usage
agrees with the client's estimates by construction.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import tokens

# Parameters that shape or cut the output but do not change what the "model" would say. The
# thinking switches are among them: a budget cuts the same thought shorter, and the answer is
# the same whether the thought was shown or not.
NON_SAMPLING_PARAMETERS = frozenset(
    {"max_tokens", "stop", "incremental_output", "result_format", "stream", "stream_options",
     "enable_thinking", "thinking_budget"}
)
# One-token endings that fill a thought cut short of its budget by a split character.
_TOP_UP_MARKS = ("\n", "。", ".", " ")
# Mixed into the draft seed for the reasoning, so the thought is not the answer's own text.
_REASONING_SALT = 0x7468696E6B696E67
# The service's default seed when none is sent (seed API page); omitting it equals sending it.
DEFAULT_SEED = 1234
MIN_REPLY_TOKENS = 8
POOL_SENTENCES = 2048
LENGTH_SIGMA = 0.6

_EN = (
    "the of and to in is that for it as with was on be by this are from at or an which have not "
    "one can all their more has been will there if about when would also other into some what "
    "time only new these two may any first then most over such well after where through many "
    "because each between under however while both during without before those should every "
    "data model result answer question value system process example method approach number "
    "table report analysis summary detail context reason change level point case group part "
    "order sample record field user request response service batch token price limit rate "
    "careful simple clear useful common important possible different similar large small "
    "early recent final main general specific likely stable quick steady short long "
    "explain describe compare consider include provide suggest require support improve "
    "follow check measure estimate review apply reduce handle prepare confirm choose "
    "usually often rarely clearly simply directly mostly partly typically generally"
).split()
_ZH = (
    "我们 你 他们 这个 那个 一个 可以 需要 应该 因为 所以 但是 如果 虽然 然后 已经 正在 还是 或者 以及 "
    "问题 答案 方法 结果 数据 模型 系统 过程 例子 分析 总结 细节 情况 原因 变化 水平 部分 时间 "
    "用户 请求 服务 价格 限制 速度 质量 效果 内容 信息 知识 经验 建议 步骤 目标 计划 任务 条件 "
    "重要 简单 清楚 有用 常见 可能 不同 相似 稳定 快速 准确 完整 具体 一般 主要 基本 合理 "
    "说明 描述 比较 考虑 包括 提供 支持 改进 检查 测量 估计 处理 准备 确认 选择 使用 完成 "
    "通常 经常 直接 大多 往往 首先 其次 最后 同时 另外 总之 例如 特别 非常 比较 更加 "
    "中国 城市 学校 公司 市场 社会 文化 历史 科学 技术 经济 环境 健康 教育 生活 工作 "
    "西红柿 鸡蛋 米饭 茶 水 天气 春天 夏天 秋天 冬天 山 河 花 树 朋友 家人 孩子 老师"
).split()
_JA = (
    "これは それは 私たちは あなたは 問題 答え 方法 結果 データ モデル システム 過程 例 分析 "
    "要約 詳細 状況 理由 変化 部分 時間 ユーザー 依頼 サービス 価格 制限 品質 内容 情報 "
    "知識 経験 提案 手順 目標 計画 重要な 簡単な 明確な 便利な 一般的な 可能な 異なる "
    "安定した 正確な 具体的な 説明します 比較します 考えます 含みます 提供します 確認します "
    "選びます 使います 通常 よく 直接 まず 次に 最後に 同時に また 例えば 特に とても "
    "の が を に で と も は から まで より"
).split()

_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_LATIN = re.compile(r"[A-Za-z]")
_SAMPLE_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Generation:
    """One reply: its answer, why it ended, the answer's exact token ids, and its reasoning (if it thought).

    ``output_tokens`` counts both, as the service bills them; ``reasoning_tokens`` the thought alone.
    """

    text: str
    finish_reason: str
    token_ids: tuple[int, ...]
    reasoning: str = ""
    reasoning_ids: tuple[int, ...] = ()

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids) + len(self.reasoning_ids)

    @property
    def reasoning_tokens(self) -> int:
        return len(self.reasoning_ids)


@dataclass(frozen=True, slots=True)
class Thinking:
    """How a thinking request thinks: its budget, the spread of natural thought lengths, directives.

    ``forced_tokens`` (the ``think=N`` directive) fixes the natural length; ``overflow`` (the
    ``think_overflow`` directive) makes the reply run out of tokens inside its thinking.
    """

    budget: int
    median_tokens: int = 60
    max_tokens: int = 600
    forced_tokens: int | None = None
    overflow: bool = False


@dataclass(frozen=True, slots=True)
class _Pool:
    """Ready-made sentences of one language with their estimated token counts."""

    sentences: tuple[str, ...]
    weights: tuple[int, ...]
    separator: str


@functools.cache
def _pool(language: str, model: str) -> _Pool:
    """Sentences built once from a word list (needs the vocabulary, so on first use).

    Composing a reply then costs one random draw per sentence, which keeps the server's
    hot path short; ``POOL_SENTENCES`` sentences give ample variety.
    """
    if language == "zh":
        words, sep, comma, period, (low, high) = _ZH, "", "，", "。", (4, 12)
    elif language == "ja":
        words, sep, comma, period, (low, high) = _JA, "", "、", "。", (4, 10)
    else:
        words, sep, comma, period, (low, high) = _EN, " ", ",", ".", (6, 18)
    rng = random.Random(f"qwen-batch emulator pool {language}")
    sentences: list[str] = []
    for _ in range(POOL_SENTENCES):
        n = rng.randint(low, high)
        chosen = rng.choices(words, k=n)
        if n > 8 and rng.random() < 0.5:
            cut = rng.randint(3, n - 3)
            chosen[cut] += comma
        sentence = sep.join(chosen) + period
        sentences.append(sentence[0].upper() + sentence[1:] if sep else sentence)
    weights = tuple(tokens.count_text(sep + sentence, model) for sentence in sentences)
    return _Pool(tuple(sentences), weights, sep)


def detect_language(text: str) -> str:
    """"zh", "ja" or "en": the script most of the prompt is written in."""
    sample = text[-_SAMPLE_CHARS:]
    kana = len(_KANA.findall(sample))
    han = len(_HAN.findall(sample))
    latin = len(_LATIN.findall(sample))
    if kana and kana * 4 >= han:
        return "ja"
    # A Han character carries about as much as a short Latin word, hence the weight.
    if han * 3 >= latin and han:
        return "zh"
    return "en"


def draft_seed(model: str, messages: Sequence[Mapping[str, Any]], parameters: Mapping[str, Any]) -> int:
    """The 64-bit seed of a request's draft: a hash of everything that may change what is said."""
    sampling = {k: v for k, v in parameters.items() if k not in NON_SAMPLING_PARAMETERS}
    sampling.setdefault("seed", DEFAULT_SEED)
    canonical = json.dumps(
        [model, [[m.get("role"), m.get("content"), bool(m.get("partial"))] for m in messages], sampling],
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "big")


def _target_tokens(rng: random.Random, median: int, maximum: int) -> int:
    value = int(rng.lognormvariate(math.log(median), LENGTH_SIGMA))
    return max(MIN_REPLY_TOKENS, min(maximum, value))


def _compose(rng: random.Random, pool: _Pool, target: int) -> str:
    """Sentences from the pool until the estimated token count reaches ``target``.

    The random draws do not depend on the target, so a smaller target gives a prefix
    (in whole sentences) of the text a larger one gives.
    """
    parts: list[str] = []
    estimate = 0
    sentences, weights, sep = pool.sentences, pool.weights, pool.separator
    count = len(sentences)
    draw = rng.random
    in_paragraph = 0
    while estimate < target:
        index = int(draw() * count)
        if parts:
            if in_paragraph >= 3 and draw() < 0.3:
                parts.append("\n\n")
                in_paragraph = 0
                estimate += 1
            elif sep:
                parts.append(sep)
        parts.append(sentences[index])
        estimate += weights[index]
        in_paragraph += 1
    return "".join(parts)


def cut_to_tokens(text: str, limit: int, model: str, ids: list[int] | None = None) -> tuple[str, list[int]]:
    """The longest prefix of ``text`` (on a token boundary) that encodes to at most ``limit`` tokens.

    ``ids`` may pass ``tokens.encode(text, model)`` when the caller already has it.
    """
    if ids is None:
        ids = tokens.encode(text, model)
    if len(ids) <= limit:
        return text, ids
    k = limit
    while k > 0:
        prefix = tokens.decode(ids[:k], model)
        # A cut inside a multi-byte character decodes to U+FFFD; step back to a whole character.
        if not prefix.endswith("\ufffd"):
            again = tokens.encode(prefix, model)
            if len(again) <= limit:
                return prefix, again
        k -= 1
    return "", []


def stop_strings(stop: Any, model: str) -> list[str]:
    """Stop sequences as text; token-id stops (``list[int]``, ``list[list[int]]``) are decoded."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    result: list[str] = []
    if stop and all(isinstance(item, int) for item in stop):
        result.append(tokens.decode(stop, model))
    else:
        for item in stop:
            if isinstance(item, str):
                result.append(item)
            elif isinstance(item, list):
                result.append(tokens.decode(item, model))
    return [s for s in result if s]


def draft_text(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    parameters: Mapping[str, Any],
    *,
    median_tokens: int = 80,
    max_draft_tokens: int = 600,
    forced_tokens: int | None = None,
) -> str:
    """The uncut reply: what the model would say with no ``max_tokens`` or ``stop``."""
    return _draft(model, messages, parameters, median_tokens, max_draft_tokens, forced_tokens, None)[0]


def _draft(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    parameters: Mapping[str, Any],
    median_tokens: int,
    max_draft_tokens: int,
    forced_tokens: int | None,
    cap_tokens: int | None,
) -> tuple[str, bool]:
    """The draft, composed no further than ``cap_tokens`` (estimated); and whether the cap cut it.

    A capped draft is a prefix of the uncapped one, so a caller that will cut at fewer
    tokens than the cap loses nothing and saves the work.
    """
    rng = random.Random(draft_seed(model, messages, parameters))
    language = detect_language(_last_user_text(messages))
    pool = _pool(language, model)
    if forced_tokens is not None:
        # Aim above the target so the exact cut has enough text to work with.
        target = forced_tokens + forced_tokens // 5 + 8
    else:
        target = _target_tokens(rng, median_tokens, max_draft_tokens)
    length = min(target, cap_tokens) if cap_tokens is not None else target
    return _compose(rng, pool, length), length < target


def generate(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    parameters: Mapping[str, Any],
    *,
    max_tokens: int,
    median_tokens: int = 80,
    max_draft_tokens: int = 600,
    forced_tokens: int | None = None,
    thinking: Thinking | None = None,
) -> Generation:
    """The reply to a request: the draft, cut at the first stop string, then at ``max_tokens``.

    ``forced_tokens`` (the ``length=N`` directive) makes the natural reply exactly that long
    (or the nearest token boundary below it); ``max_tokens`` still applies on top. With
    ``thinking`` a reasoning comes first; ``max_tokens`` caps only the answer (WAVE2 A.2).
    """
    answer = _answer(model, messages, parameters, max_tokens, median_tokens, max_draft_tokens, forced_tokens)
    if thinking is None:
        return answer
    reasoning, reasoning_ids = think(model, messages, parameters, thinking)
    if thinking.overflow:
        return Generation("", "length", (), reasoning, reasoning_ids)
    return Generation(answer.text, answer.finish_reason, answer.token_ids, reasoning, reasoning_ids)


def _answer(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    parameters: Mapping[str, Any],
    max_tokens: int,
    median_tokens: int,
    max_draft_tokens: int,
    forced_tokens: int | None,
) -> Generation:
    stops = stop_strings(parameters.get("stop"), model)
    # Only the first max_tokens tokens can be returned: compose a margin beyond them, no more.
    cap = max_tokens + max_tokens // 4 + 16 + max((len(s) for s in stops), default=0)
    text, capped = _draft(model, messages, parameters, median_tokens, max_draft_tokens, forced_tokens, cap)
    result = _finish(text, stops, max_tokens, forced_tokens, model)
    if capped and result.finish_reason != "length":
        # The capped prefix did not reach max_tokens (the estimate fell short, or a stop
        # string cut it): only the whole draft gives the right answer.
        text, _ = _draft(model, messages, parameters, median_tokens, max_draft_tokens, forced_tokens, None)
        result = _finish(text, stops, max_tokens, forced_tokens, model)
    return result


def think(
    model: str, messages: Sequence[Mapping[str, Any]], parameters: Mapping[str, Any], thinking: Thinking
) -> tuple[str, tuple[int, ...]]:
    """The reasoning of a thinking request and its token ids, cut at the budget exactly.

    Seeded like the draft (the budget excluded), so a smaller budget gives a prefix of the
    same thought; its natural length varies per request around ``thinking.median_tokens``.
    """
    rng = random.Random(draft_seed(model, messages, parameters) ^ _REASONING_SALT)
    if thinking.forced_tokens is not None:
        natural = thinking.forced_tokens
    else:
        natural = _target_tokens(rng, thinking.median_tokens, thinking.max_tokens)
    keep = min(natural, thinking.budget)
    pool = _pool(detect_language(_last_user_text(messages)), model)
    text = _compose(rng, pool, keep + keep // 5 + 8)
    text, ids = cut_exactly(text, keep, model)
    return text, tuple(ids)


def cut_exactly(text: str, limit: int, model: str) -> tuple[str, list[int]]:
    """A prefix of ``text`` that encodes to exactly ``limit`` tokens where one exists near the cut.

    A budget is met exactly by the service (WAVE2 A.2); a cut inside a character or a
    re-merge at the edge can miss, so a few longer prefixes are tried, then the longest one
    under the limit is topped up with one-token marks.
    """
    ids = tokens.encode(text, model)
    if len(ids) <= limit:
        return text, ids
    for k in range(limit, min(len(ids), limit + 4) + 1):
        prefix = tokens.decode(ids[:k], model)
        if not prefix.endswith("\ufffd"):
            again = tokens.encode(prefix, model)
            if len(again) == limit:
                return prefix, again
    prefix, again = cut_to_tokens(text, limit, model, ids)
    for mark in _TOP_UP_MARKS * 4:  # a split character leaves at most a few tokens to fill
        if len(again) == limit:
            break
        longer = tokens.encode(prefix + mark, model)
        if len(longer) == len(again) + 1:
            prefix, again = prefix + mark, longer
    return prefix, again


def _finish(text: str, stops: list[str], max_tokens: int, forced_tokens: int | None, model: str) -> Generation:
    if forced_tokens is not None:
        text, _ = cut_to_tokens(text, forced_tokens, model)
    finish_reason = "stop"
    if stops:
        positions = [p for p in (text.find(s) for s in stops) if p >= 0]
        if positions:
            text = text[: min(positions)]
    ids = tokens.encode(text, model)
    if len(ids) > max_tokens:
        text, ids = cut_to_tokens(text, max_tokens, model, ids)
        finish_reason = "length"
    return Generation(text, finish_reason, tuple(ids))


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            return content
    return "".join(m["content"] for m in messages if isinstance(m.get("content"), str))
