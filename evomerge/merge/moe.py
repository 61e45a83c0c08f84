"""Mixture-of-experts assembly from dense fine-tunes (mergekit-moe's Mixtral output, the same tensors).

Each layer's MLP becomes ``len(experts)`` experts, one per dense model (Transformers' Mixtral layout:
``experts.gate_up_proj`` = every expert's gate and up projections stacked, ``experts.down_proj``);
everything else is the base model's. Each layer's router (``mlp.gate.weight``, experts x hidden) is
set from prompts, as mergekit sets it:

- ``hidden``: the base model (in bfloat16) reads each expert's positive prompts; per layer, the hidden
  state entering that layer at the prompts' last token, averaged over the prompts, minus the same for
  the negative prompts, normalized to unit length;
- ``cheap_embed``: the prompts' token embeddings summed and normalized, the same for every layer;
- ``random`` / ``uniform_random``: Gaussian, or ``nn.Linear``'s uniform initialization (seeded here).

So a token goes to the experts whose prompts its hidden state resembles most.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from evomerge.merge.io import Checkpoint, OutputTensor, ShardedWriter, parse_size
from evomerge.recipe.moe import Expert, MoEConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MoEError(ValueError):
    """A mixture that cannot be assembled from these models (names the model and what differs)."""


def model_path(ref: str, base_dir: Path | None) -> Path:
    """A model reference as a directory: relative paths against ``base_dir``."""
    path = Path(ref).expanduser()
    return path if path.is_absolute() or base_dir is None else (base_dir / path).resolve()


def _tokenize(tokenizer: Any, prompts: list[str]) -> Any:
    """The prompts as mergekit tokenizes them for the router: BOS prepended, left-padded with BOS."""
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    )


def gate_vectors(config: MoEConfig, base: Path, *, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """The routers' weights, (layers, experts, hidden), by ``config.gate_mode`` (module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(base)
    layers, hidden, experts = model_config.num_hidden_layers, model_config.hidden_size, len(config.experts)
    generator = torch.Generator().manual_seed(seed)
    if config.gate_mode == "random":
        return torch.randn((layers, experts, hidden), generator=generator)
    if config.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale
    tokenizer = _router_tokenizer(base)
    if config.gate_mode == "cheap_embed":
        checkpoint = Checkpoint(base)
        embed = checkpoint.get("model.embed_tokens.weight")

        def vectors(prompts: list[str]) -> torch.Tensor:
            tokens = _tokenize(tokenizer, prompts)
            onehot = torch.nn.functional.one_hot(tokens["input_ids"], num_classes=model_config.vocab_size)
            summed = (
                ((onehot.float() @ embed.float()) * tokens["attention_mask"].unsqueeze(-1))
                .sum(dim=1)
                .sum(dim=0, keepdim=True)
            )
            return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)

    else:  # hidden
        checkpoint = None
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device).eval()  # type: ignore[arg-type]  # transformers' typed .to wrapper

        def vectors(prompts: list[str]) -> torch.Tensor:
            tokens = _tokenize(tokenizer, prompts).to(device)
            with torch.no_grad():
                out = model(**tokens, output_hidden_states=True, return_dict=True)
            states = torch.stack(out.hidden_states[:-1])[:, :, -1, :]  # entering each layer, last token
            return (states.sum(dim=1) / states.shape[1]).cpu()

    try:
        per_expert = []
        for expert in config.experts:
            vector = vectors(list(expert.positive_prompts or ()))
            if expert.negative_prompts:
                vector -= vectors(list(expert.negative_prompts))
            vector /= vector.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
            per_expert.append(vector)
    finally:
        if checkpoint is not None:
            checkpoint.close()
    return torch.stack(per_expert, dim=0).permute(1, 0, 2)


