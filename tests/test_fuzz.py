"""Hypothesis-generated requests never produce INTERNAL (or UNKNOWN) and never stop the engine.

Requests are real protobufs sent over gRPC, with any unicode, empty fields, out-of-range, huge, NaN and
infinite numbers, and unknown fields appended (what a newer client might send)."""
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.client import Client
from protos.loraplex.v1 import inference_pb2 as pb
from tests.helpers import make_peft_adapter, start_server

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(model_dirs["llama"], root / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    s = start_server(model_dirs["llama"], root, max_new_tokens=6, default_max_new_tokens=4)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


unknown_fields = st.lists(st.tuples(st.integers(20, 10_000), st.integers(0, 2 ** 63 - 1)), max_size=3).map(
    lambda fields: b"".join(_varint(tag << 3) + _varint(value) for tag, value in fields))
floats = st.one_of(st.none(), st.floats(width=32, allow_nan=True, allow_infinity=True),
                   st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e38, -1e38, 1e-45]))
int32 = st.integers(-2 ** 31, 2 ** 31 - 1)
adapter_ids = st.one_of(st.just(""), st.just("a1"), st.just("missing"), st.text(max_size=300),
                        st.sampled_from(["..", "../a1", "a1/..", "/etc", ".hidden", "a" * 129, "a1\x00", "é"]))


def sometimes(weird, usual, odds: int = 4):
    """`weird` one draw in `odds`, else `usual`: most requests stay valid enough to reach the engine, where the
    interesting failures live (a request refused at validation never samples a token)."""
    return st.integers(0, odds - 1).flatmap(lambda i: weird if i == 0 else usual)


@st.composite
def generate_requests(draw) -> bytes:
    request = pb.GenerateRequest(adapter_id=draw(sometimes(adapter_ids, st.sampled_from(["", "a1"]))),
                                 request_id=draw(sometimes(st.text(max_size=300), st.just(""))))
    if draw(sometimes(st.just(True), st.just(False))):
        request.prompt_token_ids.ids.extend(draw(sometimes(st.lists(int32, max_size=40),
                                                           st.lists(st.integers(0, 255), min_size=1, max_size=20))))
    elif draw(sometimes(st.just(False), st.just(True), odds=8)):
        request.prompt = draw(sometimes(st.text(max_size=400), st.text(min_size=1, max_size=30)))
    sampling, stopping = request.sampling, request.stopping
    for name, usual in (("temperature", st.floats(0, 2)), ("top_p", st.floats(0.01, 1))):
        value = draw(sometimes(floats, st.one_of(st.none(), usual), odds=2))
        if value is not None:
            setattr(sampling, name, value)
    if draw(st.booleans()):
        sampling.top_k = draw(sometimes(int32, st.integers(0, 300)))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2 ** 64 - 1))
    if draw(st.booleans()):
        stopping.max_new_tokens = draw(sometimes(int32, st.integers(1, 6)))
    stopping.stop.extend(draw(sometimes(st.lists(st.text(max_size=300), max_size=20),
                                        st.lists(st.text(min_size=1, max_size=3), max_size=2))))
    stopping.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        request.n = draw(sometimes(st.integers(0, 2 ** 32 - 1), st.integers(1, 3)))
    return request.SerializeToString() + draw(unknown_fields)


def _call(channel, method: str, payload: bytes, stream: bool, response_type):
    kwargs = dict(request_serializer=lambda b: b, response_deserializer=response_type.FromString)
    if stream:
        return list(channel.unary_stream(method, **kwargs)(payload, timeout=60))
    return channel.unary_unary(method, **kwargs)(payload, timeout=60)


def _expect_no_internal(fn) -> None:
    try:
        fn()
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, f"{err.code()}: {err.details()}"
        assert err.details(), "every refusal says why"


@FUZZ
@given(payload=generate_requests(), stream=st.booleans())
def test_fuzzed_generate_requests_never_internal(channel, payload, stream):
    method = "/loraplex.v1.Inference/GenerateStream" if stream else "/loraplex.v1.Inference/Generate"
    response_type = pb.GenerateStreamResponse if stream else pb.GenerateResponse
    _expect_no_internal(lambda: _call(channel, method, payload, stream, response_type))


