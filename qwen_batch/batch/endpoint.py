"""Where the Batch API of a job lives: the compatible-mode base of the job's host, and the key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from ..endpoint import configured_base_url, resolve_api
from ..wire import API_PREFIX

if TYPE_CHECKING:
    from ..plan import JobPlan
    from ..spec import JobSpec

COMPATIBLE_PREFIX = "/compatible-mode/v1"


def batch_base_url(spec: JobSpec) -> str:
    """``batch.base_url``, else the job's base URL with its native ``/api/v1`` made the compatible
    ``/compatible-mode/v1`` (the same host: shared/NOTES.md, "Batch mode"); an openai job's
    base is already the compatible one."""
    if spec.batch.base_url is not None:
        return spec.batch.base_url.rstrip("/")
    base = configured_base_url(spec).rstrip("/")
    if spec.api.protocol == "dashscope" and base.endswith(API_PREFIX):
        return base[: -len(API_PREFIX)] + COMPATIBLE_PREFIX
    return base


@asynccontextmanager
async def batch_endpoint(plan: JobPlan) -> AsyncIterator[tuple[str, str]]:
    """``(base URL, key)`` of the Batch API: the built-in emulator's under ``--emulate`` (started
    here, stopped on exit), else the job's."""
    if plan.options.emulate:
        from ..emulator import EmulatorConfig, open_emulator

        async with open_emulator(EmulatorConfig()) as emulator:
            yield emulator.compatible_base_url, emulator.api_key or "sk-emulator"
        return
    base = batch_base_url(plan.spec)
    from ..spec import check_base_url

    check_base_url(base, plan.spec.api.allow_insecure_http, source=f"batch.base_url (or the job's base URL) in {plan.spec.where}")
    _, key = resolve_api(plan.spec)
    if key is None:
        from ..errors import ConfigError

        raise ConfigError(f"{plan.spec.where}: api.key_env: batch mode needs DashScope's API key; name the variable that holds it")
    yield base, key
