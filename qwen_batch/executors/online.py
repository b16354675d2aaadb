"""The online executor: a pool of workers sends one request per row, within the limits.

It builds what ``Runner`` needs from the plan (the DashScope client, the limits, the retry
policy, the budget) and, under ``--emulate``, starts the built-in emulator to send to. A
test or a benchmark passes its own ``backend`` instead: then nothing is started or opened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

from ..budget import Budget
from ..cache import EMULATOR_SERVICE
from ..endpoint import base_url_key, configured_base_url, resolve_api
from ..runner import Runner
from ..variants import connections

if TYPE_CHECKING:
    from ..backends.base import Backend, Event, OpenBackend
    from ..modes import Mode
    from ..types import Request
    from ..catalog import Price
    from ..emulator.servers import ServerName
    from ..errors import ConfigurationRefused
    from ..limits import GateFactory
    from ..plan import JobPlan
    from ..run_events import EventLog
    from ..runner import OutcomeSink, RunStatistics, WorkItem
    from ..spec import ApiSpec

INJECTED_SERVICE = "qwen-batch injected backend"


class OnlineExecutor:
    """Sends each request as it comes, ``plan.workers`` at a time, through one backend.

    ``backend``: send through this instead of the DashScope client (a test seam; its replies
    are cached apart from every real service's, under ``service``). ``gate_factory``: where each
    model's rate gate comes from (the Ray engine's shared limiter); by default this process's own
    ``Limits``.
    """

    mode = "online"

    def __init__(
        self, backend: Backend | None = None, *, service: str = INJECTED_SERVICE, gate_factory: GateFactory | None = None
    ) -> None:
        self._backend = backend
        self._injected_service = service
        self._gate_factory = gate_factory

    def __repr__(self) -> str:
        return f"OnlineExecutor(backend={self._backend!r})"

    def check(self, plan: JobPlan) -> None:
        if self._backend is None and not plan.options.emulate:
            resolve_api(plan.spec)

    def service(self, plan: JobPlan) -> str:
        if self._backend is not None:
            return self._injected_service
        return EMULATOR_SERVICE if plan.options.emulate else configured_base_url(plan.spec)

    @asynccontextmanager
    async def open(self, plan: JobPlan, sink: OutcomeSink) -> AsyncIterator[OnlineExecution]:
        async with AsyncExitStack() as stack:
            backend, base_url, local = self._backend, None, False
            if backend is None:
                base_url, api_key = await _endpoint(plan, stack)
                server = await _server(plan, base_url, api_key)
                local = _is_local(server)
                backend = await _open_backends(plan, base_url, api_key, server, stack)
            event_log = _event_log(plan)
            if event_log is not None:
                stack.callback(event_log.close)
            runner = _runner(plan, backend, sink, local=local, event_log=event_log, gate_factory=self._gate_factory)
            yield OnlineExecution(plan, runner, base_url, local=local)


@asynccontextmanager
async def service_backend(plan: JobPlan) -> AsyncIterator[Backend]:
    """The backend (one per model of a sweep) a real run of ``plan`` sends through, with no pool,
    limits or sink around it: ``verify --resend`` sends a few units again through it."""
    async with AsyncExitStack() as stack:
        base_url, api_key = await _endpoint(plan, stack)
        server = await _server(plan, base_url, api_key)
        yield await _open_backends(plan, base_url, api_key, server, stack)


def _event_log(plan: JobPlan) -> EventLog | None:
    """The run report's event log in the checkpoint folder, which ``execute`` opened (and locked)
    first; None when there is no such folder (an execution opened without a checkpoint records none)."""
    from ..run_events import EventLog, events_path

    if not plan.checkpoint_dir.is_dir():
        return None
    return EventLog(events_path(plan.checkpoint_dir))


async def _endpoint(plan: JobPlan, stack: AsyncExitStack) -> tuple[str, str | None]:
    """Base URL and key: the built-in emulator's (started here) or the configured service's.

    On the openai protocol the emulator's base is its compatible-mode one, imitating the server
    the spec points at (``emulated_server``).
    """
    if plan.options.emulate:
        from ..emulator import EmulatorConfig, open_emulator

        config = EmulatorConfig(server=emulated_server(plan.spec.api))
        emulator = await stack.enter_async_context(open_emulator(config))
        base_url = emulator.compatible_base_url if plan.spec.api.protocol == "openai" else emulator.base_url
        return base_url, emulator.api_key or "sk-emulator"
    return resolve_api(plan.spec)


def emulated_server(api: ApiSpec) -> ServerName:
    """The server ``--emulate`` imitates: the one ``api.server`` names; under ``auto``, DashScope's
    compatible mode for a DashScope base URL, else vLLM, the commonest local server, so
    that a job written for a local server runs as it would there, auto-detection included."""
    from ..servers import is_dashscope_host

    if api.protocol != "openai":
        return "dashscope"
    if api.server != "auto":
        return api.server
    return "dashscope" if is_dashscope_host(api.base_url) else "vllm"


async def _server(plan: JobPlan, base_url: str, api_key: str | None) -> str:
    """The server whose dialect the run speaks: the spec's, or decided once here (and said);
    a parameter that server does not read stops the run before anything is sent."""
    from ..servers import check_dialect, detect_server

    api = plan.spec.api
    if api.protocol != "openai":
        return "dashscope"
    if api.server != "auto":
        return api.server  # its parameters were checked, and its price dropped, by prepare
    server, why = await detect_server(base_url, api_key, timeout_s=min(plan.spec.execution.request_timeout_s, 10.0))
    _note(f"api.server auto: speaking {server}'s dialect ({why}); set api.server to choose")
    check_dialect(plan.spec.where, server, plan.renderer.parameters)
    _check_json_mode(plan, server)
    if _is_local(server):
        _note(f"a {server} server has no price: cost is null for this run")
    return server


def _check_json_mode(plan: JobPlan, server: str) -> None:
    """A json mode that the server decided here would refuse (jsonmode.refusal) stops the run unsent."""
    from ..errors import ConfigError
    from ..jsonmode import refusal

    problem = refusal(plan, server=server)
    if problem is not None:
        raise ConfigError(problem)


def _is_local(server: str) -> bool:
    from ..servers import DIALECTS

    return DIALECTS[server].local


def _note(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


async def _open_backends(
    plan: JobPlan, base_url: str, api_key: str | None, server: str, stack: AsyncExitStack
) -> Backend:
    """The job's backend; for a sweep whose models are sent differently (one streams, one
    does not), one backend per way, each request sent through its model's."""
    modes = connections(plan.variants) if plan.variants else {}
    ways = {_way(mode) for mode in modes.values()}
    if len(ways) <= 1:
        return await stack.enter_async_context(_service_backend(plan, base_url, api_key, server, plan.mode))
    opened: dict[tuple[bool, str, bool], Backend] = {}
    for mode in modes.values():
        if _way(mode) not in opened:
            opened[_way(mode)] = await stack.enter_async_context(
                _service_backend(plan, base_url, api_key, server, mode)
            )
    return _ByModel({model: opened[_way(mode)] for model, mode in modes.items()})


