"""The stage cache: stage results as plain ``.npy`` arrays plus a JSON description — no pickles.

Why this format
---------------
A cache folder is shared (the dask executor needs one folder that every worker reads), so
loading an entry must never run code: an entry is data, and only data. Each entry is a folder::

    .cache/<stage>/<key>/
        a0.npy a1.npy …     every numpy array of the result, one plain .npy each
                            (np.save/np.load with allow_pickle=False; object arrays are refused)
        entry.json          the result's structure with arrays replaced by file references,
                            plus each file's size and checksum; written last

The folder is assembled under ``.cache/<stage>/.tmp-…`` and renamed into place in one step, so
another reader sees a whole entry or none; of two workers writing the same key, the first
rename wins and the second discards its copy.

``.npy`` + ``mmap`` rather than zarr: the results are whole arrays consumed whole or by plain
slicing; a ``.npy`` file memory-maps with no dependency and no decode step (zarr chunks must be
decompressed into RAM, and it is not a dependency of tembench), its header is a literal that
numpy parses without evaluating code, and a 4D-STEM set that ``stem4d`` streamed to a ``.npy``
file (``patterns_path``) *is* already a cache file — it is hard-linked into the entry instead of
copied (a chunked copy when the cache is on another file system). Compression would not pay:
simulated float32 patterns barely compress and decompression would cost RAM and time on every hit.

What a value may hold
---------------------
``None``, ``bool``, ``int``, ``float`` (inf/nan/-0.0 exactly, by bit pattern), ``complex``, ``str``,
``bytes``, ``list``, ``tuple``, ``set``, ``frozenset``, ``dict`` (any representable keys, order
kept), :class:`pathlib.Path`, numpy scalars and dtypes (dtype kept), numpy arrays (no object
dtype; ``np.memmap`` included), and instances of an allowlist of dataclasses: the tembench data
types (:class:`~tembench.types.Sample`, ``Geometry``, ``Measurement``, ``Reconstruction``,
:class:`~tembench.eer.ElectronEvents`, ``RunLengthEvents``) and whatever a plugin registers with
:func:`register_cache_type`. A dataclass is rebuilt with ``object.__new__`` and attribute
assignment (``__init__``/``__post_init__`` do not run, so nothing is copied or re-validated); the
type is looked up by name in the allowlist, never imported. A result holding anything else is
not cached: that stage runs uncached, with a one-line notice — it never fails a run.

Big arrays stay on disk
-----------------------
Arrays of at least :data:`MMAP_THRESHOLD_BYTES` load memory-mapped copy-on-write
(``mmap_mode="c"``): a hit costs page-table entries, not RAM, and a consumer that writes in place
gets private pages — the cache file never changes. Smaller arrays are read into RAM (cheaper
to use, and mapping thousands of tiny files would cost more than it saves). An ``np.memmap``
whose file holds exactly that array (what ``stem4d`` returns) is hard-linked into the entry,
so a streamed data set is never read into RAM or copied on the same file system.

Integrity
---------
``entry.json`` carries a blake2b-128 hash of its own body, and for every array file its size
and a checksum: blake2b-128 over the whole file up to :data:`FULL_HASH_LIMIT_BYTES` (256 MiB);
above that, blake2b-128 over the file size and :data:`SAMPLE_BLOCKS` evenly spaced blocks of
:data:`SAMPLE_BLOCK_BYTES` (the first and the last included) — a truncated or extended file is
always caught by its size, a damaged header by the first block, other damage only when it hits
a sampled block (64 MiB of every file is read, ≈6 % of 1 GiB). A hard-linked file also records
its modification time: the user's file shares the inode, so a later write through either name is
caught even outside the sampled blocks. Checksums are read with ``pread`` (page cache, not the
process's RSS) and each file is verified once per process. A missing, truncated, corrupted or
half-written entry is reported in one line on stderr, discarded and recomputed — never returned.

Pickled entries of the previous cache format (``.cache/<stage>/<key>.pkl``) are never opened:
they are reported once per cache folder and removed by ``tembench cache prune``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import mmap
import os
import pathlib
import secrets
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "tembench-stage-cache"
VERSION = 1
ENTRY_JSON = "entry.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LEGACY_SUFFIX = ".pkl"

#: arrays at least this large load memory-mapped (copy-on-write); smaller ones are read into RAM
MMAP_THRESHOLD_BYTES = 16 * 2**20
#: files up to this size are checksummed whole; larger ones by size + sampled blocks
FULL_HASH_LIMIT_BYTES = 256 * 2**20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 2**20
#: bytes per write/read when streaming arrays and files
CHUNK_BYTES = 8 * 2**20
#: temp folders older than this are abandoned writes (a killed run) and are pruned
STALE_TMP_S = 3600.0

_TAG = "$t"
_MAX_DEPTH = 200


class Unrepresentable(Exception):
    """The value holds something the cache cannot store without pickle."""


class EntryError(Exception):
    """A cache entry is missing, truncated, corrupted or from another format: recompute it."""


class UnknownType(EntryError):
    """The entry holds a dataclass that is not registered in this process."""


# --- notices -----------------------------------------------------------------------------------
_noticed: set[Any] = set()


def notice(message: str, once: Any = None) -> None:
    """One line on stderr (once per ``once`` token per process, if given)."""
    if once is not None:
        if once in _noticed:
            return
        _noticed.add(once)
    print(f"tembench: cache: {message}", file=sys.stderr, flush=True)


# --- the type allowlist ----------------------------------------------------------------------
_TYPES: dict[str, type] = {}


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_cache_type(cls: type) -> type:
    """Allow instances of the dataclass ``cls`` in cached stage results (usable as a decorator).

    Its attributes must themselves be representable (arrays, plain values, other registered
    dataclasses). Decoding rebuilds it with ``object.__new__`` and attribute assignment, without
    calling ``__init__`` or ``__post_init__``.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_cache_type needs a dataclass type, got {cls!r}")
    name = _type_name(cls)
    other = _TYPES.get(name)
    if other is not None and other is not cls:
        raise TypeError(f"register_cache_type: another class is already registered as {name!r}")
    _TYPES[name] = cls
    return cls


