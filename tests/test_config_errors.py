"""Configuration errors in units: the status/code -> class table, the runner's stop, the messages.

The end-to-end side (the CLI against the emulator) is tests/test_config_errors_e2e.py.
"""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_batch.backends import DashScopeBackend, collect
from qwen_batch.backends.base import Completed, Event
from qwen_batch.backends.errors import configuration_error
from qwen_batch.catalog import builtin
from qwen_batch.configuration import check_model_known, check_native_path, explain
from qwen_batch.errors import (
    AuthError,
    BackendError,
    BadRequest,
    ConfigError,
    ConfigurationRefused,
    EndpointNotFound,
    ModelNotOnEndpoint,
    ParameterRefused,
    RateLimited,
    SpecError,
    UnknownModel,
)
from qwen_batch.limits import Limits
from qwen_batch.retry import RetryPolicy
from qwen_batch.runner import STOP_CONFIGURATION, Runner
from qwen_batch.spec import JobSpec
from qwen_batch.types import Reply, Request, UnitKey
from qwen_batch.wire import DEFAULT_BASE_URL, MULTIMODAL_PATH, NATIVE_PATH

from .test_runner import ListSink, _no_sleep, request

SENT = ("seed", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
        "stop", "enable_search", "result_format")
STOP_TEXT = (
    'The "stop" parameter must be of type "str", "list[str]", "list[int]", or "list[list[int]]", '
    "and all elements within the list must be of the same type."
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# (status, code, message) -> the class, and the parameter for ParameterRefused. Texts are the
# service's own (shared/dashscope-protocol.md sections 1.1, 1.3, 4.2, 5, 6; research-wave2.md 1, 5).
CONFIGURATION_CASES = [
    (400, "InvalidParameter", "Model not exist.", UnknownModel, None),
    (404, "ModelNotFound", "Model can not be found.", UnknownModel, None),
    (404, "ModelNotFound", "The model qwen-x does not exist.", UnknownModel, None),
    (404, "model_not_found", "Model not exist.", UnknownModel, None),
    (400, "Model.NotExist", "not documented", UnknownModel, None),
    (404, "InvalidParameter", "Model not exist.", UnknownModel, None),
    (400, "InvalidParameter", "模型不存在", UnknownModel, None),
    (400, "InvalidURL", "url error, please check url！", ModelNotOnEndpoint, None),
    (400, "InvalidParameter", "url error, please check url！", ModelNotOnEndpoint, None),
    (404, "HTTP404", "404: Not Found", EndpointNotFound, None),
    (404, "WorkSpaceNotFound", "WorkSpace can not be found.", EndpointNotFound, None),
    (404, "SomethingNew", "Not here.", EndpointNotFound, None),
    (405, "HTTP405", "405: Method Not Allowed", EndpointNotFound, None),
    (400, "InvalidParameter", "Range of max_tokens should be [1, 1500]", ParameterRefused, "max_tokens"),
    (400, "InternalError.Algo.InvalidParameter",
     "<400> InternalError.Algo.InvalidParameter: Range of max_tokens should be [1, 8192]", ParameterRefused, "max_tokens"),
    (400, "invalid_parameter_error", "Range of max_tokens should be [1, 8192]", ParameterRefused, "max_tokens"),
    (400, "InvalidParameter", "Range of seed should be [0, 9223372036854775807]", ParameterRefused, "seed"),
    (400, "InvalidParameter", "Range of top_p should be (0.0, 1.0]", ParameterRefused, "top_p"),
    (400, "InvalidParameter", "'top_p' must be Float", ParameterRefused, "top_p"),
    (400, "InvalidParameter", "Parameter top_k be greater than or equal to 0", ParameterRefused, "top_k"),
    (400, "InvalidParameter", "'top_k' must be Integer", ParameterRefused, "top_k"),
    (400, "InvalidParameter", "Temperature should be in [0.0, 2.0)", ParameterRefused, "temperature"),
    (400, "InvalidParameter", "Repetition_penalty should be greater than 0.0", ParameterRefused, "repetition_penalty"),
    (400, "InvalidParameter", "Presence_penalty should be in [-2.0, 2.0]", ParameterRefused, "presence_penalty"),
    (400, "InvalidParameter", STOP_TEXT, ParameterRefused, "stop"),
    (400, "InvalidParameter", "This model does not support enable_search.", ParameterRefused, "enable_search"),
    (400, "InvalidParameter", 'The result_format parameter must be "message" when enable_thinking is true',
     ParameterRefused, "result_format"),
    (400, "InvalidParameter", "parameter.enable_thinking must be set to false for non-streaming calls",
     ParameterRefused, "enable_thinking"),
    (400, "InvalidParameter", "parameter.enable_thinking必须设置为false才能进行非流式调用", ParameterRefused, "enable_thinking"),
    (400, "InvalidParameter.NotSupportEnableThinking", "The model qwen-x does not support enable_thinking.",
     ParameterRefused, "enable_thinking"),
    (400, "InvalidParameter", "The incremental_output parameter of this model cannot be set to False.",
     ParameterRefused, "incremental_output"),
    (400, "InvalidParameter", "This model only supports incremental_output set to True.", ParameterRefused, "incremental_output"),
]

# Answers about the row (or not about configuration at all): no ConfigurationRefused.
ROW_CASES = [
    (400, "InvalidParameter", "Range of input length should be [1, 6000]"),
    (400, "invalid_parameter_error", "Range of input length should be [1, 6000]"),
    (400, "InvalidParameter", "Role must be user or assistant and Content length must be greater than 0"),
    (400, "InvalidParameter", "User and assistant need to appear alternately in the message"),
    (400, "InvalidParameter", "The input messages do not contain elements with the role of user."),
    (400, "InvalidParameter", 'Either "prompt" or "messages" must exist and cannot both be none'),
    (400, "InvalidParameter", "The content field is a required field."),
    (400, "InvalidParameter", "input content must be a string."),
    (400, "InvalidParameter", "[] is too short"),
    (400, "InvalidParameter", "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."),
    (400, "InvalidParameter", "Required parameter(s) missing or invalid, please check the request parameters."),
    (400, "InvalidParameter", "Range of n should be [1, 4]"),  # n is never sent by qwen-batch
    (400, "DataInspectionFailed", "Input data may contain inappropriate content."),
    (400, "Arrearage", "Access denied, please make sure your account is in good standing."),
    (400, "DataInspectionFailed", "Range of max_tokens should be [1, 1500]"),  # a parameter, but not InvalidParameter
    (413, "BadRequest.TooLarge", "Payload Too Large."),
    (500, "InternalError", "Range of max_tokens should be [1, 1500]"),
    (500, "InternalError.Algo", "list index out of range"),
    (503, "ModelUnavailable", "Model is unavailable, please try again later."),
    (408, "RequestTimeOut", "Request timed out, please try again later."),
]


@pytest.mark.parametrize(("status", "code", "message", "cls", "parameter"), CONFIGURATION_CASES)
def test_each_configuration_answer_maps_to_its_class(status, code, message, cls, parameter) -> None:
    error = configuration_error(status, code, message, sent_parameters=SENT, request_id="rid", url="http://h/x")
    assert type(error) is cls
    assert (error.code, error.message, error.status, error.request_id, error.url) == (code, message, status, "rid", "http://h/x")
    assert error.retryable is False
    if parameter is not None:
        assert error.parameter == parameter


@pytest.mark.parametrize(("status", "code", "message"), ROW_CASES)
def test_row_and_service_answers_are_not_configuration_errors(status, code, message) -> None:
    assert configuration_error(status, code, message, sent_parameters=SENT) is None


def test_a_parameter_the_request_did_not_send_is_not_the_jobs() -> None:
    """top_k named, but this job sends no top_k: the message cannot be about the spec."""
    message = "Parameter top_k be greater than or equal to 0"
    assert configuration_error(400, "InvalidParameter", message, sent_parameters=("seed", "max_tokens")) is None
    assert configuration_error(400, "InvalidParameter", message, sent_parameters=("top_k",)).parameter == "top_k"


@given(st.text(max_size=80), st.sampled_from(sorted(SENT)))
def test_a_message_about_the_input_is_never_a_configuration_error(text, parameter) -> None:
    """Whatever else it says, an InvalidParameter message that speaks of the input stays the row's."""
    message = f"{parameter} {text} Range of input length should be [1, 6000]"
    assert configuration_error(400, "InvalidParameter", message, sent_parameters=SENT) is None


# -- through the backend: the wire shapes reach the table -------------------------------

KEY = "sk-secret-config-0123456789"
BASE = "http://dashscope.test/wrong/api/v1"
REQUEST = Request(0, "r0", "qwen turbo", [{"role": "user", "content": "hi"}], {"seed": 1, "max_tokens": 10}, "f", 5, 10,
                  UnitKey(0))


async def answer(status: int, *, json: object = None, content: bytes = b"", headers: dict | None = None) -> BackendError:
    def handler(_: httpx.Request) -> httpx.Response:
        if json is not None:
            return httpx.Response(status, json=json, headers=headers)
        return httpx.Response(status, content=content, headers=headers)

    backend = DashScopeBackend(BASE, KEY, timeout_s=5, max_connections=1, transport=httpx.MockTransport(handler))
    async with backend:
        with pytest.raises(BackendError) as info:
            await collect(backend.stream(REQUEST))
    return info.value


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "kwargs", "cls"),
    [
        (404, {"content": b"404: Not Found", "headers": {"content-type": "text/plain"}}, EndpointNotFound),
        (404, {"content": b""}, EndpointNotFound),
        (400, {"json": {"code": "InvalidParameter", "message": "Model not exist.", "request_id": "r"}}, UnknownModel),
        (404, {"json": {"error": {"code": "model_not_found", "type": "invalid_request_error", "message": "Model not exist."}}},
         UnknownModel),
        (400, {"content": b'id:1\nevent:error\n:HTTP_STATUS/400\ndata:{"code":"InvalidURL","message":"url error, please check url\xef\xbc\x81"}\n\n'},
         ModelNotOnEndpoint),
        (200, {"json": {"code": "InvalidParameter", "message": "Range of max_tokens should be [1, 8]", "request_id": "r"}},
         ParameterRefused),
        (400, {"json": {"code": "InvalidParameter", "message": "Range of input length should be [1, 6000]"}}, BadRequest),
        (401, {"json": {"code": "InvalidApiKey", "message": "Invalid API-key provided."}}, AuthError),
        (429, {"json": {"code": "Throttling", "message": "Requests throttling triggered."}}, RateLimited),
    ],
)
async def test_the_backend_translates_each_wire_shape(status, kwargs, cls) -> None:
    error = await answer(status, **kwargs)
    assert isinstance(error, cls)
    if isinstance(error, ConfigurationRefused):
        assert error.url == BASE + NATIVE_PATH


