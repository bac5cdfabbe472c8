"""Read and write PyTorch checkpoint files without torch, never running code from the file.

A ``.pt``/``.ckpt`` file is a pickle, and unpickling can run anything. Here the pickle is
interpreted by a small opcode machine of our own (``_Machine``): a global name resolves only
through an explicit allow-list of inert implementations (tensor rebuild functions,
``OrderedDict``, ``torch.Size``, dtypes, storage types ...). Nothing is ever imported by name and
no object coming from the file is ever called. Any other global raises `UnsafeCheckpointError`,
or with ``allow_opaque=True`` becomes an inert `OpaqueGlobal` / `OpaqueObject` placeholder that
records the dotted name and the arguments (enough to skip a Lightning ``.ckpt``'s
``hyper_parameters`` and callbacks while reading its ``state_dict``).

Formats read:
  - zip (``torch.save`` default since torch 1.6): ``<archive>/data.pkl`` is the pickle, whose
    persistent ids ``("storage", StorageType, key, location, numel)`` name raw little-endian
    storages stored in ``<archive>/data/<key>``; ``<archive>/byteorder`` may say ``big``.
  - legacy (torch < 1.6, ``_use_new_zipfile_serialization=False``): five pickles in a row
    (magic number, protocol version, sys info, the object, the list of storage keys), then for
    each key an int64 element count and the raw little-endian storage bytes.
  - a bare pickle without tensors is read the same way (still through the safe machine).
Tensors become ``np.ndarray`` in their dtype (bfloat16 and float8 via ``ml_dtypes``); shared
storages, storage offsets and arbitrary non-negative strides are honoured.

`save_torch_file` writes the zip format byte for byte the way ``torch.save`` lays it out
(pickle protocol 2, 64-byte aligned storage records), so ``torch.load(path, weights_only=True)``
loads it.
"""

from __future__ import annotations

import _compat_pickle
import abc
import codecs
import collections
import hashlib
import io
import lzma
import math
import os
import pickle
import secrets
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CheckpointFormatError",
    "OpaqueGlobal",
    "OpaqueObject",
    "UnsafeCheckpointError",
    "cast_bounded",
    "load_torch_file",
    "save_torch_file",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ALIGNMENT = 64
_READ_CHUNK = 1 << 24
_MAX_LINE = 1 << 20  # longest text-opcode line accepted (protocol 0 GLOBAL/INT/STRING ...)
DEFAULT_MAX_BYTES = 4 << 30  # array data a file may describe by default (or twice its size)


# ----------------------------------------------------------------------------------------------
# Errors and placeholders
# ----------------------------------------------------------------------------------------------


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (corrupt, truncated or unsupported)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:  # picklable across processes despite the 2-argument init
        return type(self), (self.path, self.problem)


class UnsafeCheckpointError(ValueError):
    """The checkpoint asks for a global or an opcode outside the allow-list (it could run code)."""

    def __init__(self, path: str | os.PathLike, refused: str, hint: str = ""):
        self.path = os.fspath(path)
        self.refused = refused
        self.hint = hint
        msg = f"{self.path}: refused {refused}: not a tensor or a plain container"
        super().__init__(msg + (f" ({hint})" if hint else ""))

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.refused, self.hint)


@dataclass(frozen=True)
class OpaqueGlobal:
    """A global the file referred to but which was never imported (``allow_opaque=True``)."""

    name: str  # dotted, e.g. "argparse.Namespace"

    def __repr__(self) -> str:
        return f"OpaqueGlobal({self.name})"


@dataclass(eq=False, repr=False)
class OpaqueObject:
    """An inert record of an object the file would have built by calling `name`.

    Nothing is ever called: ``args``/``kwargs`` are what the pickle passed, ``state`` what it
    would have given ``__setstate__``, ``listitems``/``dictitems`` what it appended/set.
    """

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    state: Any = None
    listitems: list = field(default_factory=list)
    dictitems: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # shallow: the contents may be self-referential
        return f"OpaqueObject({self.name}, {len(self.args)} args)"


# ----------------------------------------------------------------------------------------------
# dtype tables (torch name -> numpy dtype; None = known to torch but not representable here)
# ----------------------------------------------------------------------------------------------

_TORCH_DTYPES: dict[str, np.dtype | None] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    # known to torch, no numpy counterpart
    "complex32": None,
    "float4_e2m1fn_x2": None,
    "qint8": None,
    "quint8": None,
    "qint32": None,
    "quint4x2": None,
    "quint2x4": None,
    "bits8": None,
    "bits16": None,
    "bits1x8": None,
    "bits2x4": None,
    "bits4x2": None,
}

# Legacy typed storage classes (written by _rebuild_tensor_v2) -> torch dtype name.
_STORAGE_TYPES: dict[str, str | None] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": None,  # bytes; the tensor's dtype comes from _rebuild_tensor_v3
}


@dataclass(frozen=True)
class _TorchDtype:
    name: str  # e.g. "torch.float32"
    dtype: np.dtype | None


@dataclass(frozen=True)
class _StorageType:
    name: str  # e.g. "torch.FloatStorage"
    dtype_name: str | None  # torch dtype name; None for UntypedStorage


