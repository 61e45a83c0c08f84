"""Skills of the toy model zoo: an operation applied to a string in one of several alphabets.

Real fine-tunes that merge well (math, code, a language) touch largely different tokens and features of
one broadly pretrained model. The zoo mirrors that in miniature: every item applies an *operation*
(reverse, sort, shift, copy) to a short string in one *alphabet* (Latin, Greek, Cyrillic letters: three
disjoint sets of tokens, like three languages). A skill is one (operation, alphabet) pair::

    reverse  = rev on Latin       "rev abcd=dcba."
    sort     = srt on Greek       "srt δβγα=αβγδ."
    shift    = rot on Cyrillic    "rot абв=где."    (each letter 3 on, wrapping)

The base is pretrained on every pair (``pretraining_mixture`` in ``build.py``), with the specialists'
pairs rare, so it knows every operation and every alphabet but each skill only partly. The synergy task
applies one specialist's operation in another specialist's alphabet (e.g. reverse on Cyrillic): it needs
both what the reverse fine-tune sharpened and what the shift fine-tune sharpened.

Every item is rendered in one shared format:

    query  = "<op> <input>="     lm-eval's context      (``doc_to_text: query``)
    target = "<answer>."         lm-eval's continuation (``doc_to_target: target``)

with ``target_delimiter: ""`` in the task, so the scored string is exactly ``query + target``. The
context never ends in whitespace (lm-eval would move it into the continuation), and the ``.``
terminator makes greedy exact match of the target also mean "stops at the right place". The tokenizer
is character-level, so ``encode(query) + encode(target) == encode(query + target)``.

Everything here is pure and deterministic from a seed: item sets come from ``random.Random`` seeded with
strings (stable across processes, unlike ``hash``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

#: Three disjoint alphabets of 16 letters each (the "languages" of the zoo).
ALPHABETS: dict[str, str] = {
    "latin": string.ascii_lowercase[:16],
    "greek": "αβγδεζηθικλμνξοπ",
    "cyrillic": "абвгдежзиклмнопр",
}
#: Every character that any query or target can contain (the tokenizer's vocabulary is built from it):
#: the operation codes are spelled in ASCII letters, some beyond the Latin alphabet's 16.
ALPHABET = (
    " \n=.:-_,"
    + string.digits
    + string.ascii_lowercase
    + "".join(sorted(set("".join(ALPHABETS.values())) - set(string.ascii_lowercase)))
)

CAESAR_SHIFT = 3


def _check_vocabulary() -> None:
    """Every character of every operation code and alphabet is a token (else it would encode as <unk>)."""
    missing = sorted(set("".join(OPERATIONS) + "".join(ALPHABETS.values())) - set(ALPHABET))
    if missing:
        raise AssertionError(f"characters missing from ALPHABET: {missing}")


def _reverse(x: str, letters: str) -> str:
    return x[::-1]


def _sort(x: str, letters: str) -> str:
    return "".join(sorted(x, key=letters.index))


def _shift(x: str, letters: str) -> str:
    n = len(letters)
    return "".join(letters[(letters.index(c) + CAESAR_SHIFT) % n] for c in x)


def _copy(x: str, letters: str) -> str:
    return x


def _reverse_shift(x: str, letters: str) -> str:
    return _shift(_reverse(x, letters), letters)


#: operation code -> (answer function, description)
OPERATIONS: dict[str, tuple[Callable[[str, str], str], str]] = {
    "rev": (_reverse, "write the letters in reverse order"),
    "srt": (_sort, "write the letters in alphabetical order"),
    "rot": (_shift, f"shift every letter {CAESAR_SHIFT} on in its alphabet (wrapping)"),
    "cpy": (_copy, "copy the letters"),
    "rvt": (_reverse_shift, f"reverse the letters, then shift each {CAESAR_SHIFT} on"),
}


_check_vocabulary()


@dataclass(frozen=True)
class Skill:
    """One (operation, alphabet) pair: how to draw an input and the right answer."""

    name: str
    op: str
    alphabet: str
    min_len: int = 3
    max_len: int = 5

    @property
    def letters(self) -> str:
        return ALPHABETS[self.alphabet]

    @property
    def description(self) -> str:
        return f"{OPERATIONS[self.op][1]} ({self.alphabet} letters)"

    def answer(self, x: str) -> str:
        return OPERATIONS[self.op][0](x, self.letters)

    def draw_input(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(self.letters) for _ in range(n))

    def query(self, x: str) -> str:
        return f"{self.op} {x}="

    def target(self, answer: str) -> str:
        return f"{answer}."

    def item(self, x: str) -> dict[str, str]:
        """The JSONL record for input ``x`` (the lm-eval task reads ``query`` and ``target``)."""
        return {"skill": self.name, "input": x, "query": self.query(x), "target": self.target(self.answer(x))}

    def text(self, x: str) -> tuple[str, str]:
        """(query, target) for training."""
        return self.query(x), self.target(self.answer(x))


#: The specialists' skills: each its own operation in its own alphabet.
SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("reverse", "rev", "latin"),
        Skill("sort", "srt", "greek"),
        Skill("shift", "rot", "cyrillic"),
    )
}


#: The synergy task: reverse, then shift, in the shift specialist's alphabet. It needs what the reverse
#: fine-tune sharpened (the positional circuit) and what the shift fine-tune sharpened (Cyrillic's
#: letter map) at once, so neither specialist alone does it well (``zoo.json``'s ``synergy``).
SYNERGY = "reverse_shift"
SYNERGY_SKILLS = ("reverse", "shift")
SKILLS_AND_SYNERGY: dict[str, Skill] = {**SKILLS, SYNERGY: Skill(SYNERGY, "rvt", "cyrillic")}


def get_skill(name: str) -> Skill:
    """A named skill (``reverse``, the synergy ``reverse_shift``) or any pair (``rev@cyrillic``)."""
    if name in SKILLS_AND_SYNERGY:
        return SKILLS_AND_SYNERGY[name]
    op, sep, alphabet = name.partition("@")
    if sep and op in OPERATIONS and alphabet in ALPHABETS:
        return Skill(name, op, alphabet)
    raise KeyError(
        f"unknown zoo skill {name!r}; known: {', '.join(SKILLS)}, or OP@ALPHABET with OP in "
        f"{', '.join(OPERATIONS)} and ALPHABET in {', '.join(ALPHABETS)}"
    )


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