@pytest.mark.anyio
async def test_an_echoed_key_is_scrubbed_from_a_configuration_error() -> None:
    error = await answer(404, json={"code": "ModelNotFound", "message": f"The model for {KEY} does not exist."})
    assert isinstance(error, UnknownModel)
    assert KEY not in "".join(traceback.format_exception(error)) + repr(vars(error))


# -- the runner: stop like a refused key, but let the requests in flight finish ----------


class FirstFailsBackend:
    """Request 0 waits until ``width`` requests are in flight, then fails with ``error``; the
    others wait until the runner has decided to stop, then answer."""

    def __init__(self, error: BackendError, width: int) -> None:
        self.error = error
        self.width = width
        self.calls: list[int] = []
        self.in_flight = 0
        self.runner: Runner | None = None

    async def stream(self, req: Request) -> AsyncIterator[Event]:
        yield Completed(await self.generate(req))

    async def generate(self, req: Request) -> Reply:
        self.calls.append(req.index)
        self.in_flight += 1
        try:
            if req.index == 0:
                while self.in_flight < self.width:
                    await anyio.lowlevel.checkpoint()
                raise self.error
            assert self.runner is not None
            while self.runner.stop_reason is None:
                await anyio.lowlevel.checkpoint()
            return Reply(f"reply {req.index}", "stop", req.input_tokens, 5, f"id-{req.index}")
        finally:
            self.in_flight -= 1