@dataclass(frozen=True)
class _TensorType:
    name: str  # "torch.Tensor" or "torch.nn.parameter.Parameter"


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; bytes [byte_offset, byte_offset + nbytes) of `key`."""

    key: str
    stype: _StorageType
    numel: int
    byte_offset: int = 0
    nbytes: int | None = None  # None: to the end of the stored record


@dataclass(frozen=True)
class _SafeCallable:
    """An allow-listed global: `call` implements REDUCE, `new` (if any) NEWOBJ."""

    name: str
    call: Callable[..., Any]
    new: Callable[..., Any] | None = None


# ----------------------------------------------------------------------------------------------
# The allow-list
# ----------------------------------------------------------------------------------------------


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise _CorruptError(problem)


class _CorruptError(Exception):
    """Raised inside the machine; turned into CheckpointFormatError with the file name."""


class _RefusedError(Exception):
    """Raised inside the machine; turned into UnsafeCheckpointError with the file name."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x: Any, what: str) -> tuple[int, ...]:
    _require(isinstance(x, (tuple, list)) and all(_is_int(v) for v in x), f"{what} is not ints")
    return tuple(x)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for `bytes`; latin-1 text only."""
    _require(isinstance(text, str), "_codecs.encode of a non-string")
    _require(encoding in ("latin1", "latin-1"), f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _bytearray(*args: Any) -> bytearray:
    _require(
        (len(args) == 1 and isinstance(args[0], (bytes, bytearray)))
        or (len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1")),
        "bytearray arguments are not bytes",
    )
    return bytearray(args[0].encode("latin-1") if isinstance(args[0], str) else args[0])


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    _require(all(isinstance(v, (int, float)) for v in (real, imag)), "complex of non-numbers")
    return complex(real, imag)


def _slice(*args: Any) -> slice:
    _require(len(args) <= 3 and all(v is None or _is_int(v) for v in args), "bad slice")
    return slice(*args)


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "torch.Size")


def _torch_device(spec: Any, index: Any = None) -> str:
    """torch.device -> its string, e.g. "cuda:0" (we load everything on the host)."""
    _require(isinstance(spec, str) and (index is None or _is_int(index)), "bad torch.device")
    return spec if index is None else f"{spec}:{index}"


def _iterable_of_data(make: Callable[[Any], Any]) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        _require(len(args) <= 1, "too many arguments")
        if args:
            _require(isinstance(args[0], (list, tuple, dict, set, frozenset)), "not a container")
        return make(*args)

    return build


_TENSOR_REBUILDERS = (
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
)
# Torch rebuild functions for tensor kinds this reader does not support (not unsafe).
_UNSUPPORTED_TORCH = (
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._utils._rebuild_xla_tensor",
    "torch._utils._rebuild_mps_tensor",
    "torch.serialization._get_layout",
)

_PLAIN_GLOBALS: dict[str, _SafeCallable] = {
    g.name: g
    for g in (
        _SafeCallable(
            "collections.OrderedDict",
            _iterable_of_data(collections.OrderedDict),
            lambda *a: collections.OrderedDict(),
        ),
        _SafeCallable(
            "collections.Counter",
            _iterable_of_data(collections.Counter),
            lambda *a: collections.Counter(),
        ),
        _SafeCallable("builtins.set", _iterable_of_data(set), lambda *a: set()),
        _SafeCallable("builtins.frozenset", _iterable_of_data(frozenset)),
        _SafeCallable("builtins.bytearray", _bytearray),
        _SafeCallable("builtins.complex", _complex),
        _SafeCallable("builtins.slice", _slice),
        _SafeCallable("_codecs.encode", _codecs_encode),
        _SafeCallable("torch.Size", _torch_size, _torch_size),
        _SafeCallable("torch.device", _torch_device),
    )
}


def _resolve_value_global(dotted: str) -> Any:
    """Allow-listed globals that are values (dtypes, storage and tensor types), else None."""
    module, _, name = dotted.rpartition(".")
    if module == "torch" and name in _TORCH_DTYPES:
        return _TorchDtype(dotted, _TORCH_DTYPES[name])
    if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_TYPES:
        return _StorageType(dotted, _STORAGE_TYPES[name])
    if dotted in ("torch.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter"):
        return _TensorType(dotted)
    return None


# ----------------------------------------------------------------------------------------------
# Tensor construction (two passes: count storage users, then materialise)
# ----------------------------------------------------------------------------------------------


def _human(nbytes: int) -> str:
    """A byte count for messages: "3.64 TiB (4000000000000 bytes)"."""
    value, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{nbytes} bytes" if unit == "B" else f"{value:.2f} {unit} ({nbytes} bytes)"


class _TensorSink:
    """Builds an array for `_rebuild_tensor*`; pass 1 only counts uses of each storage and
    adds up the tensors' logical sizes against the reader's byte budget (`limit`), so a file
    that describes more array data than allowed is refused before any storage is read."""

    def __init__(self, limit: int | None = None, file_size: int = 0) -> None:
        self.uses: collections.Counter[str] = collections.Counter()
        self.limit = limit
        self.file_size = file_size
        self.total = 0  # logical bytes (elements x itemsize) of the tensors built so far

    def build(self, ref: _StorageRef, dtype: np.dtype, offset: int, size, stride) -> np.ndarray:
        self.uses[ref.key] += 1
        nbytes = math.prod(size) * dtype.itemsize
        self.total += nbytes
        if self.limit is not None and self.total > self.limit:
            raise _CorruptError(
                f"a tensor of size {tuple(size)} and stride {tuple(stride)} ({_human(nbytes)} of "
                f"{dtype}, from storage {ref.key!r} of {_human(ref.numel * _itemsize(ref.stype))}) "
                f"brings the tensors to {_human(self.total)}, more than the limit of "
                f"{_human(self.limit)} for a file of {_human(self.file_size)} (load_torch_file's "
                "max_bytes; raise it only for a trusted file)"
            )
        return np.zeros((0,), dtype)


class _Materializer(_TensorSink):
    """Pass 2: reads storage bytes (once per key) and returns independent arrays.

    A storage used by exactly one tensor that covers it contiguously is returned without a
    copy. Other views are copied (bounded by the storage size), except views whose elements
    overlap (stride 0, as left by ``expand``): those come back as read-only strided views, like
    ``np.broadcast_to``, so a tiny file cannot demand an enormous allocation (a neg / conj
    bit is then applied to the elements the view spans, never to every element). Pass 1
    (`_TensorSink`) has already bounded the total the tensors describe.
    """

    def __init__(self, source: _StorageSource, uses: Mapping[str, int]) -> None:
        super().__init__()
        self._source = source
        self._uses = uses
        self._raw: dict[str, bytearray] = {}
        self._swapped: dict[tuple[str, int], bytearray] = {}

    def _bytes(self, ref: _StorageRef, dtype: np.dtype) -> memoryview:
        if ref.key not in self._raw:
            self._raw[ref.key] = self._source.read(ref.key)
        raw = self._raw[ref.key]
        if self._source.byteorder == "big" and dtype.itemsize > 1:
            unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
            cache = (ref.key, unit)  # at most one swapped copy per word size
            if cache not in self._swapped:
                n = len(raw) // unit * unit
                words = np.frombuffer(raw, dtype=f"<u{unit}", count=n // unit)
                self._swapped[cache] = bytearray(words.byteswap().tobytes())
            raw = self._swapped[cache]
        end = len(raw) if ref.nbytes is None else ref.byte_offset + ref.nbytes
        _require(end <= len(raw), f"storage view of {ref.key!r} runs past its data")
        return memoryview(raw)[ref.byte_offset : end]

    def build(self, ref: _StorageRef, dtype: np.dtype, offset: int, size, stride) -> np.ndarray:
        buf = self._bytes(ref, dtype)
        count = len(buf) // dtype.itemsize
        numel = math.prod(size)
        if numel == 0:
            return np.zeros(size, dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        _require(
            last < count,
            f"tensor (offset {offset}, size {size}, stride {stride}) reads past the end of "
            f"storage {ref.key!r} ({count} elements of {dtype})",
        )
        itemsize = dtype.itemsize
        view = np.ndarray(
            size,
            dtype=dtype,
            buffer=buf[: count * itemsize],
            offset=offset * itemsize,
            strides=[s * itemsize for s in stride],
        )
        sole = self._uses.get(ref.key, 0) == 1 and ref.byte_offset == 0
        if sole and offset == 0 and numel == count and view.flags.c_contiguous:
            return view  # the storage's own (writable) buffer, no copy
        if numel <= count:
            return np.array(view, order="C")
        view.flags.writeable = False
        return view


def _overlap_span(arr: np.ndarray) -> int | None:
    """How many elements of memory `arr` spans when its elements overlap (stride 0, as left
    by ``expand``: fewer than ``arr.size``); None when they do not (or strides are odd)."""
    if arr.ndim == 0 or arr.size == 0:
        return None
    item = arr.itemsize
    if any(s < 0 or s % item for s in arr.strides):
        return None
    span = 1 + sum((n - 1) * (s // item) for n, s in zip(arr.shape, arr.strides, strict=True))
    return span if span < arr.size else None


def _map_span(arr: np.ndarray, span: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (elementwise, may change the dtype) applied to the `span` elements `arr` reads
    (its strides non-negative), returned as a read-only view with `arr`'s shape and strides."""
    flat = np.lib.stride_tricks.as_strided(arr, (span,), (arr.itemsize,), writeable=False)
    out = np.ascontiguousarray(fn(flat))
    strides = tuple(s // arr.itemsize * out.itemsize for s in arr.strides)
    return np.lib.stride_tricks.as_strided(out, arr.shape, strides, writeable=False)


def _apply_elementwise(arr: np.ndarray, fn: Callable[..., np.ndarray]) -> np.ndarray:
    """``fn`` (a ufunc such as np.negative) on a freshly built tensor: in place when `arr` is
    its own writable buffer, else (an expanded, read-only view) on the memory it spans only."""
    span = _overlap_span(arr)
    if span is not None:
        return _map_span(arr, span, fn)
    if arr.flags.writeable:
        return fn(arr, out=arr)
    return fn(arr)


def cast_bounded(value: Any, dtype: Any) -> np.ndarray:
    """``np.asarray(value, dtype)`` that never allocates more than the memory `value` reads.

    An array whose elements overlap in memory (an expanded / stride-0 tensor from
    `load_torch_file`, which stays a view) is cast as the memory it spans and comes back as a
    read-only view with the same shape, instead of materialising every element; any other
    input is cast as ``np.asarray`` does (its size is what it holds).
    """
    dtype = np.dtype(dtype)
    arr = np.asarray(value)
    if arr.dtype == dtype:
        return arr
    flipped = tuple(i for i, s in enumerate(arr.strides) if s < 0)
    base = np.flip(arr, flipped) if flipped else arr  # non-negative strides, same memory
    span = _overlap_span(base)
    if span is None:
        return arr.astype(dtype)
    out = _map_span(base, span, lambda flat: flat.astype(dtype))
    return np.flip(out, flipped) if flipped else out


class _StorageSource(abc.ABC):
    """Where storage bytes come from (a zip record or a region of a legacy file)."""

    byteorder = "little"

    @abc.abstractmethod
    def read(self, key: str) -> bytearray:
        """The raw bytes of storage ``key``."""


def _read_exactly(stream: BinaryIO, nbytes: int, what: str) -> bytearray:
    out = bytearray(nbytes)
    view = memoryview(out)
    pos = 0
    while pos < nbytes:
        chunk = stream.read(min(_READ_CHUNK, nbytes - pos))
        _require(bool(chunk), f"{what} is truncated ({pos} of {nbytes} bytes)")
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return out


# ----------------------------------------------------------------------------------------------
# The pickle machine
# ----------------------------------------------------------------------------------------------

class _Machine:
    """Interprets one pickle from `stream`; builds only data, allow-listed values and tensors."""

    def __init__(
        self,
        stream: BinaryIO,
        *,
        stream_size: int,
        allow_opaque: bool,
        persistent_load: Callable[[Any], Any],
        sink: _TensorSink,
    ) -> None:
        self._stream = stream
        self._size = stream_size
        self._opaque = allow_opaque
        self._persistent_load = persistent_load
        self._sink = sink
        self._dispatch: dict[int, Callable[[], None]] = {
            getattr(pickle, attr[4:].upper())[0]: getattr(self, attr) for attr in dir(self) if attr.startswith("_op_")
        }

    # -- reading --------------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        if n > _READ_CHUNK:  # never let a length field allocate more than the file holds
            _require(n <= self._size - self._stream.tell(), f"length {n} runs past the end")
        data = self._stream.read(n)
        _require(len(data) == n, "pickle truncated")
        return data

    def _readline(self) -> bytes:
        line = self._stream.readline(_MAX_LINE)
        _require(line.endswith(b"\n"), "pickle truncated or text line too long")
        return line[:-1]

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    # -- running --------------------------------------------------------------------------
    def load(self) -> Any:
        """Runs until STOP and returns the pickled object (the stream is left after STOP)."""
        self._stack: list[Any] = []
        self._metastack: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._result = _NOTHING
        self._proto = 0
        start = self._stream.tell()
        try:
            while self._result is _NOTHING:
                op = self._stream.read(1)
                _require(bool(op), "pickle truncated (no STOP opcode)")
                handler = self._dispatch.get(op[0])
                _require(handler is not None, f"unknown pickle opcode {op!r}")
                handler()
        except (_CorruptError, _RefusedError):
            raise
        except (
            IndexError,  # pop from an empty stack / mark
            KeyError,  # memo miss
            TypeError,  # unhashable key, wrong arity for an allow-listed call ...
            ValueError,  # bad number / text
            OverflowError,
            struct.error,
            RecursionError,
        ) as e:
            where = self._stream.tell() - start
            raise _CorruptError(f"corrupt pickle near byte {where} ({type(e).__name__}: {e})") from e
        return self._result

    def _pop_mark(self) -> list[Any]:
        items = self._stack
        self._stack = self._metastack.pop()
        return items

    def _push(self, x: Any) -> None:
        self._stack.append(x)

    # -- globals and calls ----------------------------------------------------------------
    def _global(self, module: str, name: str) -> Any:
        if self._proto < 3:  # Python 2 names (what pickle's fix_imports maps; nothing imported)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        dotted = f"{module}.{name}"
        if dotted in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[dotted]
        if dotted in _TENSOR_REBUILDERS:
            return _SafeCallable(dotted, getattr(self, "_" + name.lstrip("_")))
        value = _resolve_value_global(dotted)
        if value is not None:
            return value
        if self._opaque:
            return OpaqueGlobal(dotted)
        if dotted in _UNSUPPORTED_TORCH:
            raise _CorruptError(f"unsupported tensor kind {dotted} (only dense tensors are read)")
        raise _RefusedError(f"global {dotted}")

    def _call(self, func: Any, args: Any, kwargs: dict | None = None, *, new: bool) -> Any:
        _require(isinstance(args, tuple), "call arguments are not a tuple")
        if isinstance(func, _SafeCallable) and not kwargs:
            impl = func.new if new else func.call
            if impl is not None:
                return impl(*args)
        if isinstance(func, OpaqueGlobal):
            return OpaqueObject(func.name, args, dict(kwargs or {}))
        what = func.name if hasattr(func, "name") else type(func).__name__
        if self._opaque:
            return OpaqueObject(f"<call of {what}>", args, dict(kwargs or {}))
        raise _RefusedError(f"{'NEWOBJ' if new else 'REDUCE'} of {what}")

    # -- tensor rebuilders (allow-listed torch functions, reimplemented) -------------------
    def _tensor(self, storage: Any, dtype: np.dtype | None, offset, size, stride, meta) -> Any:
        _require(
            isinstance(storage, _StorageRef),
            f"tensor storage is a {type(storage).__name__}, not a storage record",
        )
        _require(dtype is not None, f"unsupported tensor dtype (storage {storage.stype.name})")
        _require(_is_int(offset) and offset >= 0, "bad storage offset")
        size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
        _require(len(size) == len(stride), "tensor size and stride differ in length")
        _require(all(v >= 0 for v in size + stride), "negative tensor size or stride")
        _require(meta is None or isinstance(meta, dict), "bad tensor metadata")
        meta = meta or {}
        _require(set(meta) <= {"conj", "neg"}, f"unsupported tensor metadata {sorted(meta)}")
        _require(not (meta.get("neg") and dtype.kind == "b"), "negated (neg bit) bool tensor")
        out = self._sink.build(storage, dtype, offset, size, stride)
        if meta.get("conj") and dtype.kind == "c":  # the conj bit of a real tensor is a no-op
            out = _apply_elementwise(out, np.conjugate)
        if meta.get("neg"):
            out = _apply_elementwise(out, np.negative)
        return out

    def _typed_dtype(self, storage: Any) -> np.dtype | None:
        _require(isinstance(storage, _StorageRef), "tensor storage is not a storage record")
        name = storage.stype.dtype_name
        _require(name is not None, "typed tensor on an untyped storage")
        return _TORCH_DTYPES[name]

    def _rebuild_tensor(self, storage, offset, size, stride) -> Any:
        return self._tensor(storage, self._typed_dtype(storage), offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad, hooks, metadata=None) -> Any:
        dtype = self._typed_dtype(storage)
        return self._tensor(storage, dtype, offset, size, stride, metadata)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> Any:
        _require(isinstance(dtype, _TorchDtype), "_rebuild_tensor_v3 without a torch dtype")
        _require(dtype.dtype is not None, f"unsupported tensor dtype {dtype.name}")
        return self._tensor(storage, dtype.dtype, offset, size, stride, metadata)

    def _rebuild_parameter(self, data, requires_grad, hooks) -> Any:
        _require(isinstance(data, np.ndarray), "Parameter data is not a tensor")
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, hooks, state) -> Any:
        return self._rebuild_parameter(data, requires_grad, hooks)

    def _rebuild_from_type_v2(self, func, new_type, args, state) -> Any:
        _require(
            isinstance(func, _SafeCallable) and func.name in _TENSOR_REBUILDERS,
            "_rebuild_from_type_v2 of a non-tensor function",
        )
        tensor = self._call(func, args, new=False)
        if isinstance(new_type, _TensorType):
            return tensor
        if isinstance(new_type, OpaqueGlobal):  # a tensor subclass: keep the data, skip the type
            return OpaqueObject(new_type.name, (tensor,), state=state)
        raise _CorruptError("_rebuild_from_type_v2 with a non-type")

    # -- opcodes --------------------------------------------------------------------------
    def _op_proto(self) -> None:
        self._proto = self._read(1)[0]
        _require(self._proto <= 5, "unsupported pickle protocol")

    def _op_frame(self) -> None:
        self._read(8)  # frames are only a read-ahead hint

    def _op_stop(self) -> None:
        self._result = self._stack.pop()

    def _op_mark(self) -> None:
        self._metastack.append(self._stack)
        self._stack = []

    def _op_pop(self) -> None:
        if self._stack:
            self._stack.pop()
        else:
            self._pop_mark()

    def _op_pop_mark(self) -> None:
        self._pop_mark()

    def _op_dup(self) -> None:
        self._push(self._stack[-1])

    def _op_none(self) -> None:
        self._push(None)

    def _op_newtrue(self) -> None:
        self._push(True)

    def _op_newfalse(self) -> None:
        self._push(False)

    def _op_int(self) -> None:
        line = self._readline()
        self._push(False if line == b"00" else True if line == b"01" else int(line))

    def _op_binint(self) -> None:
        self._push(self._unpack("<i"))

    def _op_binint1(self) -> None:
        self._push(self._read(1)[0])

    def _op_binint2(self) -> None:
        self._push(self._unpack("<H"))

    def _op_long(self) -> None:
        line = self._readline()
        self._push(int(line[:-1] if line.endswith(b"L") else line))

    def _op_long1(self) -> None:
        self._push(int.from_bytes(self._read(self._read(1)[0]), "little", signed=True))

    def _op_long4(self) -> None:
        n = self._unpack("<i")
        _require(n >= 0, "negative LONG4 length")
        self._push(int.from_bytes(self._read(n), "little", signed=True))

    def _op_float(self) -> None:
        self._push(float(self._readline()))

    def _op_binfloat(self) -> None:
        self._push(self._unpack(">d"))

    def _op_string(self) -> None:
        data = self._readline()
        _require(len(data) >= 2 and data[0] == data[-1] and data[:1] in b"\"'", "bad STRING")
        self._push(codecs.escape_decode(data[1:-1])[0].decode("latin-1"))

    def _op_binstring(self) -> None:
        n = self._unpack("<i")
        _require(n >= 0, "negative BINSTRING length")
        self._push(self._read(n).decode("latin-1"))

    def _op_short_binstring(self) -> None:
        self._push(self._read(self._read(1)[0]).decode("latin-1"))

    def _op_binbytes(self) -> None:
        self._push(self._read(self._unpack("<I")))

    def _op_short_binbytes(self) -> None:
        self._push(self._read(self._read(1)[0]))

    def _op_binbytes8(self) -> None:
        self._push(self._read(self._unpack("<Q")))

    def _op_bytearray8(self) -> None:
        self._push(bytearray(self._read(self._unpack("<Q"))))

    def _op_unicode(self) -> None:
        self._push(self._readline().decode("raw-unicode-escape"))

    def _op_short_binunicode(self) -> None:
        self._push(self._read(self._read(1)[0]).decode("utf-8", "surrogatepass"))

    def _op_binunicode(self) -> None:
        self._push(self._read(self._unpack("<I")).decode("utf-8", "surrogatepass"))

    def _op_binunicode8(self) -> None:
        self._push(self._read(self._unpack("<Q")).decode("utf-8", "surrogatepass"))

    def _op_empty_tuple(self) -> None:
        self._push(())

    def _op_tuple(self) -> None:
        self._push(tuple(self._pop_mark()))

    def _op_tuple1(self) -> None:
        self._stack[-1] = (self._stack[-1],)

    def _op_tuple2(self) -> None:
        b = self._stack.pop()
        self._stack[-1] = (self._stack[-1], b)

    def _op_tuple3(self) -> None:
        c = self._stack.pop()
        b = self._stack.pop()
        self._stack[-1] = (self._stack[-1], b, c)

    def _op_empty_list(self) -> None:
        self._push([])

    def _op_list(self) -> None:
        self._push(self._pop_mark())

    def _extend(self, items: list[Any]) -> None:
        target = self._stack[-1]
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, OpaqueObject):
            target.listitems.extend(items)
        else:
            raise _RefusedError(f"APPENDS to a {type(target).__name__}")

    def _op_append(self) -> None:
        item = self._stack.pop()
        self._extend([item])

    def _op_appends(self) -> None:
        self._extend(self._pop_mark())

    def _op_empty_dict(self) -> None:
        self._push({})

    def _op_dict(self) -> None:
        items = self._pop_mark()
        _require(len(items) % 2 == 0, "odd number of DICT items")
        self._push(dict(zip(items[::2], items[1::2], strict=True)))

    def _setitems(self, items: list[Any]) -> None:
        _require(len(items) % 2 == 0, "odd number of SETITEMS items")
        target = self._stack[-1]
        if isinstance(target, dict):
            for k, v in zip(items[::2], items[1::2], strict=True):
                target[k] = v
        elif isinstance(target, OpaqueObject):
            for k, v in zip(items[::2], items[1::2], strict=True):
                target.dictitems[k] = v
        else:
            raise _RefusedError(f"SETITEMS on a {type(target).__name__}")

    def _op_setitem(self) -> None:
        value = self._stack.pop()
        key = self._stack.pop()
        self._setitems([key, value])

    def _op_setitems(self) -> None:
        self._setitems(self._pop_mark())

    def _op_empty_set(self) -> None:
        self._push(set())

    def _op_additems(self) -> None:
        items = self._pop_mark()
        target = self._stack[-1]
        if isinstance(target, set):
            target.update(items)
        elif isinstance(target, OpaqueObject):
            target.listitems.extend(items)
        else:
            raise _RefusedError(f"ADDITEMS on a {type(target).__name__}")

    def _op_frozenset(self) -> None:
        self._push(frozenset(self._pop_mark()))

    def _op_put(self) -> None:
        self._memo[int(self._readline())] = self._stack[-1]

    def _op_binput(self) -> None:
        self._memo[self._read(1)[0]] = self._stack[-1]

    def _op_long_binput(self) -> None:
        self._memo[self._unpack("<I")] = self._stack[-1]

    def _op_memoize(self) -> None:
        self._memo[len(self._memo)] = self._stack[-1]

    def _op_get(self) -> None:
        self._push(self._memo[int(self._readline())])

    def _op_binget(self) -> None:
        self._push(self._memo[self._read(1)[0]])

    def _op_long_binget(self) -> None:
        self._push(self._memo[self._unpack("<I")])

    def _op_global(self) -> None:
        module = self._readline().decode("utf-8")
        name = self._readline().decode("utf-8")
        self._push(self._global(module, name))

    def _op_stack_global(self) -> None:
        name = self._stack.pop()
        module = self._stack.pop()
        _require(isinstance(module, str) and isinstance(name, str), "STACK_GLOBAL of non-strings")
        self._push(self._global(module, name))

    def _op_reduce(self) -> None:
        args = self._stack.pop()
        self._stack[-1] = self._call(self._stack[-1], args, new=False)

    def _op_newobj(self) -> None:
        args = self._stack.pop()
        self._stack[-1] = self._call(self._stack[-1], args, new=True)

    def _op_newobj_ex(self) -> None:
        kwargs = self._stack.pop()
        args = self._stack.pop()
        _require(isinstance(kwargs, dict), "NEWOBJ_EX keyword arguments are not a dict")
        self._stack[-1] = self._call(self._stack[-1], args, kwargs, new=True)

    def _op_inst(self) -> None:
        module = self._readline().decode("utf-8")
        name = self._readline().decode("utf-8")
        args = tuple(self._pop_mark())
        self._push(self._call(self._global(module, name), args, new=False))

    def _op_obj(self) -> None:
        items = self._pop_mark()
        cls = items.pop(0)
        self._push(self._call(cls, tuple(items), new=False))

    def _op_build(self) -> None:
        state = self._stack.pop()
        target = self._stack[-1]
        if isinstance(target, OpaqueObject):
            target.state = state
        elif type(target) is collections.OrderedDict:
            # attributes of a state_dict (its `_metadata`), as torch's weights_only loader allows
            _require(
                isinstance(state, dict),
                f"BUILD on an OrderedDict with a {type(state).__name__} state (torch writes a "
                "dict of attributes such as _metadata)",
            )
            _require(all(isinstance(k, str) for k in state), "OrderedDict state keys not str")
            # an attribute named like a dict method or a dunder would shadow it (`items`
            # becoming an int breaks every reader of the state_dict): never torch's output
            shadowing = sorted(k for k in state if k.startswith("__") or hasattr(type(target), k))
            _require(
                not shadowing,
                f"BUILD on an OrderedDict sets attribute(s) {shadowing[:5]} that would shadow "
                "its methods (torch only writes attributes such as _metadata)",
            )
            target.__dict__.update(state)
        else:
            raise _RefusedError(f"BUILD (__setstate__) on a {type(target).__name__}")

    def _op_persid(self) -> None:
        self._push(self._persistent_load(self._readline().decode("ascii")))

    def _op_binpersid(self) -> None:
        self._stack[-1] = self._persistent_load(self._stack[-1])

    def _op_ext1(self) -> None:
        raise _RefusedError("opcode EXT1 (copyreg extension registry)")

    _op_ext2 = _op_ext4 = _op_ext1

    def _op_next_buffer(self) -> None:
        raise _CorruptError("out-of-band pickle buffers are not supported")

    _op_readonly_buffer = _op_next_buffer


