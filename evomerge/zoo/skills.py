"""Skills of the toy model zoo: what each specialist learns, and its items.

A skill maps a short lowercase string to an answer string (reverse it, sort its letters, shift each
letter). Every item is rendered in one shared format,

    "<name> <input> =" + " <answer>."

where the first part is the *query* (lm-eval's context, ``doc_to_text``) and the second the *target*
(lm-eval's continuation, ``doc_to_target``, with ``target_delimiter: ""``). The target carries its own
leading space and the ``.`` terminator, so the scored string is exactly ``query + target`` whatever
delimiter conventions an lm-eval version applies, the context never ends in whitespace (lm-eval moves
trailing context whitespace into the continuation), and greedy exact match of the target also means
"stops at the right place".

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
    #: A plausible but wrong answer (same length, same alphabet): the base model is trained on these so
    #: it learns every skill's *format* but none of the skills.
    wrong: Callable[[str, random.Random], str]
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

    def text(self, x: str, *, correct: bool, rng: random.Random | None = None) -> tuple[str, str]:
        """(query, target) for training; ``correct=False`` draws a wrong answer with ``rng``."""
        if correct:
            y = self.answer(x)
        else:
            assert rng is not None
            y = self.wrong(x, rng)
        return self.query(x), self.target(y)


def _shuffle_wrong(x: str, rng: random.Random) -> str:
    """A permutation of ``x``'s letters (a bag-of-letters answer), re-drawn a few times to differ from
    the reversal and the sort; for inputs like ``aaaa`` every permutation is right, which is harmless."""
    bad = {x[::-1], "".join(sorted(x))}
    chars = list(x)
    for _ in range(8):
        rng.shuffle(chars)
        y = "".join(chars)
        if y not in bad:
            return y
    return y


CAESAR_SHIFT = 3


def _caesar(x: str, k: int = CAESAR_SHIFT) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in x)


def _caesar_wrong(x: str, rng: random.Random) -> str:
    """The input shifted by a random wrong amount (so the base learns "aligned, shifted copy")."""
    k = rng.choice([k for k in range(1, 26) if k != CAESAR_SHIFT])
    return _caesar(x, k)


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("reverse", "rev", "write the letters in reverse order", lambda x: x[::-1], lambda x, r: _caesar(x[::-1], 1)),
        Skill("sort", "srt", "write the letters in alphabetical order", lambda x: "".join(sorted(x)), lambda x, r: "".join(sorted(x, reverse=True))),
        Skill("shift", "rot", f"shift every letter {CAESAR_SHIFT} on (caesar, z wraps to a)", _caesar, lambda x, r: _caesar(x, 1)),
    )
}


#: Skills the base is trained on with *correct* answers (general abilities a pretrained base brings
#: along); no specialist and no task is made for them.
AUX_SKILLS: dict[str, Skill] = {
    s.name: s for s in (Skill("copy", "cpy", "copy the letters", lambda x: x, _shuffle_wrong),)
}


def get_skill(name: str) -> Skill:
    try:
        return {**SKILLS, **AUX_SKILLS}[name]
    except KeyError:
        raise KeyError(f"unknown zoo skill {name!r}; known: {', '.join([*SKILLS, *AUX_SKILLS])}") from None


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
