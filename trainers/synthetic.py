"""The built-in synthetic preference task: prompts, preference pairs and a programmatic gold reward.

Pure Python (no torch), seeded and deterministic. The task is built so that the paper's phenomena can
appear at a size that trains in seconds on a CPU:

- A prompt asks about one topic (training) or two topics (evaluation: the prompts are shifted, the
  paper's out-of-distribution setting). A good answer names several distinct words of the prompt's topics.
- The gold reward pays for distinct on-topic words up to a cap, punishes off-topic and "bad" words and
  repetition, and charges for every token past a comfortable length: padding stops paying.
- The preference labels come from an annotator who likes longer answers (gold + a length bonus + noise),
  and ~10% of labels are flipped. So chosen responses are longer on average than rejected ones, and a
  method that learns "longer is better" from the labels is exploiting a bias the gold reward does not share.
"""

from __future__ import annotations

import random

from trainers.pairs import PreferencePair

# The vocabulary is fixed (its own seed), so every data seed shares one tokenizer and one model shape.
_VOCAB_SEED = 20240721
N_TOPICS = 12
WORDS_PER_TOPIC = 8
TRAIN_FRAMINGS = ("tell", "list", "name", "give")
EVAL_FRAMINGS = ("explain", "compare")  # never seen in training prompts
FILLER_WORDS = ("very", "really", "indeed", "so", "quite", "truly", "just", "well")
PROMPT_START, PROMPT_END, JOINER = "ask", "?", "and"

# Gold reward constants (see gold_reward).
RELEVANT_CAP = 5
COMFORTABLE_LENGTH = 8
LENGTH_PENALTY = 0.25
OFF_TOPIC_PENALTY = 0.5
BAD_WORD_PENALTY = 2.0
REPEAT_PENALTY = 0.5
COVERAGE_BONUS = 1.0

# Annotator bias: the labels prefer longer answers by this much per token.
ANNOTATOR_LENGTH_BONUS = 0.35
ANNOTATOR_NOISE_SD = 0.5


def _pseudo_words(n: int, rng: random.Random) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2)))
    return sorted(words)


def _build_lexicon() -> tuple[list[list[str]], list[str]]:
    rng = random.Random(_VOCAB_SEED)
    pool = _pseudo_words(N_TOPICS * WORDS_PER_TOPIC + 6, rng)
    rng.shuffle(pool)
    topics = [pool[i * WORDS_PER_TOPIC:(i + 1) * WORDS_PER_TOPIC] for i in range(N_TOPICS)]
    bad = pool[N_TOPICS * WORDS_PER_TOPIC:]
    return topics, bad


TOPIC_WORDS, BAD_WORDS = _build_lexicon()
_TOPIC_OF = {w: t for t, words in enumerate(TOPIC_WORDS) for w in words}


def vocabulary() -> list[str]:
    """Every word the task can produce, in a fixed order (special tokens are the tokenizer's business)."""
    words = [PROMPT_START, PROMPT_END, JOINER, *TRAIN_FRAMINGS, *EVAL_FRAMINGS, *FILLER_WORDS, *BAD_WORDS]
    return words + [w for topic in TOPIC_WORDS for w in topic]


def prompt_topics(prompt: str) -> set[int]:
    return {_TOPIC_OF[w] for w in prompt.split() if w in _TOPIC_OF}


def gold_reward(prompt: str, response: str) -> float:
    """Programmatic gold score of `response` to `prompt` (higher is better; best possible is 6.0).

    min(distinct on-topic words, 5) + 1 if every prompt topic is covered
    - 0.5 per off-topic word - 2 per bad word - 0.5 per repeated on-topic word
    - 0.25 per token beyond 8.
    """
    topics = prompt_topics(prompt)
    tokens = response.split()
    on_topic = [w for w in tokens if _TOPIC_OF.get(w) in topics]
    distinct = set(on_topic)
    off_topic = sum(1 for w in tokens if w in _TOPIC_OF and _TOPIC_OF[w] not in topics)
    bad = sum(1 for w in tokens if w in BAD_WORDS)
    covered = {_TOPIC_OF[w] for w in distinct}
    score = float(min(len(distinct), RELEVANT_CAP))
    score += COVERAGE_BONUS if topics and covered >= topics else 0.0
    score -= OFF_TOPIC_PENALTY * off_topic + BAD_WORD_PENALTY * bad
    score -= REPEAT_PENALTY * (len(on_topic) - len(distinct))
    score -= LENGTH_PENALTY * max(0, len(tokens) - COMFORTABLE_LENGTH)
    return score


def _make_prompt(rng: random.Random, topics: list[int], framings: tuple[str, ...]) -> str:
    keywords = [rng.choice(TOPIC_WORDS[t]) for t in topics]
    if len(keywords) == 1:
        keywords.append(rng.choice(TOPIC_WORDS[topics[0]]))
    return " ".join([PROMPT_START, rng.choice(framings), keywords[0], JOINER, *keywords[1:], PROMPT_END])


def _sample_response(rng: random.Random, topics: list[int]) -> str:
    """A response of random quality: on-topic words, filler, sometimes off-topic, bad or repeated words."""
    relevant = [w for t in topics for w in TOPIC_WORDS[t]]
    others = [w for t, words in enumerate(TOPIC_WORDS) if t not in topics for w in words]
    tokens = rng.sample(relevant, rng.randint(0, 6))
    if tokens and rng.random() < 0.2:
        tokens.append(rng.choice(tokens))
    tokens += rng.sample(others, rng.choice((0, 0, 1, 2)))
    tokens += [rng.choice(BAD_WORDS)] if rng.random() < 0.15 else []
    tokens += [rng.choice(FILLER_WORDS) for _ in range(rng.randint(0, 6))]
    rng.shuffle(tokens)
    return " ".join(tokens) if tokens else rng.choice(FILLER_WORDS)


def _annotator_utility(rng: random.Random, prompt: str, response: str) -> float:
    return gold_reward(prompt, response) + ANNOTATOR_LENGTH_BONUS * len(response.split()) + rng.gauss(
        0.0, ANNOTATOR_NOISE_SD)


def _make_pair(rng: random.Random, prompt_id: str, prompt: str, label_noise: float) -> PreferencePair:
    topics = sorted(prompt_topics(prompt))
    a, b = _sample_response(rng, topics), _sample_response(rng, topics)
    if _annotator_utility(rng, prompt, a) < _annotator_utility(rng, prompt, b):
        a, b = b, a
    if rng.random() < label_noise:
        a, b = b, a
    return PreferencePair(prompt_id, prompt, chosen=a, rejected=b)


def generate_split(split: str, n: int, seed: int, label_noise: float = 0.1) -> list[PreferencePair]:
    """`n` preference pairs of the "train" split (one-topic prompts) or the "eval" split (two-topic
    prompts with framings never seen in training). Same (split, n, seed, label_noise) -> same pairs."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; known: train, eval")
    rng = random.Random(f"{seed}-{split}")
    pairs = []
    for i in range(n):
        if split == "train":
            prompt = _make_prompt(rng, [rng.randrange(N_TOPICS)], TRAIN_FRAMINGS)
        else:
            prompt = _make_prompt(rng, rng.sample(range(N_TOPICS), 2), EVAL_FRAMINGS)
        pairs.append(_make_pair(rng, f"{split}-{i}", prompt, label_noise))
    return pairs
