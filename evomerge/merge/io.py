"""Checkpoint I/O: memory-mapped safetensors in, streamed safetensors shards out.

Why not ``safetensors.safe_open`` / ``save_file``: a merge must never hold a model in RAM. Reading,
we map each file once (private mapping) and hand out zero-copy tensor views; after a tensor is used
its pages are dropped (``madvise(DONTNEED)``) so resident memory stays a few tensors however large the
model. Writing, every output shape and dtype is known before the first tensor is computed, so each
shard's header is written first and tensors are streamed to their offsets as they are produced; the
files are ordinary safetensors that ``safetensors``/``transformers`` load.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A directory that is not a usable checkpoint; the message names the path."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header without touching its data."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(f.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    data_start = 8 + length
    size = path.stat().st_size
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file (tensor {name}: malformed header entry)") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - start != expected or start < 0:
            raise CheckpointError(
                f"{path}: corrupted (tensor {name}: {end - start} bytes for shape {list(shape)} of {dtype}, "
                f"expected {expected})"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated ({size} bytes on disk, its header needs {data_start + end}); copy it again"
            )
        infos[name] = TensorInfo(path, SAFETENSORS_DTYPES[dtype], shape, data_start + start, data_start + end)
    return infos


class Checkpoint:
    """A Hugging Face checkpoint directory opened for tensor-by-tensor reading.

    ``get(name)`` returns a zero-copy, read-only-by-convention view into the mapped file; callers must
    not write into it. ``release(name)`` tells the OS those pages may be dropped (they are re-read
    from disk if needed again).
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a checkpoint dir with config.json)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json, so not a Hugging Face checkpoint")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            for file in files:
                self.tensors.update(read_safetensors_header(file))
        elif any((self.path / name).exists() for name in PICKLE_WEIGHTS):
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.path}: only pickle (.bin) weights, which can run arbitrary code when loaded; "
                    "convert to safetensors or pass --allow-pickle if you trust this checkpoint"
                )
            self._load_pickle()
        else:
            raise CheckpointError(f"{self.path}: no *.safetensors weights found")

    def _load_pickle(self) -> None:
        index = self.path / "pytorch_model.bin.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["pytorch_model.bin"]
        )
        self._pickled = {}
        for name in files:
            self._pickled.update(torch.load(self.path / name, map_location="cpu", weights_only=True))
        for name, tensor in self._pickled.items():
            self.tensors[name] = TensorInfo(self.path / files[0], tensor.dtype, tuple(tensor.shape), 0, 0)

    # --- architecture facts -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def architecture(self) -> tuple[str, ...]:
        return tuple(self.config.get("architectures") or [self.config.get("model_type", "?")])

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    @property
    def pickled(self) -> bool:
        """Weights loaded from pickle (.bin) files, so not readable as byte ranges."""
        return self._pickled is not None

    # --- tensors --------------------------------------------------------------------------------
    def stored(self, name: str) -> bool:
        """Whether ``get(name)`` is the bytes stored in the file (a disk merge may then copy them as they
        are); not so for an adapted weight of a ``BASE+ADAPTER`` checkpoint (``merge/adapters.py``)."""
        return True

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if self._pickled is not None:
            return self._pickled[name]
        buffer = self._maps.get(info.file)
        if buffer is None:
            with open(info.file, "rb") as f:
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = buffer
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(buffer, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        return flat.view(info.dtype).view(info.shape)

    def release(self, name: str, rows: slice | None = None) -> None:
        """Drop the mapped pages of ``name`` (or of its ``rows``, a range over dimension 0) from
        memory (no-op for pickled checkpoints). For a row range only the pages wholly inside it
        are dropped, so neighbouring rows stay mapped."""
        info = self.tensors[name]
        buffer = self._maps.get(info.file)
        if buffer is None or info.nbytes == 0:
            return
        page = mmap.PAGESIZE
        if rows is None:
            start, end = info.start - info.start % page, info.end
        else:
            row_bytes = info.nbytes // info.shape[0]
            first, stop, _ = rows.indices(info.shape[0])
            start = info.start + first * row_bytes
            end = info.start + stop * row_bytes
            start += -start % page
            end -= end % page
        if end > start:
            buffer.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        for buffer in self._maps.values():
            try:
                buffer.close()
            except BufferError:  # a tensor view is still alive; the mapping goes with it
                pass
        self._maps.clear()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Iterable[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [s for s in shards if s]


class ShardedWriter:
    """Streams tensors, in a fixed order, into safetensors shards plus an index.

    Usage: ``writer = ShardedWriter(dir, layout)``; ``writer.write(name, tensor)`` for every tensor
    of the layout in order; ``writer.finish()``.
    """

    def __init__(self, out_dir: Path, tensors: list[OutputTensor], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = plan_shards(tensors, max_shard_bytes)
        count = len(self.shards)
        self.filenames = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order: Iterator[tuple[int, OutputTensor]] = ((i, t) for i, shard in enumerate(self.shards) for t in shard)
        self._current: int = -1
        self._file: BinaryIO | None = None

    def _open_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[index]:
            header[tensor.name] = {
                "dtype": DTYPE_CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.out_dir / self.filenames[index], "wb", buffering=0)  # writes are large
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._current = index

    def _next(self, name: str, shape: tuple[int, ...] | None) -> OutputTensor:
        try:
            shard, expected = next(self._order)
        except StopIteration:
            raise RuntimeError(f"unexpected tensor {name}: all planned tensors were written") from None
        if expected.name != name or (shape is not None and shape != expected.shape):
            raise RuntimeError(
                f"tensor {name} {shape} does not match the planned {expected.name} {expected.shape} {expected.dtype}"
            )
        if shard != self._current:
            self._open_shard(shard)
        return expected

    def copy_range(self, name: str, source: Path, offset: int, nbytes: int) -> None:
        """Write the next planned tensor as a byte range of another file (a tensor copied unchanged),
        copied by the kernel (``copy_file_range``) without passing through this process's memory."""
        expected = self._next(name, None)
        if nbytes != expected.nbytes:
            raise RuntimeError(f"tensor {name}: source range has {nbytes} bytes, planned {expected.nbytes}")
        assert self._file is not None
        out = self._file.fileno()
        with open(source, "rb", buffering=0) as src:
            done = 0
            try:
                while done < nbytes:
                    step = os.copy_file_range(src.fileno(), out, nbytes - done, offset + done)
                    if step == 0:
                        raise OSError("copy_file_range copied nothing")
                    done += step
            except OSError:  # not supported here (old kernel, some filesystems): plain reads and writes
                src.seek(offset + done)
                while done < nbytes:
                    chunk = src.read(min(1 << 24, nbytes - done))
                    if not chunk:
                        raise RuntimeError(f"{source}: ends inside tensor {name}") from None
                    self._file.write(chunk)
                    done += len(chunk)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor, whole."""
        self.write_pieces(name, [tensor], shape=tuple(tensor.shape))

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor], *, shape: tuple[int, ...] | None = None) -> None:
        """Write the next planned tensor from consecutive pieces (blocks of rows, in order), so a
        large tensor never has to exist whole in memory."""
        expected = self._next(name, shape)
        assert self._file is not None
        written = 0
        for piece in pieces:
            if piece.dtype != expected.dtype:
                raise RuntimeError(f"tensor {name}: got {piece.dtype}, planned {expected.dtype}")
            data = piece.detach().to("cpu").contiguous()
            if data.numel():
                # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12 (mypy checks 3.11)
                self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))  # type: ignore[arg-type]
            written += data.numel() * data.element_size()
        if written != expected.nbytes:
            raise RuntimeError(f"tensor {name}: wrote {written} bytes, planned {expected.nbytes}")

    def finish(self) -> None:
        if next(self._order, None) is not None:
            raise RuntimeError("merge ended before every planned tensor was written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            weight_map = {t.name: self.filenames[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def parse_size(text: str | int) -> int:
    """'5GB', '500M', '1.5G', 1000 -> bytes."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "K": 10**3,
        "KB": 10**3,
        "M": 10**6,
        "MB": 10**6,
        "G": 10**9,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number with an optional unit such as 500MB or 2GB") from None
    if unit not in units or value <= 0:
        raise ValueError(f"size {text!r}: expected a positive number with a unit among B, KB, MB, GB, KiB, MiB, GiB")
    return int(value * units[unit])
