import statistics

from trainers import synthetic
from trainers.synthetic import TOPIC_WORDS, generate_split, gold_reward


def test_generation_is_deterministic_and_seeded():
    assert generate_split("train", 50, seed=3) == generate_split("train", 50, seed=3)
    assert generate_split("train", 50, seed=3) != generate_split("train", 50, seed=4)


def test_gold_reward_hand_examples():
    t0, t1 = TOPIC_WORDS[0], TOPIC_WORDS[1]
    prompt = f"ask tell {t0[0]} and {t0[1]} ?"
    # 3 distinct on-topic words, topic covered: 3 + 1
    assert gold_reward(prompt, f"{t0[2]} {t0[3]} {t0[4]}") == 4.0
    # one off-topic word (-0.5) and one repeat (-0.5)
    assert gold_reward(prompt, f"{t0[2]} {t0[2]} {t1[0]}") == 1.0 + 1.0 - 0.5 - 0.5
    # a bad word costs 2
    assert gold_reward(prompt, f"{t0[2]} {synthetic.BAD_WORDS[0]}") == 2.0 - 2.0
    # padding stops paying: 5 on-topic words + 7 filler = 12 tokens -> 4 over the comfortable 8
    padded = " ".join(t0[2:7] + ["very"] * 7)
    assert gold_reward(prompt, padded) == 5 + 1 - 0.25 * 4
    assert gold_reward(prompt, padded) < gold_reward(prompt, " ".join(t0[2:7]))


def test_pairs_show_the_papers_phenomena():
    pairs = generate_split("train", 2000, seed=0)
    chosen_gold = [gold_reward(p.prompt, p.chosen) for p in pairs]
    rejected_gold = [gold_reward(p.prompt, p.rejected) for p in pairs]
    better = sum(c > r for c, r in zip(chosen_gold, rejected_gold)) / len(pairs)
    worse = sum(c < r for c, r in zip(chosen_gold, rejected_gold)) / len(pairs)
    assert 0.7 < better < 0.9            # chosen usually better ...
    assert 0.1 < worse < 0.25            # ... but label noise and the annotator's bias flip some
    mean_len = lambda xs: statistics.mean(len(x.split()) for x in xs)
    assert mean_len(p.chosen for p in pairs) > mean_len(p.rejected for p in pairs) + 1  # chosen are longer


def test_eval_prompts_are_shifted():
    train = generate_split("train", 200, seed=0)
    evaluation = generate_split("eval", 200, seed=0)
    assert all(len(synthetic.prompt_topics(p.prompt)) == 1 for p in train)
    assert all(len(synthetic.prompt_topics(p.prompt)) == 2 for p in evaluation)
    train_framings = {p.prompt.split()[1] for p in train}
    eval_framings = {p.prompt.split()[1] for p in evaluation}
    assert train_framings.isdisjoint(eval_framings)


def test_label_noise_zero_removes_flips():
    noisy = generate_split("train", 500, seed=1, label_noise=0.4)
    clean = generate_split("train", 500, seed=1, label_noise=0.0)
    flipped = lambda ps: sum(gold_reward(p.prompt, p.chosen) < gold_reward(p.prompt, p.rejected) for p in ps)
    assert flipped(noisy) > flipped(clean)
