#!/usr/bin/env python
"""Merge benchmark: evomerge's streaming engine vs mergekit, side by side, on synthetic Llama checkpoints.

    python scripts/bench_merge.py --size small --no-markdown          # smoke run (~110M params, minutes)
    python scripts/bench_merge.py --size 1b --repeats 1               # the real one (TinyLlama shape, 1.1B)

What it does, in one run:

1. Generates (once, cached under ``--work-dir``) a synthetic bf16 Llama *base* and three *fine-tunes*
   (base + small noise), tensor by tensor from seeded generators, streamed to sharded safetensors by a
   small writer in this file (no torch model is instantiated, memory stays at a few tensors).
2. Measures the machine: memory-copy bandwidth (torch and numpy copies of 1 GiB), disk write (fsync'd),
   cold read (after ``posix_fadvise(DONTNEED)``) and page-cache read throughput.
3. For each method, writes ONE recipe YAML that both tools read, and runs each merge in its own fresh
   subprocess (this script re-invoked with ``--child``). The child times only the merge call and
   reports its own peak RSS (``VmHWM`` of its address space, which, unlike ``ru_maxrss``, does not
   inherit the parent's high-water mark across fork/exec); the parent also samples
   ``/proc/<pid>/status`` every 20 ms for the anon/file breakdown at the peak. Before every merge all
   source files are read once (so both tools start from a warm page cache), dirty pages are synced,
   and the tool order alternates between methods and repeats.
4. Checks correctness cheaply: a few output tensors of evomerge vs mergekit (max |diff|, max bf16 ulp
   distance, share of elements that differ).
5. Prints markdown tables, optionally writes them into BENCHMARKS.md ("## Merge" section) and JSON.

Model files only ever go under ``--work-dir`` (default ``~/.cache/evomerge/bench``), never the repo.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = Path(os.environ.get("EVOMERGE_BENCH_DIR", Path.home() / ".cache" / "evomerge" / "bench"))
ALL_METHODS = ("linear", "slerp", "ties", "dare_ties", "task_arithmetic", "passthrough")
EXTRA_METHODS = ("model_stock", "nuslerp")  # not in the issue's table; run with --methods
DETERMINISTIC = {"linear", "slerp", "ties", "task_arithmetic", "passthrough", "model_stock", "nuslerp"}
TOOLS = ("evomerge", "mergekit")
GB = 1e9
RSS_TARGET = 1 * GB

# TinyLlama-1.1B's shape; "small" is the same architecture at ~110M parameters for smoke runs.
SIZES: dict[str, dict[str, int]] = {
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "small": dict(hidden=768, intermediate=2048, layers=10, heads=12, kv_heads=4, vocab=32000),
}
SOURCE_SHARD_BYTES = 2 * 10**9  # 1b sources: 2 shards + index (as many HF checkpoints); small: 1 file
WEIGHT_STD = 0.02
FINETUNE_STD = 0.002  # fine-tune delta = 10% of the weights' scale: dense, sign-mixed task vectors
GENERATOR_VERSION = 1  # bump when generation changes, to invalidate the cache
MODELS = ("base", "ft1", "ft2", "ft3")

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


# =============================================================================================
# Synthetic checkpoints
# =============================================================================================


def llama_config(shape: dict[str, int]) -> dict[str, Any]:
    """A config.json that transformers' LlamaConfig accepts (TinyLlama's values where they matter)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["hidden"] // shape["heads"],
        "vocab_size": shape["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def llama_tensors(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of LlamaForCausalLM (untied head), in Hugging Face order."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    kv = shape["kv_heads"] * (h // shape["heads"])
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


class StreamingSafetensorsWriter:
    """Writes tensors of a known layout, in order, to safetensors shards (+ index); holds no tensor.

    Independent of evomerge's own writer on purpose: the benchmark's inputs must not depend on the
    code under test.
    """

    def __init__(
        self,
        out_dir: Path,
        layout: list[tuple[str, tuple[int, ...]]],
        max_shard_bytes: int,
        dtype_code: str = "BF16",
        itemsize: int = 2,
    ):
        self.out_dir, self.dtype_code, self.itemsize = out_dir, dtype_code, itemsize
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in layout:
            nbytes = _numel(shape) * itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += nbytes
        self.shards = shards
        n = len(shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self.order = iter([(k, name, shape) for k, shard in enumerate(shards) for name, shape in shard])
        self.current = -1
        self.fh = None

    def _open(self, k: int) -> None:
        if self.fh is not None:
            self.fh.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in self.shards[k]:
            nbytes = _numel(shape) * self.itemsize
            header[name] = {"dtype": self.dtype_code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.fh = open(self.out_dir / self.files[k], "wb")
        self.fh.write(struct.pack("<Q", len(blob)) + blob)
        self.current = k

    def write(self, name: str, tensor) -> None:  # tensor: torch.Tensor
        import torch

        k, expected, shape = next(self.order)
        assert name == expected and tuple(tensor.shape) == shape and tensor.dtype == torch.bfloat16, (name, expected)
        if k != self.current:
            self._open(k)
        self.fh.write(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))

    def finish(self) -> None:
        assert next(self.order, None) is None, "not every tensor was written"
        if self.fh is not None:
            self.fh.close()
        if len(self.shards) > 1:
            weight_map = {name: self.files[k] for k, shard in enumerate(self.shards) for name, _ in shard}
            total = sum(_numel(s) * self.itemsize for shard in self.shards for _, s in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _tensor_values(name: str, shape: tuple[int, ...], model_seed: int, std: float, generator):
    import torch

    generator.manual_seed(_seed(GENERATOR_VERSION, model_seed, name))
    if name.endswith("norm.weight"):  # RMSNorm weights live around 1
        return torch.randn(shape, generator=generator).mul_(std * 5).add_(1.0)
    return torch.randn(shape, generator=generator).mul_(std)


def ensure_models(size: str, work_dir: Path, log=print) -> dict[str, Path]:
    """The base and three fine-tunes for ``size``; generated once, reused while the spec is unchanged."""
    import torch

    shape = SIZES[size]
    root = work_dir / "models" / size
    spec = {
        "shape": shape,
        "version": GENERATOR_VERSION,
        "std": WEIGHT_STD,
        "ft_std": FINETUNE_STD,
        "shard": SOURCE_SHARD_BYTES,
    }
    stamp = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    paths = {m: root / m for m in MODELS}
    if all(
        (p / ".bench-complete").is_file() and (p / ".bench-complete").read_text().strip() == stamp
        for p in paths.values()
    ):
        log(f"models: cached in {root}")
        return paths
    layout = llama_tensors(shape)
    nparams = sum(_numel(s) for _, s in layout)
    log(f"models: generating base + 3 fine-tunes ({nparams / 1e6:.0f}M params each, bf16) in {root} ...")
    start = time.perf_counter()
    tmp = {m: root / f".{m}.partial" for m in MODELS}
    for p in list(tmp.values()) + list(paths.values()):
        shutil.rmtree(p, ignore_errors=True)
        if p in tmp.values():
            p.mkdir(parents=True)
    writers = {m: StreamingSafetensorsWriter(tmp[m], layout, SOURCE_SHARD_BYTES) for m in MODELS}
    gen = torch.Generator()
    for name, tshape in layout:
        base = _tensor_values(name, tshape, 0, WEIGHT_STD, gen)
        writers["base"].write(name, base.to(torch.bfloat16))
        for k, m in enumerate(MODELS[1:], start=1):
            delta = _tensor_values(name, tshape, k, FINETUNE_STD, gen)
            if name.endswith("norm.weight"):
                delta.sub_(1.0)  # norm deltas: ~N(0, 5*ft_std), not around 1
            writers[m].write(name, delta.add_(base).to(torch.bfloat16))
            del delta
        del base
    config = json.dumps(llama_config(shape), indent=2) + "\n"
    for m in MODELS:
        writers[m].finish()
        (tmp[m] / "config.json").write_text(config)
        (tmp[m] / ".bench-complete").write_text(stamp + "\n")
        tmp[m].rename(paths[m])
    log(f"models: generated in {time.perf_counter() - start:.0f} s")
    return paths


def checkpoint_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def read_headers(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype code, shape, nbytes) over every shard of a checkpoint."""
    out = {}
    for f in checkpoint_files(path):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, e in header.items():
            if name != "__metadata__":
                out[name] = (e["dtype"], e["shape"], e["data_offsets"][1] - e["data_offsets"][0])
    return out


# =============================================================================================
# Recipes (one YAML per method; both tools read the very same file)
# =============================================================================================


def make_recipes(paths: dict[str, Path], num_layers: int) -> dict[str, dict[str, Any]]:
    b, f1, f2, f3 = (str(paths[m]) for m in MODELS)
    fts3 = lambda **p: [{"model": m, "parameters": dict(p)} for m in (f1, f2, f3)]  # noqa: E731
    # passthrough: layers 0-16 of ft1 then 8-22 of ft2 at 22 layers (scaled for other depths)
    first_end = round(16 / 22 * num_layers)
    second_start = round(8 / 22 * num_layers)
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": f1, "parameters": {"weight": 0.4}},
                {"model": f2, "parameters": {"weight": 0.3}},
                {"model": f3, "parameters": {"weight": 0.3}},
            ],
            "dtype": "bfloat16",
        },
        "slerp": {  # mergekit's README slerp: per-layer t gradients, different for attention and MLP
            "merge_method": "slerp",
            "base_model": b,
            "models": [{"model": b}, {"model": f1}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "bfloat16",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": b,
            "models": fts3(density=0.5, weight=0.5),
            "dtype": "bfloat16",
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": b,
            "models": fts3(density=0.5, weight=0.5),
            "dtype": "bfloat16",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": fts3(weight=0.5),
            "dtype": "bfloat16",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": b,
            "models": [{"model": m} for m in (f1, f2, f3)],
            "dtype": "bfloat16",
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": b,
            "models": [{"model": f1, "parameters": {"weight": 0.4}}, {"model": f2, "parameters": {"weight": 0.6}}],
            "dtype": "bfloat16",
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": f1, "layer_range": [0, first_end]}]},
                {"sources": [{"model": f2, "layer_range": [second_start, num_layers]}]},
            ],
            "dtype": "bfloat16",
        },
    }


def source_bytes(recipe: dict[str, Any], headers: dict[str, dict[str, tuple[str, list[int], int]]]) -> int:
    """Bytes of source tensors a merge must read (computed from the recipe, independently of either tool)."""
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    total = 0
    if recipe.get("models"):
        models = [m["model"] for m in recipe["models"]]
        if recipe.get("base_model") and recipe["base_model"] not in models:
            models.append(recipe["base_model"])
        for m in models:
            total += sum(nb for _, _, nb in headers[m].values())
        return total
    slices = recipe["slices"]
    for s in slices:
        for src in s["sources"]:
            lo, hi = src["layer_range"]
            for name, (_, _, nb) in headers[src["model"]].items():
                match = layer_re.match(name)
                if match and lo <= int(match.group(1)) < hi:
                    total += nb
    for which, pick in ((slices[0], lambda n: "embed" in n), (slices[-1], lambda n: "embed" not in n)):
        for src in which["sources"]:
            total += sum(nb for n, (_, _, nb) in headers[src["model"]].items() if not layer_re.match(n) and pick(n))
    return total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(path))


# =============================================================================================
# Machine measurements
# =============================================================================================


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        info["cpu"] = cpu
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "?"
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        info["ram_gib"] = None
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    try:
        from importlib.metadata import version

        info["mergekit"] = version("mergekit")
    except Exception:  # noqa: BLE001
        info["mergekit"] = None
    try:
        info["evomerge_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "evomerge"], cwd=REPO, capture_output=True, text=True
        ).stdout
        if dirty.strip():
            info["evomerge_commit"] += " (+ uncommitted changes in evomerge/)"
    except (OSError, subprocess.CalledProcessError):
        info["evomerge_commit"] = None
    return info


def measure_memory_bandwidth(nbytes: int = 2**30, trials: int = 5) -> dict[str, float]:
    """Large-buffer copy bandwidth, counted as bytes read + bytes written per second (GB/s)."""
    import numpy as np
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(trials))
    torch_bw = 2 * nbytes / best / GB
    a, b = src.numpy(), dst.numpy()
    best_np = min(_timed(lambda: np.copyto(b, a)) for _ in range(trials))
    numpy_bw = 2 * nbytes / best_np / GB
    # the pattern a merge of bf16 inputs starts with: bf16 -> fp32 upcast (reads 2 bytes, writes 4)
    half = torch.ones(nbytes // 4, dtype=torch.bfloat16)
    best_up = min(_timed(lambda: dst.copy_(half)) for _ in range(trials))
    upcast_bw = (half.nbytes + dst.nbytes) / best_up / GB
    return {
        "torch_copy_gbps": torch_bw,
        "numpy_copy_gbps": numpy_bw,
        "bf16_to_fp32_gbps": upcast_bw,
        "copy_gbps": max(torch_bw, numpy_bw),
        "buffer_bytes": nbytes,
    }


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_disk(work_dir: Path, nbytes: int) -> dict[str, float]:
    """Write (fsync'd), cold read (file dropped from the page cache first) and page-cache read, GB/s."""
    path = work_dir / ".disk-probe.bin"
    chunk = os.urandom(16 * 2**20)
    n = max(1, nbytes // len(chunk))
    t = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(n):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    write = n * len(chunk) / (time.perf_counter() - t) / GB
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    cold = n * len(chunk) / _timed(lambda: _read_all([path])) / GB
    warm = n * len(chunk) / _timed(lambda: _read_all([path])) / GB
    path.unlink()
    return {
        "disk_write_gbps": write,
        "disk_read_cold_gbps": cold,
        "page_cache_read_gbps": warm,
        "probe_bytes": n * len(chunk),
    }


_READ_BUF = bytearray(64 * 2**20)


def _read_all(files: list[Path]) -> int:
    view = memoryview(_READ_BUF)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(view)
                if not got:
                    break
                total += got
    return total


class SourcePin:
    """Keeps the source files mapped (and their pages faulted in) in this, the parent, process.

    This VM runs DAMON proactive reclaim, which pages out *unmapped* page-cache pages left idle for
    about a minute: without this, sources warmed before a long merge get evicted during it (and
    during idle waits), and the slower tool pays disk reads the faster one does not. Mapped pages
    are exempt, so mapping them here keeps the cache warm for both tools without any work during
    the timed merge. The children's RSS does not include these pages (another address space).
    """

    def __init__(self, paths: dict[str, Path]):
        import mmap

        import numpy as np

        self.maps = []
        for p in paths.values():
            for f in checkpoint_files(p):
                with open(f, "rb") as fh:
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self.maps.append(mm)
        self._np = np
        self.touch()

    def touch(self) -> None:
        """Fault every page in (reads one byte per page)."""
        page = 4096
        for mm in self.maps:
            arr = self._np.frombuffer(mm, dtype=self._np.uint8)
            int(arr[::page].sum(dtype=self._np.uint64))
            del arr

    def close(self) -> None:
        for mm in self.maps:
            mm.close()
        self.maps = []


def warm_sources(paths: dict[str, Path]) -> tuple[int, float]:
    files = [f for p in paths.values() for f in checkpoint_files(p)]
    t = time.perf_counter()
    total = _read_all(files)
    return total, time.perf_counter() - t


# =============================================================================================
# One merge in a fresh subprocess
# =============================================================================================


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def wait_for_idle(max_wait_s: float, threshold_cores: float = 0.2, window_s: float = 1.0) -> tuple[float, float]:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold_cores`` over a window.

    Returns (seconds waited, cores used by others in the last window).
    """
    import resource

    hz = os.sysconf("SC_CLK_TCK")
    start = time.perf_counter()
    while True:
        busy0, _ = _cpu_jiffies()
        me0 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(window_s)
        busy1, _ = _cpu_jiffies()
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        mine = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
        other = max(0.0, (busy1 - busy0) / hz - mine) / window_s
        waited = time.perf_counter() - start
        if other < threshold_cores or waited >= max_wait_s:
            return waited, other


def _proc_io() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                out[key] = int(rest)
    except (OSError, ValueError):
        pass
    return out


def child_main(tool: str, recipe_path: Path, out_dir: Path, result_path: Path, seed: int) -> int:
    """Runs in the fresh subprocess: one merge, timed; writes a JSON result."""
    t_start = time.perf_counter()
    result: dict[str, Any] = {"tool": tool, "ok": False}
    try:
        import yaml

        data = yaml.safe_load(recipe_path.read_text())
        if tool == "evomerge":
            from evomerge.merge.engine import merge_to_disk
            from evomerge.recipe import Recipe

            recipe = Recipe.from_dict(data, source=str(recipe_path))

            def run() -> Any:
                return merge_to_disk(recipe, out_dir, device="cpu", out_shard_size="5GB", overwrite=True, seed=seed)
        else:
            from mergekit.config import MergeConfiguration
            from mergekit.merge import run_merge
            from mergekit.options import MergeOptions

            config = MergeConfiguration.model_validate(data)
            # mergekit defaults except: no tokenizer to copy (the synthetic models have none, and its
            # fallback would try to load one), a fixed seed (dare), no progress bars.
            options = MergeOptions(copy_tokenizer=False, random_seed=seed, quiet=True)
            result["mergekit_options"] = options.model_dump(mode="json")
            run = lambda: run_merge(config, str(out_dir), options=options)  # noqa: E731
        result["import_s"] = time.perf_counter() - t_start
        result["rss_before_merge"] = _proc_status().get("VmRSS")
        io0 = _proc_io()
        import resource

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run()
        result["merge_s"] = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        result["merge_cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        io1 = _proc_io()
        result["disk_read_bytes"] = io1.get("read_bytes", 0) - io0.get("read_bytes", 0)
        result["disk_write_bytes"] = io1.get("write_bytes", 0) - io0.get("write_bytes", 0)
        result["peak_rss"] = _proc_status().get("VmHWM")
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001
        import traceback

        result["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    result_path.write_text(json.dumps(result))
    return 0 if result["ok"] else 1


def run_child(
    tool: str, recipe_path: Path, out_dir: Path, work_dir: Path, seed: int, tag: str, profile_to: Path | None = None
) -> dict[str, Any]:
    result_path = work_dir / "logs" / f"{tag}.result.json"
    log_path = work_dir / "logs" / f"{tag}.log"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        tool,
        "--child-recipe",
        str(recipe_path),
        "--child-out",
        str(out_dir),
        "--child-result",
        str(result_path),
        "--seed",
        str(seed),
    ]
    if profile_to is not None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [py_spy, "record", "--rate", "50", "--format", "raw", "--output", str(profile_to), "--"] + cmd
    env = {**os.environ, **CHILD_ENV}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    peak: dict[str, int] = {"VmRSS": 0}
    at_peak: dict[str, int] = {}
    import resource

    hz = os.sysconf("SC_CLK_TCK")
    busy0, steal0 = _cpu_jiffies()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work_dir))
        watch_pid = proc.pid
        while proc.poll() is None:
            if profile_to is not None:  # the merge runs in py-spy's child
                kids = _children(proc.pid)
                watch_pid = kids[0] if kids else proc.pid
            status = _proc_status(watch_pid)
            if status.get("VmRSS", 0) > peak["VmRSS"]:
                peak["VmRSS"] = status["VmRSS"]
                at_peak = status
            time.sleep(0.02)
    process_s = time.perf_counter() - t
    busy1, steal1 = _cpu_jiffies()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    ours = sum(
        getattr(b, f) - getattr(a, f) for a, b in ((kids0, kids1), (self0, self1)) for f in ("ru_utime", "ru_stime")
    )
    load = {
        "other_cores": max(0.0, ((busy1 - busy0) / hz - ours) / process_s),  # CPU used by other processes
        "steal_cores": (steal1 - steal0) / hz / process_s,
        "child_cpu_s": ours,
    }
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {
            "tool": tool,
            "ok": False,
            "error": f"child exited {proc.returncode} without a result; see {log_path}",
        }
    result["process_s"] = process_s
    result["load"] = load
    result["sampled_peak"] = at_peak
    result["log"] = str(log_path)
    if result.get("ok"):
        result["output_bytes"] = dir_bytes(out_dir)
    return result


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


# =============================================================================================
# Correctness: a few output tensors, evomerge vs mergekit
# =============================================================================================


def _sample_names(num_layers: int) -> list[str]:
    last, mid = num_layers - 1, num_layers // 2
    return [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{mid}.mlp.down_proj.weight",
        f"model.layers.{mid}.input_layernorm.weight",
        f"model.layers.{last}.self_attn.k_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]


def _load(path: Path, names: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    out = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as st:
            for name in set(st.keys()) & set(names):
                out[name] = st.get_tensor(name)
    return out


def _bf16_ulps(a, b):
    """|a - b| in units of the bf16 spacing at max(|a|, |b|) (1 = one rounding step; sign flips near 0 stay ~2)."""
    import torch

    diff = (a.float() - b.float()).abs()
    mag = torch.maximum(a.float().abs(), b.float().abs())
    _, exp = torch.frexp(mag)  # mag = m * 2**exp, 0.5 <= m < 1: bf16 spacing is 2**(exp - 8)
    spacing = torch.ldexp(torch.ones_like(mag), exp - 8).clamp_min(2.0**-133)
    return diff / spacing


def compare_outputs(evo_dir: Path, mk_dir: Path) -> dict[str, Any]:

    n_layers = json.loads((evo_dir / "config.json").read_text())["num_hidden_layers"]
    mk_layers = json.loads((mk_dir / "config.json").read_text())["num_hidden_layers"]
    names = _sample_names(n_layers)
    evo, mk = _load(evo_dir, names), _load(mk_dir, names)
    per: dict[str, Any] = {}
    worst = {"max_abs": 0.0, "max_ulp": 0.0, "mismatch": 0, "beyond_1ulp": 0, "numel": 0, "rel_l2": 0.0}
    for name in names:
        if name not in evo or name not in mk:
            per[name] = {"missing_in": [k for k, d in (("evomerge", evo), ("mergekit", mk)) if name not in d]}
            continue
        a, b = evo[name], mk[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            per[name] = {"shape_or_dtype_differs": [str(a.shape), str(b.shape), str(a.dtype), str(b.dtype)]}
            continue
        diff = (a.float() - b.float()).abs()
        ulp = _bf16_ulps(a, b)
        entry = {
            "max_abs": diff.max().item(),
            "mismatch": int((a != b).sum().item()),
            "numel": a.numel(),
            "max_ulp": ulp.max().item(),
            "beyond_1ulp": int((ulp > 1.0).sum().item()),
            "rel_l2": (diff.norm() / b.float().norm().clamp_min(1e-30)).item(),
            "ref_std": b.float().std().item() if b.numel() > 1 else 0.0,
        }
        per[name] = entry
        worst["max_abs"] = max(worst["max_abs"], entry["max_abs"])
        worst["max_ulp"] = max(worst["max_ulp"], entry["max_ulp"])
        worst["mismatch"] += entry["mismatch"]
        worst["beyond_1ulp"] += entry["beyond_1ulp"]
        worst["numel"] += entry["numel"]
        worst["rel_l2"] = max(worst["rel_l2"], entry["rel_l2"])
    ok_names = [n for n in names if "max_abs" in per.get(n, {})]
    return {"tensors": per, "compared": len(ok_names), "of": len(names), "layers": [n_layers, mk_layers], **worst}


# =============================================================================================
# Profiling summary (py-spy raw/collapsed stacks)
# =============================================================================================


def summarize_profile(path: Path, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares, among the samples taken inside the merge call, per frame ('function (file:line)')."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    func_incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if not any(f.startswith(("merge_to_disk (", "run_merge (")) for f in frames):
            continue  # interpreter start-up and imports: not the merge
        total += n
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for f in set(frames):
            incl_counts[f] = incl_counts.get(f, 0) + n
        for fn in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            func_incl[fn] = func_incl.get(fn, 0) + n
    if not total:
        return {"self": [], "inclusive_lines": [], "inclusive_functions": []}

    def rank(d: dict[str, int], keep=lambda k: True) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if keep(k)][:top]

    ours = lambda k: "evomerge/" in k or "mergekit/" in k  # noqa: E731
    return {
        "self": rank(self_counts),
        "inclusive_lines": rank(incl_counts, ours),
        "inclusive_functions": rank(func_incl, ours),
        "samples": total,
    }  # type: ignore[dict-item]


# =============================================================================================
# Report
# =============================================================================================


def _fmt_s(x: float | None) -> str:
    return "—" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _fmt_gb(x: float | None) -> str:
    return "—" if x is None else f"{x / GB:.2f}"


def summarize(results: list[dict[str, Any]], methods: list[str], bw: float) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for tool in TOOLS:
            runs = [r for r in results if r["method"] == method and r["tool"] == tool]
            good = [r for r in runs if r.get("ok")]
            if not runs:
                row[tool] = None
                continue
            if not good:
                row[tool] = {"error": runs[-1].get("error", "failed")}
                continue
            row[tool] = {
                "merge_s": statistics.median(r["merge_s"] for r in good),
                "merge_s_min": min(r["merge_s"] for r in good),
                "process_s": statistics.median(r["process_s"] for r in good),
                "peak_rss": max(r["peak_rss"] or 0 for r in good),
                "peak_anon": max((r.get("sampled_peak") or {}).get("RssAnon", 0) for r in good),
                "rss_before_merge": statistics.median(r.get("rss_before_merge") or 0 for r in good),
                "output_bytes": good[-1]["output_bytes"],
                "disk_read_bytes": max(r.get("disk_read_bytes", 0) for r in good),
                "cpu_cores": statistics.median(r["merge_cpu_s"] / r["merge_s"] for r in good),
                "cpu_s": statistics.median(r["merge_cpu_s"] for r in good),
                "other_load_cores": max(r["load"]["other_cores"] for r in good),
                "steal_cores": max(r["load"]["steal_cores"] for r in good),
                "repeats": len(good),
            }
        src = next((r["source_bytes"] for r in results if r["method"] == method), None)
        out_b = next(
            (row[t]["output_bytes"] for t in TOOLS if isinstance(row.get(t), dict) and "output_bytes" in row[t]), None
        )
        row["bytes_moved"] = (src or 0) + (out_b or 0) if src is not None and out_b is not None else None
        row["limit_s"] = row["bytes_moved"] / (bw * GB) if row["bytes_moved"] and bw else None
        summary[method] = row
    return summary


def render(summary: dict[str, dict[str, Any]], comparisons: dict[str, Any], bench: dict[str, Any]) -> str:
    lines = []
    lines.append(
        "| method | evomerge s | mergekit s | speedup | evomerge CPU s | mergekit CPU s | evomerge peak RSS GB "
        "| mergekit peak RSS GB | bytes moved GB | bytes-moved limit s | evomerge × limit | mergekit × limit |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, row in summary.items():
        evo, mk = row.get("evomerge"), row.get("mergekit")

        def cell_s(r):
            if r is None:
                return "skipped"
            if "error" in r:
                return "error"
            busy = "†" if r["other_load_cores"] > 0.25 or r["steal_cores"] > 0.1 else ""
            return f"{_fmt_s(r['merge_s'])} ({_fmt_s(r['process_s'])}){busy}"

        def cell_rss(r):
            if not r or "peak_rss" not in r:
                return "—"
            anon = f" ({r['peak_anon'] / GB:.2f})" if r.get("peak_anon") else ""
            return _fmt_gb(r["peak_rss"]) + anon

        def times(r, row=row):
            return f"{r['merge_s'] / row['limit_s']:.1f}×" if r and "merge_s" in r and row["limit_s"] else "—"

        def cell_cpu(r):
            return _fmt_s(r["cpu_s"]) if r and "cpu_s" in r else "—"

        speed = f"{mk['merge_s'] / evo['merge_s']:.2f}×" if evo and mk and "merge_s" in evo and "merge_s" in mk else "—"
        lines.append(
            f"| {method} | {cell_s(evo)} | {cell_s(mk)} | {speed} | {cell_cpu(evo)} | {cell_cpu(mk)} | "
            f"{cell_rss(evo)} | {cell_rss(mk)} | "
            f"{_fmt_gb(row['bytes_moved'])} | {_fmt_s(row['limit_s'])} | {times(evo)} | {times(mk)} |"
        )
    lines.append("")
    lines.append(
        "Times: median merge-call wall time over repeats (in parentheses: the whole subprocess, interpreter "
        "start and imports included). Speedup = mergekit s / evomerge s. CPU s = user + system CPU time of the merge call "
        "(less sensitive than wall time to other load on this shared machine). Peak RSS = the merge process's "
        "VmHWM (resident anon + file-backed pages, Python/torch import included"
        + _import_rss(summary)
        + "); in parentheses the anonymous part at the sampled peak (mergekit's "
        "RSS is mostly mapped safetensors pages, i.e. shared page cache). Bytes moved = source tensor "
        "bytes the recipe reads + output bytes written; limit = bytes moved / memory-copy bandwidth "
        f"({bench['memory']['copy_gbps']:.1f} GB/s read+write)."
        + (
            " † = other processes (or the hypervisor) took more than a quarter of a core during that merge: "
            "its time is not clean."
            if any(
                isinstance(row.get(t), dict)
                and (row[t].get("other_load_cores", 0) > 0.25 or row[t].get("steal_cores", 0) > 0.1)
                for row in summary.values()
                for t in TOOLS
            )
            else ""
        )
    )
    cold = [
        f"{m}/{t} {row[t]['disk_read_bytes'] / GB:.2f} GB"
        for m, row in summary.items()
        for t in TOOLS
        if _ok(row, t) and row[t].get("disk_read_bytes", 0) > 0.05 * GB
    ]
    if cold:
        lines.append("")
        lines.append("Not fully warm: these merges read from disk despite the warm-up: " + ", ".join(cold) + ".")
    errors = [
        (m, t, row[t]["error"])
        for m, row in summary.items()
        for t in TOOLS
        if isinstance(row.get(t), dict) and "error" in row[t]
    ]
    if errors:
        lines.append("")
        for m, t, e in errors:
            lines.append(f"- {m} / {t}: error: `{e.splitlines()[0][:300]}`")
    if comparisons:
        lines.append("")
        lines.append(
            "Correctness, evomerge vs mergekit output (a sample of tensors: embeddings, first/middle/last-layer "
            "projections, a norm, the head):"
        )
        lines.append("")
        lines.append(
            "| method | tensors | max abs diff | max diff in bf16 ulps | elements differing | "
            "elements > 1 ulp apart | max rel L2 diff |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for method, c in comparisons.items():
            if "error" in c:
                lines.append(f"| {method} | — | error: {c['error'][:120]} | | | |")
                continue
            share = c["mismatch"] / c["numel"] if c["numel"] else 0
            note = "" if method in DETERMINISTIC else " (randomized: not comparable elementwise)"
            beyond = c["beyond_1ulp"] / c["numel"] if c["numel"] else 0
            lines.append(
                f"| {method}{note} | {c['compared']}/{c['of']} | {c['max_abs']:.3g} | {c['max_ulp']:.3g} | "
                f"{share:.3%} | {beyond:.3%} | {c['rel_l2']:.2g} |"
            )
    targets = []
    both = {m: r for m, r in summary.items() if _ok(r, "evomerge") and _ok(r, "mergekit")}
    if both:
        slower = [m for m, r in both.items() if r["evomerge"]["merge_s"] >= r["mergekit"]["merge_s"]]
        targets.append(
            f"- evomerge faster than mergekit on every method: "
            f"{'yes' if not slower else 'no (slower or equal on: ' + ', '.join(slower) + ')'}"
        )
    if _ok(summary.get("ties", {}), "evomerge") and _ok(summary.get("linear", {}), "evomerge"):
        ratio = summary["ties"]["evomerge"]["merge_s"] / summary["linear"]["evomerge"]["merge_s"]
        targets.append(f"- evomerge ties within 2× of linear: {'yes' if ratio <= 2 else 'no'} ({ratio:.2f}×)")
    evo_rss = {m: r["evomerge"]["peak_rss"] for m, r in summary.items() if _ok(r, "evomerge")}
    if evo_rss:
        over = [f"{m} {v / GB:.2f} GB" for m, v in evo_rss.items() if v >= RSS_TARGET]
        targets.append(f"- evomerge peak RSS under 1 GB: {'yes' if not over else 'no (' + ', '.join(over) + ')'}")
    if targets:
        lines.append("")
        lines.append("Targets:")
        lines.append("")
        lines.extend(targets)
    return "\n".join(lines)


def _import_rss(summary: dict[str, dict[str, Any]]) -> str:
    parts = []
    for tool in TOOLS:
        values = [
            row[tool]["rss_before_merge"]
            for row in summary.values()
            if _ok(row, tool) and row[tool].get("rss_before_merge")
        ]
        if values:
            parts.append(f"{tool} {statistics.median(values) / GB:.2f} GB")
    return ": RSS after imports, before merging: " + ", ".join(parts) if parts else ""


def _busy(run: dict[str, Any]) -> bool:
    """Other processes (or the hypervisor) took a real share of the CPU during this merge."""
    load = run.get("load") or {}
    return load.get("other_cores", 0) > 0.25 or load.get("steal_cores", 0) > 0.1


def _ok(row: dict[str, Any], tool: str) -> bool:
    return isinstance(row.get(tool), dict) and "merge_s" in row[tool]


def markdown_section(table: str, bench: dict[str, Any]) -> str:
    m, mem, disk = bench["machine"], bench["memory"], bench["disk"]
    shape = SIZES[bench["size"]]
    return f"""## Merge: evomerge vs mergekit

evomerge's streaming engine vs mergekit {m.get("mergekit")}, same recipes, same inputs, same disk. Generated by
`scripts/bench_merge.py`; rerun it to refresh this section.

- Command: `{bench["command"]}`
- Date: {bench["date"]}
- Machine: {m["cpu"]}, {m["cores"]} cores, {m["ram_gib"]} GiB RAM, no GPU; torch {m["torch"]} ({m["torch_threads"]} threads), Python {m["python"]}; evomerge {m.get("evomerge_commit")}
- Models: synthetic Llama, {bench["params"] / 1e9:.2f}B parameters, bf16 (hidden {shape["hidden"]}, intermediate {shape["intermediate"]}, {shape["layers"]} layers, {shape["heads"]} heads / {shape["kv_heads"]} KV heads, vocab {shape["vocab"]}, untied head), a base + 3 fine-tunes (base + N(0, {FINETUNE_STD}) noise), {bench["source_model_bytes"] / GB:.2f} GB each
- Memory-copy bandwidth (1 GiB buffers, read + write, best of a measurement before and after the merges): torch {mem["torch_copy_gbps"]:.1f} GB/s, numpy {mem["numpy_copy_gbps"]:.1f} GB/s, bf16→fp32 upcast {mem["bf16_to_fp32_gbps"]:.1f} GB/s
- Disk ({disk["probe_bytes"] / GB:.1f} GB probe, best of before and after): write {disk["disk_write_gbps"]:.2f} GB/s (fsync'd), cold read {disk["disk_read_cold_gbps"]:.2f} GB/s, page-cache read {disk["page_cache_read_gbps"]:.2f} GB/s; warming all sources before each merge read {bench["warm_gbps"]:.2f} GB/s
- Method: each merge runs in its own fresh subprocess, started once other processes leave the CPU idle; the page cache is warmed by reading every source file right before each merge (and the benchmark keeps the sources mapped so this VM's DAMON proactive reclaim cannot evict them mid-merge; per-merge disk reads are checked), dirty pages are synced between merges, and the tool order alternates between methods and repeats. Outputs are bf16 (`dtype: bfloat16`), one shard (5 GB limit, both tools' default), to the same disk, without fsync (neither tool syncs). mergekit runs with its default options except `copy_tokenizer=False` (the synthetic models have no tokenizer), `random_seed={bench["seed"]}` and `quiet=True`; evomerge runs `merge_to_disk(recipe, out, device="cpu", out_shard_size="5GB", seed={bench["seed"]})`. Repeats: {bench["repeats"]}; a merge during which other processes used more than a quarter of a core is rerun (up to {bench["retry_busy"]} time(s)) and flagged † if still not clean.
- Recipes: linear over the 3 fine-tunes (0.4/0.3/0.3); slerp base↔ft1 (t gradients [0, .5, .3, .7, 1] for self_attn, reversed for mlp, 0.5 elsewhere); ties and dare_ties over the 3 fine-tunes with the base (density 0.5, weight 0.5); task_arithmetic (weight 0.5 each); passthrough stacking layers {bench["passthrough"]}. The YAML files are written to `<work-dir>/recipes/` and read by both tools.

{table}
"""


MANUAL_MARKER = "<!-- bench_merge.py: generated above; text below this line is kept when the section is regenerated -->"


def update_markdown(path: Path, section: str) -> None:
    """Replace the '## Merge...' section (up to the next '## ' heading) or append it.

    Hand-written notes after ``MANUAL_MARKER`` inside the old section are carried over; any further
    '## Merge' sections (duplicates) are dropped.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Merge\b[^\n]*\n.*?(?=^## |\Z)", re.S | re.M)
    found = list(pattern.finditer(text))
    notes = ""
    for match in found:
        if MANUAL_MARKER in match.group(0):
            notes = match.group(0).split(MANUAL_MARKER, 1)[1].strip()
            break
    block = section.rstrip() + "\n\n" + MANUAL_MARKER + "\n" + (("\n" + notes + "\n") if notes else "") + "\n"
    if found:
        first = found[0]
        pieces = [text[: first.start()], block]
        last = first.end()
        for match in found[1:]:
            pieces.append(text[last : match.start()])
            last = match.end()
        pieces.append(text[last:])
        text = "".join(pieces)
    else:
        text = text.rstrip() + "\n\n" + block
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# =============================================================================================
# Main
# =============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help=f"comma-separated subset of {','.join(ALL_METHODS + EXTRA_METHODS)} (default: {','.join(ALL_METHODS)})",
    )
    p.add_argument(
        "--size", choices=sorted(SIZES), default="1b", help="1b: TinyLlama shape (1.1B); small: ~110M smoke run"
    )
    p.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help=f"models, outputs, logs (default {DEFAULT_WORK_DIR})"
    )
    p.add_argument("--skip-mergekit", action="store_true", help="time evomerge only")
    p.add_argument("--repeats", type=int, default=1, help="timed merges per method and tool (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed for randomized methods (both tools)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=300,
        metavar="SECONDS",
        help="before each merge, wait up to this long for other processes to stop using the CPU "
        "(0: don't wait); merges run on a busy machine are flagged † either way (default 300)",
    )
    p.add_argument(
        "--retry-busy",
        type=int,
        default=1,
        metavar="N",
        help="rerun a merge up to N times when other processes used the CPU during it (default 1)",
    )
    p.add_argument(
        "--no-pin-sources",
        action="store_true",
        help="do not keep the sources mapped in the parent (see SourcePin: on hosts with proactive "
        "page-cache reclaim, sources then get evicted during long merges)",
    )
    p.add_argument("--json", type=Path, help="write all measurements to this JSON file")
    p.add_argument(
        "--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="file whose '## Merge' section is replaced"
    )
    p.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--no-compare", action="store_true", help="skip the evomerge-vs-mergekit output comparison")
    p.add_argument("--keep-outputs", action="store_true", help="keep merged checkpoints under <work-dir>/out")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="do not run anything: re-render the tables (and BENCHMARKS.md) from a --json file of an earlier run",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the timed runs, one extra untimed evomerge run per method under py-spy "
        "(raw stacks in <work-dir>/profiles, summary printed and in the JSON)",
    )
    # internal: the per-merge subprocess
    p.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--child-recipe", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS + EXTRA_METHODS]
    if bad:
        p.error(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(ALL_METHODS + EXTRA_METHODS)})")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.methods = methods
    args.work_dir = args.work_dir.expanduser().resolve()
    return args


def report_from_json(args: argparse.Namespace, log) -> int:
    payload = json.loads(args.from_json.read_text())
    bench = {
        k: v
        for k, v in payload.items()
        if k not in ("summary", "runs", "comparisons", "profiles", "recipes", "discarded_busy_runs")
    }
    bench.setdefault("retry_busy", 0)
    summary = summarize(payload["runs"], bench["methods"], bench["memory"]["copy_gbps"])
    table = render(summary, payload.get("comparisons", {}), bench)
    print(table)
    if not args.no_markdown:
        update_markdown(args.markdown, markdown_section(table, bench))
        log(f"updated the '## Merge' section of {args.markdown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_recipe, args.child_out, args.child_result, args.seed)
    if args.work_dir == REPO or REPO in args.work_dir.parents:
        print(f"--work-dir {args.work_dir} is inside the repository; pick a path outside it", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.from_json:
        return report_from_json(args, log)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_merge.py " + " ".join(
        a if not any(c in a for c in " '\"") else repr(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    bench: dict[str, Any] = {
        "command": command.strip(),
        "size": args.size,
        "repeats": args.repeats,
        "seed": args.seed,
        "retry_busy": args.retry_busy,
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_info(),
        "methods": args.methods,
    }
    log(f"machine: {bench['machine']['cpu']}, {bench['machine']['cores']} cores, {bench['machine']['ram_gib']} GiB RAM")

    paths = ensure_models(args.size, args.work_dir, log)
    headers = {str(p): read_headers(p) for p in paths.values()}
    bench["params"] = sum(math.prod(s) for _, s, _ in headers[str(paths["base"])].values())
    bench["source_model_bytes"] = dir_bytes(paths["base"])

    if args.wait_idle > 0:
        waited, other = wait_for_idle(args.wait_idle)
        if waited >= 2:
            log(f"waited {waited:.0f} s for the machine to go idle (others now use {other:.2f} cores)")
    log("measuring memory-copy bandwidth ...")
    bench["memory"] = measure_memory_bandwidth()
    log(
        "  torch copy {torch_copy_gbps:.1f} GB/s, numpy copy {numpy_copy_gbps:.1f} GB/s, bf16->fp32 {bf16_to_fp32_gbps:.1f} GB/s "
        "(read+write)".format(**bench["memory"])
    )
    log("measuring disk ...")
    bench["disk"] = measure_disk(args.work_dir, min(bench["source_model_bytes"], 2 * 2**30))
    log(
        "  write {disk_write_gbps:.2f} GB/s, cold read {disk_read_cold_gbps:.2f} GB/s, page-cache read "
        "{page_cache_read_gbps:.2f} GB/s".format(**bench["disk"])
    )
    nbytes, secs = warm_sources(paths)
    log(f"warmed sources: {nbytes / GB:.1f} GB in {secs:.1f} s")
    pin = None if args.no_pin_sources else SourcePin(paths)

    num_layers = SIZES[args.size]["layers"]
    recipes = make_recipes(paths, num_layers)
    pt = recipes["passthrough"]["slices"]
    bench["passthrough"] = (
        f"{pt[0]['sources'][0]['layer_range'][0]}–{pt[0]['sources'][0]['layer_range'][1]} of ft1 and "
        f"{pt[1]['sources'][0]['layer_range'][0]}–{pt[1]['sources'][0]['layer_range'][1]} of ft2"
    )
    recipe_dir = args.work_dir / "recipes" / args.size
    recipe_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    recipe_paths = {}
    for method in args.methods:
        recipe_paths[method] = recipe_dir / f"{method}.yaml"
        recipe_paths[method].write_text(yaml.safe_dump(recipes[method], sort_keys=False))

    tools = ["evomerge"] if args.skip_mergekit else list(TOOLS)
    out_root = args.work_dir / "out" / args.size
    results: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    comparisons: dict[str, Any] = {}
    warm_rates = []
    for rep in range(args.repeats):
        for i, method in enumerate(args.methods):
            order = tools if (i + rep) % 2 == 0 else tools[::-1]
            src_bytes = source_bytes(recipes[method], headers)
            for tool in order:
                os.sync()
                waited, other = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else (0.0, None)
                if waited >= 2:
                    log(f"    waited {waited:.0f} s for the machine to go idle (others now use {other:.2f} cores)")
                nbytes, secs = warm_sources(paths)
                warm_rates.append(nbytes / secs / GB)
                if pin is not None:
                    pin.touch()
                tag = f"{args.size}-{method}-{tool}-r{rep}"
                r = run_child(tool, recipe_paths[method], out_root / f"{method}-{tool}", args.work_dir, args.seed, tag)
                r.update(method=method, repeat=rep, source_bytes=src_bytes, waited_for_idle_s=waited)
                for attempt in range(args.retry_busy):
                    if not (r.get("ok") and _busy(r)):
                        break
                    log(
                        f"[{method:>15} r{rep}] {tool:>8}: {r['merge_s']:7.2f} s, but other processes used "
                        f"{r['load']['other_cores']:.2f} cores meanwhile: discarded, running it again"
                    )
                    r["discarded"] = True
                    discarded.append(r)
                    os.sync()
                    if args.wait_idle > 0:
                        wait_for_idle(args.wait_idle)
                    warm_sources(paths)
                    if pin is not None:
                        pin.touch()
                    r = run_child(
                        tool,
                        recipe_paths[method],
                        out_root / f"{method}-{tool}",
                        args.work_dir,
                        args.seed,
                        f"{tag}-retry{attempt + 1}",
                    )
                    r.update(method=method, repeat=rep, source_bytes=src_bytes, retry=attempt + 1)
                results.append(r)
                if r.get("ok"):
                    log(
                        f"[{method:>15} r{rep}] {tool:>8}: {r['merge_s']:7.2f} s merge ({r['process_s']:.1f} s process), "
                        f"peak RSS {r['peak_rss'] / GB:.2f} GB, CPU {r['merge_cpu_s'] / r['merge_s']:.2f} cores, "
                        f"disk read {r.get('disk_read_bytes', 0) / GB:.2f} GB, other load {r['load']['other_cores']:.2f} "
                        f"cores, steal {r['load']['steal_cores']:.2f}"
                    )
                    if _busy(r):
                        log(
                            "    warning: the machine was busy with other work during this merge; its time is not clean"
                        )
                else:
                    log(
                        f"[{method:>15} r{rep}] {tool:>8}: FAILED: {r.get('error', '?').splitlines()[0][:300]} (log: {r['log']})"
                    )
            evo_out, mk_out = out_root / f"{method}-evomerge", out_root / f"{method}-mergekit"
            if rep == 0 and not args.no_compare and len(tools) == 2:
                pair = [r for r in results if r["method"] == method and r["repeat"] == rep]
                if all(r.get("ok") for r in pair):
                    try:
                        comparisons[method] = compare_outputs(evo_out, mk_out)
                        c = comparisons[method]
                        log(
                            f"[{method:>15}] evomerge vs mergekit: max |diff| {c['max_abs']:.3g} ({c['max_ulp']:.3g} bf16 ulps), "
                            f"{c['mismatch'] / max(c['numel'], 1):.3%} of sampled elements differ, "
                            f"{c['beyond_1ulp'] / max(c['numel'], 1):.3%} by more than 1 ulp"
                        )
                    except Exception as exc:  # noqa: BLE001
                        comparisons[method] = {"error": f"{type(exc).__name__}: {exc}"}
            if not args.keep_outputs:
                for d in (evo_out, mk_out):
                    shutil.rmtree(d, ignore_errors=True)
    bench["warm_gbps"] = statistics.median(warm_rates) if warm_rates else float("nan")

    profiles = {}
    if args.profile:
        prof_dir = args.work_dir / "profiles"
        prof_dir.mkdir(parents=True, exist_ok=True)
        for method in args.methods:
            os.sync()
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            warm_sources(paths)
            raw = prof_dir / f"{args.size}-{method}-evomerge.txt"
            r = run_child(
                "evomerge",
                recipe_paths[method],
                out_root / f"{method}-evomerge-profile",
                args.work_dir,
                args.seed,
                f"{args.size}-{method}-evomerge-profile",
                profile_to=raw,
            )
            shutil.rmtree(out_root / f"{method}-evomerge-profile", ignore_errors=True)
            if not raw.exists():
                log(f"[{method:>15}] profile: py-spy wrote nothing (see {r['log']})")
                continue
            profiles[method] = {"file": str(raw), **summarize_profile(raw)}
            log(f"[{method:>15}] profile ({raw}), top self time:")
            for frame, share in profiles[method]["self"][:8]:
                log(f"      {share:6.1%}  {frame}")
            log("    inclusive (evomerge/mergekit functions):")
            for frame, share in profiles[method]["inclusive_functions"][:10]:
                log(f"      {share:6.1%}  {frame}")

    if pin is not None:
        pin.close()
    # bandwidths are ceilings: measure again at the end (idle permitting) and keep the best of the two
    if args.wait_idle > 0:
        wait_for_idle(min(args.wait_idle, 120))
    again = measure_memory_bandwidth()
    for key in ("torch_copy_gbps", "numpy_copy_gbps", "bf16_to_fp32_gbps"):
        bench["memory"][key] = max(bench["memory"][key], again[key])
    bench["memory"]["copy_gbps"] = max(bench["memory"]["torch_copy_gbps"], bench["memory"]["numpy_copy_gbps"])
    disk_again = measure_disk(args.work_dir, min(bench["source_model_bytes"], 2 * 2**30))
    for key in ("disk_write_gbps", "disk_read_cold_gbps", "page_cache_read_gbps"):
        bench["disk"][key] = max(bench["disk"][key], disk_again[key])
    log("bandwidth, best of start and end: copy {copy_gbps:.1f} GB/s (read+write)".format(**bench["memory"]))
    summary = summarize(results, args.methods, bench["memory"]["copy_gbps"])
    table = render(summary, comparisons, bench)
    print()
    print(table)
    if args.json:
        payload = {
            **bench,
            "summary": summary,
            "runs": results,
            "discarded_busy_runs": discarded,
            "comparisons": comparisons,
            "profiles": profiles,
            "recipes": {m: recipes[m] for m in args.methods},
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        log(f"\nwrote {args.json}")
    if not args.no_markdown:
        update_markdown(args.markdown, markdown_section(table, bench))
        log(f"updated the '## Merge' section of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
