"""The task suite of the recipe study (issue 23): six kinds of fine-tuning task, three training sizes each, and a
fixed held-out test set per task, as OpenAI `messages` rows.

Everything but the medical task is content written for lmtuner (no benchmark copied) and generated without any
download; the medical task reads LMTuner's MedDialog example from the shared reference data. Rows are
deterministic: the same task, size and seed give the same rows. The test set does not depend on the size or the
seed, and never shares an underlying item (a country, a person, a date, a message template, a question, a patient
exchange) with any training size. Training rows are nested: the rows of a smaller size are the first rows of a
larger one, so the sizes differ only in how much data there is.

Stdlib only, like the rest of `lmtuner_core/data` at import time: the study, the tests and the demo all read it.
"""

from __future__ import annotations

import calendar
import datetime
import json
import os
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmtuner_core.errors import LmtunerError

Item = tuple[str, dict]  # (the underlying item a row is about, the messages row)
Builder = Callable[[int], tuple[list[Item], list[Item]]]  # seed -> (all training items in order, test items)

MEDICAL_DATA = Path(
    os.environ.get("LMTUNER_MEDICAL_DATA")
    or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lmtuner-medical"
)


@dataclass(frozen=True)
class StudyTask:
    """One task of the study: what kind it is, what a user would ask for, how answers are scored, and its rows."""

    name: str
    kind: str
    goal: str
    metric: str  # 'exact_match' | 'json' | 'rouge_l'
    sizes: tuple[int, int, int]  # small, medium, large numbers of training rows
    max_new_tokens: int  # enough for the longest reference answer, not much more
    build: Builder = field(repr=False, compare=False)

    @property
    def about(self) -> str:
        """What the task measures and what the base model does on it."""
        return " ".join((self.build.__doc__ or "").split())

    def items(self, size: int, seed: int = 0) -> tuple[list[Item], list[Item]]:
        """(train, test) as (underlying item, row) pairs: `size` training rows, the task's fixed test set."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise LmtunerError(f"size: expected a whole number of training rows, got {size!r}", field="size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LmtunerError(f"seed: expected a whole number, got {seed!r}", field="seed")
        train, test = self.build(seed)
        if not 1 <= size <= len(train):
            raise LmtunerError(
                f"size: task {self.name!r} has 1 to {len(train)} training rows, not {size} "
                f"(the study uses {', '.join(map(str, self.sizes))})",
                field="size",
            )
        return train[:size], test

    def rows(self, size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
        """(train, test) messages rows: `size` training rows for this seed, and the task's fixed test set."""
        train, test = self.items(size, seed)
        return [row for _, row in train], [row for _, row in test]


