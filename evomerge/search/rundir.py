"""The run directory: nothing a search learned is lost.

    RUN_DIR/run.yaml             the resolved run config (paths absolute), written at the start
    RUN_DIR/evaluations.jsonl    one line per scored candidate, appended and fsync'ed as it arrives
    RUN_DIR/responses.jsonl      per scored candidate, each objective's value on each item (written first)
    RUN_DIR/state                the optimizer and the pending generation, pickled atomically after
                                 every ask and every tell

A run killed at any point (kill -9 included) resumes from these: candidates already in
evaluations.jsonl are never scored again, and the pending generation is finished and told.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge.atomic import write_bytes
from evomerge.search.record import CandidateRecord

EVALUATIONS = "evaluations.jsonl"
RESPONSES = "responses.jsonl"
STATE = "state"
OPTIMIZER_SUMMARY = "optimizer.json"
"""What a finite optimizer (sweep, soups) found, rewritten after each of its steps."""
RUN_CONFIG = "run.yaml"


class RunDirError(ValueError):
    """A run directory whose files cannot be read as a run (names the file and line)."""


@dataclass
class SearchState:
    optimizer: Any
    generation: int = 0
    next_id: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_X: np.ndarray | None = None
    """The asked-but-not-told generation (saved right after ask, so a resumed run tells the same X)."""
    asked: dict[int, np.ndarray] = field(default_factory=dict)
    """Async mode: candidates asked one at a time and not yet told (saved before each is dispatched)."""
    promotions: dict[int, int] | None = None
    """Multi-fidelity runs: the pending generation's promoted candidates (screen record id -> the id of
    its full-fidelity record), chosen once every screen record of the generation is in; None before."""
    final_promotions: int = 0
    """Multi-fidelity runs: screened candidates promoted when the run stopped at its budget, over every
    resume (capped at a population)."""
    told: list[int] = field(default_factory=list)
    """Async mode: candidate ids in the order the optimizer was told them (the order of evaluations.jsonl,
    by construction); a resumed run tells the recorded ones missing here, in file order, before anything else."""

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(
            {"asked": {}, "told": [], "promotions": None, "final_promotions": 0, **data}
        )  # states saved before those existed


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def evaluations_path(self) -> Path:
        return self.path / EVALUATIONS

    def exists(self) -> bool:
        return (self.path / STATE).exists() or self.evaluations_path.exists()

    # --- config ---------------------------------------------------------------------------------
    def write_config(self, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / RUN_CONFIG, yaml.safe_dump(data, sort_keys=False).encode())

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / RUN_CONFIG).read_text())

    # --- a finite optimizer's findings (sweep fit, soup steps) -----------------------------------------
    def write_optimizer_summary(self, data: dict[str, Any]) -> None:
        _atomic_write(self.path / OPTIMIZER_SUMMARY, json.dumps(data, indent=2, default=_json_default).encode())

    def read_optimizer_summary(self) -> dict[str, Any] | None:
        path = self.path / OPTIMIZER_SUMMARY
        return json.loads(path.read_text()) if path.exists() else None

    # --- evaluations ----------------------------------------------------------------------------
    def append(self, record: CandidateRecord) -> None:
        """One candidate's record, durable before this returns."""
        line = json.dumps(record.to_json(), separators=(",", ":"), default=_json_default) + "\n"
        with open(self.evaluations_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def append_responses(
        self, candidate_id: int, recipe_hash: str, items: dict[str, list[float]], fidelity: str = "full"
    ) -> None:
        """A scored candidate's per-item values per objective (``responses.jsonl``), durable before this
        returns; written before its record, so a recorded candidate always has them. A screened
        candidate's line says ``"fidelity": "screen"`` (its items are the screens')."""
        entry: dict[str, Any] = {"id": candidate_id, "recipe_hash": recipe_hash, "items": items}
        if fidelity != "full":
            entry["fidelity"] = fidelity
        line = json.dumps(entry, separators=(",", ":"))
        with open(self.path / RESPONSES, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def responses(self) -> dict[int, dict[str, list[float]]]:
        """Candidate id -> objective label -> its per-item values (a candidate scored twice, after a kill
        between its responses and its record: the last). Cached candidates (an identical recipe scored
        earlier) have none of their own: ``responses_by_hash`` finds them by recipe."""
        return {int(e["id"]): e["items"] for e in self._response_lines()}

    def responses_by_hash(self, fidelity: str = "full") -> dict[str, dict[str, list[float]]]:
        """Recipe hash -> objective label -> per-item values, at ``fidelity`` (``full`` or ``screen``)."""
        return {
            str(e["recipe_hash"]): e["items"] for e in self._response_lines() if e.get("fidelity", "full") == fidelity
        }

    def _response_lines(self) -> Iterator[dict[str, Any]]:
        path = self.path / RESPONSES
        if not path.exists():
            return
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith("\n"):
                    break  # a torn last line
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise RunDirError(f"{path}:{number}: not a responses line; restore or delete it") from None

    def repair(self) -> None:
        """Cut a torn last line (a kill in the middle of a write) so appends start on a fresh line."""
        for path in (self.evaluations_path, self.path / RESPONSES):
            if not path.exists():
                continue
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def records(self) -> Iterator[CandidateRecord]:
        """Every complete record. A torn last line (a kill in the middle of a write) is skipped; any other
        line that is not a record is refused with its line number, so that nothing is silently lost."""
        if not self.evaluations_path.exists():
            return
        with open(self.evaluations_path) as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith("\n"):
                    break
                if not line.strip():
                    continue
                try:
                    yield CandidateRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise RunDirError(
                        f"{self.evaluations_path}:{number}: not a candidate record ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); restore the line or delete it (its candidate is then scored again "
                        "on --resume)"
                    ) from None

    # --- optimizer state ------------------------------------------------------------------------
    def save_state(self, state: SearchState) -> None:
        _atomic_write(self.path / STATE, pickle.dumps(state))

    def load_state(self) -> SearchState | None:
        path = self.path / STATE
        if not path.exists():
            return None
        return pickle.loads(path.read_bytes())


def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes(path, data)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
