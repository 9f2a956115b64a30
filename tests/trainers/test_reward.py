"""A Hugging Face sequence-classification reward model behind the same interface as the synthetic one."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from trainers.reward import SequenceClassificationReward, SyntheticGoldReward, load_reward_model
from trainers.synthetic import gold_reward


def make_reward_folder(path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "answer", "question"]
    # a vocabulary given as a dict: transformers 5's BertTokenizerFast(vocab_file=...) maps every word to [UNK]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=1))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


def test_hf_reward_scores_are_the_model_logits(tmp_path):
    model, tokenizer = make_reward_folder(tmp_path)
    reward = load_reward_model(type("Spec", (), {"kind": "hf", "path": str(tmp_path), "trust_remote_code": False,
                                                 "batch_size": 2})())
    assert isinstance(reward, SequenceClassificationReward)
    prompts, responses = ["question", "question", "question"], ["good answer", "bad answer", "answer"]
    scores = reward.score(prompts, responses).values
    assert len(set(scores)) == 3  # the words are told apart (not all [UNK])
    with torch.no_grad():
        expected = model(**tokenizer(prompts, responses, padding=True, return_tensors="pt")).logits[:, 0]
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-5)


def test_synthetic_reward_serves_gold_reward():
    prompt = "ask tell koza and bifa ?"
    assert SyntheticGoldReward().score([prompt], ["koza very"]).values == [gold_reward(prompt, "koza very")]


def test_the_reward_cuts_the_prompt_never_a_response_that_fits(tmp_path):
    """max_length 16: [CLS] prompt [SEP] response [SEP] leaves 13 tokens. A 10-token response beside a 20-token prompt
    is read whole, with the prompt's last 3 tokens; the score equals the model's on exactly that pair. A 15-token
    response cannot fit beside one prompt token: it keeps its first 12 tokens and is counted."""
    model, tokenizer = make_reward_folder(tmp_path)
    reward = SequenceClassificationReward(str(tmp_path), batch_size=2, max_length=16)
    prompt, response = " ".join(["question"] * 17 + ["good", "bad", "answer"]), " ".join(["good"] * 10)
    scored = reward.score([prompt, "question"], [response, "answer"])
    assert (scored.prompts_cut, scored.responses_cut) == (1, 0)
    with torch.no_grad():
        expected = model(**tokenizer(["good bad answer"], [response], return_tensors="pt")).logits[0, 0]
    assert scored.values[0] == pytest.approx(float(expected), abs=1e-5)
    too_long = reward.score(["question"], [" ".join(["bad"] * 15)])
    assert (too_long.prompts_cut, too_long.responses_cut) == (0, 1)
    with torch.no_grad():
        expected = model(**tokenizer(["question"], [" ".join(["bad"] * 12)], return_tensors="pt")).logits[0, 0]
    assert too_long.values[0] == pytest.approx(float(expected), abs=1e-5)
