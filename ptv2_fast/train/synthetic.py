"""Small labelled tasks the project generates itself, so training runs offline on any machine.

Each task builds sentences from templates over a fixed vocabulary (common English words, all in BERT's
uncased vocabulary) with a rule a model must learn:

- ``sentiment`` (2 labels): "the soup was really good" is positive; an adjective from the negative list,
  or a "not" in front of a positive one, makes it negative (and "not" flips a negative one back).
- ``topic`` (3 labels: sports, science, food): which topic the content words come from.
- ``tense`` (3 labels: past, present, future): "the farmer walked to the river", "the farmers walk ...",
  "the farmer will walk ...".

Deterministic for a seed; train and dev splits never share a sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

POSITIVE = ["good", "great", "excellent", "wonderful", "nice", "lovely", "amazing", "fantastic", "pleasant", "fine"]
NEGATIVE = ["bad", "terrible", "awful", "poor", "horrible", "boring", "ugly", "nasty", "dull", "weak"]
THINGS = ["soup", "movie", "book", "hotel", "game", "song", "show", "trip", "meal", "room", "car", "class"]
ADVERBS = ["", "really", "very", "quite", "so", "truly"]
TOPICS = {
    "sports": ["football", "tennis", "goal", "team", "match", "player", "coach", "stadium", "race", "league"],
    "science": ["physics", "atom", "energy", "experiment", "laboratory", "theory", "chemistry", "molecule",
                "planet", "cell"],
    "food": ["pizza", "bread", "cheese", "soup", "kitchen", "recipe", "dinner", "salad", "butter", "sugar"],
}
TOPIC_FRAMES = ["we talked about the {a} and the {b} today", "my friend loves the {a} more than the {b}",
                "the article was about {a} and {b}", "there was news on {a} , then on {b}",
                "she wrote a long note about the {a} near the {b}"]
NOUNS = ["dog", "cat", "teacher", "student", "bird", "farmer", "doctor", "singer", "player", "driver"]
# (base, past) of regular verbs: the tense shows in the verb's form ("walked", "walks", "will walk")
VERBS = [("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("work", "worked"), ("laugh", "laughed"),
         ("call", "called"), ("wait", "waited"), ("cook", "cooked"), ("clean", "cleaned"), ("visit", "visited")]
PLACES = ["in the park", "at home", "near the river", "after lunch", "with a friend", "", "together", "at school"]


@dataclass
class Task:
    """A labelled task: ``train``/``dev`` are lists of (text, label index); ``labels`` names the classes."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]] = field(default_factory=list)
    dev: list[tuple[str, int]] = field(default_factory=list)


def _sentiment(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.3
    adv = rng.choice(ADVERBS)
    words = ["the", rng.choice(THINGS), "was"] + (["not"] if negated else []) + ([adv] if adv else []) + [adj]
    return " ".join(words), int(positive != negated)


def _topic(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(3)
    a, b = rng.sample(TOPICS[list(TOPICS)[label]], 2)
    return rng.choice(TOPIC_FRAMES).format(a=a, b=b), label


def _tense(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(3)  # past, present, future
    plural = rng.random() < 0.5
    noun, (base, past) = rng.choice(NOUNS), rng.choice(VERBS)
    verb = {0: past, 1: base if plural else base + "s", 2: "will " + base}[label]
    words = ("the", noun + "s" if plural else noun, verb, rng.choice(PLACES))
    return " ".join(w for w in words if w), label


GENERATORS = {"sentiment": (_sentiment, ["negative", "positive"]),
              "topic": (_topic, list(TOPICS)),
              "tense": (_tense, ["past", "present", "future"])}


def make_task(name: str, n_train: int = 600, n_dev: int = 200, seed: int = 0) -> Task:
    """The synthetic task ``name`` with ``n_train``/``n_dev`` distinct examples (fewer if the templates
    cannot produce that many distinct sentences)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {', '.join(GENERATORS)}")
    gen, labels = GENERATORS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: dict[str, int] = {}
    tries = 0
    while len(seen) < n_train + n_dev and tries < 50 * (n_train + n_dev):
        text, label = gen(rng)
        seen.setdefault(text, label)
        tries += 1
    items = list(seen.items())
    rng.shuffle(items)
    n_dev = min(n_dev, len(items) // 4)
    return Task(name, labels, train=items[n_dev:n_dev + n_train], dev=items[:n_dev])