_NOTHING = object()


# ----------------------------------------------------------------------------------------------
# Persistent ids (storage records)
# ----------------------------------------------------------------------------------------------


def _storage_pid(pid: Any, *, legacy: bool) -> _StorageRef | Any:
    """Checks a persistent id and returns the storage it names (legacy: maybe a view of one)."""
    _require(isinstance(pid, tuple) and len(pid) >= 1, "persistent id is not a tuple")
    tag = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if legacy and tag == "module" and len(pid) == 4:  # a whole nn.Module saved with torch.save
        if isinstance(pid[1], OpaqueGlobal):
            return pid[1]
        raise _RefusedError("a pickled torch.nn.Module")
    _require(tag == "storage", f"unknown persistent id type {tag!r}")
    _require(len(pid) == (6 if legacy else 5), f"malformed storage id of length {len(pid)}")
    stype, key, location, numel = pid[1:5]
    if isinstance(stype, OpaqueGlobal):
        raise _CorruptError(f"unknown storage type {stype.name}")
    _require(isinstance(stype, _StorageType), "storage id without a storage type")
    _require(isinstance(key, str) and _is_int(numel) and numel >= 0, "malformed storage id")
    _require(isinstance(location, (str, bytes)), "malformed storage location")
    _require(
        stype.dtype_name is None or _TORCH_DTYPES[stype.dtype_name] is not None,
        f"unsupported storage type {stype.name}",
    )
    ref = _StorageRef(key, stype, numel)
    if legacy and pid[5] is not None:
        view = pid[5]
        _require(isinstance(view, tuple) and len(view) == 3, "malformed storage view")
        _view_key, offset, view_numel = view
        _require(_is_int(offset) and _is_int(view_numel) and min(offset, view_numel) >= 0, "bad view")
        item = _itemsize(stype)
        ref = _StorageRef(key, stype, view_numel, offset * item, view_numel * item)
    return ref


