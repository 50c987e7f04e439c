"""Tiny random-init models built from config, for tests and the demo (no hub access needed)."""

from __future__ import annotations

import torch
from torch import nn

TINY_IMAGE_TOKEN = 127
TINY_VOCAB = 128
TINY_PAD, TINY_BOS, TINY_EOS = 0, 1, 2


def tiny_llava(attn_implementation: str = "sdpa", layers: int = 4, image_size: int = 56, patch_size: int = 7,
               seed: int = 0, init_std: float = 0.2) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` with a 2-layer CLIP tower ((image_size/patch_size)^2 visual
    tokens, 64 by default) and a ``layers``-layer Llama (hidden 64, 4 heads, 2 KV heads: GQA).

    ``init_std`` is larger than usual so that random attention is peaked rather than uniform,
    which makes the choice of tokens (and so pruning) matter.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=1024,
                       pad_token_id=TINY_PAD, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS,
                       initializer_range=init_std)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=TINY_PAD)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = TINY_PAD
    model.generation_config.eos_token_id = None
    return model.eval()


def tiny_llava_inputs(model: nn.Module, prompts: list[list[int]] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch: each prompt is ``[bos, *text, <image> x V, *question]``.

    ``prompts`` gives the question token ids per sample (default: two samples of different
    lengths, so the first is padded).
    """
    cfg = model.config
    num_visual = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    rows = [[TINY_BOS, 5, 6] + [cfg.image_token_id] * num_visual + list(q) for q in prompts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), TINY_PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention_mask[i, width - len(r):] = 1
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(len(rows), 3, size, size, generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
