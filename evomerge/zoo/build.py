"""Build the toy model zoo: tokenizer, tiny Llama base, specialists, a soup group, lm-eval tasks.

Layout of a built zoo (all paths in ``zoo.json`` are relative to the zoo directory)::

    zoo.json              {"base", "models": {skill: dir}, "tasks": {skill: task}, "generative_tasks":
                           {skill: task}, "include_path", "seed",
                           "synergy": {"task", "skills": [a, b]}, "soups": {skill: [dirs]},
                           "adapters": {skill: dir}}
    zoo_report.json       test-split exact match of every model and hand-set merge, gain retention,
                          task-vector sizes and cosines, the soup against its ingredients
    tokenizer/            the shared tokenizer (also copied into every model dir)
    models/base/          LlamaForCausalLM + tokenizer files, float32 safetensors
    models/<skill>/       the specialist fine-tuned from base on <skill>
    models/<skill>-soup<i>/  more fine-tunes of the soup skill that differ only in data order
    adapters/<skill>/     a PEFT LoRA adapter of base for <skill> (same data and steps; use as base+adapter)
    tasks/zoo_<name>.yaml, tasks/zoo.yaml (group), tasks/data/<name>.{search,test}.jsonl
    tasks/zoo_<skill>_gen.yaml  the same items answered by greedy generation (exact match of the text
                          up to its first full stop: a regex filter), for generative scoring
    .zoo-stamp.json       seed + recipe version + config fingerprint, written last

Recipe (``ZooConfig``; why, in ``skills.py``): the base is pretrained on a broad mixture, copying in
every alphabet (the "general text"), and each specialist's skill and the synergy task on the letters it
is shown (``known_letters`` of each alphabet), so it knows each skill partly. Each specialist is a brief
fine-tune of that one checkpoint, all with the same settings: its skill on every letter, with a share of
copying and of every skill on the known letters replayed against the base's own predictions (a KL
term), so it keeps what the base knew. The soup group is the soup skill fine-tuned again with other
data orders.

The build writes into a temporary sibling directory and renames it into place at the end, so an
interrupted build never leaves a directory that looks complete; a build whose stamp matches (same
seed, recipe and config) is reused untouched.
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

import evomerge.zoo.quality as quality
from evomerge.atomic import replace_dir, write_bytes
from evomerge.zoo.skills import (
    ALPHABET,
    ALPHABETS,
    SKILLS,
    SYNERGY,
    SYNERGY_SKILLS,
    Skill,
    eval_inputs,
    get_skill,
    known_letters,
    training_inputs,
)

#: Bump whenever a change to this module or to ``skills.py`` changes what a build produces; cached
#: zoos with another version are rebuilt.
RECIPE_VERSION = "zoo-recipe-4"

STAMP_NAME = ".zoo-stamp.json"
ZOO_JSON = "zoo.json"
REPORT_JSON = "zoo_report.json"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo besides the seed (hashed into the cache stamp)."""

    skills: tuple[str, ...] = ("latin", "greek", "cyrillic")
    #: the synergy task: a skill (``skills.py``) that needs two specialists' skills at once
    synergy: str = SYNERGY
    #: the soup group: this skill's specialist plus ``soup_size - 1`` fine-tunes with other data orders
    soup_skill: str = "greek"
    soup_size: int = 3
    # model
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_positions: int = 64
    # base: the pretraining mixture, loss on every token
    base_steps: int = 2000
    base_lr: float = 3e-3
    #: how many of each alphabet's 16 letters the base is shown the code of (``skills.known_letters``):
    #: it gets an item right when every letter is one of these, so this sets how much of each skill it
    #: knows (10 of 16: about 0.16 exact match on 3-5 letters)
    known_letters: int = 10
    #: mixture weight of each specialist's skill (on the known letters) and of the synergy task (on
    #: the known letters of both alphabets); copying in each alphabet has 1
    skill_weight: float = 0.3
    synergy_weight: float = 0.1
    # specialists: one skill, loss on the target only, identical settings for all
    ft_steps: int = 200
    ft_lr: float = 5e-4
    #: share of a specialist's items that replay copying in every alphabet and every skill on the base's
    #: known letters, held to the base's own predictions by a KL term (``_ft_mixture``)
    ft_replay: float = 0.25
    batch_size: int = 64
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    #: LoRA specialists (PEFT adapters of the base, one per skill; zoo.json ``adapters``): the same data
    #: and steps as the full fine-tunes, rank ``lora_rank`` on every linear layer of the decoder
    lora_rank: int = 8
    lora_lr: float = 5e-3
    # task items per skill
    n_search: int = 100
    n_test: int = 200
    # compute zoo_report.json (exact match of models and hand-set merges, task-vector statistics)
    report: bool = True
    threads: int = 2

    def fingerprint(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_zoo_dir(seed: int = 0) -> Path:
    """Cache location outside the repo: ``$EVOMERGE_ZOO_DIR`` if set (and not a zoo of another seed),
    else ``~/.cache/evomerge/zoo-seed{seed}``.

    A zoo of another seed there is left alone: building seed N into it would replace the user's zoo
    (benchmarks over several seeds set the variable for one seed, then ask for the next)."""
    env = os.environ.get("EVOMERGE_ZOO_DIR")
    if env:
        path = Path(env).expanduser()
        stamp = _read_stamp(path)
        if stamp is None or stamp.get("seed") == seed:
            return path
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
            replace_dir(tmp, out_dir)
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
        "soups": {k: [root / p for p in v] for k, v in meta.get("soups", {}).items()},
        "adapters": {k: root / v for k, v in meta.get("adapters", {}).items()},
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
    """Task YAMLs hold absolute data paths; if the zoo was moved, point them at the new place. A zoo
    built before the generative tasks existed gets them here (task files only: the models are the same)."""
    stamp = _read_stamp(out_dir)
    meta = json.loads((out_dir / ZOO_JSON).read_text())
    if stamp is None or (stamp.get("path") == str(out_dir) and "generative_tasks" in meta):
        return
    if "generative_tasks" not in meta:
        meta["generative_tasks"] = _generative_names(meta["tasks"])
        write_bytes(out_dir / ZOO_JSON, (json.dumps(meta, indent=2) + "\n").encode())
    _write_task_yamls(
        out_dir / meta["include_path"], out_dir / meta["include_path"], _task_names(meta), meta["generative_tasks"]
    )
    stamp["path"] = str(out_dir)
    _write_json(out_dir / STAMP_NAME, stamp)


def _generative_names(tasks: dict[str, str]) -> dict[str, str]:
    """Each skill's generative task: the same items, answered by greedy generation (``<task>_gen``)."""
    return {skill: f"{task}_gen" for skill, task in tasks.items()}


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


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _batches(
    tok: Any,
    mixture: Sequence[tuple[Skill, float]],
    seed: int,
    tag: str,
    exclude: set[str],
    *,
    target_only: bool,
    batch_size: int,
    replay: frozenset[str] = frozenset(),
) -> Iterator[Batch]:
    """Endless ``(input_ids, labels, replay_mask)`` batches from a mixture of (skill, weight).

    ``labels`` are -100 where no cross-entropy is taken. Items of a skill named in ``replay`` take
    none: ``replay_mask`` marks the positions that predict their target tokens instead, where the
    fine-tune is held to the base's own next-token distribution (``_train``'s ``teacher``).
    """
    rng = random.Random(f"evomerge-zoo/{seed}/train/{tag}")
    streams = {s.name: training_inputs(s, rng, exclude) for s, _ in mixture}
    weights = [w for _, w in mixture]
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    while True:
        rows: list[tuple[list[int], list[int], bool, int]] = []
        for _ in range(batch_size):
            skill = rng.choices(mixture, weights)[0][0]
            q, t = skill.text(next(streams[skill.name]))
            q_ids = tok.encode(q).ids
            t_ids = tok.encode(t).ids + [eos]
            labels = ([-100] * len(q_ids) if target_only else list(q_ids)) + t_ids
            rows.append((q_ids + t_ids, labels, skill.name in replay, len(q_ids)))
        width = max(len(r[0]) for r in rows)
        x = torch.full((batch_size, width), pad, dtype=torch.long)
        y = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.bool)
        for i, (ids, labels, replayed, n_query) in enumerate(rows):
            x[i, : len(ids)] = torch.tensor(ids)
            if replayed:
                mask[i, n_query - 1 : len(ids) - 1] = True
            else:
                y[i, : len(labels)] = torch.tensor(labels)
        yield x, y, mask


