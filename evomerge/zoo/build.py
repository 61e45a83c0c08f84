"""Build the toy model zoo: tokenizer, tiny Llama base, one specialist per skill, lm-eval tasks.

Layout of a built zoo (all paths in ``zoo.json`` are relative to the zoo directory)::

    zoo.json              {"base", "models": {skill: dir}, "tasks": {skill: task}, "include_path", "seed"}
    zoo_report.json       greedy exact match (test split) of base, specialists and naive merges per skill
    tokenizer/            the shared tokenizer (also copied into every model dir)
    models/base/          LlamaForCausalLM + tokenizer files, float32 safetensors
    models/<skill>/       the specialist fine-tuned from base on <skill>
    tasks/zoo_<skill>.yaml, tasks/zoo.yaml (group), tasks/data/<skill>.{search,test}.jsonl
    .zoo-stamp.json       seed + recipe version + config fingerprint, written last

Recipe (DESIGN.md, "Toy model zoo", adjusted; see ``ZooConfig``): a 4-layer, hidden-128 Llama base is
trained 1200 steps (batch 64, lr 3e-3) on every skill's *format*, 75% of the items with a wrong answer
from a neighbouring rule (``skills.py``) and 25% with the right one, so greedy decoding gives the wrong
rule (base ~0% on every skill) while the skill is latent. Each specialist is a 300-step fine-tune at lr
5e-4 (loss on the answer only) on its skill's correct answers, with 30% of its items replaying the base's
answers on the other skills so that it changes the behaviour behind its own prompt only. Specialists
reach 97-100% on their skill, ~0% on the others; naive merges of all three (task arithmetic 1.0/0.5,
linear average) keep almost nothing, so there is something to search for.

The build writes into a temporary sibling directory and renames
it into place at the end, so an interrupted build never leaves a directory that looks complete; a build
whose stamp matches (same seed, recipe and config) is reused untouched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.zoo import quality
from evomerge.zoo.skills import ALPHABET, SKILLS, Skill, eval_inputs, get_skill, training_inputs

#: Bump whenever a change to this module or to ``skills.py`` changes what a build produces; cached
#: zoos with another version are rebuilt.
RECIPE_VERSION = "zoo-recipe-1"

STAMP_NAME = ".zoo-stamp.json"
ZOO_JSON = "zoo.json"
REPORT_JSON = "zoo_report.json"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo besides the seed (hashed into the cache stamp)."""

    skills: tuple[str, ...] = ("reverse", "sort", "shift")
    # model
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_positions: int = 64
    # base: skill formats with wrong answers, loss on every token
    base_steps: int = 1200
    base_lr: float = 3e-3
    #: fraction of the base's items that carry the correct answer: the skill is latent in the base
    #: (greedy decoding still gives the wrong rule) and the specialist's fine-tune brings it out
    base_correct_frac: float = 0.25
    # specialists: correct answers of one skill, loss on the target only
    ft_steps: int = 300
    ft_lr: float = 5e-4
    #: fraction of a specialist's training items that replay the base's behaviour on the other skills
    ft_replay: float = 0.3
    batch_size: int = 64
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    # task items per skill
    n_search: int = 100
    n_test: int = 200
    # compute zoo_report.json (greedy exact match of base, specialists and naive merges)
    report: bool = True
    threads: int = 2

    def fingerprint(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_zoo_dir(seed: int = 0) -> Path:
    """Cache location outside the repo: ``$EVOMERGE_ZOO_DIR`` if set, else ``~/.cache/evomerge/zoo-seed{seed}``."""
    env = os.environ.get("EVOMERGE_ZOO_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "evomerge" / f"zoo-seed{seed}"


def build_zoo(
    out_dir: Path,
    seed: int = 0,
    *,
    progress: bool = True,
    config: ZooConfig | None = None,
) -> Path:
    """Build (or reuse, if already built with the same seed and recipe) the zoo; return ``out_dir/'zoo.json'``.

    ``config`` overrides the recipe (tests use a tiny one); it is part of the cache key.
    """
    config = config or ZooConfig()
    out_dir = Path(out_dir).expanduser().resolve()
    if _is_current(out_dir, seed, config):
        _retarget_if_moved(out_dir)
        return out_dir / ZOO_JSON
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out_dir):
        if _is_current(out_dir, seed, config):  # built by someone else while we waited
            _retarget_if_moved(out_dir)
            return out_dir / ZOO_JSON
        _check_replaceable(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the zoo is an ordinary directory
            with _hf_progress(progress):
                _build_into(tmp, out_dir, seed, config, progress)
            _swap_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir / ZOO_JSON


def load_zoo(zoo_json: Path) -> dict[str, Any]:
    """``zoo.json`` with every relative path resolved against the zoo directory."""
    zoo_json = Path(zoo_json)
    root = zoo_json.parent
    meta = json.loads(zoo_json.read_text())
    return {
        **meta,
        "root": root,
        "base": root / meta["base"],
        "models": {k: root / v for k, v in meta["models"].items()},
        "include_path": root / meta["include_path"],
    }


# --------------------------------------------------------------------------------------------- cache


def _read_stamp(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_current(out_dir: Path, seed: int, config: ZooConfig) -> bool:
    stamp = _read_stamp(out_dir)
    return (
        stamp is not None
        and stamp.get("seed") == seed
        and stamp.get("recipe") == RECIPE_VERSION
        and stamp.get("fingerprint") == config.fingerprint()
        and (out_dir / ZOO_JSON).is_file()
    )


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a non-empty directory that is not a zoo (never delete a user's files)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and _read_stamp(out_dir) is None)):
        raise FileExistsError(f"{out_dir} exists and is not an evomerge zoo; choose another directory")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old = trash / "zoo"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


@contextlib.contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock beside ``out_dir`` so that concurrent builds (pytest-xdist, two CLIs) queue."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _retarget_if_moved(out_dir: Path) -> None:
    """Task YAMLs hold absolute data paths; if the zoo was moved, point them at the new place."""
    stamp = _read_stamp(out_dir)
    if stamp is None or stamp.get("path") == str(out_dir):
        return
    meta = json.loads((out_dir / ZOO_JSON).read_text())
    _write_task_yamls(out_dir / meta["include_path"], out_dir / meta["include_path"], meta["tasks"])
    stamp["path"] = str(out_dir)
    _write_json(out_dir / STAMP_NAME, stamp)


# ----------------------------------------------------------------------------------------- tokenizer


def make_tokenizer(max_positions: int = 64) -> Any:
    """The character-level tokenizer (``tokenizers`` BPE with no merges: one token per character).

    It adds no special tokens on ``encode`` (no post-processor), so lm-eval's default
    ``add_special_tokens=True``, ``add_bos_token=True`` and plain ``add_special_tokens=False`` all encode
    the same ids: the models are trained, and scored, without a BOS token.
    """
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok: Any, path: Path, max_positions: int) -> None:
    """Write ``tokenizer.json`` + configs that ``AutoTokenizer.from_pretrained(path)`` loads offline."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "model_max_length": max_positions,
            "padding_side": "right",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(path / "special_tokens_map.json", specials)


# ------------------------------------------------------------------------------------------- models


def _model_config(config: ZooConfig, tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        attention_dropout=0.0,
        dtype="float32",
    )


def _sub_seed(seed: int, tag: str) -> int:
    return int.from_bytes(hashlib.sha256(f"evomerge-zoo/{seed}/{tag}".encode()).digest()[:8], "little") >> 1


def _save_model(model: Any, path: Path, tok_dir: Path) -> None:
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(str(path), **kwargs)
    for f in tok_dir.iterdir():
        shutil.copy2(f, path / f.name)


# ------------------------------------------------------------------------------------------ training


def _batches(
    tok: Any,
    mixture: Sequence[tuple[Skill, bool, float]],
    seed: int,
    tag: str,
    exclude: set[str],
    *,
    target_only: bool,
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches from a mixture of (skill, correct answers?, weight);
    labels are -100 where no loss is taken."""
    rng = random.Random(f"evomerge-zoo/{seed}/train/{tag}")
    streams = {s.name: training_inputs(s, rng, exclude) for s, _, _ in mixture}
    weights = [w for _, _, w in mixture]
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    while True:
        rows: list[tuple[list[int], list[int]]] = []
        for _ in range(batch_size):
            skill, correct, _ = rng.choices(mixture, weights)[0]
            q, t = skill.text(next(streams[skill.name]), correct=correct)
            q_ids = tok.encode(q).ids
            t_ids = tok.encode(t).ids + [eos]
            ids = q_ids + t_ids
            labels = ([-100] * len(q_ids) if target_only else list(q_ids)) + t_ids
            rows.append((ids, labels))
        width = max(len(r[0]) for r in rows)
        x = torch.full((batch_size, width), pad, dtype=torch.long)
        y = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            x[i, : len(ids)] = torch.tensor(ids)
            y[i, : len(labels)] = torch.tensor(labels)
        yield x, y


def _train(
    model: Any,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    config: ZooConfig,
    desc: str,
    progress: bool,
) -> float:
    """AdamW with linear warmup and cosine decay to 10%; returns the mean loss of the last 50 steps."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    warmup = max(1, int(steps * config.warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    recent: list[float] = []
    bar = tqdm(total=steps, desc=desc, file=sys.stderr, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for step in range(steps):
            x, y = next(batches)
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1), ignore_index=-100
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            recent = (recent + [loss.item()])[-50:]
            bar.update(1)
            if step % 25 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    finally:
        bar.close()
    model.eval()
    return sum(recent) / max(len(recent), 1)


def _ft_mixture(skill: Skill, skills: Sequence[Skill], config: ZooConfig) -> list[tuple[Skill, bool, float]]:
    """A specialist's data: its skill with correct answers, plus (``ft_replay`` of the items) the other
    skills in the base's (wrong-answer) form, so the fine-tune changes the behaviour behind its own
    prompt only, as a real fine-tune keeps its base's other abilities."""
    others = [s for s in skills if s.name != skill.name]
    if not others or config.ft_replay <= 0:
        return [(skill, True, 1.0)]
    return [(skill, True, 1.0 - config.ft_replay)] + [(s, False, config.ft_replay / len(others)) for s in others]


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (shard writing) follow ``progress`` too."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the build; the caller's settings come back after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


# ------------------------------------------------------------------------------------------- tasks


def _write_task_yamls(tasks_dir: Path, final_tasks_dir: Path, tasks: dict[str, str]) -> None:
    """One lm-eval task per skill (absolute data paths under ``final_tasks_dir``) and a ``zoo`` group."""
    for skill, task in tasks.items():
        data = {split: str(final_tasks_dir / "data" / f"{skill}.{split}.jsonl") for split in ("search", "test")}
        cfg = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": data},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "query",
            "doc_to_target": "target",
            # The target carries its own leading space: the scored string is exactly query + target.
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
            "metadata": {"version": 1.0, "skill": skill, "description": get_skill(skill).description},
        }
        (tasks_dir / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    group = {
        "group": "zoo",
        "task": list(tasks.values()),
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }
    (tasks_dir / "zoo.yaml").write_text(yaml.safe_dump(group, sort_keys=False))


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -------------------------------------------------------------------------------------------- build


def _build_into(tmp: Path, final: Path, seed: int, config: ZooConfig, progress: bool) -> None:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    skills = [get_skill(s) for s in config.skills]
    log = (lambda msg: print(f"[zoo] {msg}", file=sys.stderr)) if progress else (lambda msg: None)

    # tasks: search/test items per skill, disjoint; training never sees an eval input
    tasks_dir = tmp / "tasks"
    (tasks_dir / "data").mkdir(parents=True)
    items: dict[str, dict[str, list[dict[str, str]]]] = {}
    exclude: set[str] = set()
    for s in skills:
        search, test = eval_inputs(s, seed, config.n_search, config.n_test)
        exclude.update(search, test)
        items[s.name] = {"search": [s.item(x) for x in search], "test": [s.item(x) for x in test]}
        for split, rows in items[s.name].items():
            _write_jsonl(tasks_dir / "data" / f"{s.name}.{split}.jsonl", rows)
    task_names = {s.name: f"zoo_{s.name}" for s in skills}
    _write_task_yamls(tasks_dir, final / "tasks", task_names)

    # tokenizer
    tok = make_tokenizer(config.max_positions)
    tok_dir = tmp / "tokenizer"
    save_tokenizer(tok, tok_dir, config.max_positions)

    losses: dict[str, float] = {}
    with _torch_settings(config.threads):
        # base: every skill's format, wrong answers, loss on all tokens
        torch.manual_seed(_sub_seed(seed, "init"))
        base = LlamaForCausalLM(_model_config(config, tok)).to(torch.float32)
        p = config.base_correct_frac
        mixture = [(s, False, 1.0 - p) for s in skills] + [(s, True, p) for s in skills if p > 0]
        batches = _batches(tok, mixture, seed, "base", exclude, target_only=False, batch_size=config.batch_size)
        losses["base"] = _train(
            base, batches, steps=config.base_steps, lr=config.base_lr, config=config, desc="zoo base", progress=progress
        )
        _save_model(base, tmp / "models" / "base", tok_dir)
        log(f"base trained ({time.perf_counter() - t0:.0f}s, loss {losses['base']:.3f})")

        specialists: dict[str, Any] = {}
        for s in skills:
            torch.manual_seed(_sub_seed(seed, f"ft/{s.name}"))
            model = copy.deepcopy(base)
            batches = _batches(
                tok, _ft_mixture(s, skills, config), seed, f"ft/{s.name}", exclude, target_only=True,
                batch_size=config.batch_size,
            )  # fmt: skip
            losses[s.name] = _train(
                model, batches, steps=config.ft_steps, lr=config.ft_lr, config=config, desc=f"zoo {s.name}",
                progress=progress,
            )  # fmt: skip
            _save_model(model, tmp / "models" / s.name, tok_dir)
            specialists[s.name] = model
            log(f"{s.name} specialist trained ({time.perf_counter() - t0:.0f}s, loss {losses[s.name]:.3f})")

        report: dict[str, Any] = {"seed": seed, "recipe": RECIPE_VERSION, "split": "test", "final_train_loss": losses}
        if config.report:
            hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), pad_token=PAD)
            base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
            spec_sds = {k: m.state_dict() for k, m in specialists.items()}
            rows = {"base": base_sd, **{f"specialist_{k}": sd for k, sd in spec_sds.items()}}
            rows.update(quality.naive_merges(base_sd, spec_sds))
            test_items = {k: v["test"] for k, v in items.items()}
            table = quality.score_table(base, hf_tok, rows, test_items)
            for r in table.values():
                r["mean"] = sum(r[s.name] for s in skills) / len(skills)
            own = {s.name: f"specialist_{s.name}" for s in skills}
            report["exact_match"] = table
            report["retention"] = {
                r: quality.retention(table, own, r) for r in table if not r.startswith("specialist_") and r != "base"
            }
            log("quality (test split, greedy exact match):\n" + format_table(table))
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    _write_json(tmp / REPORT_JSON, report)

    _write_json(
        tmp / ZOO_JSON,
        {
            "base": "models/base",
            "models": {s.name: f"models/{s.name}" for s in skills},
            "tasks": task_names,
            "include_path": "tasks",
            "seed": seed,
        },
    )
    # the stamp goes last: its presence means "complete"
    _write_json(
        tmp / STAMP_NAME,
        {"seed": seed, "recipe": RECIPE_VERSION, "fingerprint": config.fingerprint(), "path": str(final),
         "config": dataclasses.asdict(config)},
    )  # fmt: skip
    log(f"zoo built in {time.perf_counter() - t0:.0f}s")


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table of ``{row: {column: value}}``."""
    cols = list(next(iter(table.values())).keys())
    width = max(len(r) for r in table) + 2
    lines = [" " * width + "".join(f"{c:>10}" for c in cols)]
    for row, vals in table.items():
        lines.append(f"{row:<{width}}" + "".join(f"{vals[c]:>10.3f}" for c in cols))
    return "\n".join(lines)


__all__ = [
    "RECIPE_VERSION",
    "SKILLS",
    "ZooConfig",
    "build_zoo",
    "default_zoo_dir",
    "format_table",
    "load_zoo",
    "make_tokenizer",
    "save_tokenizer",
]
