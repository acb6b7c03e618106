"""The bundled instruction set: a deterministic generator of checkable tasks (spec llm.md section 4).

Six task families, each with a short answer that can be checked, written in Dolly format
(``instruction``, ``context``, ``response``, ``category``) plus a ``references`` list of every
acceptable answer (the gold sentence, the same sentence for each accepted variant of the
answer, then the bare answers), which :func:`llm.evaluate.rouge_l` and ``exact_match`` maximise over:

==================  ==============================================  =====================================
family (category)   example instruction (/ input)                   gold response
==================  ==============================================  =====================================
``capital``         Name the capital city of Peru.                  The capital city of Peru is Lima.
``antonym``         What is the opposite of early?                  The opposite of early is late.
``currency``        What is the currency of Japan?                  The currency of Japan is the yen.
``element_symbol``  What is the chemical symbol for iron?           The chemical symbol for iron is Fe.
``word_category``   Which category does the word belong to:         The word "pear" belongs to the
                    fruit, animal, or vehicle? / pear               category of fruit.
``list_position``   What is the last word in this list? / sun, cup  The last word in this list is "cup".
==================  ==============================================  =====================================

The families and wordings were chosen by measuring the SmolLM2-135M-Instruct teacher: it
answers these well within a few dozen new tokens, while an untrained student scores zero.
Addition, number comparison, list sorting and copying were probed and dropped, because the
teacher answers them at chance level or not at all.

Answers.  Every record also carries ``answers``: the ``accepted`` short answers, the
``distractors`` (the answers of the family's other facts, the other two categories, the list's
other words) and ``case_sensitive`` (chemical symbols), from which :func:`llm.evaluate.answer_accuracy`
scores a response: it names an accepted answer and no distractor.  The question's own subject is
never a distractor ("early" in "What is the opposite of early?").

Splits.  For the fact families 30% of the facts (countries, words, elements, items) are held
out, and each family has evaluation-only wordings (the last two of each table; two other questions
for ``word_category``) that training never uses.  Train draws the other 70% of the facts in the
training wordings.  Valid and test (**unseen facts**, the generalisation split) draw disjoint
(fact, wording) prompts of the held-out facts, in every wording; ``test_seen`` (**seen facts in
unseen wordings**, the in-distribution split) draws training facts in the evaluation-only wordings
(``list_position`` has no such split).  Split sizes are divided between the families as evenly
as their prompts allow (currency and element_symbol have fewer held-out prompts), valid and test
in the same proportion.  ``list_position`` holds out a quarter of all lists by a stable hash.
Everything is a pure function of ``seed`` (Python's ``random`` seeded with strings, which does
not depend on ``PYTHONHASHSEED``), so the files are byte-identical across runs.

``python -m llm.testbed --out DIR`` writes ``train.jsonl``, ``valid.jsonl``, ``test.jsonl``,
``test_seen.jsonl`` and ``manifest.json``; :func:`testbed_splits` does the same once under ``cache/``
and returns the paths.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llm.cache import cache_lock
from llm.data import names
from pbkd_ref.cli import ArgumentParser

GENERATOR_VERSION = 3
SPLITS = ("train", "valid", "test", "test_seen")
HELD_OUT_FRACTION = 0.3
DEFAULT_SIZES = {"train": 2000, "valid": 200, "test": 500, "test_seen": 300}
CACHE_ROOT = Path(__file__).resolve().parents[1] / "cache"

# --------------------------------------------------------------------------------------------
# Fact tables.  Values are lists of accepted answers; the first is the canonical one.
# --------------------------------------------------------------------------------------------

CAPITALS = {
    "Afghanistan": ["Kabul"], "Albania": ["Tirana"], "Algeria": ["Algiers"], "Argentina": ["Buenos Aires"],
    "Armenia": ["Yerevan"], "Australia": ["Canberra"], "Austria": ["Vienna"], "Azerbaijan": ["Baku"],
    "Bangladesh": ["Dhaka"], "Belarus": ["Minsk"], "Belgium": ["Brussels"], "Brazil": ["Brasilia", "Brasília"],
    "Bulgaria": ["Sofia"], "Cambodia": ["Phnom Penh"], "Canada": ["Ottawa"], "Chile": ["Santiago"],
    "China": ["Beijing"], "Colombia": ["Bogota", "Bogotá"], "Costa Rica": ["San Jose", "San José"],
    "Croatia": ["Zagreb"], "Cuba": ["Havana"], "the Czech Republic": ["Prague"], "Denmark": ["Copenhagen"],
    "Ecuador": ["Quito"], "Egypt": ["Cairo"], "Estonia": ["Tallinn"], "Ethiopia": ["Addis Ababa"],
    "Finland": ["Helsinki"], "France": ["Paris"], "Georgia": ["Tbilisi"], "Germany": ["Berlin"],
    "Ghana": ["Accra"], "Greece": ["Athens"], "Hungary": ["Budapest"], "Iceland": ["Reykjavik"],
    "India": ["New Delhi"], "Indonesia": ["Jakarta"], "Iran": ["Tehran"], "Iraq": ["Baghdad"],
    "Ireland": ["Dublin"], "Italy": ["Rome"], "Jamaica": ["Kingston"], "Japan": ["Tokyo"], "Jordan": ["Amman"],
    "Kazakhstan": ["Astana"], "Kenya": ["Nairobi"], "Latvia": ["Riga"], "Lebanon": ["Beirut"],
    "Libya": ["Tripoli"], "Lithuania": ["Vilnius"], "Malaysia": ["Kuala Lumpur"], "Mexico": ["Mexico City"],
    "Mongolia": ["Ulaanbaatar"], "Morocco": ["Rabat"], "Nepal": ["Kathmandu"], "the Netherlands": ["Amsterdam"],
    "New Zealand": ["Wellington"], "Nigeria": ["Abuja"], "North Korea": ["Pyongyang"], "Norway": ["Oslo"],
    "Pakistan": ["Islamabad"], "Peru": ["Lima"], "the Philippines": ["Manila"], "Poland": ["Warsaw"],
    "Portugal": ["Lisbon"], "Qatar": ["Doha"], "Romania": ["Bucharest"], "Russia": ["Moscow"],
    "Saudi Arabia": ["Riyadh"], "Senegal": ["Dakar"], "Serbia": ["Belgrade"], "Slovakia": ["Bratislava"],
    "Slovenia": ["Ljubljana"], "South Korea": ["Seoul"], "Spain": ["Madrid"], "Sudan": ["Khartoum"],
    "Sweden": ["Stockholm"], "Switzerland": ["Bern"], "Syria": ["Damascus"], "Thailand": ["Bangkok"],
    "Tunisia": ["Tunis"], "Turkey": ["Ankara"], "Uganda": ["Kampala"], "Ukraine": ["Kyiv", "Kiev"],
    "the United Kingdom": ["London"], "the United States": ["Washington, D.C.", "Washington"],
    "Uruguay": ["Montevideo"], "Venezuela": ["Caracas"], "Vietnam": ["Hanoi"], "Zimbabwe": ["Harare"],
}

ANTONYMS = {
    "hot": ["cold"], "cold": ["hot"], "big": ["small", "little"], "small": ["big", "large"],
    "tall": ["short"], "fast": ["slow"], "slow": ["fast", "quick"], "happy": ["sad", "unhappy"],
    "sad": ["happy"], "dark": ["light", "bright"], "open": ["closed", "shut"], "closed": ["open"],
    "up": ["down"], "down": ["up"], "early": ["late"], "late": ["early"], "easy": ["hard", "difficult"],
    "difficult": ["easy"], "full": ["empty"], "empty": ["full"], "rich": ["poor"], "poor": ["rich"],
    "strong": ["weak"], "weak": ["strong"], "young": ["old"], "new": ["old"], "wet": ["dry"], "dry": ["wet"],
    "loud": ["quiet", "soft"], "quiet": ["loud", "noisy"], "thick": ["thin"], "wide": ["narrow"],
    "narrow": ["wide", "broad"], "heavy": ["light"], "true": ["false"], "false": ["true"], "win": ["lose"],
    "love": ["hate"], "hate": ["love"], "buy": ["sell"], "sell": ["buy"], "push": ["pull"], "pull": ["push"],
    "inside": ["outside"], "outside": ["inside"], "above": ["below"], "below": ["above"], "before": ["after"],
    "after": ["before"], "day": ["night"], "night": ["day"], "north": ["south"], "south": ["north"],
    "east": ["west"], "west": ["east"], "left": ["right"], "first": ["last"], "good": ["bad", "evil"],
    "bad": ["good"], "clean": ["dirty"], "dirty": ["clean"], "safe": ["dangerous", "unsafe"],
    "dangerous": ["safe"], "friend": ["enemy"], "enemy": ["friend"], "awake": ["asleep"], "asleep": ["awake"],
    "alive": ["dead"], "dead": ["alive"], "cheap": ["expensive"], "expensive": ["cheap"], "high": ["low"],
    "low": ["high"], "long": ["short"], "laugh": ["cry"], "question": ["answer"], "war": ["peace"],
    "peace": ["war"], "summer": ["winter"], "winter": ["summer"], "black": ["white"], "white": ["black"],
    "boy": ["girl"], "girl": ["boy"], "king": ["queen"], "queen": ["king"], "man": ["woman"],
    "woman": ["man"], "brother": ["sister"], "sister": ["brother"], "remember": ["forget"],
    "forget": ["remember"], "success": ["failure"], "increase": ["decrease"], "decrease": ["increase"],
    "positive": ["negative"], "negative": ["positive"], "possible": ["impossible"], "polite": ["rude", "impolite"],
    "smooth": ["rough"], "deep": ["shallow"], "shallow": ["deep"], "sweet": ["sour", "bitter"],
}

CURRENCIES = {
    "Japan": ["yen", "Japanese yen"], "the United States": ["US dollar", "dollar", "United States dollar", "American dollar"],
    "the United Kingdom": ["pound sterling", "pound", "British pound"], "India": ["Indian rupee", "rupee"],
    "Mexico": ["Mexican peso", "peso"], "Russia": ["Russian ruble", "ruble", "rouble"],
    "China": ["renminbi", "yuan", "Chinese yuan"], "Switzerland": ["Swiss franc", "franc"],
    "Canada": ["Canadian dollar", "dollar"], "Australia": ["Australian dollar", "dollar"],
    "Brazil": ["Brazilian real", "real"], "South Africa": ["South African rand", "rand"],
    "South Korea": ["South Korean won", "won"], "Turkey": ["Turkish lira", "lira"],
    "Sweden": ["Swedish krona", "krona"], "Norway": ["Norwegian krone", "krone"],
    "Denmark": ["Danish krone", "krone"], "Poland": ["Polish zloty", "zloty"], "Thailand": ["Thai baht", "baht"],
    "Indonesia": ["Indonesian rupiah", "rupiah"], "the Philippines": ["Philippine peso", "peso"],
    "Egypt": ["Egyptian pound", "pound"], "Israel": ["Israeli shekel", "shekel", "new shekel"],
    "Saudi Arabia": ["Saudi riyal", "riyal"], "Argentina": ["Argentine peso", "peso"],
    "Chile": ["Chilean peso", "peso"], "Colombia": ["Colombian peso", "peso"], "Vietnam": ["Vietnamese dong", "dong"],
    "Malaysia": ["Malaysian ringgit", "ringgit"], "Nigeria": ["Nigerian naira", "naira"],
    "Kenya": ["Kenyan shilling", "shilling"], "Pakistan": ["Pakistani rupee", "rupee"],
    "Hungary": ["Hungarian forint", "forint"], "the Czech Republic": ["Czech koruna", "koruna"],
    "Germany": ["euro"], "France": ["euro"], "Italy": ["euro"], "Spain": ["euro"], "Greece": ["euro"],
    "Portugal": ["euro"], "Ireland": ["euro"], "the Netherlands": ["euro"], "Finland": ["euro"],
    "Austria": ["euro"], "Belgium": ["euro"], "New Zealand": ["New Zealand dollar", "dollar"],
    "Singapore": ["Singapore dollar", "dollar"], "Iceland": ["Icelandic krona", "krona"],
    "Ukraine": ["Ukrainian hryvnia", "hryvnia"], "Bangladesh": ["Bangladeshi taka", "taka"],
    "Morocco": ["Moroccan dirham", "dirham"], "the United Arab Emirates": ["UAE dirham", "dirham"],
    "Peru": ["Peruvian sol", "sol"], "Romania": ["Romanian leu", "leu"], "Bulgaria": ["Bulgarian lev", "lev"],
    "Iran": ["Iranian rial", "rial"], "Qatar": ["Qatari riyal", "riyal"], "Sri Lanka": ["Sri Lankan rupee", "rupee"],
    "Nepal": ["Nepalese rupee", "rupee"],
}

ELEMENTS = {
    "hydrogen": ["H"], "helium": ["He"], "lithium": ["Li"], "beryllium": ["Be"], "boron": ["B"], "carbon": ["C"],
    "nitrogen": ["N"], "oxygen": ["O"], "fluorine": ["F"], "neon": ["Ne"], "sodium": ["Na"], "magnesium": ["Mg"],
    "aluminum": ["Al"], "silicon": ["Si"], "phosphorus": ["P"], "sulfur": ["S"], "chlorine": ["Cl"], "argon": ["Ar"],
    "potassium": ["K"], "calcium": ["Ca"], "titanium": ["Ti"], "chromium": ["Cr"], "manganese": ["Mn"],
    "iron": ["Fe"], "cobalt": ["Co"], "nickel": ["Ni"], "copper": ["Cu"], "zinc": ["Zn"], "gallium": ["Ga"],
    "germanium": ["Ge"], "arsenic": ["As"], "selenium": ["Se"], "bromine": ["Br"], "krypton": ["Kr"],
    "strontium": ["Sr"], "zirconium": ["Zr"], "silver": ["Ag"], "tin": ["Sn"], "iodine": ["I"], "xenon": ["Xe"],
    "cesium": ["Cs"], "barium": ["Ba"], "tungsten": ["W"], "platinum": ["Pt"], "gold": ["Au"], "mercury": ["Hg"],
    "lead": ["Pb"], "radon": ["Rn"], "radium": ["Ra"], "uranium": ["U"], "plutonium": ["Pu"],
}

CATEGORY_ITEMS = {
    "animal": ["tiger", "elephant", "horse", "rabbit", "lion", "giraffe", "zebra", "monkey", "bear", "wolf", "fox",
               "deer", "camel", "kangaroo", "dolphin", "whale", "shark", "eagle", "owl", "penguin", "frog", "snake",
               "turtle", "cow", "pig", "sheep", "goat", "dog", "cat", "mouse", "squirrel", "rhinoceros",
               "crocodile", "parrot"],
    "fruit": ["apple", "banana", "orange", "pear", "grape", "mango", "peach", "plum", "cherry", "strawberry",
              "pineapple", "watermelon", "lemon", "lime", "kiwi", "papaya", "apricot", "coconut", "blueberry",
              "raspberry", "fig", "pomegranate", "melon", "grapefruit", "nectarine", "tangerine", "blackberry",
              "guava"],
    "vehicle": ["car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "helicopter", "boat", "ship",
                "tractor", "van", "taxi", "scooter", "tram", "submarine", "ambulance", "canoe", "yacht", "jeep",
                "limousine", "sailboat", "wagon", "minivan", "ferry"],
}

LIST_WORDS = (
    "apple river stone cloud chair table lamp bread milk eggs north garden window mountain pencil paper "
    "ocean forest candle bottle button carpet castle circle coffee cookie dragon engine farmer feather "
    "finger flower guitar hammer island jacket kettle ladder lemon magnet market mirror needle orange "
    "palace pepper pillow planet pocket rabbit rocket saddle silver spoon square sugar summer sunset "
    "thunder ticket tomato tower tunnel valley violin wallet water winter yellow basket blanket bridge "
    "camera desert doctor family hunter jungle letter meadow napkin parrot puzzle shadow singer spider "
    "station teacher timber velvet wizard anchor arrow barrel cactus cherry copper crystal harbor helmet"
).split()


# --------------------------------------------------------------------------------------------
# Families: each maps a fact key (and a wording) to an instruction, a context and references.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    instruction: str
    context: str
    references: tuple[str, ...]  # gold sentence first, then accepted variants and the bare answers
    answers: dict  # accepted answers and distractors (the record's "answers" field)


def _sentences(make: Callable[[str], str], answers: Sequence[str]) -> tuple[str, ...]:
    """The gold sentence for each accepted answer, then the bare answers themselves."""
    seen: dict[str, None] = {}
    for text in [make(a) for a in answers] + list(answers):
        seen.setdefault(text, None)
    return tuple(seen)


# Each wording pairs a question with the answer sentence that echoes it, the way an instruction-tuned
# model answers; wordings the teacher could not follow (the word given as ``### Input:``, "which
# word comes last", "classify the word") were measured and dropped.
CAPITAL_WORDINGS = (
    ("What is the capital of {key}?", "The capital of {key} is {answer}."),
    ("Which city is the capital of {key}?", "The capital of {key} is {answer}."),
    ("Name the capital city of {key}.", "The capital city of {key} is {answer}."),
    # evaluation-only wordings (never in the training split)
    ("Tell me the capital of {key}.", "The capital of {key} is {answer}."),
    ("What city is the capital of {key}?", "The capital of {key} is {answer}."),
)
ANTONYM_WORDINGS = (
    ("What is the opposite of {key}?", "The opposite of {key} is {answer}."),
    ('What is the opposite of "{key}"?', 'The opposite of "{key}" is "{answer}".'),
    ("What is the antonym of {key}?", "The antonym of {key} is {answer}."),
    # evaluation-only
    ("Tell me the opposite of {key}.", "The opposite of {key} is {answer}."),
    ("Give the antonym of {key}.", "The antonym of {key} is {answer}."),
)
CURRENCY_WORDINGS = (
    ("What is the currency of {key}?", "The currency of {key} is the {answer}."),
    ("Name the currency of {key}.", "The currency of {key} is the {answer}."),
    ("What currency is used in {key}?", "The currency used in {key} is the {answer}."),
    # evaluation-only
    ("Tell me the currency of {key}.", "The currency of {key} is the {answer}."),
    ("Which currency is used in {key}?", "The currency used in {key} is the {answer}."),
)
ELEMENT_WORDINGS = (
    ("What is the chemical symbol for {key}?", "The chemical symbol for {key} is {answer}."),
    ("What is the chemical symbol of {key}?", "The chemical symbol of {key} is {answer}."),
    ("Which chemical symbol stands for {key}?", "The chemical symbol for {key} is {answer}."),
    ("Write the chemical symbol for {key}.", "The chemical symbol for {key} is {answer}."),
    # evaluation-only
    ("Give the chemical symbol for {key}.", "The chemical symbol for {key} is {answer}."),
    ("Tell me the chemical symbol of {key}.", "The chemical symbol of {key} is {answer}."),
)
EVAL_WORDINGS = 2
"""The last two wordings of every fact family are evaluation-only: the training split never uses them."""


def _answers(accepted: Sequence[str], candidates: Sequence[str], *, subject: str = "",
             case_sensitive: bool = False) -> dict:
    """The ``answers`` field of a record: its accepted answers, and the distractors that make a
    response wrong (the candidates that are not accepted and not named by the question's own subject,
    e.g. "early" in "What is the opposite of early?")."""
    distractors = sorted({c for c in candidates if c not in accepted
                          and not names(subject, c, case_sensitive=case_sensitive)})
    return {"accepted": list(accepted), "distractors": distractors, "case_sensitive": case_sensitive}


def _fact_family(table: dict[str, list[str]], wordings: tuple[tuple[str, str], ...], *,
                 case_sensitive: bool = False) -> Callable[[str, int], Prompt]:
    """A question about one table entry; references are the echoing sentence for every accepted answer,
    and the distractors every other entry's answers."""
    candidates = sorted({a for answers in table.values() for a in answers})

    def make(key: str, wording: int) -> Prompt:
        question, answer = wordings[wording]
        return Prompt(question.format(key=key), "",
                      _sentences(lambda a: answer.format(key=key, answer=a), table[key]),
                      _answers(table[key], candidates, subject=key, case_sensitive=case_sensitive))
    return make


