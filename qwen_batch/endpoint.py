"""Where a real run sends: the configured base URL, the name of the setting it came from, and the key."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .wire import DEFAULT_BASE_URL

if TYPE_CHECKING:
    from .spec import JobSpec

BASE_URL_ENV = "DASHSCOPE_HTTP_BASE_URL"


def configured_base_url(spec: JobSpec) -> str:
    """Where a real run sends: DASHSCOPE_HTTP_BASE_URL, else the spec's api.base_url."""
    return os.environ.get(BASE_URL_ENV) or spec.api.base_url or DEFAULT_BASE_URL


def base_url_key(spec: JobSpec) -> str:
    """Where a real run's base URL comes from, as a message names it."""
    return BASE_URL_ENV if os.environ.get(BASE_URL_ENV) else f"api.base_url in {spec.where}"


def resolve_api(spec: JobSpec) -> tuple[str, str | None]:
    """Base URL and key for a real run; a missing or unsendable key is exit 2 with how to fix it.

    The key is None when ``api.key_env`` is null: a server that needs none (nothing is read).
    """
    from .apikey import read_api_key
    from .spec import check_base_url

    base_url = configured_base_url(spec)
    check_base_url(base_url, spec.api.allow_insecure_http, source=base_url_key(spec))
    key_env = spec.api.key_env
    return base_url, read_api_key(key_env).value if key_env is not None else None
