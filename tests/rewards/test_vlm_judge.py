"""``--oracle vlm_judge``: a vision-language model's probability of answering yes to a question about the prompt,
on a tiny random LLaVA (random weights, tokenizer and chat template in memory)."""

import pytest
import torch

from hf_control_ft.rewards.registry import load_reward
from hf_control_ft.rewards.vlm_judge import VLMJudgeReward
from hf_control_ft.testing import VLM_WORDS, tiny_vlm

QUESTION = "does this figure show {prompt} ? please answer yes or no ."
PROMPTS = ["a cat", "the red car", "the sea"]  # different lengths: padded batches


def _images():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _by_hand(model, processor, image, prompt):
    from PIL import Image

    picture = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION.format(prompt=prompt)}]}], add_generation_prompt=True)
    with torch.no_grad():
        logits = model(**processor(text=[text], images=[picture], return_tensors="pt")).logits[0, -1]
    p = logits.softmax(-1)
    return float(p[VLM_WORDS.index("Yes")] + p[VLM_WORDS.index("yes")])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_score_is_the_probability_of_yes_per_image_in_a_padded_batch(padding_side):
    model, processor = tiny_vlm()
    processor.tokenizer.padding_side = padding_side  # chat VLMs ship either; the last real position is read
    judge = VLMJudgeReward(model, processor, question=QUESTION, batch_size=2)
    images = _images().requires_grad_(True)
    scores = judge(images, PROMPTS)
    assert scores.shape == (3,) and not scores.requires_grad  # a black box: SEIKO's oracle
    assert ((scores > 0) & (scores < 1)).all()
    expected = [_by_hand(model, processor, x, p) for x, p in zip(images.detach(), PROMPTS)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4)
    assert judge(images, ["a cat"] * 3)[1] != pytest.approx(scores[1].item(), rel=1e-6)  # it reads the prompt
    with pytest.raises(ValueError, match="one prompt per image"):
        judge(images, None)


def test_vlm_judge_loads_by_name_from_a_saved_model(tmp_path):
    model, processor = tiny_vlm()
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    judge = load_reward("vlm_judge", model_name_or_path=str(tmp_path / "vlm"))
    assert isinstance(judge, VLMJudgeReward)
    direct = VLMJudgeReward(model, processor)  # the default question (words the tiny vocabulary lacks: <unk>)
    assert torch.allclose(judge(_images(), PROMPTS), direct(_images(), PROMPTS), atol=1e-6)


def test_a_bare_sentencepiece_space_is_not_counted_as_yes():
    """A SentencePiece vocabulary without "▁Yes" splits " Yes" into "▁" + "Yes": the bare "▁" starts any answer
    and must not be counted (it was: the judge then scored every image near 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_control_ft.rewards.vlm_judge import _first_token_ids

    vocab = [("<unk>", 0.0), ("\u2581", -1.0), ("Yes", -2.0), ("yes", -2.0), ("No", -2.0), ("\u2581No", -2.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    space = tokenizer.convert_tokens_to_ids("\u2581")
    assert tokenizer.encode(" Yes", add_special_tokens=False)[0] == space  # the split this guards against
    ids = _first_token_ids(tokenizer, ("Yes", "yes"))
    assert space not in ids and sorted(ids) == sorted(tokenizer.convert_tokens_to_ids(["Yes", "yes"]))
    assert _first_token_ids(tokenizer, ("No",)) == tokenizer.convert_tokens_to_ids(["No", "\u2581No"])
