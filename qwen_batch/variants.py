"""Samples and sweeps: the variants of a job and the units they make with its rows.

A job's work is units: every input row crossed with every variant (one combination of the
``sweep:`` matrix, in sweep order: the first key varies slowest) and every sample
(``samples:``; sample ``k`` is sent with seed ``parameters.seed + k``, so it is reproducible
and the response cache never answers sample 2 with sample 1's reply). Units are numbered
densely (``types.UnitKey.dense_index``), so the output's order is input order, then variant,
then sample, and resume, cache and output join on that one number.

A variant's id is stable and readable, ``model=qwen-plus,temperature=0.7``: the swept keys
and values in sweep order, ``""`` for a job without a sweep.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import ModelInfo, Price
    from .modes import Mode
    from .render import Renderer
    from .spec import JobSpec

NO_SWEEP = ""
"""The variant id of a job without a sweep."""
_UNIT_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class Variant:
    """One combination of the sweep, resolved: its spec, catalog entry, price, limits and mode.

    ``spec`` is the job's spec with this variant's model, seed and parameters; ``renderers``
    holds one renderer per sample (sample ``k``'s seed is ``seed + k``).
    """

    index: int
    id: str
    settings: dict[str, Any]
    spec: JobSpec
    model_info: ModelInfo | None
    price: Price | None
    mode: Mode
    renderers: tuple[Renderer, ...]

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def seed(self) -> int:
        """The seed of sample 0; sample ``k`` is sent with ``seed + k``."""
        return self.spec.parameters.seed

    @property
    def parameters(self) -> dict[str, Any]:
        """The parameters sample 0's requests carry (defaults filled, as sent)."""
        return self.renderers[0].parameters

    @property
    def rate_limits(self) -> tuple[float | None, float | None]:
        """The spec's RPM and TPM, else this variant's model's documented defaults."""
        return rate_limits_for(self.spec, self.model_info)


def rate_limits_for(spec: JobSpec, model_info: ModelInfo | None) -> tuple[float | None, float | None]:
    """The spec's RPM and TPM, else the catalog's documented defaults for the model (shared/NOTES.md)."""
    execution = spec.execution
    rpm, tpm = execution.requests_per_minute, execution.tokens_per_minute
    defaults = model_info.rate_limits if model_info else None
    if defaults is not None:
        rpm = rpm if rpm is not None else defaults.requests_per_minute
        tpm = tpm if tpm is not None else defaults.tokens_per_minute
    return rpm, tpm


def sweep_settings(spec: JobSpec) -> list[dict[str, Any]]:
    """Every combination of the spec's sweep, in sweep order; ``[{}]`` without a sweep.

    Keys are ``model``, ``seed`` and ``parameters``' keys, in the order the spec gives them.
    """
    sweep = spec.sweep
    if sweep is None:
        return [{}]
    axes: list[tuple[str, Sequence[Any]]] = []
    if sweep.model is not None:
        axes.append(("model", sweep.model))
    if sweep.seed is not None:
        axes.append(("seed", sweep.seed))
    axes.extend(sweep.parameters.items())
    names = [name for name, _ in axes]
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(v for _, v in axes))]


def variant_id(settings: dict[str, Any]) -> str:
    """``model=qwen-plus,temperature=0.7``: the swept keys and values in sweep order."""
    return ",".join(f"{name}={_shown(value)}" for name, value in settings.items())


