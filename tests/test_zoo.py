"""The toy model zoo: structure, loadability, quality, caching, determinism, lm-eval wiring.

The full zoo is built once per session (cached on disk, so usually not at all); everything that needs a
second build uses a tiny config that builds in about a second.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from evomerge.zoo import ZooConfig, build_zoo, default_zoo_dir, load_zoo
from evomerge.zoo import build as zoo_build
from evomerge.zoo.quality import HAND_SET_MERGES, encode_pair, greedy_exact_match, greedy_hits
from evomerge.zoo.skills import ALPHABETS, SKILLS, SYNERGY, eval_inputs, get_skill, training_inputs

TINY = ZooConfig(
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    base_steps=4,
    ft_steps=2,
    batch_size=8,
    n_search=10,
    n_test=20,
    report=False,
)


@pytest.fixture(scope="session")
def zoo_built(zoo_dir: Path) -> Path:
    """The full zoo (the session fixture in conftest.py: built once per machine, then cached)."""
    return zoo_dir


def _meta(zoo: Path) -> dict:
    return load_zoo(zoo / "zoo.json")


def _items(zoo: Path, skill: str, split: str) -> list[dict]:
    path = zoo / "tasks" / "data" / f"{skill}.{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


# ------------------------------------------------------------------------------------ the full zoo


def _check_zoo_json(zoo: Path, seed: int) -> dict:
    raw = json.loads((zoo / "zoo.json").read_text())
    assert set(raw) == {
        "base", "models", "tasks", "generative_tasks", "include_path", "seed", "synergy", "soups", "adapters"
    }  # fmt: skip
    assert raw["generative_tasks"] == {skill: f"zoo_{skill}_gen" for skill in raw["models"]}
    for task in raw["generative_tasks"].values():
        assert (zoo / raw["include_path"] / f"{task}.yaml").is_file()
    assert set(raw["adapters"]) == set(raw["models"])
    for rel in raw["adapters"].values():  # PEFT LoRA adapters of the base, read as BASE+ADAPTER
        assert (zoo / rel / "adapter_config.json").is_file() and (zoo / rel / "adapter_model.safetensors").is_file()
    assert raw["seed"] == seed
    assert len(raw["models"]) >= 3 and set(raw["models"]) == set(raw["tasks"])
    for skill, task in raw["tasks"].items():
        assert task == f"zoo_{skill}"
    synergy = raw["synergy"]
    assert len(synergy["skills"]) == 2 and set(synergy["skills"]) <= set(raw["models"])
    assert (zoo / raw["include_path"] / f"{synergy['task']}.yaml").is_file()
    assert synergy["task"] not in raw["tasks"].values()
    ((soup_skill, members),) = raw["soups"].items()
    assert soup_skill in raw["models"] and len(members) >= 3 and len(set(members)) == len(members)
    assert raw["models"][soup_skill] in members
    for rel in [raw["base"], raw["include_path"], *raw["models"].values(), *members]:
        assert not Path(rel).is_absolute() and (zoo / rel).is_dir()
    return raw


def test_zoo_json_structure(zoo_built: Path) -> None:
    _check_zoo_json(zoo_built, 0)


def test_models_load_as_plain_hf_checkpoints(zoo_built: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    meta = _meta(zoo_built)
    soup_members = [p for ps in meta["soups"].values() for p in ps]
    for path in dict.fromkeys([meta["base"], *meta["models"].values(), *soup_members]):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        assert isinstance(model, LlamaForCausalLM)
        cfg = model.config
        assert cfg.tie_word_embeddings is False
        assert 64 <= cfg.hidden_size <= 128 and cfg.num_hidden_layers >= 2
        assert cfg.vocab_size == len(tok)
        assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
            tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
        )  # fmt: skip
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            names = list(f.keys())
            assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
            assert all(f.get_slice(n).get_dtype() == "F32" for n in names)


def test_tokenizer_is_char_level_and_adds_nothing(zoo_built: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_meta(zoo_built)["base"], local_files_only=True)
    text = "rev abcd=dcba."
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert ids == tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids) == text
    assert tok.encode("rev abcd=") + tok.encode("dcba.") == ids
    ctx, cont = encode_pair(tok, "srt dcab=", "abcd.")
    assert tok.decode(ctx) == "srt dcab=" and tok.decode(cont) == "abcd."
    # lm-eval moves trailing context whitespace into the continuation; the zoo's contexts have none
    assert encode_pair(tok, "srt dcab= ", "abcd.")[1] == tok.encode(" abcd.")
    # every character of every task's items is a token of its own (an <unk> would hide the operation)
    meta = _meta(zoo_built)
    for name in [*meta["models"], meta["synergy"]["name"]]:
        for item in _items(zoo_built, name, "test")[:50]:
            text = item["query"] + item["target"]
            ids = tok.encode(text)
            assert tok.unk_token_id not in ids and tok.decode(ids) == text, text


def test_specialists_master_their_own_skill(zoo_built: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = _meta(zoo_built)
    tok = AutoTokenizer.from_pretrained(meta["base"], local_files_only=True)
    skills = list(meta["models"])
    items = {s: _items(zoo_built, s, "test") for s in skills}
    rows = {"base": meta["base"], **meta["models"]}
    scores = {}
    for row, path in rows.items():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        scores[row] = {s: greedy_exact_match(model, tok, items[s]) for s in skills}
    for s in skills:
        own = scores[s][s]
        assert own >= 0.95, (s, scores)
        others = [scores[r][s] for r in rows if r != s]
        # the base knows each skill partly (by design), so the margin is over a partial base
        assert own >= max(others) + 0.25, (s, scores)


def test_report_bands(zoo_built: Path) -> None:
    """The zoo behaves like real fine-tunes (issue bands that hold on the full zoo, seed 0)."""
    report = json.loads((zoo_built / "zoo_report.json").read_text())
    table, retention = report["exact_match"], report["gain_retention"]
    meta = _meta(zoo_built)
    skills = list(meta["models"])
    for s in skills:
        assert table[f"specialist {s}"][s] >= 0.95, (s, table[f"specialist {s}"])
        # the LoRA specialists learn their skill too (rank 8 of a 128-wide model), if less completely
        assert table[f"lora specialist {s}"][s] >= table["base"][s] + 0.5, (s, table[f"lora specialist {s}"])
        assert table[f"specialist {s}"][s] >= table["base"][s] + 0.25  # a real gain over the base
    # hand-set merges keep part of the gains, not none and not all: there is something to search for
    best = report["best_hand_set_merge"]
    assert best == {"row": best["row"], **retention[best["row"]]}
    assert 0.25 <= best["mean"] <= 0.80, best
    assert best["mean"] == max(retention[label]["mean"] for label, *_ in HAND_SET_MERGES)
    # no single source does the synergy task well
    synergy = meta["synergy"]["name"]
    assert report["synergy"]["best_source_score"] <= 0.40
    assert report["synergy"]["best_source_score"] == max(
        table[r][synergy] for r in ["base", *(f"specialist {s}" for s in skills)]
    )
    # the base knows each skill partly (it was shown some of each alphabet's code)
    for s in skills:
        assert 0.10 <= table["base"][s] <= 0.60, (s, table["base"])
    # the uniform soup is as good as its best ingredient
    assert report["soup"]["uniform_soup"] >= max(report["soup"]["ingredients"].values())
    # task vectors: small next to the weights, and far from parallel
    assert all(0 < v < 0.5 for v in report["task_vectors"]["relative_size"].values())
    assert all(abs(c) < 0.5 for c in report["task_vectors"]["cosine"].values())


def test_second_build_is_a_noop(zoo_built: Path, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("a cached zoo must not be rebuilt")

    monkeypatch.setattr(zoo_build, "_build_into", no_training)
    before = {p: p.stat().st_mtime_ns for p in zoo_built.rglob("*")}
    out = build_zoo(zoo_built, 0, progress=False)
    assert out == zoo_built / "zoo.json"
    after = {p: p.stat().st_mtime_ns for p in zoo_built.rglob("*")}
    assert after == before


def test_search_and_test_items_are_disjoint(zoo_built: Path) -> None:
    for skill in _meta(zoo_built)["models"]:
        search = [it["input"] for it in _items(zoo_built, skill, "search")]
        test = [it["input"] for it in _items(zoo_built, skill, "test")]
        assert len(search) == 100 and len(test) == 200
        assert len(set(search)) == len(search) and len(set(test)) == len(test)
        assert not set(search) & set(test)


def test_tasks_load_through_lm_eval_task_manager(zoo_built: Path) -> None:
    from lm_eval.tasks import TaskManager, get_task_dict

    meta = _meta(zoo_built)
    tm = TaskManager(include_path=str(meta["include_path"]), include_defaults=False)
    names = list(meta["tasks"].values())
    assert set(names) <= set(tm.all_tasks)
    tasks = get_task_dict(names, tm)
    for _skill, name in meta["tasks"].items():
        task = tasks[name]
        assert task.config.output_type == "loglikelihood"
        docs = list(task.test_docs())
        assert len(docs) == 200
        task.build_all_requests(limit=5, rank=0, world_size=1)
        for inst in task.instances:
            ctx, cont = inst.arguments[:2]
            # what lm-eval scores is exactly the trained format: query + target, nothing in between
            assert ctx == inst.doc["query"] and cont == inst.doc["target"], (ctx, cont)
            assert ctx.endswith("=") and cont.endswith(".") and not cont.startswith(" ")


def test_lm_eval_acc_matches_quick_scorer(zoo_built: Path) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = _meta(zoo_built)
    path = meta["base"]  # the base knows each skill partly: a non-trivial number to match on every task
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    limit = 200
    res = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=64),
        tasks=list(meta["tasks"].values()),
        task_manager=TaskManager(include_path=str(meta["include_path"]), include_defaults=False),
        limit=limit,
        bootstrap_iters=0,
    )
    for s, task in meta["tasks"].items():
        ours = greedy_exact_match(model, tok, _items(zoo_built, s, "test")[:limit])
        assert res["results"][task]["acc,none"] == pytest.approx(ours), (s, res["results"][task], ours)


# ------------------------------------------------------------------------------ tiny builds (cheap)


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    a = build_zoo(tmp_path / "a", 3, progress=False, config=TINY).parent
    b = build_zoo(tmp_path / "b", 3, progress=False, config=TINY).parent
    skip = (zoo_build.STAMP_NAME, zoo_build.REPORT_JSON) + tuple(f"zoo_{s}.yaml" for s in [*SKILLS, SYNERGY])
    skip += tuple(f"zoo_{s}_gen.yaml" for s in SKILLS)  # absolute data paths, like the others
    da, db = _tree_digest(a, skip), _tree_digest(b, skip)
    assert any(k.endswith("model.safetensors") for k in da)
    assert da == db
    c = build_zoo(tmp_path / "c", 4, progress=False, config=TINY).parent
    dc = _tree_digest(c, skip)
    assert dc["models/base/model.safetensors"] != da["models/base/model.safetensors"]
    assert dc["tasks/data/latin.test.jsonl"] != da["tasks/data/latin.test.jsonl"]
    # soup ingredients start from one base with one recipe and differ only in their data order
    assert len({da[f"{m}/model.safetensors"] for m in json.loads((a / "zoo.json").read_text())["soups"]["greek"]}) == 3


def test_tiny_build_zoo_json_and_report(tmp_path: Path) -> None:
    import dataclasses

    zoo = build_zoo(tmp_path / "z", 2, progress=False, config=dataclasses.replace(TINY, report=True)).parent
    raw = _check_zoo_json(zoo, 2)
    report = json.loads((zoo / "zoo_report.json").read_text())
    rows = report["exact_match"]
    tasks = [*raw["models"], raw["synergy"]["name"]]
    for row in ["base", *(f"specialist {s}" for s in raw["models"]), *(label for label, *_ in HAND_SET_MERGES)]:
        assert set(rows[row]) == set(tasks) and all(0 <= v <= 1 for v in rows[row].values())
        assert set(report["gain_retention"][row]) == {*raw["models"], "mean", "min"}
    assert report["best_hand_set_merge"]["row"] in {label for label, *_ in HAND_SET_MERGES}
    assert set(report["task_vectors"]["relative_size"]) == set(raw["models"])
    assert len(report["task_vectors"]["cosine"]) == 3
    for s in raw["models"]:
        assert set(rows[f"lora specialist {s}"]) == set(tasks)
    assert set(report["soup"]["ingredients"]) == {
        "specialist greek",
        "soup ingredient greek-soup1",
        "soup ingredient greek-soup2",
    }


def test_tiny_build_layout_and_lm_eval_paths(tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "zoo"
    meta = load_zoo(build_zoo(out, 0, progress=False, config=TINY))
    for _skill, task in meta["tasks"].items():
        cfg = yaml.safe_load((meta["include_path"] / f"{task}.yaml").read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        assert set(files) == {"search", "test"} and cfg["test_split"] == "test"
        for f in files.values():
            assert Path(f).is_absolute() and Path(f).is_file() and Path(f).parent.parent.parent == out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zoo.lock", "zoo"], "temp dirs left behind"


def test_a_zoo_built_before_the_generative_tasks_gets_them_without_a_rebuild(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "zoo"
    build_zoo(out, 0, progress=False, config=TINY)
    raw = json.loads((out / "zoo.json").read_text())
    for task in raw.pop("generative_tasks").values():
        (out / "tasks" / f"{task}.yaml").unlink()
    (out / "zoo.json").write_text(json.dumps(raw))
    weights = {p: p.read_bytes() for p in out.rglob("*.safetensors")}

    def no_training(*args, **kwargs):
        raise AssertionError("the models are current: only task files are written")

    monkeypatch.setattr(zoo_build, "_build_into", no_training)
    build_zoo(out, 0, progress=False, config=TINY)
    _check_zoo_json(out, 0)
    assert {p: p.read_bytes() for p in out.rglob("*.safetensors")} == weights


def test_rebuild_on_seed_or_recipe_change(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    build_zoo(out, 0, progress=False, config=TINY)
    stamp0 = json.loads((out / zoo_build.STAMP_NAME).read_text())
    build_zoo(out, 1, progress=False, config=TINY)
    stamp1 = json.loads((out / zoo_build.STAMP_NAME).read_text())
    assert (stamp0["seed"], stamp1["seed"]) == (0, 1)
    assert json.loads((out / "zoo.json").read_text())["seed"] == 1
    build_zoo(out, 1, progress=False, config=ZooConfig(**{**TINY.__dict__, "ft_steps": 3}))
    assert json.loads((out / zoo_build.STAMP_NAME).read_text())["fingerprint"] != stamp1["fingerprint"]


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "zoo"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo_build, "_save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(out, 0, progress=False, config=TINY)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".zoo.lock"]


def test_refuses_to_replace_a_directory_that_is_not_a_zoo(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_zoo(out, 0, progress=False, config=TINY)
    assert (out / "notes.txt").read_text() == "keep me"


def test_moved_zoo_gets_its_task_paths_retargeted(tmp_path: Path) -> None:
    import yaml

    first = tmp_path / "first"
    build_zoo(first, 0, progress=False, config=TINY)
    moved = tmp_path / "moved"
    first.rename(moved)
    meta = load_zoo(build_zoo(moved, 0, progress=False, config=TINY))
    cfg = yaml.safe_load((meta["include_path"] / "zoo_greek.yaml").read_text())
    assert all(Path(f).is_file() and moved in Path(f).parents for f in cfg["dataset_kwargs"]["data_files"].values())


def test_default_zoo_dir(monkeypatch) -> None:
    monkeypatch.delenv("EVOMERGE_ZOO_DIR", raising=False)
    assert default_zoo_dir(7) == Path.home() / ".cache" / "evomerge" / "zoo-seed7"
    monkeypatch.setenv("EVOMERGE_ZOO_DIR", "/somewhere/zoo")
    assert default_zoo_dir(7) == Path("/somewhere/zoo")


# ------------------------------------------------------------------------------------- pure parts


def test_item_sets_are_seeded_disjoint_and_unseen_in_training() -> None:
    import random

    for skill in SKILLS.values():
        s1, t1 = eval_inputs(skill, 0, 100, 200)
        s2, t2 = eval_inputs(skill, 0, 100, 200)
        assert (s1, t1) == (s2, t2)
        assert not set(s1) & set(t1)
        assert eval_inputs(skill, 1, 100, 200)[0] != s1
        stream = training_inputs(skill, random.Random(0), set(s1) | set(t1))
        assert not {next(stream) for _ in range(2000)} & (set(s1) | set(t1))


def test_skill_answers() -> None:
    from evomerge.zoo.skills import CODE, known_letters

    # each language's code is a fixed substitution of its own letters, none left in place
    for letters in ALPHABETS.values():
        assert sorted(CODE[c] for c in letters) == sorted(letters)
        assert all(CODE[c] != c for c in letters)
    word = "abcd"
    assert SKILLS["latin"].answer(word) == "".join(CODE[c] for c in word)
    item = SKILLS["greek"].item("δβγα")
    assert item["query"] + item["target"] == "sub δβγα=" + "".join(CODE[c] for c in "δβγα") + "."
    assert get_skill("cpy@greek").answer("αβ") == "αβ"
    assert get_skill("rev@latin").answer("abcd") == "dcba"
    # each specialist's skill lives in its own alphabet: disjoint tokens, like different languages
    letters = [set(ALPHABETS[s.alphabet]) for s in SKILLS.values()]
    assert all(not (a & b) for i, a in enumerate(letters) for b in letters[i + 1 :])
    # the synergy task mixes the two alphabets of its pair in every item (two letters of each at least)
    import random

    synergy = get_skill(SYNERGY)
    a, b = (set(ALPHABETS[SKILLS[s].alphabet]) for s in ("latin", "cyrillic"))
    for x in (synergy.draw_input(random.Random(i)) for i in range(50)):
        assert len(set(x) & a) >= 1 and sum(c in a for c in x) >= 2 and sum(c in b for c in x) >= 2
        assert synergy.answer(x) == "".join(CODE[c] for c in x)
    # what the base is shown: a seeded subset of each alphabet; inputs restricted to it stay in it
    known = known_letters("latin", 0, 10)
    assert len(known) == 10 and set(known) <= a and known == known_letters("latin", 0, 10)
    assert known != known_letters("latin", 1, 10)
    restricted = SKILLS["latin"].restricted_to(known)
    assert restricted.name == "latin/known"
    assert all(set(restricted.draw_input(random.Random(i))) <= set(known) for i in range(50))
    with pytest.raises(KeyError, match="OP@ALPHABET"):
        get_skill("rev@klingon")


def test_greedy_hits_equals_generation(zoo_built: Path) -> None:
    """Teacher-forced "every target token is the argmax" agrees with greedy decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = _meta(zoo_built)
    tok = AutoTokenizer.from_pretrained(meta["base"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(meta["models"]["greek"], local_files_only=True)
    items = _items(zoo_built, "greek", "test")[:15] + _items(zoo_built, "latin", "test")[:15]
    hits = greedy_hits(model, tok, items)
    for it, hit in zip(items, hits, strict=True):
        ids = torch.tensor([tok.encode(it["query"])])
        n = len(tok.encode(it["target"]))
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        assert (tok.decode(out[0, ids.shape[1] :]) == it["target"]) == hit


def test_gain_retention() -> None:
    from evomerge.zoo.quality import gain_retention, retention_table

    assert gain_retention(0.7, 0.4, 1.0) == pytest.approx(0.5)
    assert gain_retention(0.4, 0.4, 1.0) == 0.0
    assert gain_retention(0.2, 0.4, 1.0) == pytest.approx(-1 / 3)
    assert gain_retention(1.0, 0.4, 1.0) == 1.0
    assert math.isnan(gain_retention(0.5, 0.6, 0.6))  # a fine-tune that gained nothing: undefined
    table = {
        "base": {"a": 0.2, "b": 0.5},
        "spec a": {"a": 1.0, "b": 0.5},
        "spec b": {"a": 0.2, "b": 1.0},
        "merge": {"a": 0.6, "b": 1.0},
    }
    ret = retention_table(table, {"a": "spec a", "b": "spec b"})
    assert ret["merge"] == {"a": pytest.approx(0.5), "b": 1.0, "mean": pytest.approx(0.75), "min": pytest.approx(0.5)}


def test_zoo_compare_cli_scores_recipes_beside_the_zoo(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from evomerge.cli import app

    zoo = build_zoo(tmp_path / "zoo", 0, progress=False, config=TINY).parent
    meta = load_zoo(zoo / "zoo.json")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(meta["base"]),
                "dtype": "float32",
                "models": [
                    {"model": str(meta["models"][s]), "parameters": {"weight": 0.7}} for s in ("latin", "greek")
                ],
            }
        )
    )
    out_json = tmp_path / "cmp.json"
    result = CliRunner().invoke(
        app,
        [
            "zoo",
            "compare",
            str(recipe),
            "--zoo",
            str(zoo),
            "--skills",
            "latin,greek",
            "--synergy",
            "--json",
            str(out_json),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "mine" in result.output
    data = json.loads(out_json.read_text())
    assert data["best_hand_set"] in {label for label, *_ in HAND_SET_MERGES}
    assert list(data["tasks"]) == ["latin", "greek", SYNERGY]
    rows = set(data["scores"])
    assert {"base", "specialist latin", "specialist greek", "mine"} <= rows
    assert {label for label, *_ in HAND_SET_MERGES} <= rows
    assert set(data["gain_retention"]["mine"]) == {"latin", "greek"}
    bad = CliRunner().invoke(app, ["zoo", "compare", "--zoo", str(zoo), "--skills", "latin,juggle"])
    assert bad.exit_code == 2 and "juggle" in bad.output


def test_the_build_log_table_keeps_long_column_names_apart() -> None:
    from evomerge.zoo.build import format_table

    text = format_table(
        {
            "base": {"cyrillic": 0.185, "latin_cyrillic": 0.105},
            "specialist latin": {"cyrillic": 1.0, "latin_cyrillic": 0.22},
        }
    )
    header, *rows = text.splitlines()
    assert header.split() == ["cyrillic", "latin_cyrillic"]
    assert rows[1].split()[-2:] == ["1.000", "0.220"] and len({len(line) for line in text.splitlines()}) == 1


def test_default_zoo_dir_never_points_a_seed_at_another_seeds_zoo(tmp_path: Path, monkeypatch) -> None:
    from evomerge.zoo.build import default_zoo_dir

    zoo = build_zoo(tmp_path / "z", 3, progress=False, config=TINY).parent
    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(zoo))
    assert default_zoo_dir(3) == zoo
    assert default_zoo_dir(4) == Path.home() / ".cache" / "evomerge" / "zoo-seed4"  # not a rebuild over seed 3's
    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(tmp_path / "empty"))
    assert default_zoo_dir(4) == tmp_path / "empty"