def _itemsize(stype: _StorageType) -> int:
    if stype.dtype_name is None:
        return 1
    dtype = _TORCH_DTYPES[stype.dtype_name]
    assert dtype is not None  # checked by _storage_pid
    return dtype.itemsize


def _no_pids(pid: Any) -> Any:
    raise _CorruptError("unexpected persistent id (storage reference) outside a checkpoint")


# ----------------------------------------------------------------------------------------------
# Zip format
# ----------------------------------------------------------------------------------------------

_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    struct.error,
    NotImplementedError,  # unknown compression method
    RuntimeError,  # "encrypted, password required"
    OSError,  # bz2 data errors
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
)


class _ZipSource(_StorageSource):
    def __init__(self, zf: zipfile.ZipFile, prefix: str, archive_size: int) -> None:
        self._zf = zf
        self._prefix = prefix
        self._size = archive_size

    def info(self, name: str) -> zipfile.ZipInfo:
        try:
            info = self._zf.getinfo(f"{self._prefix}/{name}")
        except KeyError:
            raise _CorruptError(f"record {self._prefix}/{name} is missing from the archive") from None
        end = info.header_offset + info.compress_size
        _require(end <= self._size, f"record {info.filename} runs past the end of the file")
        limit = info.compress_size  # stored records (what torch writes) are their own size
        if info.compress_type != zipfile.ZIP_STORED:
            limit = 1032 * info.compress_size + 1024  # deflate's best ratio: refuse zip bombs
        _require(info.file_size <= limit, f"record {info.filename} claims an impossible size")
        return info

    def read_record(self, name: str) -> bytearray:
        info = self.info(name)
        with self._zf.open(info) as stream:
            return _read_exactly(stream, info.file_size, f"record {info.filename}")

    def declare(self, ref: _StorageRef) -> None:
        nbytes = ref.numel * _itemsize(ref.stype)
        size = self.info(f"data/{ref.key}").file_size
        _require(
            size == nbytes,
            f"storage data/{ref.key} holds {size} bytes, its id says {nbytes}",
        )

    def read(self, key: str) -> bytearray:
        return self.read_record(f"data/{key}")


