"""Read and write PyTorch checkpoint files without torch, never running code from the file.

``torch.save`` (torch >= 1.6) writes a zip archive: ``<archive>/data.pkl`` is a pickle whose
persistent ids ``("storage", StorageType, key, location, numel)`` name raw little-endian storages
``<archive>/data/<key>``. The pickle goes through the C `pickle.Unpickler` with a ``find_class``
that maps an allow-list (tensor rebuild functions, ``OrderedDict``, ``torch.Size``, dtypes, storage
types ...) to immutable local stand-ins and imports nothing: any other global raises
`UnsafeCheckpointError`, or with ``allow_opaque=True`` becomes an inert `OpaqueObject` (a
Lightning ``.ckpt``'s hyper-parameters). Legacy (torch < 1.6) and big-endian files are refused.
`save_torch_file` writes what ``torch.save`` writes (``torch.load(weights_only=True)`` loads it).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import hashlib
import io
import lzma
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from marlin_jax.files import atomic_path

__all__ = ["DEFAULT_MAX_BYTES", "CheckpointFormatError", "OpaqueObject", "UnsafeCheckpointError",
           "cast_bounded", "load_torch_file", "save_torch_file"]

DEFAULT_MAX_BYTES = 4 << 30  # array data a file may describe by default (or twice its size)
_LEGACY = "a legacy (torch < 1.6) checkpoint: not supported; load it with torch and save it again"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a torch < 1.6 file
_ALIGNMENT = 64
_CHUNK = 1 << 24
_OPCODES = frozenset(op.code.encode("latin-1")[0] for op in pickletools.opcodes)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError, struct.error,
               RuntimeError, OSError, ValueError, KeyError, IndexError, OverflowError)  # RuntimeError: encrypted


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (corrupt, truncated or unsupported)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:  # picklable across processes despite the 2-argument init
        return type(self), (self.path, self.problem)


class UnsafeCheckpointError(ValueError):
    """The checkpoint asks for a global or an opcode outside the allow-list (it could run code)."""

    def __init__(self, path: str | os.PathLike, refused: str, hint: str = ""):
        self.path, self.refused, self.hint = os.fspath(path), refused, hint
        msg = f"{self.path}: refused {refused}: not a tensor or a plain container"
        super().__init__(msg + (f" ({hint})" if hint else ""))

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.refused, self.hint)


class _CorruptError(Exception):
    """Raised while reading; becomes CheckpointFormatError with the file name."""


class _RefusedError(Exception):
    """Raised while reading; becomes UnsafeCheckpointError with the file name."""


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise _CorruptError(problem)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x: Any, what: str) -> tuple[int, ...]:
    _require(isinstance(x, (tuple, list)) and all(_is_int(v) and v >= 0 for v in x), f"bad {what}")
    return tuple(x)


def _human(nbytes: int) -> str:
    """A byte count for messages: "3.64 TiB (4000000000000 bytes)"."""
    exp = min(max(nbytes.bit_length() - 1, 0) // 10, 6)  # 1024**exp <= nbytes, up to EiB
    return f"{nbytes} bytes" if exp == 0 else f"{nbytes / 1024**exp:.2f} {'BKMGTPE'[exp]}iB ({nbytes} bytes)"


# -- the allow-list -----------------------------------------------------------------------------


class _Frozen(type):
    def __setattr__(cls, name: str, value: Any) -> None:  # a pickle's BUILD must not edit a class
        raise AttributeError(f"placeholder class {cls.__name__} is read-only")


class OpaqueObject(metaclass=_Frozen):
    """An inert record of an object whose class is outside the allow-list (``allow_opaque``).

    Its class is a placeholder per dotted name (``obj.name``, e.g. "argparse.Namespace"; also what
    a bare reference to that global loads as). ``args``/``kwargs``/``state``/``listitems``/
    ``dictitems``: what the pickle passed, gave ``__setstate__``, appended / set.
    """

    name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.listitems, obj.dictitems = args, kwargs, None, [], {}
        return obj

    def __setstate__(self, state: Any) -> None:  # BUILD
        self.state = state

    def extend(self, items: Any) -> None:  # APPEND(S)
        self.listitems.extend(items)

    def add(self, item: Any) -> None:  # ADDITEMS
        self.listitems.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    def __repr__(self) -> str:  # shallow: the contents may be self-referential
        return f"OpaqueObject({self.name}, {len(self.args)} args)"


_DTYPES = {n: np.dtype(getattr(np, n, None) or getattr(ml_dtypes, n)) for n in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32",
    "uint64", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu")}
_TYPED_STORAGES = {  # torch's typed storage classes (written with _rebuild_tensor_v2) -> dtype name
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128"}
_TENSOR_FUNCTIONS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_from_type_v2")


class _Value(NamedTuple):  # NamedTuples have no __dict__ and no __setstate__: BUILD cannot edit them
    kind: str  # "dtype", "storage" (dtype None: UntypedStorage, bytes) or "tensor" (a tensor type)
    name: str
    dtype: np.dtype | None = None


class _StorageRef(NamedTuple):
    key: str
    dtype: np.dtype | None


class _Call(NamedTuple):
    """An allow-listed function: REDUCE calls it; NEWOBJ (which needs a class) is refused."""

    name: str
    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:  # how protocol 2 pickles `bytes`
    _require(isinstance(text, str) and encoding in ("latin1", "latin-1"), "_codecs.encode of non-latin-1 text")
    return text.encode("latin-1")


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:  # never bytearray(<size>)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data.encode("latin-1"))
    _require(isinstance(data, bytes) and encoding is None, "bytearray arguments are not bytes")
    return bytearray(data)


def _torch_device(spec: Any, index: Any = None) -> str:  # its string, e.g. "cuda:0"
    _require(isinstance(spec, str) and (index is None or _is_int(index)), "bad torch.device")
    return spec if index is None else f"{spec}:{index}"


_PLAIN = {"builtins.set": set, "builtins.frozenset": frozenset, "builtins.slice": slice, "builtins.complex": complex,
          "builtins.bytearray": _bytearray, "_codecs.encode": _codecs_encode, "torch.device": _torch_device,
          "torch.Size": lambda dims=(): _ints(dims, "torch.Size")}


def _value_global(module: str, name: str) -> _Value | None:
    """Allow-listed globals that are values (dtypes, storage and tensor types), else None."""
    if module == "torch" and name in _DTYPES:
        return _Value("dtype", f"torch.{name}", _DTYPES[name])
    if module in ("torch", "torch.cuda", "torch.storage") and name in (*_TYPED_STORAGES, "UntypedStorage"):
        return _Value("storage", f"{module}.{name}", _DTYPES.get(_TYPED_STORAGES.get(name, "")))
    if f"{module}.{name}" in ("torch.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter"):
        return _Value("tensor", f"{module}.{name}")
    return None


# -- reading ------------------------------------------------------------------------------------


def _record_info(zf: zipfile.ZipFile, name: str, file_size: int) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise _CorruptError(f"record {name} is missing from the archive") from None
    _require(info.header_offset + info.compress_size <= file_size, f"record {name} runs past the end of the file")
    compressed = info.compress_type != zipfile.ZIP_STORED  # deflate's best ratio is 1032: no zip bombs
    _require(info.file_size <= (1032 * info.compress_size + 1024 if compressed else info.compress_size),
             f"record {name} claims an impossible size")
    return info


def _read_record(zf: zipfile.ZipFile, name: str, file_size: int) -> bytearray:
    info = _record_info(zf, name, file_size)
    out = bytearray(info.file_size)
    view = memoryview(out)  # (assigning to a slice of the bytearray itself would copy first)
    try:
        with zf.open(info) as stream:
            for pos in range(0, len(out), _CHUNK):
                chunk = stream.read(min(_CHUNK, len(out) - pos))
                _require(len(chunk) == min(_CHUNK, len(out) - pos), f"record {name} is truncated")
                view[pos : pos + len(chunk)] = chunk
    except _ZIP_ERRORS as e:
        raise _CorruptError(f"record {name} is corrupt ({type(e).__name__}: {e})") from e
    return out


class _Unpickler(pickle.Unpickler):
    """Builds only data, allow-listed values, placeholders (``allow_opaque``) and tensors, whose
    storages are records of `zf` (checked against their ids, each read once when first used)."""

    def __init__(self, data: bytes, allow_opaque: bool, zf: zipfile.ZipFile | None = None, prefix: str = "",
                 file_size: int = 0, limit: int = 0) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.allow_opaque, self.zf, self.prefix, self.file_size, self.limit = allow_opaque, zf, prefix, file_size, limit
        self.total = 0  # logical bytes (elements x itemsize) of the tensors built so far
        self.raw: dict[str, bytearray] = {}
        self.taken: set[str] = set()  # storages handed out as some tensor's own buffer
        self.dicts: list[dict] = []  # OrderedDicts / Counters built: their attributes are checked
        self.placeholders: dict[str, type[OpaqueObject]] = {}
        self.allowed = {f"torch._utils.{n}": _Call(n, getattr(self, n)) for n in _TENSOR_FUNCTIONS}
        self.allowed["torch._tensor._rebuild_from_type_v2"] = self.allowed.pop("torch._utils._rebuild_from_type_v2")
        self.allowed.update({name: _Call(name, fn) for name, fn in _PLAIN.items()})
        for cls in (collections.OrderedDict, collections.Counter):
            self.allowed[f"collections.{cls.__name__}"] = _Call(cls.__name__, self._recorded(cls))

    def _recorded(self, cls: type[dict]) -> Callable[..., dict]:
        def make(*args: Any) -> dict:
            self.dicts.append(cls(*args))
            return self.dicts[-1]

        return make

    def find_class(self, module: str, name: str) -> Any:
        """The inert stand-in for an allow-listed global; never imports anything."""
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocol < 3 pickles)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        dotted = f"{module}.{name}"
        found = self.allowed.get(dotted) or _value_global(module, name)
        if found is not None:
            return found
        if self.allow_opaque:
            if dotted not in self.placeholders:
                self.placeholders[dotted] = _Frozen(dotted, (OpaqueObject,), {"name": dotted, "__module__": __name__})
            return self.placeholders[dotted]
        if module.split(".")[0] == "torch" and (name.startswith(("_rebuild", "qint", "quint", "bits"))
                                                or name.endswith("Storage") or name in ("complex32", "_get_layout")):
            raise _CorruptError(f"unsupported tensor kind or dtype {dotted} (only dense tensors of numpy dtypes)")
        raise _RefusedError(f"global {dotted}")

    def check_attributes(self) -> None:
        """Attributes a BUILD set on an OrderedDict / Counter (torch writes ``_metadata``) must not
        shadow its methods (``items`` becoming an int would break every reader)."""
        for d in self.dicts:
            bad = sorted(str(k) for k in vars(d) if not isinstance(k, str) or k.startswith("__") or hasattr(type(d), k))
            _require(not bad, f"BUILD sets attribute(s) {bad[:5]} of an OrderedDict that would shadow its methods "
                              "(torch only writes attributes such as _metadata)")

    def persistent_load(self, pid: Any) -> _StorageRef:
        """A storage id ``("storage", StorageType, key, location, numel)``, checked against its record."""
        _require(self.zf is not None, "a storage reference outside a zip checkpoint")
        _require(isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage", "unknown persistent id")
        _, stype, key, location, numel = pid
        _require(isinstance(stype, _Value) and stype.kind == "storage", "storage id without a storage type")
        _require(isinstance(key, str) and isinstance(location, str) and _is_int(numel), "malformed storage id")
        info = _record_info(self.zf, f"{self.prefix}/data/{key}", self.file_size)
        nbytes = numel * (1 if stype.dtype is None else stype.dtype.itemsize)
        _require(info.file_size == nbytes, f"storage data/{key} holds {info.file_size} bytes, its id says {nbytes}")
        return _StorageRef(key, stype.dtype)

    def _tensor(self, ref: Any, dtype: Any, offset: Any, size: Any, stride: Any, meta: Any) -> np.ndarray:
        """An array sharing memory with no other: the storage's own buffer for the first tensor
        covering it contiguously, a read-only view of a copy of the spanned memory for an expanded
        tensor, else a copy."""
        _require(isinstance(ref, _StorageRef), f"tensor storage is a {type(ref).__name__}, not a storage record")
        dtype = ref.dtype if dtype is None else dtype
        _require(dtype is not None, "typed tensor on an untyped storage")
        _require(_is_int(offset) and offset >= 0, "bad storage offset")
        size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
        _require(len(size) == len(stride), "tensor size and stride differ in length")
        meta = {} if meta is None else meta
        _require(isinstance(meta, dict) and set(meta) <= {"conj", "neg"}, "unsupported tensor metadata")
        conj, neg = bool(meta.get("conj")) and dtype.kind == "c", bool(meta.get("neg"))  # real conj: a no-op
        _require(not (neg and dtype.kind == "b"), "negated (neg bit) bool tensor")
        numel, item = math.prod(size), dtype.itemsize
        self.total += numel * item
        if self.total > self.limit:
            raise _CorruptError(
                f"a tensor of size {size} and stride {stride} ({_human(numel * item)} of {dtype}, from storage "
                f"{ref.key!r}) brings the tensors to {_human(self.total)}, more than the limit of {_human(self.limit)}"
                f" for a file of {_human(self.file_size)} (load_torch_file's max_bytes; raise it only for a trusted "
                "file)")
        if numel == 0:
            return np.zeros(size, dtype)
        if ref.key not in self.raw:
            self.raw[ref.key] = _read_record(self.zf, f"{self.prefix}/data/{ref.key}", self.file_size)
        raw = self.raw[ref.key]
        count, last = len(raw) // item, offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        _require(last < count, f"tensor (offset {offset}, size {size}, stride {stride}) reads past the end of "
                               f"storage {ref.key!r} ({count} elements of {dtype})")
        view = np.ndarray(size, dtype, buffer=raw, offset=offset * item, strides=[s * item for s in stride])

        def copy(a: np.ndarray) -> np.ndarray:  # with the conj / neg bits applied
            a = np.array(a, order="C")
            if conj:
                np.conjugate(a, out=a)
            return np.negative(a, out=a) if neg else a

        if numel > count:  # elements overlap: a view, never an allocation of every element
            return _map_span(view, last - offset + 1, copy)
        if not (conj or neg) and ref.key not in self.taken and offset == 0 and numel == count \
                and view.flags.c_contiguous:
            self.taken.add(ref.key)
            return view
        return copy(view)

    # torch._utils' tensor rebuild functions, reimplemented on _tensor
    def _rebuild_tensor(self, storage, offset, size, stride) -> np.ndarray:
        return self._tensor(storage, None, offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad, hooks, metadata=None) -> np.ndarray:
        return self._tensor(storage, None, offset, size, stride, metadata)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
        _require(isinstance(dtype, _Value) and dtype.kind == "dtype", "_rebuild_tensor_v3 without a torch dtype")
        return self._tensor(storage, dtype.dtype, offset, size, stride, metadata)

    def _rebuild_parameter(self, data, requires_grad, hooks, state=None) -> np.ndarray:
        _require(isinstance(data, np.ndarray), "Parameter data is not a tensor")
        return data

    _rebuild_parameter_with_state = _rebuild_parameter

    def _rebuild_from_type_v2(self, func, new_type, args, state) -> Any:
        _require(isinstance(func, _Call) and func.name in _TENSOR_FUNCTIONS and isinstance(args, tuple),
                 "_rebuild_from_type_v2 of a non-tensor function")
        if isinstance(new_type, _Value) and new_type.kind == "tensor":
            return func(*args)
        _require(isinstance(new_type, type) and issubclass(new_type, OpaqueObject), "_rebuild_from_type_v2 of a "
                                                                                   "non-type")
        obj = new_type(func(*args))  # a tensor subclass: keep the data, skip the type
        obj.state = state
        return obj


def _unpickle(data: bytes, *args: Any) -> Any:
    """The first pickle in `data`. A scan first refuses what the C unpickler does unsafely: EXT
    opcodes (looked up in copyreg's process-wide registry, bypassing find_class) and memo indices
    past the pickle's length (its memo is an array as long as the largest index), and checks
    every length field against the data (the C unpickler allocates before reading)."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name.startswith("EXT"):
                raise _RefusedError(f"opcode {op.name} (copyreg extension registry)")
            _require(op.name not in ("PUT", "BINPUT", "LONG_BINPUT") or arg <= len(data), f"memo index {arg}")
        unpickler = _Unpickler(data, *args)
        try:
            obj = unpickler.load()
            unpickler.check_attributes()
            return obj
        finally:  # its stand-ins are bound methods of it: free the storages without waiting for the gc
            unpickler.raw.clear()
            unpickler.memo.clear()
            unpickler.allowed.clear()
    except (_CorruptError, _RefusedError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - anything else a malformed pickle raises
        raise _CorruptError(f"corrupt pickle ({type(e).__name__}: {e})") from e


def _load(fh: BinaryIO, size: int, allow_opaque: bool, limit: int) -> Any:
    head = fh.read(512)
    fh.seek(0)
    if head[:2] != b"PK":  # a bare pickle (or a legacy file)
        _require(bool(head), "empty file, not a torch checkpoint")
        _require(head[257:262] != b"ustar", _LEGACY)  # torch < 0.4 wrote a tar archive
        what = f"not a torch checkpoint: neither a zip archive nor a binary pickle (starts with {head[:16]!r})"
        _require(head[0] in _OPCODES, what)
        try:
            obj = _unpickle(fh.read(), allow_opaque)
        except _CorruptError as e:
            if head[0] == pickle.PROTO[0]:
                raise
            raise _CorruptError(f"{what}; {e}") from e
        _require(not (_is_int(obj) and obj == _LEGACY_MAGIC), _LEGACY)
        return obj
    zf = zipfile.ZipFile(fh)
    names = zf.namelist()
    _require(bool(names), "empty zip archive, not a torch checkpoint")
    prefix = names[0].split("/", 1)[0]
    _require(f"{prefix}/data.pkl" in names, "zip archive without <archive>/data.pkl: not a torch.save checkpoint")
    _require(f"{prefix}/constants.pkl" not in names and not any(n.startswith(f"{prefix}/code/") for n in names),
             "a TorchScript archive (torch.jit.save): only torch.save files are read")
    if f"{prefix}/byteorder" in names:
        order = bytes(_read_record(zf, f"{prefix}/byteorder", size))
        _require(order != b"big", "a big-endian checkpoint: not supported; load it with torch and save it again")
        _require(order == b"little", f"unknown byteorder {order[:16]!r}")
    return _unpickle(bytes(_read_record(zf, f"{prefix}/data.pkl", size)), allow_opaque, zf, prefix, size, limit)


def load_torch_file(path: str | os.PathLike, *, allow_opaque: bool = False, max_bytes: int | None = None) -> Any:
    """Reads a ``torch.save`` file without torch and without running code.

    Returns nested dict/OrderedDict/list/tuple/set/scalars/str/bytes/None with ``np.ndarray``
    leaves (``torch.Size`` -> tuple, ``nn.Parameter`` -> array, ``torch.device`` -> its string).
    Distinct tensors never share memory; expanded (stride-0) tensors are read-only views. With
    ``allow_opaque`` a global outside the allow-list becomes an inert `OpaqueObject`.

    Memory is bounded: nothing beyond the file's bytes is materialised (except copies of tensors
    sharing a storage), and the tensors together may describe at most ``max_bytes`` of array data,
    each at its full size (``None``: ``max(DEFAULT_MAX_BYTES, 2 x the file size)``); the first
    tensor past it is refused, before its storage is read.

    Raises:
      FileNotFoundError: `path` does not exist.
      UnsafeCheckpointError: the file asks for a global or opcode outside the allow-list.
      CheckpointFormatError: the file is corrupt, truncated, not a torch checkpoint, legacy or
        big-endian, or describes more array data than ``max_bytes``.
      MemoryError: the host ran out of memory for a file within the limit (the message names it).
    """
    path = os.fspath(path)
    if max_bytes is not None and (not _is_int(max_bytes) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        limit = max(DEFAULT_MAX_BYTES, 2 * size) if max_bytes is None else max_bytes
        try:
            return _load(fh, size, allow_opaque, limit)
        except _RefusedError as e:
            raise UnsafeCheckpointError(path, str(e), "use allow_opaque=True to skip it as an inert placeholder") \
                from None
        except _CorruptError as e:
            raise CheckpointFormatError(path, str(e)) from e.__cause__
        except MemoryError as e:
            raise MemoryError(f"{path}: out of memory reading a checkpoint of {_human(size)} (within the limit of "
                              f"{_human(limit)} of array data)") from e
        except _ZIP_ERRORS as e:
            raise CheckpointFormatError(path, f"corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e


def _map_span(arr: np.ndarray, span: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (elementwise, may change the dtype) applied to the `span` elements `arr` reads (its
    strides non-negative), returned as a read-only view with `arr`'s shape and strides."""
    flat = np.lib.stride_tricks.as_strided(arr, (span,), (arr.itemsize,), writeable=False)
    out = np.ascontiguousarray(fn(flat))
    strides = tuple(s // arr.itemsize * out.itemsize for s in arr.strides)
    return np.lib.stride_tricks.as_strided(out, arr.shape, strides, writeable=False)


def cast_bounded(value: Any, dtype: Any) -> np.ndarray:
    """``np.asarray(value, dtype)`` that never allocates more than the memory `value` reads: an
    array whose elements overlap (an expanded tensor from `load_torch_file`) is cast as the memory
    it spans and comes back as a read-only view of the same shape."""
    dtype, arr = np.dtype(dtype), np.asarray(value)
    if arr.dtype == dtype:
        return arr
    flipped = tuple(i for i, s in enumerate(arr.strides) if s < 0)
    base = np.flip(arr, flipped) if flipped else arr  # non-negative strides, same memory
    item = base.itemsize
    span = 1 + sum((n - 1) * (s // item) for n, s in zip(base.shape, base.strides, strict=True))
    if base.size == 0 or span >= base.size or any(s < 0 or s % item for s in base.strides):
        return arr.astype(dtype)  # elements do not overlap (or odd strides)
    out = _map_span(base, span, lambda flat: flat.astype(dtype))
    return np.flip(out, flipped) if flipped else out


# -- writing ------------------------------------------------------------------------------------


class _Global(NamedTuple):
    """A torch name written as a GLOBAL opcode (never imported)."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce wants a callable
        raise TypeError(f"{self.module}.{self.name} is only written into pickles")


class _Storage(NamedTuple):
    pid: tuple  # ("storage", storage type, key, "cpu", numel), as torch writes it


_SAVE_TYPES = (type(None), bool, int, float, str, dict, collections.OrderedDict, list, tuple, _Global)


class _TensorPickler(pickle._Pickler):
    """The stdlib's pure-Python pickler at protocol 2 (as torch.save), with arrays written as
    ``torch._utils._rebuild_tensor_v2/v3`` calls on storages named by persistent ids."""

    dispatch = {**pickle._Pickler.dispatch, _Global: lambda self, g: (
        self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode()), self.memoize(g))}

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, protocol=2)
        self.storages: list[np.ndarray] = []
        self.names: dict[tuple[str, str], _Global] = {}

    def _global(self, module: str, name: str) -> _Global:  # one object per name: memoised like torch
        return self.names.setdefault((module, name), _Global(module, name))

    def persistent_id(self, obj: Any) -> tuple | None:
        return obj.pid if isinstance(obj, _Storage) else None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (np.ndarray, np.generic)) or (
                hasattr(obj, "__array__") and hasattr(obj, "dtype") and hasattr(obj, "shape")):
            return self._tensor(obj)
        if type(obj) is bytes:  # as pickle writes it at protocol 2, the empty string included
            return codecs.encode, (obj.decode("latin-1"), "latin1")
        if type(obj) in _SAVE_TYPES or obj is collections.OrderedDict or obj is codecs.encode:
            return NotImplemented  # pickled as the stdlib does
        raise TypeError(f"cannot save a {type(obj).__name__}: only dict/OrderedDict/list/tuple/str/bytes/int/"
                        "float/bool/None and arrays")

    def _tensor(self, obj: Any) -> tuple:
        arr = np.asarray(obj)
        arr = arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.byteorder == ">" else arr
        name = next((n for n, d in _DTYPES.items() if d == arr.dtype), None)
        if name is None:
            raise TypeError(f"dtype {arr.dtype} has no torch equivalent")
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # keeps 0-d shapes
        key, typed = str(len(self.storages)), next((s for s, n in _TYPED_STORAGES.items() if n == name), None)
        self.storages.append(arr)
        strides = tuple(math.prod(max(n, 1) for n in arr.shape[i + 1 :]) for i in range(arr.ndim))
        stype = self._global("torch", typed) if typed else self._global("torch.storage", "UntypedStorage")
        storage = _Storage(("storage", stype, key, "cpu", arr.size if typed else arr.nbytes))
        args = (storage, 0, tuple(int(n) for n in arr.shape), strides, False, collections.OrderedDict())
        if typed:
            return self._global("torch._utils", "_rebuild_tensor_v2"), args
        return self._global("torch._utils", "_rebuild_tensor_v3"), (*args, self._global("torch", name))


def save_torch_file(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as ``torch.save`` does (zip, pickle protocol 2, 64-byte aligned storages).

    `obj`: nested dict/OrderedDict/list/tuple/int/float/str/bytes/bool/None with array leaves
    (anything else: TypeError); a top-level mapping becomes an ``OrderedDict``. Arrays keep their
    dtype (bfloat16/float8 via ml_dtypes), so ``torch.load(path, weights_only=True)`` gives
    bit-identical tensors; one array object twice becomes one shared tensor. Written atomically
    (a temporary file beside it, renamed) with the mode of a new file (0666 less the umask).
    """
    path = os.fspath(path)
    if isinstance(obj, Mapping) and not isinstance(obj, collections.OrderedDict):
        obj = collections.OrderedDict(obj)
    buffer = io.BytesIO()
    (pickler := _TensorPickler(buffer)).dump(obj)
    pkl = buffer.getvalue()
    serialization_id = f"{int.from_bytes(hashlib.sha256(pkl).digest()[:16], 'big'):040d}"[-40:]
    records = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", str(_ALIGNMENT).encode()),
               ("byteorder", b"little"), *((f"data/{i}", a) for i, a in enumerate(pickler.storages)),
               ("version", b"3\n"), (".data/serialization_id", serialization_id.encode())]
    with (atomic_path(path) as tmp, open(tmp, "xb") as fh,
          zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf):
        for name, payload in records:
            info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.file_size = payload.nbytes if isinstance(payload, np.ndarray) else len(payload)
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
            # an extra field ("FB", ignored by readers) pads the header: data starts 64-byte aligned
            pad = -(fh.tell() + 30 + len(info.filename.encode()) + (20 if zip64 else 0) + 4) % _ALIGNMENT
            info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
            with zf.open(info, "w", force_zip64=zip64) as dest:
                if isinstance(payload, np.ndarray):
                    flat = payload.reshape(-1).view(np.uint8)
                    for start in range(0, flat.size, _CHUNK):
                        dest.write(flat[start : start + _CHUNK].data)
                else:
                    dest.write(payload)
