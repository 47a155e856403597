"""Codec: msgpack body plus raw tensor frames; zero-copy decode; DecodeError only."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codec import DecodeError, Decoder, EncodeError, encode

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float64,
]
NUMPY_DTYPES = [np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]


class Inner(msgspec.Struct):
    blocks: list[torch.Tensor]
    by_name: dict[str, torch.Tensor]


class Outer(msgspec.Struct):
    request_id: str
    tensor: torch.Tensor
    inner: Inner
    maybe: torch.Tensor | None = None


class Arrays(msgspec.Struct):
    array: np.ndarray
    nested: list[dict[str, np.ndarray]]


class Loose(msgspec.Struct):
    value: Any


class Prefill(msgspec.Struct, tag=True):
    token_ids: list[int]
    kv: torch.Tensor


class Decode(msgspec.Struct, tag=True):
    seq_id: int


class TensorMsg(msgspec.Struct):
    value: torch.Tensor


class ArrayMsg(msgspec.Struct):
    value: np.ndarray


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) % 7
    return (values > 2) if dtype == torch.bool else values.to(dtype)


def address_range(frame: bytes | memoryview) -> tuple[int, int]:
    start = int(np.frombuffer(frame, dtype=np.uint8).ctypes.data)
    return start, start + memoryview(frame).nbytes


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_nested_tensors_round_trip(dtype: torch.dtype) -> None:
    msg = Outer(
        request_id="r1",
        tensor=sample(dtype, (2, 3)),
        inner=Inner(
            blocks=[sample(dtype, (4,)), sample(dtype, ())],
            by_name={"k": sample(dtype, (2, 2, 2)), "empty": sample(dtype, (0, 5))},
        ),
        maybe=sample(dtype, (1,)),
    )
    frames = encode(msg)
    assert len(frames) == 1 + 6
    out = Decoder(Outer).decode([bytes(f) for f in frames])
    assert out.request_id == "r1"
    for got, want in [
        (out.tensor, msg.tensor),
        (out.inner.blocks[0], msg.inner.blocks[0]),
        (out.inner.blocks[1], msg.inner.blocks[1]),
        (out.inner.by_name["k"], msg.inner.by_name["k"]),
        (out.inner.by_name["empty"], msg.inner.by_name["empty"]),
        (out.maybe, msg.maybe),
    ]:
        assert isinstance(got, torch.Tensor)
        assert got.dtype == dtype
        assert got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_arrays_round_trip(dtype: type) -> None:
    array = (np.arange(12) % 5).astype(dtype).reshape(3, 4)
    msg = Arrays(array=array, nested=[{"x": array[::2].T}])
    out = Decoder(Arrays).decode(encode(msg))
    assert isinstance(out.array, np.ndarray)
    assert out.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.array, array)
    np.testing.assert_array_equal(out.nested[0]["x"], array[::2].T)


def test_non_contiguous_tensor_is_copied_only_when_needed() -> None:
    base = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    contiguous_frames = encode(TensorMsg(base))
    assert address_range(contiguous_frames[1])[0] == base.data_ptr()

    transposed = base.t()
    frames = encode(TensorMsg(transposed))
    assert address_range(frames[1])[0] != base.data_ptr()
    assert torch.equal(Decoder(TensorMsg).decode(frames).value, transposed)


def test_big_endian_numpy_is_shipped_little_endian() -> None:
    array = np.arange(5, dtype=">i4")
    out = Decoder(ArrayMsg).decode(encode(ArrayMsg(array)))
    np.testing.assert_array_equal(out.value, array)


@pytest.mark.parametrize("as_memoryview", [False, True])
def test_decode_is_zero_copy(as_memoryview: bool) -> None:
    frames = [bytes(f) for f in encode(TensorMsg(torch.randn(64, 32)))]
    inputs: list[bytes | memoryview] = [memoryview(f) if as_memoryview else f for f in frames]
    out = Decoder(TensorMsg).decode(inputs)
    start, end = address_range(frames[1])
    assert start <= out.value.data_ptr() < end
    assert out.value.data_ptr() + out.value.nbytes == end


def test_any_field_keeps_the_sent_kind() -> None:
    msg = Loose({"t": torch.ones(2, dtype=torch.int8), "a": [np.zeros(3, dtype=np.int16)]})
    out = Decoder(Loose).decode(encode(msg))
    assert isinstance(out.value["t"], torch.Tensor)
    assert torch.equal(out.value["t"], torch.ones(2, dtype=torch.int8))
    assert isinstance(out.value["a"][0], np.ndarray)
    assert out.value["a"][0].dtype == np.int16


def test_field_type_decides_between_torch_and_numpy() -> None:
    as_array = Decoder(ArrayMsg).decode(encode(TensorMsg(torch.arange(4, dtype=torch.int64))))
    assert isinstance(as_array.value, np.ndarray)
    np.testing.assert_array_equal(as_array.value, np.arange(4))

    as_tensor = Decoder(TensorMsg).decode(encode(ArrayMsg(np.arange(3, dtype=np.float32))))
    assert isinstance(as_tensor.value, torch.Tensor)
    assert torch.equal(as_tensor.value, torch.arange(3, dtype=torch.float32))


def test_bfloat16_cannot_become_an_ndarray() -> None:
    frames = encode(TensorMsg(torch.ones(2, dtype=torch.bfloat16)))
    with pytest.raises(DecodeError, match="bfloat16"):
        Decoder(ArrayMsg).decode(frames)


def test_tagged_union() -> None:
    decoder = Decoder[Prefill | Decode](Prefill | Decode)
    prefill = decoder.decode(encode(Prefill(token_ids=[1, 2], kv=torch.ones(2, 2))))
    assert isinstance(prefill, Prefill)
    assert prefill.token_ids == [1, 2]
    assert torch.equal(prefill.kv, torch.ones(2, 2))
    assert decoder.decode(encode(Decode(seq_id=7))) == Decode(seq_id=7)


def test_arbitrary_objects_cannot_be_encoded() -> None:
    class Opaque:
        pass

    with pytest.raises(
        EncodeError, match=r"cannot encode object of type \S*Opaque: only msgspec-native types"
    ):
        encode(Loose(Opaque()))
    with pytest.raises(TypeError, match=r"only msgspec-native types, torch\.Tensor and numpy"):
        encode(Loose([1, {"x": Opaque()}]))


def test_non_cpu_tensor_is_refused_with_a_clear_message() -> None:
    with pytest.raises(EncodeError, match="device meta.*CPU tensors only"):
        encode(TensorMsg(torch.empty(4, device="meta")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_refused() -> None:
    with pytest.raises(EncodeError, match="device cuda"):
        encode(TensorMsg(torch.ones(2, device="cuda")))


@pytest.mark.parametrize(
    "value",
    [torch.zeros(2, dtype=torch.complex64), np.zeros(2, dtype=object), 2**70],
    ids=["complex", "object-array", "huge-int"],
)
def test_unsupported_values_raise_encode_error(value: object) -> None:
    with pytest.raises(EncodeError):
        encode(Loose(value))


def test_missing_tensor_frame() -> None:
    frames = encode(Outer("r", torch.ones(1), Inner([torch.ones(2)], {})))
    with pytest.raises(DecodeError, match="refers to frame 2, but the message has 2 frames"):
        Decoder(Outer).decode(frames[:2])


def test_frame_size_must_match_dtype_and_shape() -> None:
    frames = encode(TensorMsg(torch.ones(3, 4)))
    with pytest.raises(DecodeError, match=r"frame 1 holds 47 bytes but a float32 tensor"):
        Decoder(TensorMsg).decode([frames[0], bytes(frames[1])[:-1]])


def test_wrong_schema() -> None:
    with pytest.raises(DecodeError, match=r"Object missing required field `value`"):
        Decoder(TensorMsg).decode(encode(Decode(seq_id=1)))
    with pytest.raises(DecodeError, match=r"Expected `Tensor`, got `int` - at `\$.value`"):
        Decoder(TensorMsg).decode(encode(Loose(5)))


def test_bad_tensor_reference() -> None:
    bad_ref = msgspec.msgpack.Ext(1, msgspec.msgpack.encode(["x"]))
    body = msgspec.msgpack.encode({"value": bad_ref})
    with pytest.raises(DecodeError, match="malformed tensor reference"):
        Decoder(TensorMsg).decode([body])

    unknown = msgspec.msgpack.Ext(9, b"")
    with pytest.raises(DecodeError, match="unknown msgpack extension code 9"):
        Decoder(TensorMsg).decode([msgspec.msgpack.encode({"value": unknown})])

    bad_dtype = msgspec.msgpack.Ext(1, msgspec.msgpack.encode([1, "complex64", [1]]))
    with pytest.raises(DecodeError, match="unsupported tensor dtype 'complex64'"):
        Decoder(TensorMsg).decode([msgspec.msgpack.encode({"value": bad_dtype}), b"\0" * 8])


def test_empty_and_garbage_input() -> None:
    with pytest.raises(DecodeError, match="empty message"):
        Decoder(TensorMsg).decode([])
    with pytest.raises(DecodeError, match="MessagePack data is malformed"):
        Decoder(TensorMsg).decode([b"\xc1\xff"])
    frames = encode(Outer("r", torch.ones(1), Inner([], {})))
    with pytest.raises(DecodeError, match="truncated"):
        Decoder(Outer).decode([bytes(frames[0])[:-3], *frames[1:]])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_any_input_fails_only_with_decode_error(frames: list[bytes]) -> None:
    try:
        result = Decoder(Outer).decode(frames)
    except DecodeError:
        return
    assert isinstance(result, Outer)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 3))
def test_corrupted_valid_message_fails_only_with_decode_error(noise: bytes, at: int) -> None:
    body = bytes(encode(Outer("r", torch.ones(2), Inner([torch.ones(1)], {})))[0])
    corrupted = body[: at * 8] + noise + body[at * 8 + len(noise) :]
    try:
        result = Decoder(Outer).decode([corrupted, b"\0" * 8, b"\0" * 4])
    except DecodeError:
        return
    assert isinstance(result, Outer)


def test_tensor_free_messages_do_not_import_torch_and_decode_warns_nothing() -> None:
    script = """
import sys, msgspec
from common.codec import Decoder, encode
class Ping(msgspec.Struct):
    n: int
assert Decoder(Ping).decode(encode(Ping(1))) == Ping(1)
assert "torch" not in sys.modules, "codec imported torch for a tensor-free message"
import torch
class T(msgspec.Struct):
    t: torch.Tensor
frames = [bytes(f) for f in encode(T(torch.ones(3)))]
assert Decoder(T).decode(frames).t.sum().item() == 3.0
"""
    # -W error: torch's "buffer is not writable" warning would fail the decode.
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