_CATEGORY_OF = {item: cat for cat, items in CATEGORY_ITEMS.items() for item in items}
_CATEGORY_ORDERS = list(itertools.permutations(sorted(CATEGORY_ITEMS)))
_CATEGORY_EVAL_QUESTIONS = ("Name the category of this word: {}, {}, or {}.", "Is this word a {}, an {}, or a {}?")


def _word_category(item: str, wording: int) -> Prompt:
    """Wordings 0-5: the six orders of the categories; 6-7 (evaluation-only): two other questions."""
    if wording < len(_CATEGORY_ORDERS):
        a, b, c = _CATEGORY_ORDERS[wording]
        question = f"Which category does the word belong to: {a}, {b}, or {c}?"
    else:
        question = _CATEGORY_EVAL_QUESTIONS[wording - len(_CATEGORY_ORDERS)].format("fruit", "animal", "vehicle")
    category = _CATEGORY_OF[item]
    return Prompt(question, item,
                  _sentences(lambda x: f'The word "{item}" belongs to the category of {x}.', [category]),
                  _answers([category], sorted(CATEGORY_ITEMS)))


def _list_position(key: str, wording: int) -> Prompt:
    position, words = key.split(":", 1)
    items = words.split(",")
    answer = items[0] if position == "first" else items[-1]
    return Prompt(f"What is the {position} word in this list?", ", ".join(items),
                  _sentences(lambda a: f'The {position} word in this list is "{a}".', [answer]),
                  _answers([answer], items))


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[str, int], Prompt]
    wordings: int  # training wordings 0 .. wordings-1
    keys: tuple[str, ...] | None  # a fact table, or None for a generated key space
    eval_wordings: int = 0  # evaluation-only wordings wordings .. wordings+eval_wordings-1