def _noise_and_scale(tensor: torch.Tensor, expert: Expert, residual: bool, generator: torch.Generator) -> torch.Tensor:
    if expert.noise_scale is not None:
        tensor = tensor + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * expert.noise_scale
    if residual and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def mixtral_config(base_config: dict[str, Any], experts: int, experts_per_token: int, dtype: torch.dtype) -> Any:
    """The output's config: the base's, as a Mixtral with ``experts`` experts (as mergekit writes it)."""
    from transformers import AutoConfig, MistralConfig, MixtralConfig

    config = AutoConfig.for_model(**base_config)
    if not isinstance(config, MistralConfig):
        mistral = MistralConfig(**config.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = config.max_position_embeddings
        config = mistral
    out = MixtralConfig(**config.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = experts
    out.num_experts_per_tok = experts_per_token
    out.sliding_window = None
    out.dtype = dtype
    return out


def _router_tokenizer(base: Path) -> Any:
    """The base's tokenizer as mergekit-moe sets it up, to read router prompts and to save with the
    mixture: left padding, padded with BOS (EOS if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def moe_tensors(
    config: MoEConfig, *, base_dir: Path | None = None, device: str = "cpu", seed: int = 0
) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """The mixture's Transformers config and every tensor, named as a Mixtral checkpoint names them:
    the base's non-MLP tensors, each layer's experts stacked from the sources' MLPs, the routers."""
    from evomerge.merge.plan import open_checkpoint

    base = model_path(config.base_model, base_dir)
    sources = [e.source_model for e in config.experts]  # a directory or BASE+ADAPTER (a LoRA expert)
    checkpoints: dict[Any, Checkpoint] = {base: Checkpoint(base)}
    for ref in sources:
        if ref not in checkpoints:
            checkpoints[ref] = open_checkpoint(ref, base_dir=base_dir)
    try:
        base_ckpt = checkpoints[base]
        if base_ckpt.config.get("model_type") not in ("llama", "mistral"):
            raise MoEError(
                f"{base}: model_type {base_ckpt.config.get('model_type')!r}; the Mixtral output needs llama or mistral models"
            )
        for path in sources:
            theirs = checkpoints[path].config
            for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers"):
                if theirs.get(key) != base_ckpt.config.get(key):
                    raise MoEError(
                        f"{path}: {key} {theirs.get(key)!r} differs from the base's {base_ckpt.config.get(key)!r}"
                    )
        stored = str(base_ckpt.config.get("dtype") or base_ckpt.config.get("torch_dtype") or "float32")
        if (config.dtype or stored) not in DTYPES:
            raise MoEError(f"{base}: dtype {stored!r}; set dtype: to one of {', '.join(DTYPES)}")
        dtype = DTYPES[config.dtype or stored]
        gates = gate_vectors(config, base, device=device, seed=seed)
        layers = int(base_ckpt.config["num_hidden_layers"])
        generator = torch.Generator().manual_seed(seed)
        # copies: the checkpoints' memory maps close when this returns
        out = [(name, base_ckpt.get(name).to(dtype, copy=True)) for name in base_ckpt.tensors if ".mlp." not in name]
        for layer in range(layers):
            prefix = f"model.layers.{layer}.mlp"
            gate_up, down = [], []
            for expert, path in zip(config.experts, sources):
                read = checkpoints[path].get
                w1 = _noise_and_scale(read(f"{prefix}.gate_proj.weight"), expert, False, generator)
                w2 = _noise_and_scale(read(f"{prefix}.down_proj.weight"), expert, True, generator)
                w3 = _noise_and_scale(read(f"{prefix}.up_proj.weight"), expert, False, generator)
                gate_up.append(torch.cat([w1, w3], dim=0))
                down.append(w2)
            out.append((f"{prefix}.experts.gate_up_proj", torch.stack(gate_up).to(dtype)))
            out.append((f"{prefix}.experts.down_proj", torch.stack(down).to(dtype)))
        out += [
            (f"model.layers.{layer}.mlp.gate.weight", gates[layer].to(dtype).contiguous()) for layer in range(layers)
        ]
        hf_config = mixtral_config(base_ckpt.config, len(config.experts), config.experts_per_token, dtype)
        return hf_config, out
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()


def moe_model(
    config: MoEConfig,
    *,
    base_dir: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """The mixture as a live ``MixtralForCausalLM`` on ``device`` (in ``dtype``, default the config's):
    what ``build_moe`` writes, loaded without the disk (a search scores each candidate this way)."""
    from transformers import MixtralForCausalLM

    hf_config, tensors = moe_tensors(config, base_dir=base_dir, device=device, seed=seed)
    model = MixtralForCausalLM(hf_config)  # not on "meta": the rotary buffers are made at init, not loaded
    model.load_state_dict(dict(tensors), strict=True)
    return model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]  # transformers' typed .to wrapper


def build_moe(
    config: MoEConfig,
    out_dir: str | Path,
    *,
    base_dir: Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    out_shard_size: str = "5GB",
) -> Path:
    """Write the mixture to ``out_dir`` (a temporary sibling renamed into place): config, tokenizer of
    the base, sharded safetensors. ``base_dir``: where relative model paths are resolved."""
    from evomerge.atomic import staging_dir

    hf_config, written = moe_tensors(config, base_dir=base_dir, device=device, seed=seed)
    with staging_dir(out_dir) as tmp:
        writer = ShardedWriter(
            tmp, [OutputTensor(n, tuple(t.shape), t.dtype) for n, t in written], parse_size(out_shard_size)
        )
        for name, tensor in written:
            writer.write(name, tensor)
        writer.finish()
        hf_config.save_pretrained(tmp)
        _router_tokenizer(model_path(config.base_model, base_dir)).save_pretrained(tmp)
        (tmp / "evomerge_moe.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    return Path(out_dir)