@FUZZ
@given(adapter_id=adapter_ids, flags=st.tuples(st.booleans(), st.booleans()), extra=unknown_fields,
       method=st.sampled_from(["LoadAdapter", "UnloadAdapter", "GetAdapter"]))
def test_fuzzed_adapter_calls_never_internal(channel, adapter_id, flags, extra, method):
    if method == "LoadAdapter":
        payload = pb.LoadAdapterRequest(adapter_id=adapter_id, replace=flags[0], pin=flags[1])
    elif method == "UnloadAdapter":
        payload = pb.UnloadAdapterRequest(adapter_id=adapter_id, drain=flags[0])
    else:
        payload = pb.GetAdapterRequest(adapter_id=adapter_id)
    response_type = pb.UnloadAdapterResponse if method == "UnloadAdapter" else pb.AdapterInfo
    _expect_no_internal(lambda: _call(channel, f"/loraplex.v1.Adapters/{method}",
                                      payload.SerializeToString() + extra, False, response_type))


@pytest.mark.parametrize("method, stream", [("Inference/Generate", False), ("Inference/GenerateStream", True),
                                            ("Adapters/LoadAdapter", False), ("Adapters/GetAdapter", False)])
@pytest.mark.parametrize("payload", [
    b"\x12\x03\xff\xfe!",  # prompt (field 2) that is not UTF-8; for the Adapters calls field 2 is no string
    b"\x0a\x02\xc3(\x12\x02hi",  # adapter_id (field 1) that is not UTF-8
    b"\xff\xff\xff\xff",  # no message at all
])
def test_a_request_message_that_does_not_parse_is_invalid_argument_and_counted(server, channel, caplog, method,
                                                                              stream, payload):
    """grpc answered UNKNOWN with protobuf's exception text, logged an ERROR traceback per call (an unauthenticated
    client could fill the log) and ran no handler, so no metric counted the call."""
    from tests.helpers import scrape, wait_for
    service, name = method.split("/")
    key = (f'grpc_server_handled_total{{grpc_code="INVALID_ARGUMENT",grpc_method="{name}",'
           f'grpc_service="loraplex.v1.{service}",grpc_type="{"server_stream" if stream else "unary"}"}}')
    before = scrape(server).get(key, 0)
    call = (channel.unary_stream if stream else channel.unary_unary)(
        f"/loraplex.v1.{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with caplog.at_level("ERROR"):
        try:
            list(call(payload, timeout=30)) if stream else call(payload, timeout=30)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
        else:
            code = details = None
    if method.startswith("Adapters") and payload.startswith(b"\x12"):  # field 2 there is a bool: it parses
        assert code != grpc.StatusCode.UNKNOWN
        return
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"the {name} request message does not parse" in details
    assert wait_for(lambda: scrape(server).get(key, 0) == before + 1)  # counted as the handler ends, after the reply
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_engine_still_serves_after_the_fuzzing(server):
    assert server.serving.engine.alive
    with Client(server.target, timeout=30) as client:
        assert client.health() == 1
        assert len(client.generate("hi", "a1", max_new_tokens=3).token_ids) == 3


@FUZZ
@given(temperature=st.floats(0, 2.0 ** 100, exclude_min=True, width=32), top_k=st.integers(0, 2 ** 31 - 1),
       top_p=st.floats(0, 1, exclude_min=True, width=32, allow_subnormal=True), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_any_valid_sampling_params_draw_a_token(temperature, top_k, top_p, scale):
    """Whatever the servicer accepts, sampling must survive (a subnormal temperature once overflowed the
    softmax to NaN and failed every request of its engine step)."""
    import torch

    from server.sampling import SamplingParams, make_generator, sample
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * scale
    params = [SamplingParams(temperature, top_k, top_p, seed=i) for i in range(3)]
    assert all(0 <= t < 64 for t in sample(logits, params, [make_generator(p) for p in params]))