FAMILIES = (
    Family("capital", _fact_family(CAPITALS, CAPITAL_WORDINGS), len(CAPITAL_WORDINGS) - EVAL_WORDINGS,
           tuple(CAPITALS), EVAL_WORDINGS),
    Family("antonym", _fact_family(ANTONYMS, ANTONYM_WORDINGS), len(ANTONYM_WORDINGS) - EVAL_WORDINGS,
           tuple(ANTONYMS), EVAL_WORDINGS),
    Family("currency", _fact_family(CURRENCIES, CURRENCY_WORDINGS), len(CURRENCY_WORDINGS) - EVAL_WORDINGS,
           tuple(CURRENCIES), EVAL_WORDINGS),
    Family("element_symbol", _fact_family(ELEMENTS, ELEMENT_WORDINGS, case_sensitive=True),
           len(ELEMENT_WORDINGS) - EVAL_WORDINGS, tuple(ELEMENTS), EVAL_WORDINGS),
    Family("word_category", _word_category, len(_CATEGORY_ORDERS), tuple(_CATEGORY_OF), len(_CATEGORY_EVAL_QUESTIONS)),
    Family("list_position", _list_position, 1, None),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(":".join([str(seed), *parts]))


def _held_out_keys(family: Family, seed: int) -> set[str]:
    keys = sorted(family.keys)
    _rng(seed, family.name, "held-out").shuffle(keys)
    return set(keys[: max(1, round(HELD_OUT_FRACTION * len(keys)))])


def _random_list_key(rng: random.Random) -> str:
    words = rng.sample(LIST_WORDS, rng.randint(3, 5))
    return f"{rng.choice(['first', 'last'])}:{','.join(words)}"


def _list_is_held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % 4 == 0


def _split_counts(total: int, capacities: list[float]) -> list[int]:
    """``total`` divided as evenly as the families' capacities allow: a family with fewer prompts
    than its share gives the rest to the others (water-filling), so the split keeps its size."""
    counts, free = [0] * len(capacities), list(range(len(capacities)))
    left = total
    while left and free:
        share = [left // len(free) + (1 if i < left % len(free) else 0) for i in range(len(free))]
        full = [f for f, n in zip(free, share) if capacities[f] - counts[f] <= n]
        if not full:
            for f, n in zip(free, share):
                counts[f] += n
            return counts
        for f in full:  # capped: take all that is left of it, re-share the rest
            left -= capacities[f] - counts[f]
            counts[f] = int(capacities[f])
        free = [f for f in free if f not in full]
    if left:
        raise ValueError(f"the chosen families hold {sum(int(c) for c in capacities)} such prompts, fewer than the "
                         f"{total} asked; ask for smaller valid/test sets")
    return counts


def _proportional(total: int, weights: list[int]) -> list[int]:
    """``total`` divided in proportion to ``weights`` (largest remainders), each part <= its weight."""
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    parts = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: parts[i] - exact[i])[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _pools(family: Family, seed: int) -> dict[str, list[tuple[str, int]] | None]:
    """The (fact, wording) prompts each split draws from (None: a generated key space, drawn lazily).

    train: the training facts in the training wordings; unseen (valid and test): the held-out facts
    in every wording; seen (test_seen): the training facts in the evaluation-only wordings."""
    if family.keys is None:
        return {"unseen": None, "seen": []}
    held_keys = _held_out_keys(family, seed)
    train_keys = sorted(set(family.keys) - held_keys)
    every = range(family.wordings + family.eval_wordings)
    unseen = [(k, w) for k in sorted(held_keys) for w in every]
    seen = [(k, w) for k in train_keys for w in range(family.wordings, family.wordings + family.eval_wordings)]
    _rng(seed, family.name, "eval").shuffle(unseen)
    _rng(seed, family.name, "seen").shuffle(seen)
    return {"unseen": unseen, "seen": seen}


def _family_prompts(family: Family, seed: int, n_train: int, n_unseen: int, n_test: int,
                    n_seen: int) -> dict[str, list[Prompt]]:
    """Train prompts (with replacement), disjoint valid/test prompts of held-out facts (the first
    ``n_test`` of the ``n_unseen`` are the test set), and test_seen prompts."""
    out = {}
    pools = _pools(family, seed)
    if family.keys is None:  # generated key space: hash split, then draw
        rng = _rng(seed, family.name, "train")
        train = []
        while len(train) < n_train:
            key = _random_list_key(rng)
            if not _list_is_held_out(key):
                train.append(family.make(key, rng.randrange(family.wordings)))
        out["train"] = train
        rng = _rng(seed, family.name, "eval")
        seen, held = set(), []
        while len(held) < n_unseen:
            key = _random_list_key(rng)
            if _list_is_held_out(key) and key not in seen:
                seen.add(key)
                held.append(family.make(key, rng.randrange(family.wordings)))
    else:
        train_keys = sorted(set(family.keys) - _held_out_keys(family, seed))
        rng = _rng(seed, family.name, "train")
        out["train"] = [family.make(rng.choice(train_keys), rng.randrange(family.wordings)) for _ in range(n_train)]
        held = [family.make(k, w) for k, w in pools["unseen"][:n_unseen]]
    out["test"], out["valid"] = held[:n_test], held[n_test:]
    out["test_seen"] = [family.make(k, w) for k, w in pools["seen"][:n_seen]]
    return out


def generate_testbed(*, n_train: int = DEFAULT_SIZES["train"], n_valid: int = DEFAULT_SIZES["valid"],
                     n_test: int = DEFAULT_SIZES["test"], n_test_seen: int = DEFAULT_SIZES["test_seen"],
                     seed: int = 0, families: Sequence[str] = FAMILY_NAMES) -> dict[str, list[dict]]:
    """Dolly-format records for each split, a pure function of the arguments (spec section 4).

    Each split is divided as evenly as the families' prompts allow (valid + test together, so a
    family's valid and test prompts never overlap) and shuffled.  A record holds ``instruction``,
    ``context``, ``response`` (the gold sentence), ``category`` (the family), ``references`` (every
    accepted answer, the gold sentence first) and ``answers`` (accepted answers and distractors).
    """
    sizes = {"n_train": n_train, "n_valid": n_valid, "n_test": n_test, "n_test_seen": n_test_seen}
    for name, n in sizes.items():
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    chosen = [f for f in FAMILIES if f.name in families]
    unknown = set(families) - set(FAMILY_NAMES)
    if unknown or not chosen:
        raise ValueError(f"unknown or no families {sorted(unknown) or list(families)}; choose from {', '.join(FAMILY_NAMES)}")
    pools = [_pools(f, seed) for f in chosen]
    unseen = _split_counts(n_valid + n_test, [math.inf if p["unseen"] is None else len(p["unseen"]) for p in pools])
    seen = _split_counts(n_test_seen, [len(p["seen"]) for p in pools])
    train = _split_counts(n_train, [math.inf] * len(chosen))
    test = _proportional(n_test, unseen)  # valid and test hold each family in the same proportion
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for i, family in enumerate(chosen):
        prompts = _family_prompts(family, seed, train[i], unseen[i], test[i], seen[i])
        for split in SPLITS:
            for p in prompts[split]:
                records[split].append({"instruction": p.instruction, "context": p.context,
                                       "response": p.references[0], "category": family.name,
                                       "references": list(p.references), "answers": p.answers})
    for split in SPLITS:
        _rng(seed, "shuffle", split).shuffle(records[split])
    return records


def write_testbed(out_dir: str | os.PathLike, *, n_train: int = DEFAULT_SIZES["train"],
                  n_valid: int = DEFAULT_SIZES["valid"], n_test: int = DEFAULT_SIZES["test"],
                  n_test_seen: int = DEFAULT_SIZES["test_seen"], seed: int = 0,
                  families: Sequence[str] = FAMILY_NAMES) -> dict[str, Path]:
    """Write ``train.jsonl``, ``valid.jsonl``, ``test.jsonl``, ``test_seen.jsonl`` and ``manifest.json``
    to ``out_dir``.

    Files are written to a temporary name and renamed, so a reader never sees a partial file.
    """
    records = generate_testbed(n_train=n_train, n_valid=n_valid, n_test=n_test, n_test_seen=n_test_seen,
                               seed=seed, families=families)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, digests = {}, {}
    for split in SPLITS:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[split])
        paths[split] = out / f"{split}.jsonl"
        _atomic_write(paths[split], text)
        digests[split] = hashlib.sha256(text.encode()).hexdigest()
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "families": list(families),
                "sizes": {s: len(records[s]) for s in SPLITS}, "sha256": digests}
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def testbed_splits(cache_dir: str | os.PathLike | None = None, *, n_train: int = DEFAULT_SIZES["train"],
                   n_valid: int = DEFAULT_SIZES["valid"], n_test: int = DEFAULT_SIZES["test"],
                   n_test_seen: int = DEFAULT_SIZES["test_seen"], seed: int = 0,
                   families: Sequence[str] = FAMILY_NAMES) -> dict[str, Path]:
    """Paths of the testbed splits, generated once per setting under ``cache_dir``.

    ``cache_dir`` defaults to ``cache/testbed`` at the repository root; each setting (sizes,
    seed, families, generator version) gets its own sub-folder, reused while its manifest matches.
    """
    root = Path(cache_dir) if cache_dir is not None else CACHE_ROOT / "testbed"
    tag = f"v{GENERATOR_VERSION}-s{seed}-{n_train}-{n_valid}-{n_test}-{n_test_seen}"
    if tuple(families) != FAMILY_NAMES:
        tag += "-" + hashlib.sha256(",".join(families).encode()).hexdigest()[:8]
    folder = root / tag
    with cache_lock(folder):
        manifest = folder / "manifest.json"
        if manifest.is_file():
            meta = json.loads(manifest.read_text())
            if meta.get("generator_version") == GENERATOR_VERSION and meta.get("families") == list(families):
                return {split: folder / f"{split}.jsonl" for split in SPLITS}
        build = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=root))
        try:
            write_testbed(build, n_train=n_train, n_valid=n_valid, n_test=n_test, n_test_seen=n_test_seen, seed=seed,
                          families=families)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(build, folder)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return {split: folder / f"{split}.jsonl" for split in SPLITS}


testbed_splits.__test__ = False  # its name starts with "test": keep pytest from collecting it where imported


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = ArgumentParser(description="Write the bundled testbed instruction set (Dolly-format JSONL).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--valid", type=int, default=DEFAULT_SIZES["valid"])
    parser.add_argument("--test", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument("--test-seen", type=int, default=DEFAULT_SIZES["test_seen"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=list(FAMILY_NAMES), choices=FAMILY_NAMES)
    args = parser.parse_args(argv)
    paths = write_testbed(args.out, n_train=args.train, n_valid=args.valid, n_test=args.test,
                          n_test_seen=args.test_seen, seed=args.seed, families=args.families)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return paths


if __name__ == "__main__":
    main()
