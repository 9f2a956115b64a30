"""A Hugging Face sequence-classification reward model behind the same interface as the synthetic one."""

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from trainers.reward import SequenceClassificationReward, SyntheticGoldReward, load_reward_model
from trainers.synthetic import gold_reward


def make_reward_folder(path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "answer", "question"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
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
    scores = reward.score(prompts, responses)
    with torch.no_grad():
        expected = model(**tokenizer(prompts, responses, padding=True, return_tensors="pt")).logits[:, 0]
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-5)


def test_synthetic_reward_serves_gold_reward():
    prompt = "ask tell koza and bifa ?"
    assert SyntheticGoldReward().score([prompt], ["koza very"]) == [gold_reward(prompt, "koza very")]
