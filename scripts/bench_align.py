#!/usr/bin/env python
"""Permutation alignment: the loss barrier between two independently trained bases, before and after.

Two zoo bases built from different seeds (different initializations, and different known letters; the
same tokenizer, codes and copying data) are interpolated linearly, (1 - t) A + t B, with B as trained and
with B permuted into A's basis (``evomerge align``: Git Re-Basin weight matching, and activation
matching on 1200 alignment texts, none of them an item scored here: ``--fit-texts``). Each point is scored
on what both bases learned alike, copying in each alphabet (``cpy@<alphabet>``, 200 items each, written
here as lm-eval tasks): the items' mean negative log-likelihood (log of lm-eval's per-item
``perplexity``, averaged over the alphabets) and exact match; and on the reference zoo's three skill
tasks (exact match; each base knows other letters' codes). The barrier at t is the loss there minus the
straight line between the endpoints' losses.

B is also aligned by activation matching with rotations (``evomerge align --data --rotate``: the
residual stream, values and RoPE planes, ``evomerge/merge/rotation.py``), by Procrustes alone and
fitted to the midpoint's loss on the alignment texts. Control rows put an untrained model of B's shape
in B's place: a midpoint with small random weights is about half of A, which RMSNorm forgives, so what
tells alignment apart is what the control does not keep.

``--pair-width W`` trains the two bases here instead (the zoo's base recipe on zoo seed 0's data, at
hidden size W and MLP width 2W, from two initialization seeds; about 6 minutes per base at W = 256
on 2 CPU cores): the same data for both, so only the initialization differs.

    .venv/bin/python scripts/bench_align.py [--zoo-seeds 0 1 | --pair-width 256] [--fit-texts copying|both]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.eval.evaluator import CandidateEvaluator  # noqa: E402
from evomerge.eval.tasks import Objective  # noqa: E402
from evomerge.merge.align import align_checkpoints  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.zoo.build import build_zoo, default_zoo_dir, load_zoo  # noqa: E402

POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
ALPHABETS = ("latin", "greek", "cyrillic")


def copy_tasks(folder: Path) -> list[str]:
    """lm-eval tasks of copying in each alphabet (the zoo's task format), under ``folder``."""
    import yaml

    from evomerge.zoo.skills import eval_inputs, get_skill

    names = []
    for alphabet in ALPHABETS:
        skill = get_skill(f"cpy@{alphabet}")
        _, test = eval_inputs(skill, 12345, 1, 200)
        data = folder / f"copy_{alphabet}.jsonl"
        data.write_text("".join(json.dumps(skill.item(x)) + "\n" for x in test))
        name = f"copy_{alphabet}"
        cfg = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "query",
            "doc_to_target": "target",
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        names.append(name)
    return names


def train_pair(width: int, folder: Path) -> tuple[str, str]:
    """Two bases by the zoo's base recipe on zoo seed 0's data at hidden size ``width``, from two
    initialization seeds (the data and its order are the same for both)."""
    import dataclasses

    from transformers import LlamaForCausalLM

    from evomerge.zoo import build
    from evomerge.zoo.skills import eval_inputs, get_skill

    config = dataclasses.replace(build.ZooConfig(), hidden_size=width, intermediate_size=2 * width)
    tok = build.make_tokenizer(config.max_positions)
    build.save_tokenizer(tok, folder / "tokenizer", config.max_positions)
    exclude: set[str] = set()
    for skill in [*config.skills, config.synergy]:
        search, test = eval_inputs(get_skill(skill), 0, config.n_search, config.n_test)
        exclude.update(search, test)
    paths = []
    for init in (1001, 2002):
        started = time.perf_counter()
        with build._torch_settings(config.threads):
            torch.manual_seed(init)
            model = LlamaForCausalLM(build._model_config(config, tok)).float()
            batches = build._batches(
                tok,
                build.pretraining_mixture(config, 0),
                0,
                "base",
                exclude,
                target_only=False,
                batch_size=config.batch_size,
            )
            loss = build._train(
                model,
                batches,
                steps=config.base_steps,
                lr=config.base_lr,
                config=config,
                desc=f"base {init}",
                progress=True,
            )
        path = folder / f"base-{init}"
        build._save_model(model, path, folder / "tokenizer")
        print(
            f"trained {path.name} (width {width}): loss {loss:.3f}, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
        paths.append(str(path))
    return paths[0], paths[1]


def alignment_texts(n: int, exclude: set[str], kind: str, zoo_seed: int) -> list[str]:
    """``n`` texts to align on, none of them an item any table here scores: ``mixture`` draws them as
    zoo ``zoo_seed``'s base was trained (copying in every alphabet, and the skills on its known
    letters), ``copying`` from copying alone (then the skills scored below are something the fitted
    rotations never saw)."""
    import random

    from evomerge.zoo.build import ZooConfig, pretraining_mixture
    from evomerge.zoo.skills import training_inputs

    rng = random.Random(f"bench-align/{kind}/{zoo_seed}")
    mixture = pretraining_mixture(ZooConfig(), zoo_seed)
    if kind == "copying":
        mixture = [(skill, weight) for skill, weight in mixture if skill.name.startswith("cpy@")]
    streams = {skill.name: training_inputs(skill, rng, exclude) for skill, _ in mixture}
    texts = []
    for _ in range(n):
        skill = rng.choices(mixture, [w for _, w in mixture])[0][0]
        query, target = skill.text(next(streams[skill.name]))
        texts.append(query + target)
    return texts


FIT_TEXTS = {"mixture": "A's training mixture", "copying": "copying alone", "both": "A's and B's training mixtures"}
FITTED = {"data": True, "rotate": True, "fit_steps": 300}
#: (label, which B: the trained one or an untrained model of its shape, the align options or None)
VARIANTS = (
    ("unaligned", "trained", None),
    ("weight matching", "trained", {}),
    ("activation matching", "trained", {"data": True}),
    ("+ rotations (Procrustes)", "trained", {"data": True, "rotate": True}),
    ("+ rotations (fitted)", "trained", FITTED),
    ("control: untrained B", "untrained", None),
    ("control: untrained B + rotations (fitted)", "untrained", FITTED),
)


def untrained_like(model: str, folder: Path) -> str:
    """A randomly initialized model of ``model``'s config (and tokenizer), saved under ``folder``: the
    control that tells aligning from averaging with small noise."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.merge.engine import TOKENIZER_FILES

    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).float()
    fresh.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (Path(model) / name).is_file():
            shutil.copy2(Path(model) / name, folder / name)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--pair-width", type=int, default=None, help="train two bases of this width instead")
    parser.add_argument(
        "--fit-texts",
        choices=["mixture", "copying", "both"],
        default="mixture",
        help="what the alignment (and the rotations' fit) sees: A's training mixture, copying alone, or "
        "both zoo bases' mixtures (600 texts each; with --zoo-seeds)",
    )
    args = parser.parse_args()
    zoo_a = load_zoo(build_zoo(default_zoo_dir(args.zoo_seeds[0]), args.zoo_seeds[0], progress=False))
    skills = list(zoo_a["tasks"])
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-align-") as work:
        if args.pair_width:
            a, b = train_pair(args.pair_width, Path(work))
            title = f"two width-{args.pair_width} bases, zoo seed 0's data, initialization seeds 1001 (A) and 2002 (B)"
        else:
            zoo_b = load_zoo(build_zoo(default_zoo_dir(args.zoo_seeds[1]), args.zoo_seeds[1], progress=False))
            a, b = str(zoo_a["base"]), str(zoo_b["base"])
            title = f"zoo base seed {args.zoo_seeds[0]} (A) and seed {args.zoo_seeds[1]} (B)"
        copies = copy_tasks(Path(work))
        objectives = [Objective(task=t, metric=m, split="test") for t in copies for m in ("perplexity", "acc")]
        objectives += [Objective(task=zoo_a["tasks"][s], metric="acc", split="test") for s in skills]
        evaluator = CandidateEvaluator(objectives, include_paths=[zoo_a["include_path"], work])
        scored = [json.loads(line) for c in copies for line in (Path(work) / f"{c}.jsonl").read_text().splitlines()]
        for s in skills:
            for split in ("search", "test"):
                data_file = zoo_a["include_path"] / "data" / f"{s}.{split}.jsonl"
                scored += [json.loads(line) for line in data_file.read_text().splitlines()]
        exclude = {row["input"] for row in scored}
        if args.fit_texts == "both":  # half drawn as A was trained, half as B was
            data = [t for seed in args.zoo_seeds for t in alignment_texts(600, exclude, "mixture", seed)]
        else:
            data = alignment_texts(1200, exclude, args.fit_texts, args.zoo_seeds[0])
        assert not {row["query"] + row["target"] for row in scored} & set(data)  # fitted on unscored texts only
        sources = {"trained": b, "untrained": untrained_like(b, Path(work) / "untrained")}
        for index, (label, source, options) in enumerate(VARIANTS):
            other = sources[source]
            if options is not None:
                other = str(Path(work) / f"aligned-{index}")
                kwargs = {**options, "data": data if options.get("data") else None}
                started = time.perf_counter()
                align_checkpoints(a, sources[source], other, **kwargs)
                seconds[label] = time.perf_counter() - started
            for t in POINTS:
                models = [{"model": a, "parameters": {"weight": 1 - t}}, {"model": other, "parameters": {"weight": t}}]
                result = evaluator.evaluate(
                    Recipe.from_dict({"merge_method": "linear", "dtype": "float32", "models": models})
                )
                assert result.ok, result.reason
                loss = sum(math.log(result.objectives[f"{c}/perplexity"]) for c in copies) / len(copies)
                copied = [result.objectives[f"{c}/acc"] for c in copies]
                acc = [result.objectives[f"{zoo_a['tasks'][s]}/acc"] for s in skills]
                rows[label, t] = (loss, copied, acc)
    print(f"\n#### {title}: (1 - t) A + t B, test items\n")
    print(
        f"Alignment on 1200 texts of {FIT_TEXTS[args.fit_texts]} (none of them scored): "
        + "; ".join(f"{label} {s:.1f} s" for label, s in seconds.items())
        + ".\n"
    )
    print(
        "| B aligned by | t | copying loss (mean NLL per item) | barrier | copying exact match "
        + " / ".join(ALPHABETS)
        + f" | zoo seed {args.zoo_seeds[0]} skills exact match "
        + " / ".join(skills)
        + " |"
    )
    print("|---|---:|---:|---:|---|---|")
    for label, source, _ in VARIANTS:
        ends = rows[label, 0.0][0], rows[label, 1.0][0]
        for t in POINTS[1:-1]:
            loss, copied, acc = rows[label, t]
            barrier = f"{loss - ((1 - t) * ends[0] + t * ends[1]):+.3f}" if source == "trained" else "n/a"
            cells = [" / ".join(f"{v:.3f}" for v in copied), " / ".join(f"{v:.3f}" for v in acc)]
            print(f"| {label} | {t:.2f} | {loss:.3f} | {barrier} | {cells[0]} | {cells[1]} |")
    print(
        "\nEndpoints: A copying loss {:.3f}, B {:.3f}; skills A {}, B {}.".format(
            rows["unaligned", 0.0][0],
            rows["unaligned", 1.0][0],
            " / ".join(f"{v:.3f}" for v in rows["unaligned", 0.0][2]),
            " / ".join(f"{v:.3f}" for v in rows["unaligned", 1.0][2]),
        )
    )


if __name__ == "__main__":
    main()
