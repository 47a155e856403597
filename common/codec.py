"""Wire codec: msgspec msgpack bodies with tensors carried out of band as raw frames.

A message becomes a list of frames::

    frame 0        msgpack body; each tensor/array is replaced by an Ext placeholder
    frame 1..n     the raw bytes of each tensor/array, in the order the encoder met them

The Ext placeholder's payload is the msgpack array ``[frame_index, dtype_name, shape]``;
its Ext code says what to rebuild when the receiving field is untyped (``Any``):
``_EXT_TORCH`` a ``torch.Tensor``, ``_EXT_NUMPY`` a ``numpy.ndarray``. A field typed
``torch.Tensor`` or ``numpy.ndarray`` always gets that type, whatever was sent.

Invariants:

* Supported dtypes: float64, float32, float16, bfloat16 (torch only), int64, int32, int16,
  int8, uint8, bool.
* Never pickle. Anything msgspec cannot encode natively and that is not a CPU tensor or
  array of a supported dtype is refused with ``EncodeError``.
* Tensor bytes are C-contiguous, little-endian (every supported host is little-endian;
  numpy arrays of the other byte order are swapped on encode). A contiguous copy is made
  only when the input is not already contiguous.
* The frames returned by ``encode`` alias the caller's tensors: the sender must not write
  to those tensors until the frames are sent.
* Decoded tensors alias the received frame buffers (zero copy). Treat them as read-only;
  ``.clone()`` / ``.copy()`` before writing in place. Tensors decoded from immutable
  ``bytes`` frames share memory with the ``bytes`` object.
* ``Decoder.decode`` raises only ``DecodeError``, whatever the input.
* torch and numpy are imported only when a message actually carries a tensor/array, so
  processes that never handle tensors do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import msgspec
import zmq

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")

FrameLike = bytes | memoryview | zmq.Frame

_EXT_TORCH = 1
_EXT_NUMPY = 2

# Item size per wire dtype name. The name is torch's without the "torch." prefix, which
# equals numpy's ``dtype.name`` for every entry. bfloat16 has no numpy dtype:
# numpy arrays never carry it, and a torch bfloat16 tensor decoded into an ndarray field
# is an error.
DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class EncodeError(TypeError):
    """The message holds something that cannot go on the wire."""


class DecodeError(ValueError):
    """The frames are not a valid encoding of the expected type."""


def _loaded(module: str) -> Any:
    """The module if something already imported it; tensors cannot exist otherwise."""
    return sys.modules.get(module)


def _torch() -> Any:
    return importlib.import_module("torch")


def _numpy() -> Any:
    return importlib.import_module("numpy")


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


class _Encoder:
    """A msgspec encoder whose enc_hook appends tensor bytes to ``frames``.

    One instance per thread (see ``_encoders``): the hook has no other way to reach the
    frame list of the message being encoded.
    """

    def __init__(self) -> None:
        self.frames: list[bytes | memoryview] = []
        self._msgpack = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._ext_payload = msgspec.msgpack.Encoder()

    def encode(self, msg: object) -> list[bytes | memoryview]:
        frames = self.frames = [b""]
        try:
            frames[0] = self._msgpack.encode(msg)
        finally:
            # Do not keep the caller's tensors alive past this call.
            self.frames = []
        return frames

    def _enc_hook(self, obj: Any) -> Any:
        torch_mod = _loaded("torch")
        if torch_mod is not None and isinstance(obj, torch_mod.Tensor):
            return self._tensor_ext(obj)
        np_mod = _loaded("numpy")
        if np_mod is not None and isinstance(obj, np_mod.ndarray):
            return self._ndarray_ext(obj)
        raise EncodeError(
            f"cannot encode object of type {type(obj).__module__}.{type(obj).__qualname__}: "
            "only msgspec-native types, torch.Tensor and numpy.ndarray go on the wire"
        )

    def _tensor_ext(self, t: torch.Tensor) -> msgspec.msgpack.Ext:
        if t.device.type != "cpu":
            raise EncodeError(
                f"cannot encode a tensor on device {t.device}: the codec ships CPU tensors "
                "only; move device memory through the data plane"
            )
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPE_BYTES:
            raise EncodeError(f"cannot encode a tensor of dtype {t.dtype}")
        if t.layout != _torch().strided:
            raise EncodeError(f"cannot encode a tensor with layout {t.layout}")
        flat = t.detach()
        if not flat.is_contiguous():
            flat = flat.contiguous()
        # Viewing as uint8 reaches the bytes of every dtype, bfloat16 included, which
        # .numpy() refuses directly. The ndarray keeps the tensor alive.
        raw = flat.reshape(-1).view(_torch().uint8).numpy().data
        return self._add(_EXT_TORCH, raw, name, tuple(t.shape))

    def _ndarray_ext(self, a: np.ndarray) -> msgspec.msgpack.Ext:
        name = a.dtype.name
        if name not in DTYPE_BYTES:
            raise EncodeError(f"cannot encode a numpy array of dtype {a.dtype}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        raw = a.reshape(-1).view(_numpy().uint8).data
        return self._add(_EXT_NUMPY, raw, name, a.shape)

    def _add(
        self, code: int, raw: memoryview, dtype: str, shape: tuple[int, ...]
    ) -> msgspec.msgpack.Ext:
        index = len(self.frames)
        self.frames.append(raw)
        return msgspec.msgpack.Ext(code, self._ext_payload.encode((index, dtype, list(shape))))


_encoders = threading.local()


def encode(msg: msgspec.Struct) -> list[bytes | memoryview]:
    """Encode ``msg`` into frames: ``[body, *tensor_bytes]``.

    Raises ``EncodeError`` when the message holds an unsupported object, a non-CPU tensor,
    or an unsupported dtype.
    """
    encoder: _Encoder | None = getattr(_encoders, "encoder", None)
    if encoder is None:
        encoder = _encoders.encoder = _Encoder()
    try:
        return encoder.encode(msg)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
        raise EncodeError(f"cannot encode {type(msg).__qualname__}: {e}") from e


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def _buffer(frame: FrameLike) -> memoryview:
    """A flat byte view of ``frame``, without copying."""
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


_ref_decoder = msgspec.msgpack.Decoder(tuple[int, str, list[int]])


def _parse_ref(payload: memoryview) -> tuple[int, str, tuple[int, ...]]:
    try:
        index, dtype, shape = _ref_decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise DecodeError(f"malformed tensor reference: {e}") from None
    if dtype not in DTYPE_BYTES:
        raise DecodeError(f"unsupported tensor dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise DecodeError(f"negative dimension in tensor shape {shape}")
    return index, dtype, tuple(shape)


class _DecodeState(threading.local):
    frames: Sequence[memoryview] = ()


class Decoder(Generic[T]):
    """Decodes frames produced by ``encode`` into ``type_``.

    ``type_`` may be a Struct class or any type msgspec accepts (e.g. a Union of tagged
    Structs; annotate the decoder then: ``Decoder[A | B](A | B)``). Reusable and safe to
    share between threads.
    """

    @overload
    def __init__(self, type_: type[T]) -> None: ...
    @overload
    def __init__(self, type_: Any) -> None: ...
    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._state = _DecodeState()
        self._msgpack = msgspec.msgpack.Decoder(
            type_, dec_hook=self._dec_hook, ext_hook=self._ext_hook
        )

    def decode(self, frames: Sequence[FrameLike]) -> T:
        """Decode ``frames``; tensors in the result alias the frame buffers."""
        if not frames:
            raise DecodeError("empty message: expected at least the body frame")
        try:
            buffers = [_buffer(f) for f in frames]
            self._state.frames = buffers
            # Torch warns (once per process) that a tensor over a read-only buffer is
            # writable. Aliasing is the point of this codec and documented above.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given (buffer|NumPy array)")
                result: T = self._msgpack.decode(buffers[0])
            return result
        except DecodeError:
            raise
        except msgspec.DecodeError as e:
            raise DecodeError(f"cannot decode {self._type_name()}: {e}") from None
        except Exception as e:
            raise DecodeError(
                f"cannot decode {self._type_name()}: {type(e).__name__}: {e}"
            ) from None
        finally:
            self._state.frames = ()

    def _type_name(self) -> str:
        return getattr(self.type, "__qualname__", None) or repr(self.type)

    def _ext_hook(self, code: int, payload: memoryview) -> Any:
        if code not in (_EXT_TORCH, _EXT_NUMPY):
            raise DecodeError(f"unknown msgpack extension code {code}")
        index, dtype, shape = _parse_ref(payload)
        frames = self._state.frames
        if not 1 <= index < len(frames):
            raise DecodeError(
                f"tensor refers to frame {index}, but the message has {len(frames)} frames "
                "and frame 0 is the body"
            )
        buf = frames[index]
        numel = 1
        for d in shape:
            numel *= d
        if buf.nbytes != numel * DTYPE_BYTES[dtype]:
            raise DecodeError(
                f"frame {index} holds {buf.nbytes} bytes but a {dtype} tensor of shape "
                f"{list(shape)} needs {numel * DTYPE_BYTES[dtype]}"
            )
        if code == _EXT_TORCH:
            return _tensor_over(buf, dtype, shape)
        return _ndarray_over(buf, dtype, shape)

    def _dec_hook(self, type_: type, obj: Any) -> Any:
        torch_mod = _loaded("torch")
        np_mod = _loaded("numpy")
        if torch_mod is not None and type_ is torch_mod.Tensor:
            if isinstance(obj, torch_mod.Tensor):
                return obj
            if np_mod is not None and isinstance(obj, np_mod.ndarray):
                return torch_mod.from_numpy(obj)
            raise TypeError(f"Expected `Tensor`, got `{type(obj).__name__}`")
        if np_mod is not None and type_ is np_mod.ndarray:
            if isinstance(obj, np_mod.ndarray):
                return obj
            if torch_mod is not None and isinstance(obj, torch_mod.Tensor):
                if obj.dtype == torch_mod.bfloat16:
                    raise TypeError("Expected `ndarray`, got a bfloat16 tensor")
                return obj.numpy()
            raise TypeError(f"Expected `ndarray`, got `{type(obj).__name__}`")
        raise NotImplementedError(f"the codec cannot decode type {type_!r}")


def _tensor_over(buf: memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    torch_mod = _torch()
    torch_dtype = getattr(torch_mod, dtype)
    if buf.nbytes == 0:
        # torch.frombuffer rejects empty buffers; there is nothing to alias anyway.
        return torch_mod.empty(shape, dtype=torch_dtype)
    tensor: torch.Tensor = torch_mod.frombuffer(buf, dtype=torch_dtype).reshape(shape)
    return tensor


def _ndarray_over(buf: memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    np_mod = _numpy()
    if dtype == "bfloat16":
        raise DecodeError("a numpy array cannot have dtype bfloat16")
    array: np.ndarray = np_mod.frombuffer(buf, dtype=np_mod.dtype(dtype).newbyteorder("<"))
    return array.reshape(shape)
