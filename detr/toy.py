"""A toy English→German corpus the project makes itself: counted objects with colours.

    "we have twenty-one red dogs and one small house."
    →  "wir haben einundzwanzig rote Hunde und ein kleines Haus."

Small enough to learn in a minute on a CPU, yet a real translation task: German number
words reorder units and tens ("one-and-twenty") and write compounds as one word, and
adjectives and articles agree with the noun's gender, number and case. Used by `configs/tiny.yaml`, the
README's main job and end-to-end tests, so none of them needs downloaded data.
"""

from __future__ import annotations

import random
from pathlib import Path

from detr.atomic import atomic_write_text
from detr.errors import DataError

_EN_UNITS = "zero one two three four five six seven eight nine".split()
_EN_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_DE_UNITS = "null eins zwei drei vier fünf sechs sieben acht neun".split()
_DE_TEENS = "zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn".split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()

# English singular, English plural, German singular, German plural, German gender.
_NOUNS = [
    ("dog", "dogs", "Hund", "Hunde", "m"), ("cat", "cats", "Katze", "Katzen", "f"),
    ("house", "houses", "Haus", "Häuser", "n"), ("car", "cars", "Auto", "Autos", "n"),
    ("tree", "trees", "Baum", "Bäume", "m"), ("flower", "flowers", "Blume", "Blumen", "f"),
    ("book", "books", "Buch", "Bücher", "n"), ("bird", "birds", "Vogel", "Vögel", "m"),
    ("chair", "chairs", "Stuhl", "Stühle", "m"), ("door", "doors", "Tür", "Türen", "f"),
    ("child", "children", "Kind", "Kinder", "n"), ("boat", "boats", "Boot", "Boote", "n"),
]
_ADJECTIVES = [
    ("red", "rot"), ("blue", "blau"), ("green", "grün"), ("small", "klein"),
    ("big", "groß"), ("old", "alt"), ("new", "neu"), ("black", "schwarz"),
]
_SUBJECTS = [("i see", "ich sehe"), ("we have", "wir haben"), ("they buy", "sie kaufen"),
             ("you paint", "du malst"), ("she counts", "sie zählt")]
# Accusative after "ein"/"eine": article and adjective ending by gender (plural: no article, "-e").
_SINGULAR = {"m": ("einen", "en"), "f": ("eine", "e"), "n": ("ein", "es")}


def english_number(n: int) -> str:
    """0 ≤ n < 1000 in English words: 342 → "three hundred forty-two"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number out of range: {n}")
    words = []
    if n >= 100:
        words.append(f"{_EN_UNITS[n // 100]} hundred")
        n %= 100
        if n == 0:
            return " ".join(words)
    if n < 10:
        words.append(_EN_UNITS[n])
    elif n < 20:
        words.append(_EN_TEENS[n - 10])
    else:
        words.append(_EN_TENS[n // 10] + (f"-{_EN_UNITS[n % 10]}" if n % 10 else ""))
    return " ".join(words)


def german_number(n: int) -> str:
    """0 ≤ n < 1000 as one German word: 342 → "dreihundertzweiundvierzig"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number out of range: {n}")
    hundreds, rest = divmod(n, 100)
    word = f"{'ein' if hundreds == 1 else _DE_UNITS[hundreds]}hundert" if hundreds else ""
    if rest == 0:
        return word or "null"
    if rest < 10:
        return word + _DE_UNITS[rest]
    if rest < 20:
        return word + _DE_TEENS[rest - 10]
    tens, units = divmod(rest, 10)
    if units:
        word += ("ein" if units == 1 else _DE_UNITS[units]) + "und"
    return word + _DE_TENS[tens]


def noun_phrase(n: int, noun: int, adjective: int) -> tuple[str, str]:
    """`n` (1–999) objects of kind `noun` with colour/size `adjective`, as an accusative object."""
    en_sg, en_pl, de_sg, de_pl, gender = _NOUNS[noun]
    en_adj, de_adj = _ADJECTIVES[adjective]
    if n == 1:
        article, ending = _SINGULAR[gender]
        return f"one {en_adj} {en_sg}", f"{article} {de_adj}{ending} {de_sg}"
    return f"{english_number(n)} {en_adj} {en_pl}", f"{german_number(n)} {de_adj}e {de_pl}"


def toy_pair(rng: random.Random) -> tuple[str, str]:
    """One random sentence pair: "we have twenty-one red dogs and one old cat." → German."""
    en_subject, de_subject = rng.choice(_SUBJECTS)
    phrases = [noun_phrase(1 if rng.random() < 0.15 else rng.randint(2, 999), rng.randrange(len(_NOUNS)),
                           rng.randrange(len(_ADJECTIVES))) for _ in range(rng.randint(1, 2))]
    en = " and ".join(p[0] for p in phrases)
    de = " und ".join(p[1] for p in phrases)
    return f"{en_subject} {en}.", f"{de_subject} {de}."


def make_toy_corpus(dest: str | Path, train: int = 20000, valid: int = 300, test: int = 300,
                    seed: int = 1) -> list[Path]:
    """Write `{train,valid,test}.{en,de}` under `dest`: distinct random pairs, seeded.

    Raises:
        DataError: the folder cannot be written, or a size is out of range.
    """
    if min(train, valid, test) < 0 or train + valid + test > 1_000_000:
        raise DataError("toy corpus: sizes must be non-negative and sum to at most 1,000,000")
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < train + valid + test:
        pair = toy_pair(rng)
        if pair[0] not in seen:  # distinct sentences: no test sentence is in train
            seen.add(pair[0])
            pairs.append(pair)
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{dest}: cannot create folder: {err.strerror}") from None
    written, start = [], 0
    for split, size in (("train", train), ("valid", valid), ("test", test)):
        for side, lang in ((0, "en"), (1, "de")):
            path = dest / f"{split}.{lang}"
            try:
                atomic_write_text(path, "".join(p[side] + "\n" for p in pairs[start:start + size]))
            except OSError as err:
                raise DataError(f"{path}: cannot write: {err.strerror}") from None
            written.append(path)
        start += size
    return written