def _way(mode: Mode) -> tuple[bool, str, bool]:
    return mode.stream, mode.path, mode.path_known


class _ByModel:
    """Sends each request through the backend of its model (variants.connections)."""

    def __init__(self, backends: dict[str, Backend]) -> None:
        self._backends = backends

    def stream(self, request: Request) -> AsyncIterator[Event]:
        return self._backends[request.model].stream(request)


def _service_backend(plan: JobPlan, base_url: str, api_key: str | None, server: str, mode: Mode) -> OpenBackend:
    """The registered backend of the job's protocol, speaking ``server``'s dialect, sending in ``mode``."""
    from ..backends.registry import backend_factory

    return backend_factory(plan.spec.api.protocol)(
        base_url,
        api_key,
        timeout_s=plan.spec.execution.request_timeout_s,
        max_connections=plan.workers,
        stream=mode.stream,
        path=mode.path,
        path_known=mode.path_known,
        server=server,
    )


def _rate_limits(
    plan: JobPlan, local: bool, model_limits: tuple[float | None, float | None] | None = None
) -> tuple[float | None, float | None]:
    """The run's RPM and TPM (``model_limits``: one model's of a sweep): a local server has no
    DashScope quota, so only the spec's own apply."""
    if local:
        execution = plan.spec.execution
        return plan.shared((execution.requests_per_minute, execution.tokens_per_minute))
    return plan.rate_limits if model_limits is None else plan.shared(model_limits)