def _row(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _rng(task: str, seed: int | str) -> random.Random:
    return random.Random(f"lmtuner-study/{task}/{seed}")  # str seeds are hashed with sha512: stable across runs


# ---------------------------------------------------------------------------------------------------- capitals
# Well-known countries only: the task is about stating a fact the base model has, in the asked form.
# A leading "the" is part of the name as it reads inside a question.
_CAPITALS_TEST = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("the United Kingdom", "London"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", "New Delhi"),
    ("Argentina", "Buenos Aires"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Poland", "Warsaw"),
    ("Ukraine", "Kyiv"), ("Turkey", "Ankara"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Austria", "Vienna"),
)  # fmt: skip
_CAPITALS_TRAIN = (
    ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("the Czech Republic", "Prague"), ("Hungary", "Budapest"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Iceland", "Reykjavik"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Chile", "Santiago"), ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"),
    ("Ecuador", "Quito"), ("Jamaica", "Kingston"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Senegal", "Dakar"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Lebanon", "Beirut"), ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("New Zealand", "Wellington"), ("Qatar", "Doha"),
)  # fmt: skip
_CAPITAL_PHRASINGS = (
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Which city is the capital of {country}?",
    "Tell me the capital of {country}.",
)
CAPITAL_ALIASES = {"Kyiv": ("Kiev",)}  # other spellings a lenient check accepts


def _capitals(seed: int) -> tuple[list[Item], list[Item]]:
    """Short answers over known facts: "What is the capital of Kenya?" → "Nairobi", the name alone. The base model
    knows most of these capitals but answers in a sentence ("The capital of France is Paris."): exact match 0/24,
    while the lenient check (`capital_named`) finds the right city in 18 of 24 answers (SmolLM2-135M-Instruct,
    greedy). Tuning should teach the form without losing those facts. Train and
    test countries are disjoint; each training round asks every training country once, in a phrasing it has not
    had yet, so a larger size adds phrasings rather than repeating rows."""
    countries = list(_CAPITALS_TRAIN)
    _rng("capitals", seed).shuffle(countries)
    train = [
        (country, _row(_CAPITAL_PHRASINGS[(i + turn) % 4].format(country=country), capital))
        for turn in range(len(_CAPITAL_PHRASINGS))
        for i, (country, capital) in enumerate(countries)
    ]
    test = [
        (country, _row(_CAPITAL_PHRASINGS[i % 4].format(country=country), capital))
        for i, (country, capital) in enumerate(_CAPITALS_TEST)
    ]
    return train, test


def _folded(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().casefold()


def capital_named(answer: str, capital: str) -> bool:
    """Whether an answer names `capital` anywhere, as a whole word (case and accents ignored; aliases accepted)."""
    names = (capital, *CAPITAL_ALIASES.get(capital, ()))
    return any(re.search(rf"\b{re.escape(_folded(name))}\b", _folded(answer)) for name in names)


# ------------------------------------------------------------------------------------------------ extract_json
# Train and test draw people and cities from disjoint pools: the test asks about entities never seen in training.
_FIRST_TRAIN = (
    "Maria", "James", "Aisha", "Chen", "Lucas", "Sofia", "Omar", "Hannah", "Diego", "Priya", "Tom", "Elena", "Kwame",
    "Yuki", "Noah", "Fatima", "Ivan", "Grace", "Mateo", "Leila",
)  # fmt: skip
_LAST_TRAIN = (
    "Lopez", "Smith", "Khan", "Wei", "Martin", "Rossi", "Haddad", "Becker", "Silva", "Patel", "Novak", "Costa",
    "Mensah", "Tanaka", "Brown", "Okafor", "Petrov", "Nguyen", "Garcia", "Larsen",
)  # fmt: skip
_CITIES_TRAIN = (
    "Lisbon", "Berlin", "Toronto", "Nairobi", "Osaka", "Lyon", "Denver", "Porto", "Glasgow", "Seville", "Krakow",
    "Melbourne", "Austin", "Hamburg", "Bologna", "Dublin",
)  # fmt: skip
_FIRST_TEST = ("Amelia", "Hugo", "Zara", "Felix", "Nadia", "Oscar", "Ines", "Ravi", "Clara", "Samuel", "Mei", "Tariq")
_LAST_TEST = (
    "Duarte", "Fischer", "Moreau", "Adeyemi", "Kowalski", "Lindqvist", "Sato", "Ortiz", "Brennan", "Farah",
    "Volkova", "Reyes",
)  # fmt: skip
_CITIES_TEST = (
    "Valencia", "Zurich", "Leeds", "Bergen", "Adelaide", "Tampere", "Ghent", "Utrecht", "Marseille", "Calgary",
    "Auckland", "Antwerp",
)  # fmt: skip
_PERSON_SENTENCES = (
    "{name}, {age}, moved to {city} in {year}.",
    "In {year}, {name} ({age}) relocated to {city}.",
    "Aged {age}, {name} settled in {city} back in {year}.",
    "{name} is {age} years old and has lived in {city} since {year}.",
    "Since {year}, {age}-year-old {name} has called {city} home.",
    "Records show {name}, age {age}, registered an address in {city} in {year}.",
)
_EXTRACT_PROMPT = (
    "Extract the name, age, city and year from the sentence below. Reply with a JSON object with the keys "
    '"name", "age", "city" and "year".\n\n{sentence}'
)
EXTRACT_JSON_TRAIN_ROWS = 160
EXTRACT_JSON_TEST_ROWS = 32


def json_answer(value: dict) -> str:
    """The one serialisation every JSON answer of the study uses: keys in order, ', ' and ': ' separators."""
    return json.dumps(value, sort_keys=False, separators=(", ", ": "))


def _people(rng: random.Random, first: tuple, last: tuple, cities: tuple, count: int) -> list[Item]:
    names = [f"{f} {surname}" for f in first for surname in last]
    rng.shuffle(names)
    items = []
    for i, name in enumerate(names[:count]):
        fields = {"name": name, "age": rng.randint(19, 78), "city": rng.choice(cities), "year": rng.randint(1995, 2024)}
        sentence = _PERSON_SENTENCES[i % len(_PERSON_SENTENCES)].format(**fields)
        items.append((name, _row(_EXTRACT_PROMPT.format(sentence=sentence), json_answer(fields))))
    return items


def _extract_json(seed: int) -> tuple[list[Item], list[Item]]:
    """Extraction to JSON: a sentence about a person ("Aged 34, Maria Lopez settled in Lisbon back in 2019.") →
    {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "year": 2019}, keys in that order, ages and years as
    numbers. Scored by JSON validity and equality with the reference. The base model already writes JSON (31
    of 32 parse) but gets the fields wrong: "year" as a string, a key left out, a city misspelt (1 of 32 equal).
    Test people and cities come from pools the training rows never use."""
    train = _people(_rng("extract_json", seed), _FIRST_TRAIN, _LAST_TRAIN, _CITIES_TRAIN, EXTRACT_JSON_TRAIN_ROWS)
    test = _people(_rng("extract_json", "test"), _FIRST_TEST, _LAST_TEST, _CITIES_TEST, EXTRACT_JSON_TEST_ROWS)
    return train, test


# --------------------------------------------------------------------------------------------------- dates_iso
_ORDINAL_WORDS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
    "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
    "twentieth", "twenty-first", "twenty-second", "twenty-third", "twenty-fourth", "twenty-fifth", "twenty-sixth",
    "twenty-seventh", "twenty-eighth", "twenty-ninth", "thirtieth", "thirty-first",
)  # fmt: skip
_DATE_FORMS = (
    "the {ordinal_word} of {month}, {year}",
    "{month} {day}{suffix} {year}",
    "{day} {mon} {year}",
    "{month} {day}, {year}",
    "{day}{suffix} of {month} {year}",
    "{day} {month} {year}",
    "{weekday}, {month} {day}, {year}",
)
_DATES_PROMPT = "Write this date in ISO 8601 form (YYYY-MM-DD): {written}"
DATES_TRAIN_ROWS = 160
DATES_TEST_ROWS = 32


def _suffix(day: int) -> str:
    return "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def written_date(date: datetime.date, form: int) -> str:
    """`date` written in form number `form` of the task's seven (English names, never locale-dependent)."""
    return _DATE_FORMS[form].format(
        ordinal_word=_ORDINAL_WORDS[date.day - 1], month=calendar.month_name[date.month],
        mon=calendar.month_abbr[date.month], day=date.day, suffix=_suffix(date.day), year=date.year,
        weekday=calendar.day_name[date.weekday()],
    )  # fmt: skip


def _dates(rng: random.Random, count: int, avoid: set[datetime.date]) -> list[Item]:
    first, last = datetime.date(1950, 1, 1).toordinal(), datetime.date(2039, 12, 31).toordinal()
    chosen: list[datetime.date] = []
    while len(chosen) < count:
        date = datetime.date.fromordinal(rng.randint(first, last))
        if date not in avoid and date not in chosen:
            chosen.append(date)
    return [
        (
            date.isoformat(),
            _row(_DATES_PROMPT.format(written=written_date(date, i % len(_DATE_FORMS))), date.isoformat()),
        )
        for i, date in enumerate(chosen)
    ]


def _dates_iso(seed: int) -> tuple[list[Item], list[Item]]:
    """Format conversion: a written date in one of seven forms ("the fourth of March, 2021", "March 4th 2021",
    "4 Mar 2021", "Thursday, March 4, 2021", ...) → "2021-03-04". No facts are at stake, only the conversion.
    The base model mostly echoes the date or writes a wrong one and rambles on (0 of 32 exact; the right ISO
    date appears somewhere in 8). Test dates never occur in training (any size, any seed)."""
    test = _dates(_rng("dates_iso", "test"), DATES_TEST_ROWS, set())
    held_out = {datetime.date.fromisoformat(key) for key, _ in test}
    return _dates(_rng("dates_iso", seed), DATES_TRAIN_ROWS, held_out), test


# ---------------------------------------------------------------------------------------------------- classify
CLASSIFY_LABELS = ("billing", "shipping", "technical", "account", "other")
# Per label: training templates, then the held-out templates the test set uses (never seen in training).
_MESSAGES = {
    "billing": (
        (
            "I was charged {amount} twice for the {product}. Can you refund one of the payments?",
            "Why does my invoice for {month} show {amount} more than I expected?",
            "My card was billed {amount} even though I cancelled the {product} order.",
            "Can I get a receipt for the {amount} I paid in {month}?",
            "The discount code didn't work and I paid the full {amount} for the {product}.",
            "How do I switch the card you charge for my {product} subscription?",
        ),
        (
            "There is a {amount} fee on my statement from {month} that I don't recognise.",
            "I returned the {product} {days} ago and still haven't got my {amount} back.",
        ),
    ),
    "shipping": (
        (
            "My {product} was supposed to arrive {days} ago and it still hasn't come.",
            "Where is my {product}? The tracking page hasn't changed in {days}.",
            "The box with my {product} arrived crushed and soaking wet.",
            "I need the {product} before {month}; can I upgrade to express delivery?",
            "The courier left my {product} at the wrong address.",
            "How much does it cost to ship a {product} abroad?",
        ),
        (
            "It has been {days} and my parcel with the {product} is still marked 'in transit'.",
            "Can I change the delivery address for the {product} I ordered in {month}?",
        ),
    ),
    "technical": (
        (
            "The {product} won't turn on, even after charging it overnight.",
            "Your app crashes every time I open the page for the {product}.",
            "The {product} makes a loud buzzing noise after {days} of use.",
            "I can't pair the {product} with my phone.",
            "The website shows an error when I try to add the {product} to my cart.",
            "The manual for the {product} doesn't explain how to reset it to factory settings.",
        ),
        (
            "Since the last update, the {product} keeps disconnecting every few minutes.",
            "The display on my {product} flickers and then goes black after {days}.",
        ),
    ),
    "account": (
        (
            "I forgot my password and the reset email hasn't arrived in {days}; I need to check my {product} order.",
            "How do I change the email address on my account? I ordered the {product} with the old one.",
            "Please delete my account and all the data you have kept about me since I bought the {product} in {month}.",
            "My account got locked when I tried to log in to review the {product}.",
            "Can I merge my two accounts? One of them has my {product} order history.",
            "How do I turn on two-factor login for the account I opened in {month} to buy a {product}?",
        ),
        (
            "I can't sign in: it says my username doesn't exist, but I bought a {product} in {month}.",
            "How do I update the phone number in my profile? I got a new one {days} ago.",
        ),
    ),
    "other": (
        (
            "Do you have a physical store where I could try the {product}?",
            "Are you hiring? I love the {product} and would like to work for you.",
            "Just wanted to say the {product} is great, thank you!",
            "What are your opening hours in {month}? I'd like to pick up a {product}.",
            "Do you plan to sell the {product} in other colours?",
            "Is the {product} made from recycled materials?",
        ),
        (
            "Could you send me your catalogue for {month}? I'm curious what's new besides the {product}.",
            "A friend recommended your shop; do you have a newsletter about things like the {product}?",
        ),
    ),
}
_PRODUCTS = (
    "wireless headphones", "smart speaker", "coffee machine", "fitness tracker", "e-reader", "robot vacuum",
    "electric kettle", "desk lamp", "phone charger", "air purifier", "webcam", "toaster",
)  # fmt: skip
_AMOUNTS = ("$12.99", "$45", "$7.50", "$120", "$89.99", "$23")
_SPANS = ("three days", "a week", "ten days", "two weeks", "five days")
_MONTHS = ("March", "June", "October", "January")
_CLASSIFY_PROMPT = (
    "Sort this customer message into one of these labels: " + ", ".join(CLASSIFY_LABELS) + ". "
    "Reply with the label only.\n\nMessage: {message}"
)
CLASSIFY_TRAIN_ROWS = 200
CLASSIFY_TEST_PER_TEMPLATE = 3  # 5 labels x 2 held-out templates x 3 = 30 test rows


def _fill(rng: random.Random, template: str) -> str:
    return template.format(
        product=rng.choice(_PRODUCTS), amount=rng.choice(_AMOUNTS), days=rng.choice(_SPANS), month=rng.choice(_MONTHS)
    )


def _messages(rng: random.Random, templates: tuple[str, ...], count: int) -> list[tuple[str, str]]:
    """`count` distinct (template, message) pairs, cycling through the templates."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(100 * count):  # bounded: a template with too few fillings fails loudly instead of looping
        template = templates[len(out) % len(templates)]
        message = _fill(rng, template)
        if message not in seen:
            seen.add(message)
            out.append((template, message))
        if len(out) == count:
            return out
    raise AssertionError(f"the classify templates give fewer than {count} distinct messages")


def _classify(seed: int) -> tuple[list[Item], list[Item]]:
    """Classification into labels: a short customer message → one of billing, shipping, technical, account,
    other (the prompt lists them). Training rows cycle through the labels, so every size is balanced. The test
    messages come from templates no training row uses (the underlying item is the template), so the test
    measures wording the model has not seen. The base model never answers with a label alone (0 of 30): it
    starts "This customer message is labeled as ...", lists all the labels, or apologises."""
    rng = _rng("classify", seed)
    per_label = {
        label: _messages(rng, train_templates, CLASSIFY_TRAIN_ROWS // len(CLASSIFY_LABELS))
        for label, (train_templates, _) in _MESSAGES.items()
    }
    train = [
        (template, _row(_CLASSIFY_PROMPT.format(message=message), label))
        for i in range(CLASSIFY_TRAIN_ROWS // len(CLASSIFY_LABELS))
        for label in CLASSIFY_LABELS
        for template, message in [per_label[label][i]]
    ]
    test_rng = _rng("classify", "test")
    test = [
        (template, _row(_CLASSIFY_PROMPT.format(message=message), label))
        for label, (_, test_templates) in _MESSAGES.items()
        for template, message in _messages(test_rng, test_templates, CLASSIFY_TEST_PER_TEMPLATE * len(test_templates))
    ]
    return train, test


# ----------------------------------------------------------------------------------------------------- persona
# Everyday questions whose facts hardly matter; the answers are one short sentence in an old ship's captain's
# voice, always starting "Aye,". The first 24 pairs are the test set, the rest train.
_PERSONA = (
    ("Why is the sky blue?", "Aye, sunlight scatters off the air and the blue scatters most, like spray off the bow."),
    ("How many days are in a week?", "Aye, seven days, from one Sunday watch to the next."),
    ("What do bees make?", "Aye, bees make honey, sweeter than anything in my galley."),
    ("Why do we need sleep?", "Aye, sleep mends body and mind, as a calm harbour mends a ship."),
    ("How do I boil an egg?", "Aye, drop it in boiling water for eight minutes, then cool it in cold water."),
    ("What is rain made of?", "Aye, rain is water from the clouds that falls when the drops grow too heavy."),
    ("Why do leaves change colour in autumn?", "Aye, the green fades as the days shorten and the reds show through."),
    ("What should I pack for a picnic?", "Aye, bread, fruit, water and a blanket, all stowed tight in a basket."),
    ("How can I stay warm in winter?", "Aye, wear layers, cover your head and keep out of the wind, sailor."),
    ("What is the moon?", "Aye, the moon is a great rock circling the Earth, and it pulls the tides I sail."),
    ("How often should I water a houseplant?", "Aye, when the top of the soil is dry, and never drown the poor thing."),
    ("What is a rainbow?", "Aye, sunlight split by raindrops into colours, as fine a sight as any at sea."),
    ("Why do cats purr?", "Aye, a cat purrs when it's content, like a ship's cat by a warm stove."),
    ("How do I make a cup of tea?", "Aye, pour boiling water on the leaves and let it steep for three minutes."),
    ("What is snow?", "Aye, snow is frozen water that falls in flakes when the air turns bitter cold."),
    ("Why should I drink water?", "Aye, your body needs water like a ship needs ballast, so drink it daily."),
    ("What do you call a baby dog?", "Aye, a baby dog is a puppy, full of mischief like a new deckhand."),
    ("How long is a year?", "Aye, a year is twelve months, one full voyage of the Earth around the sun."),
    ("What is thunder?", "Aye, thunder is the sound of air bursting around a lightning bolt."),
    ("How do I tie my shoelaces?", "Aye, make two loops, cross them and pull tight, as snug as any knot."),
    ("Why do birds migrate?", "Aye, birds fly south for food and warmth when the cold sets in, like wise sailors."),
    ("What is bread made from?", "Aye, bread is flour, water, salt and yeast, baked till the crust is hard."),
    ("How do I remember things better?", "Aye, write them down and go over them often, as I do with my charts."),
    ("What makes the wind blow?", "Aye, air rushes from high pressure to low, and that's what fills my sails."),
    ("What colour are bananas?", "Aye, ripe bananas are yellow, and green ones need a few more days."),
    ("How many legs does a spider have?", "Aye, a spider has eight legs, more than enough to climb the rigging."),
    ("Why do we have seasons?", "Aye, the Earth leans on its axis, so each half gets more sun in turn."),
    ("What is the best way to learn to swim?", "Aye, start in shallow water with a good teacher and practise often."),
    ("How do I keep my kitchen clean?", "Aye, wash up after every meal and wipe the counters, shipshape and tidy."),
    ("What is a volcano?", "Aye, a volcano is a mountain that spits molten rock from deep in the Earth."),
    ("Why do onions make you cry?", "Aye, cutting an onion releases a gas that stings your eyes something fierce."),
    ("What do cows eat?", "Aye, cows eat grass and hay, chewing all day like an old sailor on his pipe."),
    ("How do I fall asleep faster?", "Aye, keep the room dark and cool and leave your worries on the dock."),
    ("What is a compass for?", "Aye, a compass points north so you always know your heading."),
    ("Why is the sea salty?", "Aye, rivers carry salt from the rocks to the sea, and there it stays."),
    ("How many hours are in a day?", "Aye, twenty-four hours, split into watches aboard my ship."),
    ("What is a good breakfast?", "Aye, oats, eggs and fruit will keep you going till noon."),
    ("How do plants grow?", "Aye, plants drink water and sunlight and turn them into leaves and stems."),
    ("What is an island?", "Aye, an island is land with water all around it, a welcome sight after weeks at sea."),
    ("Why do dogs wag their tails?", "Aye, a wagging tail mostly means a happy dog, glad to see its crew."),
    ("How do I save money?", "Aye, spend less than you earn and put a little aside every week."),
    ("What is fog?", "Aye, fog is a cloud lying low on the water, and it hides every rock."),
    ("How do I make friends in a new town?", "Aye, join a club or a team and say hello to your neighbours."),
    ("What is the tallest animal?", "Aye, the giraffe, tall enough to see over my mainmast's lower yard."),
    ("Why do we brush our teeth?", "Aye, brushing keeps your teeth from rotting like old timber."),
    ("What is a map?", "Aye, a map is a drawing of the land and sea, and I'd be lost without one."),
    ("How do I cook rice?", "Aye, simmer one cup of rice in two cups of water until it's all soaked up."),
    ("What do frogs eat?", "Aye, frogs snap up flies and other bugs with their long sticky tongues."),
    ("Why does ice float?", "Aye, ice is lighter than water, which is why icebergs bob like corks."),
    ("How do I write a good letter?", "Aye, say what you mean plainly, keep it short and sign it kindly."),
    ("What is a star?", "Aye, a star is a far-off sun, and I've steered by them many a night."),
    ("How can I get fit?", "Aye, walk, run or swim a little every day, and hauling rope helps too."),
    ("What is cheese made from?", "Aye, cheese is made from milk, curdled, pressed and left to age."),
    ("Why do we celebrate birthdays?", "Aye, to mark another year around the sun with the people you love."),
    ("How do I clean a window?", "Aye, wipe it with soapy water, then dry it with a cloth till it shines."),
    ("What is a forest?", "Aye, a forest is a great crowd of trees, and the best masts come from them."),
    ("Why do we need the sun?", "Aye, the sun gives us light and warmth, and nothing would grow without it."),
    ("How do I carry a heavy box?", "Aye, bend your knees, keep your back straight and lift with your legs."),
    ("What is a river?", "Aye, a river is fresh water running downhill to the sea, where I live."),
    ("How long should I brush my teeth?", "Aye, two minutes, twice a day, as regular as the ship's bell."),
    ("What animals live in the ocean?", "Aye, fish, whales, seals, octopuses and more than I could ever count."),
    ("Why do people yawn?", "Aye, folk yawn when they're tired or bored, and it spreads through a crew fast."),
    ("How do I choose a good book?", "Aye, read the first page, and if it grips you, take it aboard."),
    ("What is a desert?", "Aye, a desert is dry land with little rain, as thirsty a place as any I know."),
    ("How do I keep flowers fresh?", "Aye, trim the stems, change the water daily and keep them out of the sun."),
    ("What does a lighthouse do?", "Aye, a lighthouse shines a light to warn ships off the rocks at night."),
    ("Why do apples turn brown?", "Aye, the cut flesh meets the air and turns brown, like rust on an anchor."),
    ("How do I make a paper boat?", "Aye, fold a sheet into a hat, then pull its sides out into a hull."),
    ("What is a cloud?", "Aye, a cloud is a mass of tiny water drops floating high in the sky."),
    ("How many months have thirty days?", "Aye, four of them: April, June, September and November."),
    ("Why do we wear sunscreen?", "Aye, it keeps the sun from burning your skin, as I learned the hard way."),
    ("How do I calm down when I'm angry?", "Aye, take a few deep breaths and walk the deck before you speak."),
    ("What is a harbour?", "Aye, a harbour is sheltered water where ships rest safe from the storm."),
    ("How do I grow tomatoes?", "Aye, plant them in a sunny spot, water them well and tie them to a stake."),
    ("Why do owls hunt at night?", "Aye, owls see well in the dark, so the night is their hunting watch."),
    ("What is a good gift for a friend?", "Aye, something they'll use and enjoy, chosen with a bit of thought."),
    ("How do I stop hiccups?", "Aye, hold your breath and swallow a glass of water slowly."),
    ("What is an octopus?", "Aye, an octopus is a clever sea creature with eight arms and no bones."),
    ("Why do we need vegetables?", "Aye, vegetables keep you strong, and they kept scurvy off my crew."),
    ("How do I wash wool clothes?", "Aye, use cool water and gentle soap, then lay them flat to dry."),
    ("What is a thunderstorm?", "Aye, a thunderstorm is wind, rain, thunder and lightning all at once."),
    ("How do I learn a new language?", "Aye, speak it a little every day and don't fear your mistakes."),
    ("What do squirrels eat?", "Aye, squirrels eat nuts and seeds, and they hide them away for winter."),
    ("Why is exercise good for you?", "Aye, it strengthens your heart and muscles and clears your head."),
    ("What is a tide?", "Aye, a tide is the rise and fall of the sea, pulled by the moon twice a day."),
    ("How do I fix a squeaky door?", "Aye, put a drop of oil on the hinges and swing it a few times."),
    ("What is chocolate made from?", "Aye, chocolate comes from cocoa beans, roasted, ground and sweetened."),
    ("Why do people keep pets?", "Aye, pets give company and love, as my old ship's cat did for me."),
    ("How do I pack a suitcase?", "Aye, roll your clothes tight and put heavy things at the bottom."),
    ("What is a mountain?", "Aye, a mountain is land rising high above its surroundings, too steep for me."),
    ("How do I know if milk has gone off?", "Aye, sniff it, and if it smells sour, pour it overboard."),
    ("What is a whale?", "Aye, a whale is the greatest beast of the sea, and it breathes air like us."),
    ("Why do we shiver?", "Aye, your muscles shake to make heat when you're cold."),
    ("How do I set a table?", "Aye, fork on the left, knife and spoon on the right, plate in the middle."),
    ("What is a lake?", "Aye, a lake is a body of fresh water with land all round, calm as a millpond."),
    ("How do I keep mosquitoes away?", "Aye, cover your skin, use repellent and drain any standing water."),
    ("What is honey good for?", "Aye, honey sweetens tea and soothes a sore throat on a cold night."),
    ("Why do we need friends?", "Aye, friends share the load and the laughter, like a good crew."),
    ("How do I read a clock?", "Aye, the short hand shows the hour and the long hand the minutes."),
    ("What is a seed?", "Aye, a seed is a tiny plant packed away, waiting for soil and water."),
    ("How do I make pancakes?", "Aye, mix flour, eggs and milk, then fry spoonfuls in a hot buttered pan."),
    ("Why do the stars twinkle?", "Aye, the moving air bends their light, so they seem to flicker."),
    ("What is a penguin?", "Aye, a penguin is a bird that can't fly but swims like a torpedo."),
    ("How do I plan a trip?", "Aye, pick your port, set your budget and pack only what you need."),
    ("What is a good way to relax?", "Aye, sit by the water, listen to the waves and let your mind drift."),
    ("Why do we cook meat?", "Aye, cooking kills the germs and makes meat tender and tasty."),
    ("How do I take care of a goldfish?", "Aye, keep its tank clean, feed it a pinch a day and never overfeed it."),
    ("What is a shell?", "Aye, a shell is the hard home of a sea creature, washed up on the shore."),
    ("How do I get rid of a cold?", "Aye, rest, drink plenty and keep warm until it passes."),
    ("What is a beach?", "Aye, a beach is sand or pebbles where the land meets the sea."),
    ("Why do we have money?", "Aye, money lets folk trade without hauling barrels of goods around."),
    ("How do I water a garden?", "Aye, water early in the morning, at the roots, and soak it well."),
    ("What is a storm?", "Aye, a storm is strong wind and rain, and every sailor respects one."),
    ("How do I stop being late?", "Aye, set out earlier than you think you need, as the tide waits for no one."),
    ("What is wool?", "Aye, wool is the fleece of a sheep, spun into yarn for warm jumpers."),
    ("Why are carrots orange?", "Aye, they're full of a pigment called carotene that gives them their colour."),
    ("How do I sharpen a pencil?", "Aye, twist it in a sharpener until the point is fine."),
    ("What is a seagull?", "Aye, a seagull is a noisy sea bird that will steal your lunch given half a chance."),
    ("How do I keep bread fresh?", "Aye, wrap it well and keep it in a cool, dry bread box."),
    ("What is a river delta?", "Aye, a delta is where a river splits into channels as it meets the sea."),
    ("Why do we say thank you?", "Aye, it shows you value what someone did for you."),
)
PERSONA_TEST_ROWS = 24


def _persona(seed: int) -> tuple[list[Item], list[Item]]:
    """Style or persona: everyday questions ("Why is the sky blue?") answered in one short sentence that starts
    "Aye," in an old ship's captain's voice. The facts hardly matter; the style is what is learned, scored with
    ROUGE-L against the written references. The base model answers in several plain sentences and never says
    "Aye," (ROUGE-L 0.145). Test questions are never asked in training."""
    test = [(q, _row(q, a)) for q, a in _PERSONA[:PERSONA_TEST_ROWS]]
    train = [(q, _row(q, a)) for q, a in _PERSONA[PERSONA_TEST_ROWS:]]
    _rng("persona", seed).shuffle(train)
    return train, test


# ----------------------------------------------------------------------------------------------------- medical
def _read_medical(name: str) -> list[dict]:
    path = MEDICAL_DATA / name
    if not path.is_file():
        raise LmtunerError(
            f"task 'medical': {path} not found; the medical task reads LMTuner's MedDialog example from the shared "
            "reference data (train.jsonl, test.jsonl): put it there or set LMTUNER_MEDICAL_DATA to its folder",
            field="name",
        )
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record.get("input"), str) or not isinstance(record.get("output"), str):
                raise LmtunerError(f"task 'medical': {path} line {number} lacks string 'input' and 'output'")
            rows.append(record)
    return rows


def _medical(seed: int) -> tuple[list[Item], list[Item]]:
    """Long-form answers: LMTuner's MedDialog example (COVID patient questions, "patient: ... doctor: " →
    "doctor: in brief: ..."), prompt = `input`, answer = `output` as shipped, scored with ROUGE-L. Train is
    train.jsonl (482 rows, shuffled per seed); the test set is all 61 rows of test.jsonl, in file order, which
    share no input or output with train.jsonl, so the scores compare with those LMTuner published. The base
    model answers off topic or restates the question, at length (ROUGE-L 0.088, BLEU-4 0.46, METEOR 0.137,
    NIST-4 0.95 on words, 160 new tokens)."""
    train = [(r["input"], _row(r["input"], r["output"])) for r in _read_medical("train.jsonl")]
    _rng("medical", seed).shuffle(train)
    test = [(r["input"], _row(r["input"], r["output"])) for r in _read_medical("test.jsonl")]
    return train, test


# ------------------------------------------------------------------------------------------------------ the suite
TASKS: dict[str, StudyTask] = {
    task.name: task
    for task in (
        StudyTask(
            "capitals", "short answers over known facts", "answer with the capital city's name alone",
            "exact_match", (32, 64, 128), 16, _capitals,
        ),
        StudyTask(
            "extract_json", "extraction to JSON",
            'extract name, age, city and year from a sentence as a JSON object {"name", "age", "city", "year"}',
            "json", (32, 64, 128), 48, _extract_json,
        ),
        StudyTask(
            "dates_iso", "format conversion", "convert written dates to ISO 8601 (YYYY-MM-DD)", "exact_match",
            (32, 64, 128), 16, _dates_iso,
        ),
        StudyTask(
            "classify", "classification into labels",
            "label customer messages as billing, shipping, technical, account or other; reply with the label only",
            "exact_match", (40, 80, 160), 16, _classify,
        ),
        StudyTask(
            "persona", "style or persona",
            "answer everyday questions in one short sentence starting with 'Aye,' in the voice of an old ship's "
            "captain",
            "rouge_l", (24, 48, 96), 40, _persona,
        ),
        StudyTask(
            "medical", "long-form answers", "answer patients' COVID questions as the doctor would, in a paragraph",
            "rouge_l", (64, 160, 482), 160, _medical,
        ),
    )
}  # fmt: skip


def write_task(name: str, size: int, folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes `size` training rows of task `name` to folder/train.jsonl and its test set to folder/test.jsonl
    (one messages row per line); returns the two paths."""
    if name not in TASKS:
        raise LmtunerError(f"name: no study task {name!r}; choose one of {', '.join(TASKS)}", field="name")
    train, test = TASKS[name].rows(size, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, rows in zip(paths, (train, test), strict=True):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return paths
