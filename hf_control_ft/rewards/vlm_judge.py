"""A vision-language model as judge: the probability that it answers "Yes" to a question about the prompt.

``score = P(first answer token in {"Yes", "yes"} | image, question)`` from the next-token distribution after the
chat template's generation prompt (the VQAScore recipe: no sampling, one forward pass per image). The question
defaults to ``Does this figure show "{prompt}"? Please answer yes or no.``; any transformers image-text-to-text
model with a chat template works (Qwen2.5-VL, LLaVA, Idefics, SmolVLM, ...). The processor turns images into
pixels outside autograd, so the judge has no gradient: it is a SEIKO oracle (``--oracle vlm_judge``), and ELEGANT
refuses it before any model loads.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_VLM = "Qwen/Qwen2.5-VL-3B-Instruct"
DEFAULT_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'


def _first_token_ids(tokenizer, words) -> list[int]:
    """Ids of the first token of each spelling (with and without a leading space), deduplicated. A first token
    that carries no letter of the word -- SentencePiece tokenizers can split ``" Yes"`` into a bare ``"▁"`` and
    ``"Yes"`` -- is not counted: it starts any answer, not a yes."""
    ids = []
    for word in words:
        for text in (word, " " + word):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if not encoded or encoded[0] == tokenizer.unk_token_id or encoded[0] in ids:
                continue
            piece = tokenizer.decode([encoded[0]]).replace("\u2581", " ").strip()
            if piece and word.startswith(piece):
                ids.append(encoded[0])
    if not ids:
        raise ValueError(f"the tokenizer has no token for any of {list(words)}")
    return ids


class VLMJudgeReward(nn.Module):
    """``fn(images, prompts) -> (B,)`` probabilities in ``[0, 1]`` (module docstring).

    Args:
        model: an image-text-to-text model returning ``.logits`` ``(B, L, V)``.
        processor: its processor (chat template, tokenizer, image processor).
        question: the question, with ``{prompt}`` standing for the sample's prompt.
        yes: spellings of the answer counted as yes.
        batch_size: images per forward pass.
    """

    name = "vlm_judge"

    def __init__(self, model, processor, question: str = DEFAULT_QUESTION, yes=("Yes", "yes"), batch_size: int = 8):
        super().__init__()
        if "{prompt}" not in question:
            raise ValueError(f"the judge's question must contain '{{prompt}}', got {question!r}")
        self.model, self.processor, self.question = model.eval(), processor, question
        self.yes_ids = _first_token_ids(processor.tokenizer, yes)
        self.batch_size = int(batch_size)
        self.__name__ = "vlm_judge"

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if prompts is None or len(prompts) != images.shape[0]:
            raise ValueError("the VLM judge asks about each sample's prompt: give one prompt per image")
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        pictures = [Image.fromarray(p.numpy()) for p in pixels]
        scores = []
        for i in range(0, len(pictures), self.batch_size):
            scores.append(self._judge(pictures[i:i + self.batch_size], list(prompts[i:i + self.batch_size])))
        return torch.cat(scores).to(images.device)

    def _judge(self, pictures, prompts) -> torch.Tensor:
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": self.question.format(prompt=p)}]}],
            add_generation_prompt=True) for p in prompts]
        inputs = self.processor(text=texts, images=pictures, return_tensors="pt", padding=True)
        device, dtype = next(self.model.parameters()).device, next(self.model.parameters()).dtype
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        logits = self.model(**inputs).logits.float()
        mask = inputs["attention_mask"]
        if getattr(self.processor.tokenizer, "padding_side", "right") == "left":
            last = logits[:, -1]
        else:  # right padding: the last real position of each row
            last = logits[torch.arange(len(texts), device=logits.device), mask.sum(dim=1) - 1]
        return last.softmax(dim=-1)[:, self.yes_ids].sum(dim=-1).cpu()

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_VLM, question: str = DEFAULT_QUESTION,
                        torch_dtype: torch.dtype | None = None, **hub_kwargs) -> "VLMJudgeReward":
        """``AutoModelForImageTextToText`` (safetensors only) and ``AutoProcessor`` of ``name_or_path``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(name_or_path, **hub_kwargs)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, use_safetensors=True, dtype=torch_dtype,
                                                            **hub_kwargs)
        return cls(model, processor, question)


__all__ = ["VLMJudgeReward", "DEFAULT_VLM", "DEFAULT_QUESTION"]
