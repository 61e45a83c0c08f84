"""Skills of the toy model zoo: an operation applied to a short string in one or two alphabets.

Real fine-tunes that merge well (math, code, a language) touch largely different tokens and features of
one broadly pretrained model, and each starts from a base that already partly knows its skill. The zoo
mirrors that in miniature. Three disjoint alphabets (Latin, Greek, Cyrillic letters: three sets of
tokens, like three languages) each have a fixed *code*: a substitution of its letters (``CODE``), the
"vocabulary" of that language. A specialist's skill is writing one language in its code::

    latin     sub abcd=kpdh.        (each letter replaced by its code letter)
    greek     sub δβγα=...
    cyrillic  sub абвг=...

The base is pretrained on copying in every alphabet (the "general text") and on the code of *some* of
each alphabet's letters (``known_letters``: which ones depends on the zoo seed), so it knows each skill
partly: an item is right exactly when every letter in it is one the base learned. That share is set by
how many letters it knows, not by a knife-edge mixture weight, so it holds across seeds. A specialist is
a brief fine-tune that learns the rest of one alphabet's code.

The synergy task mixes two alphabets in one string (``sub aбcд=...``: code-switching): it needs the
Latin specialist's letters and the Cyrillic specialist's letters at once, so neither does it well
alone, and a merge that keeps both does.

The older operations (reverse, sort, shift, copy) stay available as ``OP@ALPHABET`` skills
(``get_skill("rev@latin")``); copying is the base's general text.

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

import dataclasses
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


def _code_of(alphabet: str) -> dict[str, str]:
    """A fixed substitution of one alphabet's letters with no letter left in place (a derangement, so
    copying is never the right answer). The same for every zoo seed: a language's code is part of the
    language, not of one zoo."""
    letters = ALPHABETS[alphabet]
    rng = random.Random(f"evomerge-zoo/code/{alphabet}")
    while True:
        shuffled = rng.sample(letters, len(letters))
        if all(a != b for a, b in zip(letters, shuffled)):
            return dict(zip(letters, shuffled))


#: Every letter of every alphabet -> its code letter (in the same alphabet).
CODE: dict[str, str] = {k: v for alphabet in ALPHABETS for k, v in _code_of(alphabet).items()}


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


def _substitute(x: str, letters: str) -> str:
    return "".join(CODE[c] for c in x)


#: operation code -> (answer function, description)
OPERATIONS: dict[str, tuple[Callable[[str, str], str], str]] = {
    "rev": (_reverse, "write the letters in reverse order"),
    "srt": (_sort, "write the letters in alphabetical order"),
    "rot": (_shift, f"shift every letter {CAESAR_SHIFT} on in its alphabet (wrapping)"),
    "cpy": (_copy, "copy the letters"),
    "rvt": (_reverse_shift, f"reverse the letters, then shift each {CAESAR_SHIFT} on"),
    "sub": (_substitute, "write each letter in its language's code"),
}


_check_vocabulary()


@dataclass(frozen=True)
class Skill:
    """One operation over one alphabet (or a code-switched mix of two): how to draw an input and the
    right answer. ``pool``, when set, limits inputs to those letters (what the base is shown)."""

    name: str
    op: str
    alphabet: str
    min_len: int = 3
    max_len: int = 5
    #: a second alphabet mixed into every input (at least ``min_each`` letters of each)
    mixed_with: str | None = None
    min_each: int = 2
    pool: str = ""

    @property
    def letters(self) -> str:
        """The alphabet the operation works in (its letter order, for sort and shift)."""
        return ALPHABETS[self.alphabet]

    @property
    def input_letters(self) -> str:
        if self.pool:
            return self.pool
        return self.letters + (ALPHABETS[self.mixed_with] if self.mixed_with else "")

    @property
    def description(self) -> str:
        where = (
            f"{self.alphabet} and {self.mixed_with} letters mixed" if self.mixed_with else f"{self.alphabet} letters"
        )
        return f"{OPERATIONS[self.op][1]} ({where})"

    def answer(self, x: str) -> str:
        return OPERATIONS[self.op][0](x, self.letters)

    def draw_input(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        while True:
            x = "".join(rng.choice(self.input_letters) for _ in range(n))
            if self.mixed_with is None or all(
                sum(c in ALPHABETS[a] for c in x) >= self.min_each for a in (self.alphabet, self.mixed_with)
            ):
                return x

    def restricted_to(self, letters: str, suffix: str = "known") -> Skill:
        """The same skill on inputs drawn from ``letters`` only (named ``<name>/<suffix>``)."""
        return dataclasses.replace(self, name=f"{self.name}/{suffix}", pool=letters)

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


#: The specialists' skills: each writes one language in its code.
SKILLS: dict[str, Skill] = {a: Skill(a, "sub", a) for a in ("latin", "greek", "cyrillic")}


#: The synergy task: code-switched strings of Latin and Cyrillic letters (4-6 letters, at least two of
#: each), written in code. It needs the Latin specialist's letters and the Cyrillic specialist's at
#: once, so neither specialist alone does it well (``zoo.json``'s ``synergy``).
SYNERGY = "latin_cyrillic"
SYNERGY_SKILLS = ("latin", "cyrillic")
SKILLS_AND_SYNERGY: dict[str, Skill] = {
    **SKILLS,
    SYNERGY: Skill(SYNERGY, "sub", "latin", min_len=4, max_len=6, mixed_with="cyrillic"),
}


def known_letters(alphabet: str, seed: int, n: int) -> str:
    """The ``n`` letters of ``alphabet`` whose code the base is shown, drawn from the zoo seed."""
    letters = ALPHABETS[alphabet]
    if not 0 < n <= len(letters):
        raise ValueError(f"known letters: {n} is not between 1 and {len(letters)}")
    chosen = set(random.Random(f"evomerge-zoo/{seed}/known/{alphabet}").sample(letters, n))
    return "".join(c for c in letters if c in chosen)


def get_skill(name: str) -> Skill:
    """A named skill (``latin``, the synergy ``latin_cyrillic``) or any pair (``rev@cyrillic``,
    ``sub@latin+cyrillic`` for a code-switched mix)."""
    if name in SKILLS_AND_SYNERGY:
        return SKILLS_AND_SYNERGY[name]
    op, sep, where = name.partition("@")
    alphabet, _, mixed = where.partition("+")
    if sep and op in OPERATIONS and alphabet in ALPHABETS and (not mixed or mixed in ALPHABETS):
        return Skill(name, op, alphabet, mixed_with=mixed or None)
    raise KeyError(
        f"unknown zoo skill {name!r}; known: {', '.join(SKILLS_AND_SYNERGY)}, or OP@ALPHABET[+ALPHABET] with OP in "
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