def _runner(
    plan: JobPlan,
    backend: Backend,
    sink: OutcomeSink,
    *,
    local: bool = False,
    event_log: EventLog | None = None,
    gate_factory: GateFactory | None = None,
) -> Runner:
    from ..jsonmode import json_mode_of
    from ..variants import model_prices
    from ..limits import local_gate
    from ..retry import RetryPolicy
    from ..run_events import RunEvents, segment_header

    gate = gate_factory if gate_factory is not None else local_gate
    rpm, tpm = _rate_limits(plan, local)
    max_cost = plan.max_cost
    limits_by_model = None
    if len({variant.model for variant in plan.variants}) > 1:
        limits_by_model = {
            variant.model: gate(variant.model, *_rate_limits(plan, local, variant.rate_limits))
            for variant in plan.variants
        }
    json_mode = json_mode_of(plan.spec, emulate=plan.options.emulate)
    limits = gate(plan.variants[0].model if plan.variants else plan.spec.model, rpm, tpm)
    events = None
    if event_log is not None:

        def rates() -> tuple[float | None, float | None]:
            pacing = limits.statistics().throttle
            return pacing.request_rate, pacing.token_rate

        events = RunEvents(segment_header(plan, "online", rpm, tpm), segment=event_log.segments, rates=rates)
    return Runner(
        backend,
        sink,
        concurrency=plan.workers,
        limits=limits,
        retry_policy=RetryPolicy(max_retries=plan.spec.execution.max_retries),
        price=None if local else plan.price,
        prices=None if local or len(plan.variants) < 2 else model_prices(plan.variants),
        limits_by_model=limits_by_model,
        rows_total=plan.own_units,
        budget=Budget(max_cost, spent=plan.previous_cost) if max_cost is not None else None,
        max_error_rate=plan.spec.execution.max_error_rate,
        json_mode=json_mode,
        replies=getattr(sink, "cache", None) if json_mode is not None else None,
        events=events,
        event_sink=event_log,
    )


class OnlineExecution:
    """A running pool: ``Runner`` plus what explains its stop to the user."""

    def __init__(self, plan: JobPlan, runner: Runner, base_url: str | None, *, local: bool = False) -> None:
        self._plan = plan
        self._runner = runner
        self._base_url = base_url
        self.rate_limits = _rate_limits(plan, local)
        self.price: Price | None = None if local else plan.price
        self.prices: dict[str, Price | None] = {v.model: None if local else v.price for v in plan.variants}

    @property
    def stop_reason(self) -> str | None:
        return self._runner.stop_reason

    @property
    def stop_detail(self) -> str | None:
        error = self._runner.stop_error
        if error is None:
            return self._runner.stop_detail
        return _explain_stop(self._plan, error, self._base_url)

    def statistics(self) -> RunStatistics:
        return self._runner.statistics()

    def request_stop(self, reason: str) -> None:
        self._runner.request_stop(reason)

    def cancel_now(self) -> None:
        self._runner.cancel_now()

    async def run(self, items: Iterator[list[WorkItem]]) -> RunStatistics:
        return await self._runner.run(items)


def _explain_stop(plan: JobPlan, error: ConfigurationRefused, base_url: str | None) -> str:
    """The one line for a run stopped by a configuration error, naming where the setting came from."""
    from .. import catalog
    from ..configuration import explain

    spec = plan.spec
    return explain(
        error,
        spec=spec,
        catalog=catalog.builtin(),
        base_url=base_url or INJECTED_SERVICE,
        base_url_key="the emulator's base URL" if plan.options.emulate else base_url_key(spec),
        parameters=plan.renderer.parameters,
    )
