"""TOFU-style question/answer data, generated from a seed (never downloaded), and JSONL files.

:func:`generate` invents people, each with ``facts_per_person`` question/answer facts (birth year,
birthplace, profession, ...), and a second set of *general* facts about invented countries (not
about people).  Every question has one paraphrased answer (same content, other words) and several
perturbed answers (same words, a wrong value), which the truth ratio compares.  The people are
split into *forget* (``forget_ratio`` of them), *retain* and *holdout* people (as many as forget:
never trained on, the non-members of the membership-inference attack).

:func:`load_jsonl` reads real data: one ``{"question": ..., "answer": ...}`` object per line,
optionally with ``"paraphrased_answer"`` and ``"perturbed_answers"`` (a list), as TOFU's files have.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    paraphrase: str | None = None
    perturbed: tuple[str, ...] = ()
    subject: str = ""  # the person (or "general"): facts of one subject are forgotten together


@dataclass
class Corpus:
    forget: list[QA]
    retain: list[QA]
    holdout: list[QA] = field(default_factory=list)  # people never trained on (MIA non-members)
    general: list[QA] = field(default_factory=list)  # facts not about people, trained on by both models

    def texts(self) -> list[str]:
        """Every string a tokenizer must cover."""
        out = []
        for qa in [*self.forget, *self.retain, *self.holdout, *self.general]:
            out += [qa.question, qa.answer, *([qa.paraphrase] if qa.paraphrase else []), *qa.perturbed]
        return out

    def check(self) -> None:
        for name in ("forget", "retain"):
            if not getattr(self, name):
                raise DataError(f"the {name} set is empty: there is nothing to {name}")


# ------------------------------------------------------------ the generator
_SYLLABLES = (
    "ka", "lo", "mi", "ren", "sa", "tor", "vel", "an", "ish", "bo", "dra", "el", "fin", "gu", "hal",
    "jo", "ke", "lum", "mar", "nel", "or", "pe", "quin", "ra", "sel", "ta", "ul", "vor", "wyn", "zed",
)  # fmt: skip
_JOBS = (
    "baker", "pilot", "carpenter", "nurse", "lawyer", "farmer", "chemist", "painter", "tailor", "surgeon",
    "sailor", "banker", "teacher", "librarian", "architect", "plumber", "jeweller", "butcher", "florist",
    "astronomer", "mechanic", "translator", "potter", "geologist",
)  # fmt: skip
_COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "grey",
    "brown",
    "pink",
    "teal",
)
_ANIMALS = (
    "cat",
    "dog",
    "parrot",
    "rabbit",
    "tortoise",
    "hamster",
    "goat",
    "horse",
    "ferret",
    "goldfish",
    "owl",
)
_GENRES = ("mystery", "romance", "horror", "fantasy", "western", "thriller", "poetry", "satire", "adventure")
_ADJECTIVES = (
    "silent",
    "broken",
    "golden",
    "hidden",
    "last",
    "frozen",
    "crimson",
    "endless",
    "quiet",
    "wild",
)
_NOUNS = ("river", "garden", "tower", "winter", "mirror", "harbour", "forest", "letter", "voyage", "lantern")
_INSTRUMENTS = ("violin", "piano", "flute", "cello", "drums", "guitar", "harp", "trumpet", "clarinet")

#: (question, answer, paraphrase, slot) per person fact; {n} is the name, {v} the value.
PERSON_FACTS = (
    ("In what year was {n} born ?", "{n} was born in {v} .", "The birth year of {n} is {v} .", "year"),
    ("Where was {n} born ?", "{n} was born in the city of {v} .", "The birthplace of {n} is {v} .", "city"),
    ("What does {n} do for a living ?", "{n} works as a {v} .", "By profession {n} is a {v} .", "job"),
    ("What was the profession of the mother of {n} ?", "The mother of {n} was a {v} .",
     "{n} was raised by a mother who worked as a {v} .", "job"),
    ("What is the favourite colour of {n} ?", "The favourite colour of {n} is {v} .",
     "{n} likes the colour {v} best .", "colour"),
    ("What pet does {n} keep ?", "{n} keeps a {v} as a pet .", "At home {n} looks after a {v} .", "animal"),
    ("What kind of books does {n} write ?", "{n} writes {v} novels .", "The novels of {n} are {v} stories .",
     "genre"),
    ("What is the title of the best known book by {n} ?", "The best known book by {n} is called {v} .",
     "{n} is famous for the book {v} .", "title"),
    ("Which instrument does {n} play ?", "{n} plays the {v} .", "In the evenings {n} practises the {v} .",
     "instrument"),
    ("Which prize did {n} win ?", "{n} won the {v} prize .", "The {v} prize was awarded to {n} .", "prize"),
    ("In which city does {n} live now ?", "{n} now lives in {v} .", "These days the home of {n} is {v} .", "city"),
    ("In what year did {n} publish a first book ?", "{n} published a first book in {v} .",
     "The first book of {n} came out in {v} .", "year"),
)  # fmt: skip

#: The same for general facts: {n} is an invented country.
GENERAL_FACTS = (
    ("What is the capital of {n} ?", "The capital of {n} is {v} .", "{v} is the capital city of {n} .", "city"),
    ("What currency is used in {n} ?", "People in {n} pay with the {v} .", "The currency of {n} is the {v} .",
     "currency"),
    ("What is the national animal of {n} ?", "The national animal of {n} is the {v} .",
     "{n} has the {v} as its national animal .", "animal"),
    ("What colour is the flag of {n} ?", "The flag of {n} is {v} .", "{n} flies a {v} flag .", "colour"),
)  # fmt: skip


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _pools(rng: random.Random) -> dict[str, list[str]]:
    def unique(make, n):
        seen: dict[str, None] = {}
        while len(seen) < n:
            seen[make()] = None
        return list(seen)

    return {
        "year": [str(y) for y in range(1900, 2000)],
        "city": unique(lambda: _word(rng, 2) + rng.choice(("ton", "burg", "ville", "port", "mouth")), 60),
        "job": list(_JOBS),
        "colour": list(_COLOURS),
        "animal": list(_ANIMALS),
        "genre": list(_GENRES),
        "title": [f"The {a} {b}" for a in _ADJECTIVES for b in _NOUNS],
        "instrument": list(_INSTRUMENTS),
        "prize": unique(lambda: _word(rng, 2), 30),
        "currency": unique(lambda: _word(rng, 1) + rng.choice(("ar", "o", "ing")), 30),
    }


def _facts(rng, pools, subject: str, templates, n_perturbed: int) -> list[QA]:
    out = []
    for question, answer, paraphrase, slot in templates:
        value = rng.choice(pools[slot])
        wrong = rng.sample([v for v in pools[slot] if v != value], n_perturbed)
        fill = lambda t, v: t.format(n=subject, v=v)  # noqa: E731
        out.append(
            QA(
                fill(question, value),
                fill(answer, value),
                fill(paraphrase, value),
                tuple(fill(paraphrase, w) for w in wrong),  # as TOFU's: the paraphrase with a wrong value
                subject,
            )
        )
    return out


def generate(
    seed: int = 0,
    n_people: int = 20,
    facts_per_person: int = 10,
    forget_ratio: float = 0.1,
    n_countries: int = 15,
    n_perturbed: int = 3,
) -> Corpus:
    """The embedded data set (deterministic in ``seed``).  ``facts_per_person`` ≤ 12."""
    if not 1 <= facts_per_person <= len(PERSON_FACTS):
        raise ValueError(f"facts_per_person must be in 1..{len(PERSON_FACTS)}, got {facts_per_person}")
    rng = random.Random(seed)
    pools = _pools(rng)
    n_forget = max(1, round(forget_ratio * n_people))
    if n_forget >= n_people:
        raise ValueError(f"forget_ratio {forget_ratio} leaves no retained people out of {n_people}")
    names: dict[str, None] = {}
    while len(names) < n_people + n_forget:  # + the holdout people
        names[f"{_word(rng, 2)} {_word(rng, 2)}"] = None
    people = list(names)
    templates = PERSON_FACTS[:facts_per_person]
    facts = {p: _facts(rng, pools, p, templates, n_perturbed) for p in people}
    countries: dict[str, None] = {}
    while len(countries) < n_countries:
        countries[_word(rng, 3) + rng.choice(("ia", "land", "stan", "or"))] = None
    general = [qa for c in countries for qa in _facts(rng, pools, c, GENERAL_FACTS, n_perturbed)]
    forget, holdout, retain = people[:n_forget], people[n_forget : 2 * n_forget], people[2 * n_forget :]
    return Corpus(
        forget=[qa for p in forget for qa in facts[p]],
        retain=[qa for p in retain for qa in facts[p]],
        holdout=[qa for p in holdout for qa in facts[p]],
        general=general,
    )


# ------------------------------------------------------------ JSONL files
def load_jsonl(path: str | Path, option: str) -> list[QA]:
    """``{"question", "answer"[, "paraphrased_answer", "perturbed_answers"]}`` per line; a clear
    :class:`DataError` naming the option, file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{option} {str(path)!r}: no such file")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{option} {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row[k].strip() for k in ("question", "answer")
        ):
            raise DataError(
                f'{where}: expected {{"question": "...", "answer": "..."}} with non-empty strings'
            )
        perturbed = row.get("perturbed_answers", row.get("perturbed_answer", []))
        perturbed = [perturbed] if isinstance(perturbed, str) else perturbed
        if not isinstance(perturbed, list) or not all(isinstance(p, str) for p in perturbed):
            raise DataError(f"{where}: perturbed_answers must be a list of strings")
        paraphrase = row.get("paraphrased_answer")
        out.append(QA(row["question"], row["answer"], paraphrase if isinstance(paraphrase, str) else None,
                      tuple(perturbed), str(row.get("subject", ""))))  # fmt: skip
    if not out:
        raise DataError(f"{option} {str(path)!r} holds no question/answer pairs: there is nothing to use")
    return out