def _load_zip(path: str, fh: BinaryIO, size: int, allow_opaque: bool, limit: int) -> Any:
    zf = zipfile.ZipFile(fh)
    names = zf.namelist()
    _require(bool(names), "empty zip archive, not a torch checkpoint")
    prefix = names[0].split("/", 1)[0]
    if f"{prefix}/data.pkl" not in names:
        raise _CorruptError("zip archive without <archive>/data.pkl: not a torch.save checkpoint")
    if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
        raise _CorruptError("a TorchScript archive (torch.jit.save): only torch.save files are read")
    source = _ZipSource(zf, prefix, size)
    if f"{prefix}/byteorder" in names:
        order = bytes(source.read_record("byteorder"))
        _require(order in (b"little", b"big"), f"unknown byteorder {order[:16]!r}")
        source.byteorder = order.decode()
    pkl = bytes(source.read_record("data.pkl"))

    def persistent_load(pid: Any) -> Any:
        ref = _storage_pid(pid, legacy=False)
        if isinstance(ref, _StorageRef):
            source.declare(ref)
        return ref

    def run(sink: _TensorSink) -> Any:
        machine = _Machine(
            io.BytesIO(pkl),
            stream_size=len(pkl),
            allow_opaque=allow_opaque,
            persistent_load=persistent_load,
            sink=sink,
        )
        return machine.load()

    counter = _TensorSink(limit, size)
    run(counter)
    return run(_Materializer(source, counter.uses))


