"""Tile shapes found by ``gna profile --optimize --save``: a small on-disk cache.

The cache is one JSON file, ``$GNA_CACHE_DIR/tiles.json`` (default
``~/.cache/gna/tiles.json``)::

    {"version": 1,
     "devices": {"NVIDIA H100 80GB HBM3": {
         "input=30x48x80 window=18x24x24 stride=16x8x8 dilation=1x1x1 causal=0x0x0 "
         "head_dim=128 dtype=float16": {"q_tile": [2, 8, 8], "kv_tile": [2, 8, 8], ...}}}}

An entry is keyed by the device's name (:func:`device_name`) and the problem's
:func:`signature`: spatial shape, window, stride, dilation, causal flags, head dim and dtype.
Batch and head counts are not in the key (they change how many programs run, not which tiles
suit the geometry). Besides ``q_tile`` and ``kv_tile`` an entry records what the profiler
measured (free-form; :func:`lookup` reads only the tiles).

:func:`lookup` is what the ops call: the file is read once per path and answers are memoized,
so a call costs a dictionary look-up. A missing, unreadable or malformed file (or entry) means
"no tuned tiles", never an error on the op path. :func:`store` rewrites the file atomically
and refreshes this process's memo; other processes see the change when they next start (or
after :func:`forget`). This module imports nothing beyond the standard library and torch, so
the op path does not pull in the profiler or rich.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .geometry import Geometry

__all__ = ["VERSION", "cache_path", "signature", "device_name", "lookup", "store", "entries",
           "forget"]

VERSION = 1  # of the file's layout; a file with another version is ignored by lookup


def _cache_file() -> str:
    root = os.environ.get("GNA_CACHE_DIR")
    return os.path.join(root, "tiles.json") if root else _default_file()


@functools.lru_cache(maxsize=1)
def _default_file() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "gna", "tiles.json")


def cache_path() -> Path:
    """The cache file: ``$GNA_CACHE_DIR/tiles.json``, else ``~/.cache/gna/tiles.json``."""
    return Path(_cache_file())


def _dtype_name(dtype) -> str:
    """``torch.float16`` or ``"float16"`` -> ``"float16"``."""
    name = str(dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


def _x(values) -> str:
    return "x".join(str(int(v)) for v in values)


def signature(geo: Geometry, head_dim: int, dtype) -> str:
    """The problem part of the cache key, e.g. ``"input=30x48x80 window=18x24x24
    stride=16x8x8 dilation=1x1x1 causal=0x0x0 head_dim=128 dtype=float16"``."""
    return (f"input={_x(geo.shape)} window={_x(geo.kernel_size)} stride={_x(geo.stride)} "
            f"dilation={_x(geo.dilation)} causal={_x(geo.causal)} head_dim={int(head_dim)} "
            f"dtype={_dtype_name(dtype)}")


@functools.lru_cache(maxsize=16)
def device_name(device) -> str:
    """The device part of the cache key: the CUDA device's name (e.g. ``"NVIDIA H100 80GB
    HBM3"``), or ``"cpu"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


_TABLES: dict[str, dict] = {}  # path -> {device: {signature: entry}} as read from disk
_GENERATION = 0  # bumped whenever what lookup() answers may change in this process


def state() -> tuple:
    """Changes whenever :func:`lookup` may answer differently (a store, a forget, another
    ``GNA_CACHE_DIR``): callers that memoize tile choices key on it."""
    return _GENERATION, os.environ.get("GNA_CACHE_DIR")


def _read(path: Path) -> dict:
    """The file's ``devices`` table; raises ValueError if the file is not a cache file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise ValueError(f"{path} is not a gna tile cache (no 'devices' table)")
    if data.get("version") != VERSION:
        raise ValueError(f"{path} has cache version {data.get('version')!r}, this gna reads "
                         f"version {VERSION}")
    return data["devices"]


def _table(path: Path) -> dict:
    key = str(path)
    table = _TABLES.get(key)
    if table is None:
        try:
            table = _read(path)
        except (OSError, ValueError) as e:
            warnings.warn(f"ignoring the gna tile cache: {e}; delete it or set GNA_CACHE_DIR",
                          stacklevel=3)
            table = {}
        _TABLES[key] = table
    return table


def _tiles(entry, ndim: int):
    """``(q_tile, kv_tile)`` from a cache entry, or None if it is malformed."""
    try:
        q_tile, kv_tile = tuple(entry["q_tile"]), tuple(entry["kv_tile"])
    except (KeyError, TypeError):
        return None
    ok = all(len(t) == ndim and all(type(x) is int and x >= 1 for x in t)
             for t in (q_tile, kv_tile))
    return (q_tile, kv_tile) if ok else None


@functools.lru_cache(maxsize=4096)
def _lookup(path: str, geo: Geometry, head_dim: int, dtype: str, device: str):
    entry = _table(Path(path)).get(device, {}).get(signature(geo, head_dim, dtype))
    return None if entry is None else _tiles(entry, geo.ndim)


def lookup(geo: Geometry, head_dim: int, dtype, device_name: str):
    """Tuned ``(q_tile, kv_tile)`` for this problem on this device, or None.

    ``geo`` is the call's validated geometry, ``dtype`` a ``torch.dtype`` (or its name,
    ``"float16"``), ``device_name`` as :func:`device_name` gives it. Memoized: after the first
    call for a problem this is one cached-function call.
    """
    return _lookup(_cache_file(), geo, int(head_dim), _dtype_name(dtype), device_name)


def entries(path: Path | None = None) -> dict:
    """Everything in the cache file: ``{device: {signature: entry}}`` (a copy)."""
    return json.loads(json.dumps(_read(path or cache_path())))


def store(geo: Geometry, head_dim: int, dtype, device_name: str, q_tile, kv_tile,
          **measured) -> Path:
    """Save tuned tiles for this problem and device; returns the file written.

    ``measured`` is stored alongside (e.g. ``ms=``, ``default_ms=``, ``objective=``); it must
    be JSON-serializable. Raises ValueError if the existing file is not a cache this version
    reads (it is not overwritten) and OSError if it cannot be written.
    """
    q_tile, kv_tile = tuple(int(t) for t in q_tile), tuple(int(t) for t in kv_tile)
    if _tiles({"q_tile": list(q_tile), "kv_tile": list(kv_tile)}, geo.ndim) is None:
        raise ValueError(f"tiles must have one positive size per dimension ({geo.ndim}), got "
                         f"q_tile={q_tile}, kv_tile={kv_tile}")
    path = cache_path()
    devices = _read(path)  # fresh from disk: keep what other processes stored meanwhile
    entry = {"q_tile": list(q_tile), "kv_tile": list(kv_tile), **measured}
    devices.setdefault(device_name, {})[signature(geo, head_dim, dtype)] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tiles-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": VERSION, "devices": devices}, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _TABLES[str(path)] = devices
    _lookup.cache_clear()
    _bump()
    return path


def _bump() -> None:
    global _GENERATION
    _GENERATION += 1


def forget() -> None:
    """Drop this process's memo, so the next :func:`lookup` re-reads the file."""
    _TABLES.clear()
    _lookup.cache_clear()
    _bump()