@pytest.mark.anyio
async def test_a_configuration_error_stops_the_run_and_the_requests_in_flight_finish() -> None:
    error = UnknownModel("InvalidParameter", "Model not exist.", status=400)
    backend, sink = FirstFailsBackend(error, width=4), ListSink()
    runner = Runner(backend, sink, concurrency=4, limits=Limits.from_settings(None, None),
                    retry_policy=RetryPolicy(max_retries=3, sleep=_no_sleep), price=None, rows_total=100)
    backend.runner = runner
    with anyio.fail_after(10):
        await runner.run(iter([[request(i) for i in range(100)]]))
    assert runner.stop_reason == STOP_CONFIGURATION
    assert runner.stop_error is error
    assert sorted(backend.calls) == [0, 1, 2, 3]
    # The replies in flight were paid for and are kept; the failed row is not recorded.
    assert sorted(outcome.index for outcome in sink.outcomes) == [1, 2, 3]
    assert all(outcome.status == "ok" for outcome in sink.outcomes)


# -- the messages -----------------------------------------------------------------------


def spec_of(**changes: object) -> JobSpec:
    data: dict = {"model": "qwen turbo", "input": {"path": "in.csv"}, "prompt": {"template": "{text}"},
                  "parameters": {"max_tokens": 50}}
    data.update(changes)
    return JobSpec.model_validate(data)