def _shown(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def variant_spec(spec: JobSpec, settings: dict[str, Any]) -> JobSpec:
    """The job's spec with one combination applied (raises pydantic's ValidationError on a bad value)."""
    from .spec import Parameters

    parameters = {key: value for key, value in settings.items() if key != "model"}
    if not parameters and "model" not in settings:
        return spec
    merged = Parameters.model_validate({**spec.parameters.model_dump(exclude_unset=True), **parameters})
    update: dict[str, Any] = {"parameters": merged}
    if "model" in settings:
        update["model"] = settings["model"]
    derived = spec.model_copy(update=update)
    derived._path = spec.path
    return derived


def sample_spec(spec: JobSpec, sample: int) -> JobSpec:
    """``spec`` as sample ``sample`` sends it: seed ``parameters.seed + sample``."""
    if sample == 0:
        return spec
    parameters = spec.parameters.model_copy(update={"seed": spec.parameters.seed + sample})
    derived = spec.model_copy(update={"parameters": parameters})
    derived._path = spec.path
    return derived


def unit_key(row_id: str, variant_id: str, sample: int) -> str:
    """One unit's stable key, the same in every run of the job and on every machine.

    What names a unit outside the dense index: batch mode's ``custom_id``, the redo record
    and (later) ``--shard``'s stable hash. A row's id, the variant's id and the sample,
    joined by the ASCII unit separator, which no id column or variant id holds in practice.
    """
    return f"{row_id}{_UNIT_SEPARATOR}{variant_id}{_UNIT_SEPARATOR}{sample}"


def split_unit_key(key: str) -> tuple[str, str, int]:
    """The ``(row_id, variant_id, sample)`` of a ``unit_key``."""
    row_id, variant, sample = key.rsplit(_UNIT_SEPARATOR, 2)
    return row_id, variant, int(sample)


def unit_slots(variants: Sequence[Variant], samples: int) -> list[tuple[str, int]]:
    """``(variant id, sample)`` of each unit of a row, in output order (variant, then sample)."""
    return [(variant.id, sample) for variant in variants for sample in range(samples)]


def build_variants(spec: JobSpec, catalog: Any, *, emulate: bool) -> tuple[Variant, ...]:
    """Every variant of the job, each checked against its own model (limits, price, mode).

    Raises SpecError for a sweep value its parameter refuses, an unknown model, or variants
    of one model whose requests would be sent differently (streamed or not, endpoint path):
    the online executor picks each request's connection by its model.
    """
    from pydantic import ValidationError

    from .configuration import check_model_known
    from .errors import SpecError
    from .modes import mode_of
    from .render import Renderer
    from .servers import dashscope_rules_bind, format_tokens
    from .spec import describe_validation_error, price_for, resolve_model

    combinations = sweep_settings(spec)
    samples = spec.samples
    per_row = len(combinations) * samples
    variants: list[Variant] = []
    for number, settings in enumerate(combinations):
        try:
            derived = variant_spec(spec, settings)
        except ValidationError as error:
            raise SpecError(
                f"{spec.where}: sweep: variant {variant_id(settings)!r}: {describe_validation_error(error)}"
            ) from None
        check_model_known(derived, catalog)
        info = resolve_model(derived, catalog)
        mode = mode_of(derived, info, service_rules=dashscope_rules_bind(derived, emulate=emulate))
        renderers = tuple(
            Renderer(
                sample_spec(derived, sample),
                info,
                protocol=spec.api.protocol,
                reasoning_cap=mode.reasoning_cap,
                thinking=mode.thinking,
                variant=number,
                sample=sample,
                slot=number * samples + sample,
                units_per_row=per_row,
                format_tokens=format_tokens(derived, emulate=emulate),
            )
            for sample in range(samples)
        )
        price = None if spec.api.names_local_server else price_for(derived, info)
        variants.append(
            Variant(number, variant_id(settings), settings, derived, info, price, mode, renderers)
        )
    _check_one_way_per_model(spec, variants)
    return tuple(variants)


def _check_one_way_per_model(spec: JobSpec, variants: Sequence[Variant]) -> None:
    from .errors import SpecError

    first: dict[str, Variant] = {}
    for variant in variants:
        seen = first.setdefault(variant.model, variant)
        if (variant.mode.stream, variant.mode.path) != (seen.mode.stream, seen.mode.path):
            raise SpecError(
                f"{spec.where}: sweep: variants {seen.id!r} and {variant.id!r} of {variant.model} would be "
                "sent differently (streamed or not, or on another endpoint); sweep that setting in two jobs"
            )


def connections(variants: Sequence[Variant]) -> dict[str, Mode]:
    """The mode each model of the job is sent in (one per model: ``build_variants`` checks it)."""
    return {variant.model: variant.mode for variant in variants}


def all_renderers(variants: Sequence[Variant]) -> tuple[Renderer, ...]:
    """The renderer of each unit of a row, in output order (variant, then sample)."""
    return tuple(renderer for variant in variants for renderer in variant.renderers)


def model_prices(variants: Sequence[Variant]) -> dict[str, Price | None]:
    """Each model's price (a sweep's models each cost their own)."""
    return {variant.model: variant.price for variant in variants}