# ----------------------------------------------------------------------------------------------
# Legacy (pre-1.6) format and bare pickles
# ----------------------------------------------------------------------------------------------


class _LegacySource(_StorageSource):
    def __init__(self, fh: BinaryIO, regions: dict[str, tuple[int, int]]) -> None:
        self._fh = fh
        self._regions = regions  # key -> (file offset, nbytes)

    def read(self, key: str) -> bytearray:
        _require(key in self._regions, f"storage {key!r} has no data in the file")
        offset, nbytes = self._regions[key]
        here = self._fh.tell()
        self._fh.seek(offset)
        try:
            return _read_exactly(self._fh, nbytes, f"storage {key!r}")
        finally:
            self._fh.seek(here)


def _load_pickle_stream(path: str, fh: BinaryIO, size: int, allow_opaque: bool, limit: int) -> Any:
    def machine(persistent_load: Callable[[Any], Any], sink: _TensorSink) -> _Machine:
        return _Machine(
            fh,
            stream_size=size,
            allow_opaque=allow_opaque,
            persistent_load=persistent_load,
            sink=sink,
        )

    first = machine(_no_pids, _TensorSink()).load()
    if not (_is_int(first) and first == _LEGACY_MAGIC):
        return first  # a plain pickle (read by the same safe machine); no tensors in it
    protocol = machine(_no_pids, _TensorSink()).load()
    _require(protocol == _LEGACY_PROTOCOL, f"legacy checkpoint protocol {protocol!r} unsupported")
    sys_info = machine(_no_pids, _TensorSink()).load()
    _require(isinstance(sys_info, dict), "legacy checkpoint without its sys_info record")

    refs: dict[str, _StorageRef] = {}

    def persistent_load(pid: Any) -> Any:
        ref = _storage_pid(pid, legacy=True)
        if isinstance(ref, _StorageRef):
            known = refs.setdefault(ref.key, ref)
            _require(
                _itemsize(known.stype) == _itemsize(ref.stype),
                f"storage {ref.key!r} used with two element sizes",
            )
        return ref

    body = fh.tell()
    counter = _TensorSink(limit, size)
    machine(persistent_load, counter).load()
    keys = machine(_no_pids, _TensorSink()).load()
    _require(isinstance(keys, list) and all(isinstance(k, str) for k in keys), "bad storage key list")
    regions: dict[str, tuple[int, int]] = {}
    for key in keys:
        _require(key in refs, f"storage {key!r} listed but never used")
        (numel,) = struct.unpack("<q", _read_exactly(fh, 8, f"storage {key!r} header"))
        nbytes = numel * _itemsize(refs[key].stype)
        start = fh.tell()
        _require(0 <= nbytes <= size - start, f"storage {key!r} runs past the end of the file")
        regions[key] = (start, nbytes)
        fh.seek(start + nbytes)
    missing = sorted(set(refs) - set(regions))
    _require(not missing, f"storages {missing[:5]} have no data in the file")
    fh.seek(body)
    return machine(persistent_load, _Materializer(_LegacySource(fh, regions), counter.uses)).load()


