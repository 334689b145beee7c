"""Small labelled tasks the project generates itself, so training runs offline on any machine.

Each task builds sentences from templates over a fixed vocabulary (common English words, all in BERT's
uncased vocabulary) with a rule a model must learn:

- ``sentiment`` (2 labels): "the soup was really good" is positive; an adjective from the negative list,
  or a "not" in front of a positive one, makes it negative (and "not" flips a negative one back).
- ``topic`` (3 labels: sports, science, food): which topic the content words come from.
- ``tense`` (3 labels: past, present, future): "the farmer walked to the river", "the farmers walk ...",
  "the farmer will walk ...".
- ``pos`` (token classification, 6 tags): each word's class (DET, NOUN, VERB, ADJ, ADV, OTHER) in sentences
  built from the same vocabulary.
- ``plural`` (causal LM): the prompt "the farmer walks at home . plural :" completes to "the farmers walk at
  home" (a decoder model; the completion's words all occur in the prompt).

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
    """A task: ``train``/``dev`` are lists of (input, target); ``labels`` names the classes or tags.

    kind ``seq_cls``: (text, label index); ``token_cls``: (list of words, list of tag indices);
    ``causal_lm``: (prompt, completion), with no labels."""

    name: str
    labels: list[str]
    train: list[tuple] = field(default_factory=list)
    dev: list[tuple] = field(default_factory=list)
    kind: str = "seq_cls"


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


POS_TAGS = ["DET", "NOUN", "VERB", "ADJ", "ADV", "OTHER"]
_LEXICON = {**{w: "DET" for w in ("the", "a")}, **{w: "ADV" for w in ADVERBS + ["not", "together"] if w},
            **{w: "ADJ" for w in POSITIVE + NEGATIVE}, **{w: "OTHER" for w in ("in", "at", "near", "after", "with")},
            **{w: "NOUN" for w in THINGS + NOUNS + [n + "s" for n in NOUNS] + ["park", "home", "river", "lunch",
                                                                                "friend", "school"]},
            **{w: "VERB" for w in ["was", "will"] + [f for b, p in VERBS for f in (b, b + "s", p)]}}


def _pos(rng: random.Random) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if rng.random() < 0.4:
        text, _ = _sentiment(rng)
    else:
        text, _ = _tense(rng)
        if rng.random() < 0.5:  # an adjective before the noun
            words = text.split()
            text = " ".join([words[0], rng.choice(POSITIVE + NEGATIVE)] + words[1:])
    words = tuple(text.split())
    return words, tuple(POS_TAGS.index(_LEXICON[w]) for w in words)


def _plural(rng: random.Random) -> tuple[str, str]:
    noun, (base, _) = rng.choice(NOUNS), rng.choice(VERBS)
    place = rng.choice([p for p in PLACES if p])
    return f"the {noun} {base}s {place} . plural :", f"the {noun}s {base} {place}"


# name -> (generator, labels, kind)
GENERATORS = {"sentiment": (_sentiment, ["negative", "positive"], "seq_cls"),
              "topic": (_topic, list(TOPICS), "seq_cls"),
              "tense": (_tense, ["past", "present", "future"], "seq_cls"),
              "pos": (_pos, POS_TAGS, "token_cls"),
              "plural": (_plural, [], "causal_lm")}


def make_task(name: str, n_train: int = 600, n_dev: int = 200, seed: int = 0) -> Task:
    """The synthetic task ``name`` with ``n_train``/``n_dev`` distinct examples (fewer if the templates
    cannot produce that many distinct sentences)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {', '.join(GENERATORS)}")
    gen, labels, kind = GENERATORS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: dict = {}
    tries = 0
    while len(seen) < n_train + n_dev and tries < 50 * (n_train + n_dev):
        text, label = gen(rng)
        seen.setdefault(text, label)
        tries += 1
    items = list(seen.items())
    rng.shuffle(items)
    n_dev = min(n_dev, len(items) // 4)
    return Task(name, labels, train=items[n_dev:n_dev + n_train], dev=items[:n_dev], kind=kind)