def explained(error: ConfigurationRefused, spec: JobSpec, **kwargs: object) -> str:
    defaults: dict = {"catalog": builtin(), "base_url": "http://h/wrong", "base_url_key": "api.base_url in job spec",
                      "parameters": {"seed": 1234, "max_tokens": 50}}
    defaults.update(kwargs)
    return explain(error, spec=spec, **defaults)


def test_an_unknown_model_is_explained_with_the_close_match() -> None:
    line = explained(UnknownModel("InvalidParameter", "Model not exist.", status=400), spec_of())
    assert line == (
        "the service does not know model 'qwen turbo' (HTTP 400 InvalidParameter: Model not exist.); "
        "did you mean 'qwen-turbo'? Fix model: in job spec"
    )


def test_a_wrong_endpoint_names_the_url_the_key_and_the_default() -> None:
    error = EndpointNotFound("HTTP404", "404: Not Found", status=404, url="http://h/wrong" + NATIVE_PATH)
    line = explained(error, spec_of(model="qwen-turbo"), base_url_key="DASHSCOPE_HTTP_BASE_URL")
    assert line == (
        f"http://h/wrong{NATIVE_PATH} answered HTTP 404 (404: Not Found): DASHSCOPE_HTTP_BASE_URL "
        f"(http://h/wrong) looks wrong; the DashScope default is {DEFAULT_BASE_URL}"
    )


def test_a_refused_parameter_names_the_spec_key_and_its_value() -> None:
    error = ParameterRefused("InvalidParameter", "Range of max_tokens should be [1, 10]", parameter="max_tokens", status=400)
    line = explained(error, spec_of(model="qwen-turbo"))
    assert "parameters.max_tokens = 50" in line and line.endswith("fix parameters.max_tokens in job spec")
    seed = ParameterRefused("InvalidParameter", "Range of seed should be [0, 1]", parameter="seed", status=400)
    assert "(not set in the spec: 1234 is the default)" in explained(seed, spec_of(model="qwen-turbo"))


def test_a_parameter_the_spec_left_unset_asks_to_set_it() -> None:
    error = ParameterRefused("InvalidParameter", "parameter.enable_thinking must be set to false for non-streaming calls",
                             parameter="enable_thinking", status=400)
    line = explained(error, spec_of(model="qwen3-32b"))
    # Since issue 14 the spec has the key: the fix is to set it.
    assert "model 'qwen3-32b' refuses every request without parameters.enable_thinking" in line
    assert line.endswith("set parameters.enable_thinking in job spec")


