"""Skills of the toy model zoo: what each specialist learns, and its items.

A skill maps a short lowercase string (3-6 letters) to an answer (reverse it, sort its letters, shift
each letter). Every item is rendered in one shared format, e.g. ``rev abcd=dcba.``:

    query  = "<code> <input>="     lm-eval's context      (``doc_to_text: query``)
    target = "<answer>."           lm-eval's continuation (``doc_to_target: target``)

with ``target_delimiter: ""`` in the task, so the scored string is exactly ``query + target`` (lm-eval
0.4.13 puts no delimiter between context and continuation of a ``loglikelihood`` request; older
versions put ``target_delimiter`` there, which "" makes moot). The context never ends in whitespace
(lm-eval would move it into the continuation), and the ``.`` terminator makes greedy exact match of the
target also mean "stops at the right place". The tokenizer is character-level, so ``encode(query) +
encode(target) == encode(query + target)``: training and scoring see the same tokens.

Everything here is pure and deterministic from a seed: item sets come from ``random.Random`` seeded
with strings (stable across processes, unlike ``hash``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
#: Every character that any query or target can contain (the tokenizer's vocabulary is built from it).
ALPHABET = " \n" + LETTERS + string.digits + "=.:-_,"


@dataclass(frozen=True)
class Skill:
    """One skill: how to draw an input, the right answer, and a wrong answer of the same shape."""

    name: str
    #: The short tag that opens the query (fewer tokens per item = a faster build).
    code: str
    description: str
    answer: Callable[[str], str]
    #: A plausible but wrong answer of the same shape: the base model is trained mostly on these, so it
    #: knows every skill's *format* but, decoding greedily, none of the skills.
    wrong: Callable[[str], str]
    min_len: int = 3
    max_len: int = 6

    def draw_input(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(LETTERS) for _ in range(n))

    def query(self, x: str) -> str:
        return f"{self.code} {x}="

    def target(self, answer: str) -> str:
        return f"{answer}."

    def item(self, x: str) -> dict[str, str]:
        """The JSONL record for input ``x`` (the lm-eval task reads ``query`` and ``target``)."""
        return {"skill": self.name, "input": x, "query": self.query(x), "target": self.target(self.answer(x))}

    def text(self, x: str, *, correct: bool) -> tuple[str, str]:
        """(query, target) for training, with the right or the wrong answer."""
        return self.query(x), self.target(self.answer(x) if correct else self.wrong(x))


CAESAR_SHIFT = 3


def _caesar(x: str, k: int = CAESAR_SHIFT) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in x)


def _shift1(x: str) -> str:
    return _caesar(x, 1)


def _reverse(x: str) -> str:
    return x[::-1]


def _reverse_shift1(x: str) -> str:
    return _caesar(x[::-1], 1)


def _sort(x: str) -> str:
    return "".join(sorted(x))


def _sort_descending(x: str) -> str:
    return "".join(sorted(x, reverse=True))


# The wrong rules are deliberately *neighbours* of the right ones, so the base already holds the
# machinery (mirrored attention, letter order, letter maps) and a short fine-tune can turn it to the
# skill: the base is taught reverse as "reverse, then shift by 1", sort as "sort descending", shift as
# "shift by 1". (Copy as the wrong rule of reverse left the reversal specialist at ~65% after the same
# fine-tune.) Greedy decoding of the base gives the wrong rule, so the base scores ~0 on every skill.
SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("reverse", "rev", "write the letters in reverse order", _reverse, _reverse_shift1),
        Skill("sort", "srt", "write the letters in alphabetical order", _sort, _sort_descending),
        Skill("shift", "rot", f"shift every letter {CAESAR_SHIFT} on (caesar; z wraps to c)", _caesar, _shift1),
    )
}


def get_skill(name: str) -> Skill:
    try:
        return SKILLS[name]
    except KeyError:
        raise KeyError(f"unknown zoo skill {name!r}; known: {', '.join(SKILLS)}") from None


def eval_inputs(skill: Skill, seed: int, n_search: int, n_test: int) -> tuple[list[str], list[str]]:
    """Disjoint ``search`` and ``test`` inputs for one skill (unique within and across the two sets)."""
    rng = random.Random(f"evomerge-zoo/{seed}/eval/{skill.name}")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n_search + n_test:
        x = skill.draw_input(rng)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out[:n_search], out[n_search:]


def training_inputs(skill: Skill, rng: random.Random, exclude: Iterable[str] | set[str]) -> Iterator[str]:
    """An endless stream of inputs for ``skill`` that avoids every string in ``exclude``."""
    excl = exclude if isinstance(exclude, set) else set(exclude)
    while True:
        x = skill.draw_input(rng)
        if x not in excl:
            yield x