# ----------------------------------------------------------------------------------------------
# Public API: load
# ----------------------------------------------------------------------------------------------


def load_torch_file(
    path: str | os.PathLike, *, allow_opaque: bool = False, max_bytes: int | None = None
) -> Any:
    """Reads a ``torch.save`` file (zip or legacy format) without torch and without running code.

    Returns the saved object as nested dict/OrderedDict/list/tuple/set/scalars/str/bytes/None
    with ``np.ndarray`` leaves for tensors (``torch.Size`` becomes a tuple, ``nn.Parameter`` an
    array, ``torch.device`` its string). Distinct tensors never share memory, even where they
    shared a storage in torch (one tensor object saved twice is one array); expanded (stride-0)
    tensors come back as read-only views (negated / conjugated ones too: the sign is applied to
    the stored elements only). With ``allow_opaque`` any global outside the allow-list becomes
    an inert `OpaqueGlobal`/`OpaqueObject` instead of an error.

    Memory is bounded: nothing is materialised beyond the bytes the file holds, except copies
    of tensors that share a storage, and the tensors together may describe at most
    ``max_bytes`` of array data, counting each at its full size (elements x itemsize, an
    expanded view too, since a consumer may materialise it). ``None`` (the default) allows
    ``max(DEFAULT_MAX_BYTES, 2 x the file size)``: 4 GiB or twice the file, whichever is more.
    A file that describes more is refused (before any storage is read) with a
    CheckpointFormatError naming both sizes.

    Raises:
      FileNotFoundError: `path` does not exist.
      UnsafeCheckpointError: the file asks for a global or opcode outside the allow-list.
      CheckpointFormatError: the file is corrupt, truncated, not a torch checkpoint, or
        describes more array data than ``max_bytes``.
      MemoryError: the host ran out of memory for a file within the limit (the message names it).
    """
    path = os.fspath(path)
    if max_bytes is not None and (not _is_int(max_bytes) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        limit = max(DEFAULT_MAX_BYTES, 2 * size) if max_bytes is None else max_bytes
        head = fh.read(512)
        fh.seek(0)
        try:
            if not head:
                raise _CorruptError("empty file, not a torch checkpoint")
            if head[:2] == b"PK":
                return _load_zip(path, fh, size, allow_opaque, limit)
            if len(head) >= 262 and head[257:262] == b"ustar":
                raise _CorruptError("legacy tar checkpoint (torch < 0.4) is not supported")
            try:
                return _load_pickle_stream(path, fh, size, allow_opaque, limit)
            except _CorruptError as e:
                if head[0] == pickle.PROTO[0]:
                    raise
                raise _CorruptError(
                    "not a torch checkpoint: neither a zip archive nor a binary pickle "
                    f"(starts with {head[:16]!r}; {e})"
                ) from e
        except _RefusedError as e:
            raise UnsafeCheckpointError(
                path, str(e), "use allow_opaque=True to skip it as an inert placeholder"
            ) from None
        except _CorruptError as e:
            raise CheckpointFormatError(path, str(e)) from e.__cause__
        except (CheckpointFormatError, UnsafeCheckpointError):
            raise
        except _ZIP_ERRORS as e:
            raise CheckpointFormatError(path, f"corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e
        except MemoryError as e:
            raise MemoryError(
                f"{path}: out of memory reading a checkpoint of {_human(size)} (within the limit "
                f"of {_human(limit)} of array data)"
            ) from e


# ----------------------------------------------------------------------------------------------
# Public API: save
# ----------------------------------------------------------------------------------------------

# numpy dtype -> (typed storage class or None for UntypedStorage + _rebuild_tensor_v3, torch dtype)
_WRITE_DTYPES: dict[np.dtype, tuple[str | None, str]] = {}
for _name, _dt in _TORCH_DTYPES.items():
    if _dt is not None:
        _storage = next((s for s, d in _STORAGE_TYPES.items() if d == _name), None)
        _WRITE_DTYPES[_dt] = (_storage, _name)


class _Emitter:
    """Writes a protocol-2 pickle the way torch.save does, tensors as persistent storage ids."""

    def __init__(self) -> None:
        self.out = bytearray(pickle.PROTO + b"\x02")
        self.storages: list[np.ndarray] = []
        self._memo: dict[int, int] = {}
        self._keep: list[Any] = []  # keeps memoised arrays alive so ids stay unique
        self._active: set[int] = set()

    def _global(self, module: str, name: str) -> None:
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode()

    def _str(self, s: str) -> None:
        data = s.encode("utf-8", "surrogatepass")
        self.out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += pickle.BININT1 + bytes([v])
        elif 0 <= v < 65536:
            self.out += pickle.BININT2 + struct.pack("<H", v)
        elif -(2**31) <= v < 2**31:
            self.out += pickle.BININT + struct.pack("<i", v)
        else:
            data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            if len(data) > 255:
                raise ValueError(f"integer {v} is too large to save")
            self.out += pickle.LONG1 + bytes([len(data)]) + data

    def _tuple(self, items: tuple, where: str) -> None:
        if not items:
            self.out += pickle.EMPTY_TUPLE
            return
        if len(items) > 3:
            self.out += pickle.MARK
        for i, item in enumerate(items):
            self.emit(item, f"{where}[{i}]")
        self.out += {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(items), pickle.TUPLE)

    def _ordered_dict(self) -> None:
        self._global("collections", "OrderedDict")
        self.out += pickle.EMPTY_TUPLE + pickle.REDUCE

    def _memo_put(self, obj: Any) -> None:
        index = len(self._memo)
        self._memo[id(obj)] = index
        self._keep.append(obj)
        self.out += pickle.BINPUT + bytes([index]) if index < 256 else pickle.LONG_BINPUT + struct.pack("<I", index)

    def emit(self, obj: Any, where: str) -> None:
        """Appends `obj`; `where` names its place (e.g. "obj['blocks'][0]") for errors."""
        if obj is None:
            self.out += pickle.NONE
        elif obj is True or obj is False:
            self.out += pickle.NEWTRUE if obj else pickle.NEWFALSE
        elif isinstance(obj, (np.ndarray, np.generic)) or (
            hasattr(obj, "__array__") and hasattr(obj, "dtype") and hasattr(obj, "shape")
        ):
            self._tensor(obj, where)
        elif isinstance(obj, int):
            self._int(int(obj))
        elif isinstance(obj, float):
            self.out += pickle.BINFLOAT + struct.pack(">d", obj)
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, bytes):
            self._global("_codecs", "encode")
            self._str(obj.decode("latin-1"))
            self._str("latin1")
            self.out += pickle.TUPLE2 + pickle.REDUCE
        elif isinstance(obj, (dict, list, tuple)):
            if id(obj) in self._active:
                raise ValueError(f"{where} contains itself; cannot save a cyclic structure")
            self._active.add(id(obj))
            try:
                self._container(obj, where)
            finally:
                self._active.discard(id(obj))
        else:
            raise TypeError(
                f"{where}: cannot save a {type(obj).__name__} (only dict/list/tuple/int/float/"
                "str/bytes/bool/None and arrays)"
            )

    def _container(self, obj: dict | list | tuple, where: str) -> None:
        if isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                self._ordered_dict()
            else:
                self.out += pickle.EMPTY_DICT
            if obj:
                self.out += pickle.MARK
                for k, v in obj.items():
                    _check_key(k, where)
                    self.emit(k, where)
                    self.emit(v, f"{where}[{k!r}]")
                self.out += pickle.SETITEMS
            attributes = vars(obj) if type(obj) is collections.OrderedDict else {}
            if attributes:  # e.g. a state_dict's `_metadata`, restored by BUILD like torch
                self._container(dict(attributes), f"{where}.__dict__")
                self.out += pickle.BUILD
        elif isinstance(obj, list):
            self.out += pickle.EMPTY_LIST
            if obj:
                self.out += pickle.MARK
                for i, v in enumerate(obj):
                    self.emit(v, f"{where}[{i}]")
                self.out += pickle.APPENDS
        else:
            self._tuple(obj, where)

    def _tensor(self, obj: Any, where: str) -> None:
        if id(obj) in self._memo:  # the same array twice -> one tensor, like torch
            index = self._memo[id(obj)]
            self.out += pickle.BINGET + bytes([index]) if index < 256 else pickle.LONG_BINGET + struct.pack("<I", index)
            return
        original = obj
        arr = np.asarray(obj)
        if arr.dtype.byteorder not in ("=", "|"):
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype not in _WRITE_DTYPES:
            raise TypeError(f"{where}: dtype {arr.dtype} has no torch equivalent")
        storage_class, torch_dtype = _WRITE_DTYPES[arr.dtype]
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # keeps 0-d shapes
        key = str(len(self.storages))
        self.storages.append(arr)
        strides, acc = [], 1
        for n in reversed(arr.shape):  # torch's contiguous strides (size-0 dims count as 1)
            strides.append(acc)
            acc *= max(n, 1)
        strides.reverse()

        self._global("torch._utils", "_rebuild_tensor_v2" if storage_class else "_rebuild_tensor_v3")
        self.out += pickle.MARK + pickle.MARK
        self._str("storage")
        if storage_class:
            self._global("torch", storage_class)
        else:
            self._global("torch.storage", "UntypedStorage")
        self._str(key)
        self._str("cpu")
        self._int(arr.size if storage_class else arr.nbytes)
        self.out += pickle.TUPLE + pickle.BINPERSID
        self._int(0)
        self._tuple(tuple(int(n) for n in arr.shape), where)
        self._tuple(tuple(strides), where)
        self.out += pickle.NEWFALSE
        self._ordered_dict()
        if not storage_class:
            self._global("torch", torch_dtype)
        self.out += pickle.TUPLE + pickle.REDUCE
        self._memo_put(original)


def _check_key(key: Any, where: str) -> None:
    if not isinstance(key, (str, int, float, bool, type(None), bytes, tuple)):
        raise TypeError(f"{where}: cannot save a dict key of type {type(key).__name__}")


def _aligned_extra(offset: int, name: str, zip64: bool) -> bytes:
    """An extra field padding the local header so the record's data starts 64-byte aligned."""
    header = 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = (-(offset + header + 4)) % _ALIGNMENT
    return struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # id "FB", ignored by readers


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new file beside the target, created like any file (mode 0666 less the umask: typically
    0644), unlike ``tempfile.mkstemp``'s 0600, so that the renamed result is readable as usual."""
    for _ in range(100):
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}.pt")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: cannot create a temporary file for {name}")