def test_a_model_on_the_multimodal_path_asks_for_a_text_model() -> None:
    error = ModelNotOnEndpoint("InvalidURL", "url error, please check url！", status=400, url="http://h/x")
    line = explained(error, spec_of(model="qwen3.5-plus"))
    assert line.startswith("http://h/x does not serve model 'qwen3.5-plus' (HTTP 400 InvalidURL: url error")
    assert "set api.endpoint: multimodal in job spec" in line
    # Refused on the multimodal path, the fix is the text path.
    error = ModelNotOnEndpoint("InvalidURL", "url error", status=400, url="http://h/api/v1" + MULTIMODAL_PATH)
    assert "set api.endpoint: text in job spec" in explained(error, spec_of(model="qwen-turbo"))


# -- before sending: the catalog check ----------------------------------------------------


def test_an_unknown_model_is_refused_with_a_suggestion_unless_deliberate() -> None:
    with pytest.raises(SpecError) as caught:
        check_model_known(spec_of(model="Qwen_Plus"), builtin())
    assert "did you mean 'qwen-plus'?" in str(caught.value) and "api.allow_unknown_model: true" in str(caught.value)
    check_model_known(spec_of(model="Qwen_Plus", api={"allow_unknown_model": True}), builtin())
    check_model_known(spec_of(model="qwen-plus"), builtin())


def test_a_name_close_to_nothing_lists_the_catalog() -> None:
    with pytest.raises(SpecError) as caught:
        check_model_known(spec_of(model="gpt-4o"), builtin())
    assert "did you mean" not in str(caught.value)
    assert "the built-in catalog has " + ", ".join(builtin().names()) in str(caught.value)


@given(st.text(min_size=1, max_size=200))
def test_any_name_outside_the_catalog_is_refused_in_one_line_and_any_hint_is_a_catalog_model(name) -> None:
    catalog = builtin()
    close = catalog.closest(name)
    assert close is None or catalog.get(close) is not None
    if catalog.get(name) is not None:
        return
    with pytest.raises(SpecError) as caught:
        check_model_known(spec_of(model=name), catalog)
    message = str(caught.value)
    assert "api.allow_unknown_model" in message
    assert len(message) < 1000


@pytest.mark.parametrize(
    ("url", "native"),
    [
        ("https://dashscope.aliyuncs.com/compatible-mode/v1", "https://dashscope.aliyuncs.com/api/v1"),
        ("https://dashscope-intl.aliyuncs.com/", "https://dashscope-intl.aliyuncs.com/api/v1"),
        ("https://ws1.cn-beijing.maas.aliyuncs.com/api/v2", "https://ws1.cn-beijing.maas.aliyuncs.com/api/v1"),
        ("https://DashScope.AliyunCS.com./api", "https://DashScope.AliyunCS.com./api/v1"),
    ],
)
def test_a_dashscope_host_off_the_native_path_is_refused_with_the_fix(url, native) -> None:
    with pytest.raises(ConfigError) as caught:
        check_native_path(url, "job.yaml: api.base_url")
    assert str(caught.value).startswith(f"job.yaml: api.base_url: {url} is a DashScope host")
    assert str(caught.value).endswith(f"write {native}")


@pytest.mark.parametrize(
    "url",
    [
        "https://dashscope.aliyuncs.com/api/v1",
        "https://dashscope.aliyuncs.com/api/v1/",
        "https://cn-hongkong.dashscope.aliyuncs.com/api/v1",
        "https://proxy.example.com/any/path",  # not DashScope's: not judged before sending
        "http://127.0.0.1:8089/wrong",
        "https://notaliyuncs.com/x",
    ],
)
def test_native_paths_and_other_hosts_pass_the_check(url) -> None:
    check_native_path(url, "api.base_url")