def _train(
    model: Any,
    batches: Iterator[Batch],
    *,
    steps: int,
    lr: float,
    config: ZooConfig,
    desc: str,
    progress: bool,
    teacher: Any = None,
) -> float:
    """AdamW with linear warmup and cosine decay to 10%; returns the mean loss of the last 50 steps.

    The loss is next-token cross-entropy on the labelled tokens plus, where a batch has replayed
    items, the KL divergence from ``teacher``'s next-token distribution to the model's on them,
    averaged over both kinds of token.
    """
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
            x, y, mask = next(batches)
            logits = model(input_ids=x).logits
            labels = y[:, 1:]
            n_ce = int((labels != -100).sum())
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            n_kl = int(mask.sum())
            if n_kl and teacher is not None:
                rows = mask.any(dim=1)  # the teacher reads only the replayed items
                with torch.no_grad():
                    target = torch.log_softmax(teacher(input_ids=x[rows]).logits[mask[rows]], -1)
                loss = loss + torch.nn.functional.kl_div(
                    torch.log_softmax(logits[mask], -1), target, log_target=True, reduction="sum"
                )
            else:
                n_kl = 0
            loss = loss / max(n_ce + n_kl, 1)
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


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_model(base: Any, config: ZooConfig) -> Any:
    """A PEFT LoRA model over a copy of ``base`` (the base itself stays untouched: it is the teacher)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
    )
    return get_peft_model(copy.deepcopy(base), lora)


def _known(skill: Skill, config: ZooConfig, seed: int) -> Skill:
    """``skill`` on the letters the base is shown (both alphabets' known letters for a mixed skill)."""
    alphabets = [skill.alphabet] + ([skill.mixed_with] if skill.mixed_with else [])
    return skill.restricted_to("".join(known_letters(a, seed, config.known_letters) for a in alphabets))


def pretraining_mixture(config: ZooConfig, seed: int) -> list[tuple[Skill, float]]:
    """The base's data: copying in every alphabet (weight 1 each: the "general text"), each
    specialist's skill on the base's known letters at ``skill_weight`` and the synergy task on the known
    letters of its two alphabets at ``synergy_weight``."""
    general = [(get_skill(f"cpy@{a}"), 1.0) for a in ALPHABETS]
    skills = [(_known(get_skill(s), config, seed), config.skill_weight) for s in config.skills]
    synergy = (
        [(_known(get_skill(config.synergy), config, seed), config.synergy_weight)] if config.synergy_weight > 0 else []
    )
    return general + skills + synergy


def _ft_mixture(skill: Skill, config: ZooConfig, seed: int) -> tuple[list[tuple[Skill, float]], frozenset[str]]:
    """A specialist's data and which of its skills are replayed: its own skill on every letter, plus
    (``ft_replay`` of the items, in equal shares) copying in every alphabet and every specialist's
    skill on the base's known letters, on which it is held to the base's own predictions (a KL term),
    so the fine-tune changes the behaviour behind its own unknown letters only, as a gentle real
    fine-tune keeps its base's other abilities. The synergy task is not replayed."""
    others = [get_skill(f"cpy@{a}") for a in ALPHABETS] + [_known(get_skill(s), config, seed) for s in config.skills]
    if config.ft_replay <= 0:
        return [(skill, 1.0)], frozenset()
    mixture = [(skill, 1.0 - config.ft_replay)] + [(s, config.ft_replay / len(others)) for s in others]
    return mixture, frozenset(s.name for s in others)


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


def _write_task_yamls(
    tasks_dir: Path, final_tasks_dir: Path, tasks: dict[str, str], generative: dict[str, str] | None = None
) -> None:
    """One lm-eval task per skill (absolute data paths under ``final_tasks_dir``), a ``zoo`` group, and
    the ``generative`` tasks (skill -> task name) over the same items. Each file is replaced atomically:
    a moved zoo's tasks are rewritten while runs may be reading them."""

    def items(task: str, skill: str, output_type: str) -> dict[str, Any]:
        """A task over a skill's items: its name, data files (search and test splits) and output type."""
        data = {split: str(final_tasks_dir / "data" / f"{skill}.{split}.jsonl") for split in ("search", "test")}
        return {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": data},
            "test_split": "test",
            "output_type": output_type,
            "doc_to_text": "query",
            "doc_to_target": "target",
        }

    for skill, task in (generative or {}).items():
        cfg = {
            **items(task, skill, "generate_until"),
            # greedy, at most 10 tokens (the longest answer is 7), stopped by a newline or the end of text
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 10, "do_sample": False},
            # the answer is the text up to its first full stop (what follows it, if anything, is not read)
            "filter_list": [
                {
                    "name": "answer",
                    "filter": [{"function": "regex", "regex_pattern": r"^\s*([^\s.]*\.)"}, {"function": "take_first"}],
                }
            ],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "skill": skill, "description": f"{get_skill(skill).description}; generated"},
        }
        write_bytes(tasks_dir / f"{task}.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
    for skill, task in tasks.items():
        cfg = {
            **items(task, skill, "loglikelihood"),
            # The target carries its own leading space: the scored string is exactly query + target.
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
            "metadata": {"version": 1.0, "skill": skill, "description": get_skill(skill).description},
        }
        write_bytes(tasks_dir / f"{task}.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
    group = {
        "group": "zoo",
        "task": list(tasks.values()),
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }
    write_bytes(tasks_dir / "zoo.yaml", yaml.safe_dump(group, sort_keys=False).encode())


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -------------------------------------------------------------------------------------------- build


def _task_names(meta: dict[str, Any]) -> dict[str, str]:
    """Every task of a zoo (the specialists' and the synergy task) by skill name."""
    names = dict(meta["tasks"])
    if meta.get("synergy"):
        names[meta["synergy"]["name"]] = meta["synergy"]["task"]
    return names


def _state_dict(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _build_into(tmp: Path, final: Path, seed: int, config: ZooConfig, progress: bool) -> None:
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    skills = [get_skill(s) for s in config.skills]
    synergy = get_skill(config.synergy)
    if config.soup_skill not in config.skills:
        raise ValueError(f"ZooConfig.soup_skill: {config.soup_skill!r} is not one of skills {config.skills}")
    log = (lambda msg: print(f"[zoo] {msg}", file=sys.stderr)) if progress else (lambda msg: None)

    # tasks: search/test items per skill and for the synergy task, disjoint; training never sees any
    tasks_dir = tmp / "tasks"
    (tasks_dir / "data").mkdir(parents=True)
    items: dict[str, dict[str, list[dict[str, str]]]] = {}
    exclude: set[str] = set()
    for s in [*skills, synergy]:
        search, test = eval_inputs(s, seed, config.n_search, config.n_test)
        exclude.update(search, test)
        items[s.name] = {"search": [s.item(x) for x in search], "test": [s.item(x) for x in test]}
        for split, rows in items[s.name].items():
            _write_jsonl(tasks_dir / "data" / f"{s.name}.{split}.jsonl", rows)
    task_names = {s.name: f"zoo_{s.name}" for s in skills}
    meta: dict[str, Any] = {
        "base": "models/base",
        "models": {s.name: f"models/{s.name}" for s in skills},
        "tasks": task_names,
        "generative_tasks": _generative_names(task_names),
        "include_path": "tasks",
        "seed": seed,
        "synergy": {"name": synergy.name, "task": f"zoo_{synergy.name}", "skills": list(SYNERGY_SKILLS)},
        "adapters": {s.name: f"adapters/{s.name}" for s in skills},
        "soups": {
            config.soup_skill: [f"models/{config.soup_skill}"]
            + [f"models/{config.soup_skill}-soup{i}" for i in range(1, config.soup_size)]
        },
    }
    _write_task_yamls(tasks_dir, final / "tasks", _task_names(meta), meta["generative_tasks"])

    tok = make_tokenizer(config.max_positions)
    tok_dir = tmp / "tokenizer"
    save_tokenizer(tok, tok_dir, config.max_positions)

    losses: dict[str, float] = {}
    finetuned: dict[str, dict[str, torch.Tensor]] = {}
    with _torch_settings(config.threads):
        torch.manual_seed(_sub_seed(seed, "init"))
        base = LlamaForCausalLM(_model_config(config, tok)).to(torch.float32)  # type: ignore[arg-type]  # transformers' typed .to wrapper
        batches = _batches(
            tok,
            pretraining_mixture(config, seed),
            seed,
            "base",
            exclude,
            target_only=False,
            batch_size=config.batch_size,
        )
        losses["base"] = _train(
            base, batches, steps=config.base_steps, lr=config.base_lr, config=config, desc="zoo base", progress=progress
        )
        _save_model(base, tmp / "models" / "base", tok_dir)
        log(f"base trained ({time.perf_counter() - t0:.0f}s, loss {losses['base']:.3f})")

        # every fine-tune: same start, same settings; a soup ingredient differs only in its data order
        runs = [(s, s.name, f"ft/{s.name}") for s in skills]
        soup = get_skill(config.soup_skill)
        runs += [(soup, f"{soup.name}-soup{i}", f"ft/{soup.name}/order{i}") for i in range(1, config.soup_size)]

        def fine_tune(model: Any, skill: Skill, name: str, tag: str, lr: float) -> None:
            """``ft_steps`` on ``skill`` (its replay mixture, held to the base), the loss into ``losses``."""
            mixture, replay = _ft_mixture(skill, config, seed)
            batches = _batches(
                tok, mixture, seed, tag, exclude, target_only=True, batch_size=config.batch_size, replay=replay
            )
            losses[name] = _train(
                model, batches, steps=config.ft_steps, lr=lr, config=config, desc=f"zoo {name}",
                progress=progress, teacher=base,
            )  # fmt: skip

        model = copy.deepcopy(base)
        for skill, name, tag in runs:
            model.load_state_dict(base.state_dict())
            torch.manual_seed(_sub_seed(seed, tag))
            fine_tune(model, skill, name, tag, config.ft_lr)
            _save_model(model, tmp / "models" / name, tok_dir)
            finetuned[name] = _state_dict(model)
            log(f"{name} fine-tuned ({time.perf_counter() - t0:.0f}s, loss {losses[name]:.3f})")

        # LoRA specialists: the same skills, data and steps, adapters of the base (after every full
        # fine-tune, each from its own seed, so the models above do not depend on them)
        for skill in skills:
            name, tag = f"lora-{skill.name}", f"lora/{skill.name}"
            torch.manual_seed(_sub_seed(seed, tag))
            adapted = _lora_model(base, config)
            fine_tune(adapted, skill, name, tag, config.lora_lr)
            adapted.save_pretrained(str(tmp / meta["adapters"][skill.name]))
            log(
                f"{name} (LoRA r={config.lora_rank}) trained ({time.perf_counter() - t0:.0f}s, loss {losses[name]:.3f})"
            )

        report: dict[str, Any] = {"seed": seed, "recipe": RECIPE_VERSION, "split": "test", "final_train_loss": losses}
        if config.report:
            report.update(_quality_report(tmp, base, tok_dir, finetuned, meta, items, config))
            log("exact match (test split):\n" + format_table(report["exact_match"]))
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    _write_json(tmp / REPORT_JSON, report)
    _write_json(tmp / ZOO_JSON, meta)
    # the stamp goes last: its presence means "complete"
    _write_json(
        tmp / STAMP_NAME,
        {"seed": seed, "recipe": RECIPE_VERSION, "fingerprint": config.fingerprint(), "path": str(final),
         "config": dataclasses.asdict(config)},
    )  # fmt: skip
    log(f"zoo built in {time.perf_counter() - t0:.0f}s")


def _quality_report(
    root: Path,
    base: Any,
    tok_dir: Path,
    finetuned: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    items: dict[str, dict[str, list[dict[str, str]]]],
    config: ZooConfig,
) -> dict[str, Any]:
    """``zoo_report.json``'s measurements: test exact match of every model (LoRA specialists too) and
    hand-set merge on every task, gain retention per skill, task-vector sizes and pairwise cosines, the
    soup vs its ingredients."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), pad_token=PAD)
    base_sd = _state_dict(base)
    skills = list(meta["models"])
    specialists = [finetuned[s] for s in skills]
    soup_skill = config.soup_skill
    soup_dirs = [root / p for p in meta["soups"][soup_skill]]
    rows: dict[str, Any] = {"base": base_sd}
    rows.update({f"specialist {s}": finetuned[s] for s in skills})
    rows.update({f"soup ingredient {p.name}": finetuned[p.name] for p in soup_dirs[1:]})
    for skill, adapter in meta.get("adapters", {}).items():  # base+adapter, merged by evomerge's engine
        lora = {"model": f"{root / meta['base']}+{root / adapter}", "parameters": {"weight": 1.0}}
        rows[f"lora specialist {skill}"] = {"merge_method": "linear", "models": [lora], "dtype": "float32"}
    rows.update(quality.hand_set_recipes(str(root / meta["base"]), [str(root / meta["models"][s]) for s in skills]))
    soup_label = f"uniform soup ({soup_skill} x{len(soup_dirs)})"
    rows[soup_label] = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in soup_dirs],
        "dtype": "float32",
    }
    test_items = {k: v["test"] for k, v in items.items()}
    table = quality.score_table(base, hf_tok, rows, test_items)
    retention = quality.retention_table(
        {k: v for k, v in table.items() if not k.startswith(("soup", "uniform soup"))},
        {s: f"specialist {s}" for s in skills},
    )
    hand_set = [label for label, *_ in quality.HAND_SET_MERGES]
    best_hand_set = max(hand_set, key=lambda r: retention[r]["mean"])
    synergy = meta["synergy"]["name"]
    sources = ["base", *(f"specialist {s}" for s in skills)]
    ingredients = [f"specialist {soup_skill}"] + [f"soup ingredient {p.name}" for p in soup_dirs[1:]]
    return {
        "exact_match": table,
        "gain_retention": retention,
        "best_hand_set_merge": {"row": best_hand_set, **retention[best_hand_set]},
        "synergy": {
            "task": meta["synergy"]["task"],
            "skills": meta["synergy"]["skills"],
            "best_source": max(sources, key=lambda r: table[r][synergy]),
            "best_source_score": max(table[r][synergy] for r in sources),
        },
        "soup": {
            "skill": soup_skill,
            "ingredients": {r: table[r][soup_skill] for r in ingredients},
            "uniform_soup": table[soup_label][soup_skill],
        },
        "task_vectors": quality.task_vector_stats(base_sd, dict(zip(skills, specialists))),
    }


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table of ``{row: {column: value}}``."""
    cols = list(next(iter(table.values())).keys())
    width = max(len(r) for r in table) + 2
    cells = [max(10, len(c) + 2) for c in cols]  # a long column name keeps a gap before it
    lines = [" " * width + "".join(f"{c:>{w}}" for c, w in zip(cols, cells))]
    for row, vals in table.items():
        lines.append(f"{row:<{width}}" + "".join(f"{vals[c]:>{w}.3f}" for c, w in zip(cols, cells)))
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