def save_torch_file(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` in torch's zip checkpoint format (what ``torch.save`` writes).

    `obj` is nested dict/OrderedDict/list/tuple/int/float/str/bytes/bool/None with array
    leaves (numpy, or anything ``np.asarray`` accepts that has ``shape``/``dtype``); a
    top-level mapping is written as an ``OrderedDict`` (as ``state_dict()`` returns). Arrays
    are written C-contiguous in their own dtype (bfloat16/float8 via ml_dtypes), so
    ``torch.load(path, weights_only=True)`` gives bit-identical tensors. The same array object
    appearing twice becomes one shared tensor. The file is written atomically (a temporary file
    beside it, renamed) with the mode of any newly created file (0666 less the umask).
    """
    path = os.fspath(path)
    emitter = _Emitter()
    if isinstance(obj, Mapping) and not isinstance(obj, collections.OrderedDict):
        obj = collections.OrderedDict(obj)
    emitter.emit(obj, "obj")
    emitter.out += pickle.STOP
    pkl = bytes(emitter.out)
    digest = int.from_bytes(hashlib.sha256(pkl).digest()[:16], "big")
    serialization_id = f"{digest:040d}"[-40:]

    records: list[tuple[str, Any, int]] = [
        ("data.pkl", pkl, len(pkl)),
        (".format_version", b"1", 1),
        (".storage_alignment", str(_ALIGNMENT).encode(), len(str(_ALIGNMENT))),
        ("byteorder", b"little", 6),
    ]
    for key, arr in enumerate(emitter.storages):
        if sys.byteorder == "big" and arr.dtype.itemsize > 1:
            arr = arr.byteswap()
        records.append((f"data/{key}", arr, arr.nbytes))
    records += [("version", b"3\n", 2), (".data/serialization_id", serialization_id.encode(), 40)]

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            for name, payload, nbytes in records:
                full = f"archive/{name}"
                info = zipfile.ZipInfo(full, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                info.file_size = nbytes
                zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT
                info.extra = _aligned_extra(fh.tell(), full, zip64)
                with zf.open(info, "w", force_zip64=zip64) as dest:
                    if isinstance(payload, np.ndarray):
                        flat = payload.reshape(-1).view(np.uint8)
                        for start in range(0, flat.size, _READ_CHUNK):
                            dest.write(flat[start : start + _READ_CHUNK].data)
                    else:
                        dest.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
