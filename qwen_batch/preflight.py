"""Check every row before anything is sent: exact input tokens, over-long rows, resume consistency.

Preflight renders the whole table (streamed) once. It answers, without sending anything:
how many requests there are, their exact input tokens, which rows exceed the model's input
limit, and whether rows already in a checkpoint still render to the same request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

from . import pricing
from .catalog import Price
from .render import Renderer, RowProblem
from .resume import DoneRow, ResumeIndex
from .types import Request

if TYPE_CHECKING:
    from .cache import ServiceCache

MAX_LISTED_MISMATCHES = 5


@dataclass(frozen=True, slots=True)
class OverLongRow:
    index: int
    row_id: str
    input_tokens: int
    model: str = ""
    limit: int = 0


@dataclass(slots=True)
class VariantShare:
    """The units of one variant still to send, and their cost bounds (``estimate`` per variant)."""

    to_send: int = 0
    input_tokens: int = 0
    max_output_tokens: int = 0
    cost_min: float = 0.0
    cost_max: float = 0.0
    output_price: float = 0.0  # the price of one output token summed over these units
    reasoning_price: float = 0.0  # and of one reasoning token


@dataclass(frozen=True, slots=True)
class PreflightReport:
    """What a job will send, known before sending."""

    rows: int
    requests: int
    row_problems: int
    first_problem: RowProblem | None
    input_tokens: int
    max_output_tokens: int
    max_input_tokens: int | None
    over_long: tuple[OverLongRow, ...]
    cached: int
    to_send: int
    to_send_input_tokens: int
    to_send_max_output_tokens: int
    to_send_cost_min: float | None
    to_send_cost_max: float | None
    to_send_output_price: float | None
    mismatched_row_ids: tuple[str, ...]
    # Thinking rows (issue 14): the reasoning tokens each row to send may bill at most, and the
    # price of one reasoning token summed over those rows, each at its own tier.
    reasoning_cap: int = 0
    to_send_reasoning_price: float | None = None
    # A sweep's units to send per variant number (sweep order); empty for a job of one variant.
    to_send_by_variant: tuple[VariantShare, ...] = ()
    # Each model's own input limit (a sweep's models differ); ``max_input_tokens`` is the smallest.
    input_limits: Mapping[str, int | None] | None = None

    def input_limit_of(self, model: str) -> int | None:
        """The input limit a unit of ``model`` is checked against."""
        if self.input_limits is None:
            return self.max_input_tokens
        return self.input_limits.get(model, self.max_input_tokens)
    # JSON mode (issue 15): the re-asks a row may make (output.json_retries) and, if every row
    # made them all, their input tokens at most (``to_send_cost_max`` includes their cost).
    reasks_per_row: int = 0
    to_send_reask_input_tokens_max: int = 0

    @property
    def to_send_max_reasoning_tokens(self) -> int:
        return self.reasoning_cap * self.to_send


# Only a resume that keeps its finished rows checks them as DoneRows: skipping them yields none.
@overload
def rendered(
    renderer: Renderer | Sequence[Renderer],
    batches: Iterable[Sequence[Mapping[str, Any]]],
    resume: ResumeIndex | None = None,
    *,
    skip_finished: Literal[True],
    held: bytearray | None = None,
) -> Iterator[Sequence[Request | RowProblem]]: ...
@overload
def rendered(
    renderer: Renderer | Sequence[Renderer],
    batches: Iterable[Sequence[Mapping[str, Any]]],
    resume: ResumeIndex | None = None,
    *,
    skip_finished: bool = False,
    held: bytearray | None = None,
) -> Iterator[Sequence[Request | RowProblem | DoneRow]]: ...
def rendered(
    renderer: Renderer | Sequence[Renderer],
    batches: Iterable[Sequence[Mapping[str, Any]]],
    resume: ResumeIndex | None = None,
    *,
    skip_finished: bool = False,
    held: bytearray | None = None,
) -> Iterator[Sequence[Request | RowProblem | DoneRow]]:
    """Render each batch of rows into its units: one per renderer (variant x sample), in order.

    A unit's index is dense: ``position * len(renderers) + slot`` (the row's position for a
    single renderer). With ``resume``, token counts it already knows are reused, and units an
    earlier run finished are either left out (``skip_finished``, without rendering them) or,
    when their token count is known, checked by fingerprint only (``DoneRow``). With ``held``
    (``run --shard``, with ``resume``), only the units it marks are rendered at all.
    """
    units = (renderer,) if isinstance(renderer, Renderer) else tuple(renderer)
    per_row = len(units)
    position = 0
    if held is not None and resume is None:
        raise ValueError("held units are rendered with a resume index")
    if resume is None:
        if per_row == 1:
            render = units[0].render
            for batch in batches:
                out: list[Request | RowProblem | DoneRow] = []
                for row in batch:
                    out.append(render(position, row))
                    position += 1
                yield out
            return
        for batch in batches:
            out = []
            for row in batch:
                out.extend([unit.render(position, row) for unit in units])
                position += 1
            yield out
        return
    finished, known = resume.finished, resume.input_tokens
    for batch in batches:
        out = []
        for row in batch:
            index = position * per_row
            for unit in units:
                if held is not None and not held[index]:
                    index += 1
                    continue
                if finished[index]:
                    if skip_finished:
                        index += 1
                        continue
                    tokens = known[index]
                    if tokens:
                        checked = unit.fingerprint(position, row)
                        if isinstance(checked, RowProblem):
                            out.append(checked)
                        else:
                            out.append(DoneRow(index, checked[0], checked[1], tokens, unit.max_tokens))
                        index += 1
                        continue
                out.append(unit.render(position, row, known[index] or None))
                index += 1
            position += 1
        yield out


def run_preflight(
    batches: Iterable[Sequence[Request | RowProblem | DoneRow]],
    *,
    max_input_tokens: int | None,
    resume: ResumeIndex | None = None,
    over_long_is_error: bool = True,
    price: Price | None = None,
    cache: ServiceCache | None = None,
    max_tokens: int = 0,
    reasoning_cap: int = 0,
    prices: Mapping[str, Price | None] | None = None,
    input_limits: Mapping[str, int | None] | None = None,
    reasks: int = 0,
    reask_frame: int = 0,
) -> PreflightReport:
    """Count and check every rendered row; see PreflightReport.

    With a price, also the cost bounds of the rows to send: ``to_send_cost_min`` (empty
    replies), ``to_send_cost_max`` (every reply ``max_tokens`` long) and
    ``to_send_output_price`` (the price of one output token summed over those rows, each at
    its own tier), from which an expected cost follows for any expected reply length.
    A thinking job's rows may also bill ``reasoning_cap`` reasoning tokens each: the maximum
    counts them at the thinking price (``to_send_reasoning_price`` sums it like the output's).
    With a cache, rows it would answer count as ``cached``, not as rows to send. ``prices``
    maps each model of a sweep to its own price (``price`` is the first variant's), and
    ``input_limits`` to its own input limit (``max_input_tokens`` is then the smallest).
    When ``resume.verified``, the finished rows are not in ``batches`` at all: they are
    counted from the resume index (each with ``max_tokens``), and not listed as over-long.
    A JSON-mode row may be asked again ``reasks`` times, each re-ask resending the
    conversation grown by its answer (at most ``max_tokens``) and ``reask_frame`` tokens
    (``structured.reask_frame_tokens``): the maximum counts every row making them all.
    """
    rows = requests = problems = tokens = max_out = cached = 0
    to_send = to_send_tokens = to_send_max_out = reask_tokens = 0
    cost_min = cost_max = output_price = reasoning_price = 0.0
    over_long: list[OverLongRow] = []
    mismatched: list[str] = []
    first_problem: RowProblem | None = None
    shares: dict[int, VariantShare] = {}
    known = resume.input_tokens if resume is not None else None
    for batch in batches:
        candidates: list[Request | DoneRow] = []
        for item in batch:
            rows += 1
            if isinstance(item, RowProblem):
                problems += 1
                first_problem = first_problem or item
                continue
            if known is not None and type(item) is Request and item.input_tokens < 1 << 32:
                known[item.index] = item.input_tokens
            requests += 1
            tokens += item.input_tokens
            max_out += item.max_tokens
            model = item.model if type(item) is Request else ""  # a finished row: checked at the smallest
            limit = max_input_tokens if input_limits is None else input_limits.get(model, max_input_tokens)
            too_long = limit is not None and item.input_tokens > limit
            if too_long:
                over_long.append(OverLongRow(item.index, item.row_id, item.input_tokens, model, limit or 0))
            if resume is not None and resume.is_finished(item.index):
                if not resume.matches(item) and len(mismatched) < MAX_LISTED_MISMATCHES:
                    mismatched.append(item.row_id)
                continue
            if not (too_long and over_long_is_error):
                candidates.append(item)
        if cache is not None and candidates:
            hits = cache.get_many([item.fingerprint for item in candidates])
            cached += sum(1 for item in candidates if item.fingerprint in hits)
            candidates = [item for item in candidates if item.fingerprint not in hits]
        for item in candidates:
            to_send += 1
            to_send_tokens += item.input_tokens
            to_send_max_out += item.max_tokens
            item_price = prices.get(item.model, price) if prices is not None and type(item) is Request else price
            share = None
            if prices is not None:
                number = item.unit.variant if type(item) is Request else 0
                share = shares.get(number) or shares.setdefault(number, VariantShare())
                share.to_send += 1
                share.input_tokens += item.input_tokens
                share.max_output_tokens += item.max_tokens
            if item_price is not None:
                tier = item_price.tier_for(item.input_tokens)
                input_cost = item.input_tokens * tier.input_per_million / 1_000_000
                cost_min += input_cost
                reasoning = tier.reasoning_per_million / 1_000_000
                unit_max = input_cost + item.max_tokens * tier.output_per_million / 1_000_000 + reasoning_cap * reasoning
                cost_max += unit_max
                output_price += tier.output_per_million / 1_000_000
                reasoning_price += reasoning
                if share is not None:
                    share.cost_min += input_cost
                    share.cost_max += unit_max
                    share.output_price += tier.output_per_million / 1_000_000
                    share.reasoning_price += reasoning
            for k in range(1, reasks + 1):
                asked = item.input_tokens + k * (item.max_tokens + reask_frame)
                reask_tokens += asked
                if item_price is not None:
                    reask_max = pricing.worst_case_cost(item_price, asked, item.max_tokens, reasoning_cap) or 0.0
                    cost_max += reask_max
                    if share is not None:
                        share.cost_max += reask_max
    if resume is not None and resume.verified:
        finished = resume.count()
        rows += finished
        requests += finished
        tokens += resume.finished_input_tokens
        max_out += finished * max_tokens
    return PreflightReport(
        rows=rows,
        requests=requests,
        row_problems=problems,
        first_problem=first_problem,
        input_tokens=tokens,
        max_output_tokens=max_out,
        max_input_tokens=max_input_tokens,
        over_long=tuple(over_long),
        cached=cached,
        to_send=to_send,
        to_send_input_tokens=to_send_tokens,
        to_send_max_output_tokens=to_send_max_out,
        to_send_cost_min=cost_min if price is not None else None,
        to_send_cost_max=cost_max if price is not None else None,
        to_send_output_price=output_price if price is not None else None,
        mismatched_row_ids=tuple(mismatched),
        reasoning_cap=reasoning_cap,
        to_send_reasoning_price=reasoning_price if price is not None else None,
        input_limits=input_limits,
        to_send_by_variant=tuple(shares.get(number, VariantShare()) for number in range(max(shares, default=-1) + 1)),
        reasks_per_row=reasks,
        to_send_reask_input_tokens_max=reask_tokens,
    )
