"""evomerge.atomic: a file or directory appears whole or not at all, and failures leave no debris."""

from pathlib import Path

import pytest

from evomerge.atomic import replace_dir, staging_dir, write_text


def test_write_text_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "recipe.yaml"
    target.write_text("old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_failed_staging_keeps_the_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "front"
    out.mkdir()
    (out / "keep.yaml").write_text("old")
    with pytest.raises(RuntimeError), staging_dir(out) as tmp:
        (tmp / "half.yaml").write_text("partial")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["keep.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front"]


def test_staging_replaces_the_whole_directory(tmp_path: Path) -> None:
    out = tmp_path / "front"
    out.mkdir()
    (out / "stale.yaml").write_text("old")
    with staging_dir(out) as tmp:
        (tmp / "fresh.yaml").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["fresh.yaml"]
    assert out.stat().st_mode & 0o755 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front"]


def test_replace_dir_into_a_new_place(tmp_path: Path) -> None:
    tmp = tmp_path / "build"
    tmp.mkdir()
    (tmp / "a").write_text("1")
    replace_dir(tmp, tmp_path / "out")
    assert (tmp_path / "out" / "a").read_text() == "1" and not tmp.exists()