def cache_types() -> dict[str, type]:
    """The allowlist: qualified name → dataclass."""
    return dict(_TYPES)


def _register_builtin_types() -> None:
    from tembench.eer import ElectronEvents, RunLengthEvents
    from tembench.types import Geometry, Measurement, Reconstruction, Sample

    for cls in (Sample, Geometry, Measurement, Reconstruction, ElectronEvents, RunLengthEvents):
        register_cache_type(cls)


_register_builtin_types()


# --- checksums ---------------------------------------------------------------------------------
def _blake() -> Any:
    return hashlib.blake2b(digest_size=16)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = os.pread(fd, n - len(out), offset + len(out))
        if not b:
            break
        out += b
    return bytes(out)


def file_digest(path: Path, size: int | None = None) -> tuple[str, str]:
    """(scheme, hex digest) of a file: whole-file blake2b-128, or size + sampled blocks above the limit."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size if size is None else size
        h = _blake()
        if size <= FULL_HASH_LIMIT_BYTES:
            with _Hasher(h) as hasher:  # read the next chunk while the last one is hashed
                pos = 0
                while pos < size:
                    b = _pread_all(fd, min(CHUNK_BYTES, size - pos), pos)
                    if not b:
                        break
                    hasher.update(b)
                    pos += len(b)
            return "blake2b-128", h.hexdigest()
        h.update(b"sampled-v1" + struct.pack("<Q", size))
        span = size - SAMPLE_BLOCK_BYTES
        for i in range(SAMPLE_BLOCKS):
            off = (i * span) // (SAMPLE_BLOCKS - 1)
            h.update(struct.pack("<Q", off))
            h.update(_pread_all(fd, SAMPLE_BLOCK_BYTES, off))
        return f"blake2b-128-sampled-{SAMPLE_BLOCKS}x{SAMPLE_BLOCK_BYTES}", h.hexdigest()
    finally:
        os.close(fd)


class _Hasher:
    """Feeds a hash from a helper thread (hashlib releases the GIL), overlapping hashing with file I/O."""

    def __init__(self, h: Any) -> None:
        self.h = h
        self._pool = None
        self._pending = None

    def __enter__(self) -> _Hasher:
        return self

    def update(self, chunk) -> None:
        if len(chunk) < 2**20:
            self._wait()
            self.h.update(chunk)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tembench-cache-hash")
        self._wait()
        self._pending = self._pool.submit(self.h.update, chunk)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def __exit__(self, *exc) -> None:
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()


def _body_digest(body: dict[str, Any]) -> str:
    text = json.dumps(body, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("ascii"), digest_size=16).hexdigest()


# files verified in this process: (dev, ino, size, mtime_ns, digest)
_verified: set[tuple] = set()


# --- writing arrays ----------------------------------------------------------------------------
def _npy_header(arr: np.ndarray) -> bytes:
    d = np.lib.format.header_data_from_array_1_0(arr)
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header > 64 KiB (a huge structured dtype)
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _data_chunks(arr: np.ndarray):
    """The array's bytes in .npy order (C, or Fortran for F-contiguous arrays), ≤ CHUNK_BYTES each."""
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        flat = (arr if arr.flags.c_contiguous else arr.T).reshape(-1)
        step = max(1, CHUNK_BYTES // max(1, arr.itemsize))
        for i in range(0, flat.size, step):
            yield flat[i:i + step].view(np.uint8).data
    else:  # a strided view: C-order copies of slabs along axis 0
        rows = max(1, CHUNK_BYTES // max(1, arr[0].nbytes)) if arr.shape[0] else 1
        for i in range(0, arr.shape[0], rows):
            yield np.ascontiguousarray(arr[i:i + rows]).reshape(-1).view(np.uint8).data


def _write_npy(path: Path, arr: np.ndarray) -> dict[str, Any]:
    """Stream ``arr`` to a .npy file in chunks (never a second full copy in RAM); return its file record."""
    header = _npy_header(arr)
    size = len(header) + arr.nbytes
    h = _blake() if size <= FULL_HASH_LIMIT_BYTES else None
    with open(path, "wb") as fh, _Hasher(h) as hasher:
        fh.write(header)
        if h is not None:
            hasher.update(header)
        if arr.ndim == 0:
            chunks = [np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data]
        else:
            chunks = _data_chunks(arr)
        for c in chunks:
            if h is not None:
                hasher.update(c)  # hashed in the helper thread while the chunk is written here
            fh.write(c)
    if os.path.getsize(path) != size:
        raise OSError(f"short write to {path}")
    scheme, digest = ("blake2b-128", h.hexdigest()) if h is not None else file_digest(path, size)
    return {"size": size, "scheme": scheme, "digest": digest}


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    with open(path, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {major}")
        return tuple(shape), bool(fortran), dtype, fh.tell()


def _private_pages_untouched(arr: np.memmap) -> bool:
    """True if no page of a copy-on-write mapping was written (Linux /proc/self/smaps); else False."""
    mm = getattr(arr, "_mmap", None)
    if mm is None:
        return False
    try:
        addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        with open("/proc/self/smaps") as fh:
            inside = False
            for line in fh:
                first = line.split(" ", 1)[0]
                if "-" in first and ":" not in first:
                    lo, hi = (int(x, 16) for x in first.split("-"))
                    inside = lo <= addr < hi
                elif inside and line.startswith("Anonymous:"):
                    return int(line.split()[1]) == 0
    except (OSError, ValueError, TypeError, BufferError):
        return False
    return False


def _linkable_source(arr: np.ndarray) -> str | None:
    """The .npy file that holds exactly ``arr`` (a memmap over the file's whole data), else None."""
    if not isinstance(arr, np.memmap) or not getattr(arr, "filename", None) or arr.dtype.hasobject:
        return None
    try:
        shape, fortran, dtype, data_offset = _read_npy_header(Path(arr.filename))
        st = os.stat(arr.filename)
        mm = getattr(arr, "_mmap", None)
        if mm is None:
            return None
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        start = arr.offset - arr.offset % mmap.ALLOCATIONGRANULARITY
    except (OSError, ValueError, TypeError, BufferError):
        return None
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if (fortran or dtype != arr.dtype or not arr.flags.c_contiguous or arr.nbytes != n
            or st.st_size != data_offset + n or arr.offset != data_offset
            or arr.ctypes.data != base + (data_offset - start)):
        return None
    if arr.mode == "c" and not _private_pages_untouched(arr):
        return None  # a consumer may have written private pages: store what the array holds
    return str(arr.filename)


def npy_backing_file(arr: Any) -> tuple[str, int] | None:
    """``(path, data offset)`` of the C-ordered ``.npy`` file that holds exactly ``arr``, else None.

    True for what ``stem4d`` streamed to disk and for big arrays read from this cache: a memmap
    over the file's whole data whose copy-on-write pages were never written. Streaming consumers
    (the noise steps) read such a file chunk by chunk with plain reads, so the data never enters
    the process's resident memory.
    """
    src = _linkable_source(arr) if isinstance(arr, np.memmap) else None
    if src is None:
        return None
    try:
        _, fortran, _, offset = _read_npy_header(Path(src))
    except (OSError, ValueError):
        return None
    return (src, offset) if not fortran else None


def cache_entry_of(path: str | Path) -> Path | None:
    """The entry folder (``.cache/<stage>/<key>``) that holds ``path``, or None for a file outside any entry."""
    d = Path(path).parent
    return d if (d / ENTRY_JSON).is_file() and not d.name.startswith(".") else None


def _copy_file(src: str, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, CHUNK_BYTES)


# --- the encoder -------------------------------------------------------------------------------
class _Encoder:
    def __init__(self, folder: Path | None) -> None:
        self.folder = folder          # None: check representability only, write nothing
        self.files: dict[str, dict[str, Any]] = {}
        self._arrays: dict[int, str] = {}
        self._keep: list[Any] = []    # keep encoded arrays alive so their ids stay unique

    def encode(self, x: Any, where: str = "value", depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise Unrepresentable(f"{where}: nested more than {_MAX_DEPTH} levels (a cycle?)")
        t = type(x)
        if x is None or t is bool or t is str or t is int:
            return x
        if t is float:
            if math.isfinite(x):
                return x
            return {_TAG: "float", "bits": struct.pack("<d", x).hex()}
        if t is list:
            return [self.encode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]
        if t is tuple:
            return {_TAG: "tuple", "items": [self.encode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]}
        if t is dict:
            if all(type(k) is str for k in x) and _TAG not in x:
                return {k: self.encode(v, f"{where}[{k!r}]", depth + 1) for k, v in x.items()}
            return {_TAG: "dict", "items": [[self.encode(k, f"{where}<key>", depth + 1),
                                             self.encode(v, f"{where}[{k!r}]", depth + 1)] for k, v in x.items()]}
        if t is np.ndarray or t is np.memmap:
            return self._array(x, where)
        if isinstance(x, np.generic) and t.__module__ == "numpy":
            if x.dtype.hasobject:
                raise Unrepresentable(f"{where}: numpy object scalar")
            return {_TAG: "npscalar", "dtype": _descr(x.dtype), "hex": x.tobytes().hex()}
        if t is complex:
            return {_TAG: "complex", "re": self.encode(x.real, where), "im": self.encode(x.imag, where)}
        if t is bytes:
            return {_TAG: "bytes", "hex": x.hex()}
        if t is set or t is frozenset:
            return {_TAG: t.__name__, "items": [self.encode(v, f"{where}<item>", depth + 1) for v in x]}
        if t in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
            return {_TAG: "path", "v": str(x), "kind": t.__name__}
        if isinstance(x, np.dtype):
            if x.hasobject:
                raise Unrepresentable(f"{where}: object dtype")
            return {_TAG: "dtype", "descr": _descr(x)}
        name = _type_name(t)
        if _TYPES.get(name) is t:
            state = vars(x) if hasattr(x, "__dict__") else {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
            return {_TAG: "obj", "type": name,
                    "state": {k: self.encode(v, f"{where}.{k}", depth + 1) for k, v in state.items()}}
        raise Unrepresentable(f"{where}: {t.__module__}.{t.__qualname__}")

    def _array(self, arr: np.ndarray, where: str) -> dict[str, Any]:
        if arr.dtype.hasobject:
            raise Unrepresentable(f"{where}: numpy array of dtype {arr.dtype} (objects need pickle)")
        ref = self._arrays.get(id(arr))
        if ref is not None:
            return {_TAG: "array", "file": ref}
        name = f"a{len(self.files)}.npy"
        self._arrays[id(arr)] = name
        self._keep.append(arr)
        record: dict[str, Any] = {"shape": list(arr.shape), "dtype": _descr(arr.dtype),
                                  "fortran": bool(arr.flags.f_contiguous and not arr.flags.c_contiguous)}
        if self.folder is not None:
            record.update(self._store(arr, self.folder / name))
        self.files[name] = record
        return {_TAG: "array", "file": name}

    def _store(self, arr: np.ndarray, path: Path) -> dict[str, Any]:
        src = _linkable_source(arr)
        if src is None:
            return _write_npy(path, arr)
        try:
            os.link(src, path)
            how = "linked"
        except OSError:  # another file system, or hard links not allowed: stream a copy
            _copy_file(src, path)
            how = "copied"
        st = os.stat(path)
        scheme, digest = file_digest(path, st.st_size)
        rec = {"size": st.st_size, "scheme": scheme, "digest": digest, "source": how}
        if how == "linked":
            # the inode is shared with the producer's file: any later write through either name
            # changes the modification time, so the entry is checked against it
            rec["mtime_ns"] = st.st_mtime_ns
        _verified.add((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest))
        return rec


def _descr(dtype: np.dtype) -> Any:
    return json.loads(json.dumps(np.lib.format.dtype_to_descr(dtype)))


def _descr_from_json(d: Any) -> Any:
    """Undo JSON's tuple → list on a ``dtype_to_descr`` description (fields are tuples, shapes too)."""
    if isinstance(d, str):
        return d
    out = []
    for field in d:
        name = field[0] if isinstance(field[0], str) else tuple(field[0])  # (title, name)
        rest = (tuple(field[2]),) if len(field) > 2 else ()
        out.append((name, _descr_from_json(field[1]), *rest))
    return out


def _dtype(descr: Any) -> np.dtype:
    dt = np.lib.format.descr_to_dtype(_descr_from_json(descr))
    if dt.hasobject:
        raise EntryError("object dtype")
    return dt


def representable(value: Any) -> str | None:
    """None if the cache can store ``value``; else where it holds something it cannot."""
    try:
        _Encoder(None).encode(value)
    except Unrepresentable as exc:
        return str(exc)
    return None


# --- the decoder -------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, folder: Path, files: dict[str, Any]) -> None:
        self.folder = folder
        self.files = files
        self._arrays: dict[str, np.ndarray] = {}

    def decode(self, x: Any, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise EntryError("nested too deeply")
        if isinstance(x, list):
            return [self.decode(v, depth + 1) for v in x]
        if not isinstance(x, dict):
            return x
        tag = x.get(_TAG)
        if tag is None:
            return {k: self.decode(v, depth + 1) for k, v in x.items()}
        if tag == "float":
            return struct.unpack("<d", bytes.fromhex(x["bits"]))[0]
        if tag == "tuple":
            return tuple(self.decode(v, depth + 1) for v in x["items"])
        if tag == "dict":
            return {self.decode(k, depth + 1): self.decode(v, depth + 1) for k, v in x["items"]}
        if tag == "array":
            return self._array(x["file"])
        if tag == "npscalar":
            dt = _dtype(x["dtype"])
            raw = bytes.fromhex(x["hex"])
            if len(raw) != dt.itemsize or dt.hasobject:
                raise EntryError("bad numpy scalar")
            return np.frombuffer(raw, dtype=dt)[0].copy()
        if tag == "complex":
            return complex(self.decode(x["re"], depth + 1), self.decode(x["im"], depth + 1))
        if tag == "bytes":
            return bytes.fromhex(x["hex"])
        if tag in ("set", "frozenset"):
            items = [self.decode(v, depth + 1) for v in x["items"]]
            return set(items) if tag == "set" else frozenset(items)
        if tag == "path":
            cls = {"PosixPath": pathlib.PosixPath, "WindowsPath": pathlib.WindowsPath,
                   "PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath}.get(x["kind"])
            if cls is None:
                raise EntryError(f"unknown path kind {x['kind']!r}")
            return (pathlib.Path if cls in (pathlib.PosixPath, pathlib.WindowsPath) else cls)(x["v"])
        if tag == "dtype":
            return _dtype(x["descr"])
        if tag == "obj":
            cls = _TYPES.get(x["type"])
            if cls is None:
                raise UnknownType(f"holds a {x['type']} (not registered with register_cache_type in this process)")
            fields = {f.name for f in dataclasses.fields(cls)}
            for k in x["state"]:
                # only fields, or attributes the class does not define (no property/descriptor setter runs)
                if not isinstance(k, str) or k.startswith("__") or (k not in fields and hasattr(cls, k)):
                    raise EntryError(f"sets a forbidden attribute {k!r} of {x['type']}")
            state = {k: self.decode(v, depth + 1) for k, v in x["state"].items()}
            missing = sorted(fields - set(state))
            if missing:
                raise EntryError(f"its {x['type']} lacks fields {missing} (written by another version)")
            obj = object.__new__(cls)
            for k, v in state.items():
                object.__setattr__(obj, k, v)
            return obj
        raise EntryError(f"unknown tag {tag!r}")

    def _array(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            rec = self.files.get(name)
            if rec is None or "/" in name or name.startswith("."):
                raise EntryError(f"refers to an unlisted file {name!r}")
            arr = _load_array(self.folder / name, rec)
            self._arrays[name] = arr
        return arr


def _verify_file(path: Path, rec: dict[str, Any]) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise EntryError(f"lacks its file {path.name}") from None
    if st.st_size != rec["size"]:
        raise EntryError(f"has {path.name} of {st.st_size} bytes, expected {rec['size']} (truncated?)")
    if "mtime_ns" in rec and st.st_mtime_ns != rec["mtime_ns"]:
        raise EntryError(f"shares {path.name} with a file that was modified after it was cached")
    token = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, rec["digest"])
    if token not in _verified:
        scheme, digest = file_digest(path, st.st_size)
        if scheme != rec["scheme"] or digest != rec["digest"]:
            raise EntryError(f"has a corrupted {path.name} (checksum mismatch)")
        _verified.add(token)
    return st


def _load_array(path: Path, rec: dict[str, Any]) -> np.ndarray:
    _verify_file(path, rec)
    want_dtype = _dtype(rec["dtype"])
    shape = tuple(int(s) for s in rec["shape"])
    try:
        if rec["size"] >= MMAP_THRESHOLD_BYTES:
            arr = np.load(path, mmap_mode="c", allow_pickle=False)
        else:
            arr = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise EntryError(f"has an unreadable {path.name} ({exc})") from None
    if arr.dtype != want_dtype or arr.size != int(np.prod(shape, dtype=np.int64)):
        raise EntryError(f"has {path.name} of dtype {arr.dtype} / shape {arr.shape}, expected {want_dtype} / {shape}")
    if arr.shape != shape:  # a linked producer file with another layout of the same data
        arr = arr.reshape(shape)
    return arr


# --- the cache ---------------------------------------------------------------------------------
def _safe_part(s: str) -> str:
    if not s or "/" in s or "\\" in s or s.startswith(".") or "\x00" in s:
        raise ValueError(f"not a valid cache path component: {s!r}")
    return s


class StageCache:
    """Stage results keyed by content hash, stored as arrays + JSON (see the module docstring)."""

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / _safe_part(stage) / _safe_part(key)

    path = entry_dir

    def legacy_path(self, stage: str, key: str) -> Path:
        """Where the pickle-based cache kept this entry; never opened."""
        return self.root / _safe_part(stage) / f"{_safe_part(key)}{LEGACY_SUFFIX}"

    def has(self, stage: str, key: str) -> bool:
        return self.enabled and (self.entry_dir(stage, key) / ENTRY_JSON).is_file()

    def get(self, stage: str, key: str) -> Any | None:
        """The cached value, or None on a miss; an invalid entry is reported, discarded and missed."""
        if not self.enabled:
            return None
        d = self.entry_dir(stage, key)
        if not (d / ENTRY_JSON).is_file():
            if d.is_dir():
                self._invalid(stage, key, d, "has no entry.json (half-written or damaged)")
            elif self.legacy_path(stage, key).exists():
                notice(f"ignoring pickled entries of the old cache format in {self.root} (never loaded; "
                       f"`tembench cache prune {self.root.parent}` removes them)", once=("legacy", str(self.root)))
            return None
        try:
            value = read_entry(d, stage, key)
        except UnknownType as exc:
            notice(f"{stage} entry {key[:12]} {exc}; recomputing", once=("unknown", stage, str(exc)))
            return None
        except EntryError as exc:
            self._invalid(stage, key, d, str(exc))
            return None
        try:  # last use, for `tembench cache prune --older-than`
            os.utime(d / ENTRY_JSON)
        except OSError:
            pass
        return value

    def put(self, stage: str, key: str, value: Any) -> bool:
        """Store ``value``; False (and a one-line notice) if it cannot be stored. Never raises for that."""
        if not self.enabled:
            return False
        final = self.entry_dir(stage, key)
        if (final / ENTRY_JSON).is_file():
            return True
        parent = final.parent
        tmp = None
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = parent / f"{TMP_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
            write_entry(tmp, stage, key, value)
            try:
                os.rename(tmp, final)
                tmp = None
            except OSError:
                if not (final / ENTRY_JSON).is_file():
                    raise
                # another worker stored the same key first; its entry stands
            return True
        except Unrepresentable as exc:
            notice(f"{stage} results are not cached: {exc} cannot be stored without pickle (register a dataclass "
                   "with tembench.cache.register_cache_type)", once=("unrep", stage, str(exc).split(":")[-1]))
            return False
        except OSError as exc:
            notice(f"could not store a {stage} entry in {parent} ({exc}); the run goes on uncached",
                   once=("oserror", stage, type(exc).__name__))
            return False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _invalid(self, stage: str, key: str, d: Path, why: str) -> None:
        notice(f"{stage} entry {key[:12]} {why}; discarded, recomputing")
        discard(d)


def write_entry(folder: Path, stage: str, key: str, value: Any) -> None:
    """Write ``value``'s arrays and then entry.json into ``folder`` (an empty temp folder)."""
    enc = _Encoder(folder)
    tree = enc.encode(value)
    body = {"stage": stage, "key": key, "created": time.time(), "files": enc.files, "value": tree}
    doc = {"format": FORMAT, "version": VERSION, "body": body, "body_blake2b": _body_digest(body)}
    try:
        text = json.dumps(doc, ensure_ascii=True, allow_nan=False, indent=1)
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. an int beyond the str-conversion limit
        raise Unrepresentable(f"value: {exc}") from None
    with open(folder / ENTRY_JSON, "w", encoding="ascii") as fh:
        fh.write(text)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_entry(folder: Path, stage: str | None = None, key: str | None = None) -> Any:
    """Verify and decode one entry folder; raise :class:`EntryError` if it is not whole and intact."""
    try:
        doc = json.loads((folder / ENTRY_JSON).read_text(encoding="ascii"), parse_constant=_reject_constant)
        body = doc["body"]
        ok = (doc.get("format") == FORMAT and doc.get("version") == VERSION
              and doc.get("body_blake2b") == _body_digest(body))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise EntryError(f"has an unreadable entry.json ({type(exc).__name__})") from None
    if not ok:
        raise EntryError("has an entry.json of another format or with a checksum mismatch")
    if (stage is not None and body.get("stage") != stage) or (key is not None and body.get("key") != key):
        raise EntryError("is filed under the wrong stage/key")
    try:
        files = body["files"]
        return _Decoder(folder, files).decode(body["value"])
    except EntryError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, struct.error) as exc:
        raise EntryError(f"does not decode ({type(exc).__name__}: {exc})") from None


def discard(path: Path) -> None:
    """Remove an entry folder: renamed aside first (atomic for readers), then deleted."""
    path = Path(path)
    aside = path.parent / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        try:
            aside.unlink()
        except FileNotFoundError:
            pass


# --- housekeeping: info and prune -------------------------------------------------------------
@dataclasses.dataclass
class CacheItem:
    """One prunable thing under a ``.cache`` folder."""

    cache: Path
    stage: str
    path: Path
    kind: str            # "entry", "legacy" (old pickle), "partial" (temp/trash/incomplete folder)
    size: int
    last_used: float     # epoch seconds
    inodes: dict[tuple[int, int], int]  # (dev, ino) → bytes, to count hard-linked files once


def find_caches(root: Path) -> list[Path]:
    """``.cache`` folders at ``root`` (an output folder), below it (a folder of output folders) or ``root`` itself."""
    root = Path(root)
    if root.name == ".cache" and root.is_dir():
        return [root]
    found = []
    if (root / ".cache").is_dir():
        found.append(root / ".cache")
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.is_symlink() and (child / ".cache").is_dir():
                found.append(child / ".cache")
    return found


def scenario_of(cache: Path) -> str:
    marker = cache.parent / ".tembench-output.json"
    try:
        return str(json.loads(marker.read_text()).get("scenario") or cache.parent.name)
    except (OSError, ValueError, AttributeError):
        return cache.parent.name


def _tree_usage(path: Path) -> tuple[int, dict[tuple[int, int], int], float]:
    size, inodes, newest = 0, {}, 0.0
    for dirpath, _, names in os.walk(path, followlinks=False):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            inodes[(st.st_dev, st.st_ino)] = st.st_size
            newest = max(newest, st.st_mtime)
    size = sum(inodes.values())
    return size, inodes, newest


def scan_cache(cache: Path) -> list[CacheItem]:
    items = []
    for stage_dir in sorted(p for p in Path(cache).iterdir() if p.is_dir() and not p.is_symlink()):
        for p in sorted(stage_dir.iterdir()):
            if p.is_symlink():
                continue
            if p.is_file() and p.name.endswith(LEGACY_SUFFIX):
                st = p.stat()
                items.append(CacheItem(cache, stage_dir.name, p, "legacy", st.st_size, st.st_mtime,
                                       {(st.st_dev, st.st_ino): st.st_size}))
            elif p.is_dir():
                size, inodes, newest = _tree_usage(p)
                entry = p / ENTRY_JSON
                if entry.is_file() and not p.name.startswith("."):
                    items.append(CacheItem(cache, stage_dir.name, p, "entry", size, entry.stat().st_mtime, inodes))
                else:
                    items.append(CacheItem(cache, stage_dir.name, p, "partial", size,
                                           newest or p.stat().st_mtime, inodes))
    return items


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def cache_info(root: Path) -> str:
    """Text table: entries and size per scenario and stage under ``root``."""
    caches = find_caches(root)
    if not caches:
        return f"no stage cache (.cache folder) under {root}"
    lines = []
    grand: dict[tuple[int, int], int] = {}
    for cache in caches:
        items = scan_cache(cache)
        inodes = {k: v for it in items for k, v in it.inodes.items()}
        grand.update(inodes)
        lines.append(f"{cache}  (scenario {scenario_of(cache)!r}): {_fmt_bytes(sum(inodes.values()))}")
        lines.append(f"  {'stage':<12} {'entries':>8} {'size':>12}  last used")
        for stage in sorted({it.stage for it in items}):
            es = [it for it in items if it.stage == stage and it.kind == "entry"]
            if not es:
                continue
            ino = {k: v for it in es for k, v in it.inodes.items()}
            last = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(it.last_used for it in es)))
            lines.append(f"  {stage:<12} {len(es):>8} {_fmt_bytes(sum(ino.values())):>12}  {last}")
        for kind, what in (("legacy", "old pickle entries (ignored, never loaded)"),
                           ("partial", "unfinished or damaged entries")):
            xs = [it for it in items if it.kind == kind]
            if xs:
                lines.append(f"  {what}: {len(xs)}, {_fmt_bytes(sum(it.size for it in xs))} — "
                             "`tembench cache prune` removes them")
    if len(caches) > 1:
        lines.append(f"total: {_fmt_bytes(sum(grand.values()))} in {len(caches)} caches")
    lines.append("hard-linked data (a stem4d patterns_path file and the entries that reference it) is counted once")
    return "\n".join(lines)


def prune(root: Path, older_than_days: float | None = None, max_bytes: float | None = None,
          dry_run: bool = False, now: float | None = None) -> tuple[list[CacheItem], int, int]:
    """Remove cache entries unused for ``older_than_days`` and/or the least recently used beyond ``max_bytes``.

    Old pickle entries and abandoned temp folders are always removed. Only paths inside ``.cache``
    folders are touched (rows, tables, manifests and reports are never). Returns (removed items,
    bytes before, bytes after).
    """
    now = time.time() if now is None else now
    items = [it for cache in find_caches(root) for it in scan_cache(cache)]
    refs: dict[tuple[int, int], int] = {}
    sizes: dict[tuple[int, int], int] = {}
    for it in items:
        for k, v in it.inodes.items():
            refs[k] = refs.get(k, 0) + 1
            sizes[k] = v
    total = sum(sizes.values())
    before = total
    doomed: list[CacheItem] = []

    def drop(it: CacheItem) -> None:
        nonlocal total
        doomed.append(it)
        for k in it.inodes:
            refs[k] -= 1
            if refs[k] == 0:
                total -= sizes[k]

    entries = []
    for it in items:
        if it.kind == "legacy" or (it.kind == "partial" and now - it.last_used > STALE_TMP_S):
            drop(it)
        elif it.kind == "entry":
            if older_than_days is not None and now - it.last_used > older_than_days * 86400.0:
                drop(it)
            else:
                entries.append(it)
    if max_bytes is not None:
        for it in sorted(entries, key=lambda e: e.last_used):
            if total <= max_bytes:
                break
            drop(it)
    if not dry_run:
        for it in doomed:
            if it.path.parent.parent != it.cache:  # only .cache/<stage>/<item>
                continue
            discard(it.path)
    return doomed, before, total


def prune_summary(root: Path, doomed: list[CacheItem], before: int, after: int, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    kinds = {k: sum(1 for it in doomed if it.kind == k) for k in ("entry", "legacy", "partial")}
    return (f"{root}: {verb} {kinds['entry']} entries, {kinds['legacy']} old pickle files and {kinds['partial']} "
            f"unfinished folders; cache size {_fmt_bytes(before)} → {_fmt_bytes(after)}")
