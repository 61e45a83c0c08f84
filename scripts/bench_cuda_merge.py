#!/usr/bin/env python
"""CUDA paths of the merge engine: the same recipes merged to disk on CPU and on a GPU, compared tensor
for tensor and timed, and merged in memory into a GPU-resident model (``materialize_into``, what a
search worker on a GPU does) followed by a forward pass.

Needs a CUDA device (not run in CI). A random Llama (hidden 1024, 8 layers, vocab 32000: 167 M
parameters, float32) and three perturbed copies are written to a temp dir first.

    python scripts/bench_cuda_merge.py            # cuda
    python scripts/bench_cuda_merge.py cpu small  # a tiny model, CPU against CPU: checks the script runs
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.merge.engine import materialize_into, merge_to_disk, plan_recipe
from evomerge.recipe import Recipe

out = {}
GPU = sys.argv[1] if len(sys.argv) > 1 else "cuda"
SMALL = len(sys.argv) > 2
root = Path(tempfile.mkdtemp())
cfg = LlamaConfig(
    vocab_size=32000 if not SMALL else 100,
    hidden_size=1024 if not SMALL else 64,
    intermediate_size=2816 if not SMALL else 128,
    num_hidden_layers=8 if not SMALL else 2,
    num_attention_heads=16 if not SMALL else 4,
    num_key_value_heads=16 if not SMALL else 4,
    tie_word_embeddings=False,
)
torch.manual_seed(0)
base = LlamaForCausalLM(cfg).to(torch.float32)
base.save_pretrained(root / "base")
names = []
for i in range(3):
    m = LlamaForCausalLM(cfg)
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}
    m.load_state_dict(sd)
    m.save_pretrained(root / f"ft{i}")
    names.append(str(root / f"ft{i}"))
n_params = sum(p.numel() for p in base.parameters())
out["params"] = n_params
methods = {
    "linear": {"merge_method": "linear", "models": [{"model": n, "parameters": {"weight": 1.0}} for n in names]},
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": n, "parameters": {"weight": 0.7}} for n in names],
    },
    "ties": {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [{"model": n, "parameters": {"weight": 1.0, "density": 0.5}} for n in names],
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": str(root / "base"),
        "models": [{"model": n, "parameters": {"weight": 1.0, "density": 0.5}} for n in names],
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": names[0],
        "models": [{"model": names[0]}, {"model": names[1]}],
        "parameters": {"t": 0.4},
    },
}
from safetensors.torch import load_file  # noqa: E402

for meth, rd in methods.items():
    rd["dtype"] = "float32"
    rec = Recipe.from_dict(rd, source=meth)
    res = {}
    for dev in ("cpu", GPU):
        t = time.perf_counter()
        merge_to_disk(rec, root / f"out-{meth}-{dev}", device=dev, overwrite=True)
        res[f"disk_{dev}_s"] = round(time.perf_counter() - t, 3)
    a = {}
    b = {}
    for f in (root / f"out-{meth}-cpu").glob("*.safetensors"):
        a.update(load_file(f))
    for f in (root / f"out-{meth}-{GPU}").glob("*.safetensors"):
        b.update(load_file(f))
    res["max_abs_diff_cpu_vs_cuda"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    # in-memory, into a CUDA-resident model
    model = LlamaForCausalLM(cfg).to(GPU)
    plan = plan_recipe(rec)
    GPU == "cuda" and torch.cuda.synchronize()
    t = time.perf_counter()
    materialize_into(model, plan)
    GPU == "cuda" and torch.cuda.synchronize()
    res["materialize_into_cuda_s"] = round(time.perf_counter() - t, 3)
    sdm = model.state_dict()
    res["inmem_vs_disk_cpu_max_abs"] = max(float((sdm[k].cpu() - a[k]).abs().max()) for k in a)
    ids = torch.randint(0, cfg.vocab_size, (8, 128), device=GPU)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    res["forward_finite"] = bool(torch.isfinite(logits).all())
    plan.close()
    out[meth] = res
    print(meth, res, flush=True)
json.dump(out, sys.stdout, indent=1)
