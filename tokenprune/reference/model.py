"""The project's own reference LVLM: a small LLaVA trained on the ``shapes`` benchmark.

LLaVA-1.5 geometry (a CLIP-style tower at 336 px with 14-px patches: 576 visual tokens, an MLP
projector, a Llama LLM with RoPE) at a size that trains on a 2-core CPU. Its word-level tokenizer
covers the benchmark's language; its processor expands ``<image>`` to the 576 placeholders and
formats prompts with a chat template. Saved as a standard folder that
``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained`` load offline.

``path()`` is the folder shipped with the package; ``build_model`` / ``build_processor`` make new
ones (``tokenprune train-reference`` trains one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokenprune.reference import shapes

if TYPE_CHECKING:
    import torch

#: Where the trained reference model lives (inside the package, so an install carries it).
REFERENCE_DIR = Path(__file__).parent / "checkpoint"

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
_PROMPT_WORDS = ("USER ASSISTANT : ? . , what color is the how many are there a an on left or right at top bottom "
                 "above below of yes no")


def vocabulary() -> list[str]:
    """Special tokens, then every word the benchmark and the chat template use (plurals included)."""
    words = list(_PROMPT_WORDS.split())
    words += list(shapes.COLORS) + list(shapes.KINDS) + [k + "s" for k in shapes.KINDS]
    words += [str(i) for i in range(11)] + ["What", "How", "Is"]
    out: list[str] = []
    for w in SPECIALS + words:
        if w not in out:
            out.append(w)
    return out


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %} </s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt(processor, question: str, video: bool = False) -> str:
    """The chat-formatted prompt for one image (``video``: one clip) and ``question``, ending where the answer
    starts."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video" if video else "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (words and punctuation split apart)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # "<image>" must stay one token: it is added as a special token, matched before pre-tokenization
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor():
    """A ``LlavaProcessor``: 336-px CLIP preprocessing, the word tokenizer, 576 image tokens per image."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    # the PIL backend: no torchvision needed, and what AutoProcessor restores from the saved folder
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


@dataclass
class ReferenceSize:
    """The architecture knobs of the reference model (defaults: the shipped one)."""

    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) fixed 2-D sine-cosine position codes, row-major: half the channels encode the
    row, half the column, each with ``dim // 4`` geometric frequencies (He et al., "Masked Autoencoders
    Are Scalable Vision Learners", 2022, after Vaswani et al. 2017)."""

    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    pos = torch.arange(side, dtype=torch.float32)
    ang = pos[:, None] * freq[None, :]  # (side, quarter)
    code = torch.cat([ang.sin(), ang.cos()], dim=1)  # (side, dim/2)
    rows = code[:, None, :].expand(side, side, -1)
    cols = code[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, -1)


def build_model(size: ReferenceSize | None = None, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised reference ``LlavaForConditionalGeneration`` (336 px, patch 14: 576 visual tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    size = size or ReferenceSize()
    vocab = vocabulary()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                              image_size=336, patch_size=14, projection_dim=size.vision_hidden)
    text = LlamaConfig(hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
                       num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                       num_key_value_heads=size.text_kv_heads, vocab_size=len(vocab), max_position_embeddings=1024,
                       pad_token_id=vocab.index("<pad>"), bos_token_id=vocab.index("<s>"),
                       eos_token_id=vocab.index("</s>"))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab.index("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=vocab.index("<pad>"))
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():  # 2-D sin-cos patch positions (as in MAE), still trained: a tiny tower learns where fast
        emb = model.model.vision_tower.embeddings.position_embedding.weight
        emb[0] = 0.0  # CLS
        emb[1:] = sincos_2d(336 // 14, size.vision_hidden)
    model.generation_config.pad_token_id = vocab.index("<pad>")
    model.generation_config.eos_token_id = vocab.index("</s>")
    model.generation_config.bos_token_id = vocab.index("<s>")
    return model


def path() -> Path:
    """The folder of the trained reference model (loadable with the Auto classes, offline)."""
    if not (REFERENCE_DIR / "config.json").exists():
        raise FileNotFoundError(f"the reference model is not trained yet: {REFERENCE_DIR} holds no config.json "
                                "(run `tokenprune train-reference experiments/train_reference.yaml`)")
    return REFERENCE_DIR
