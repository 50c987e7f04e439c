"""The second reference LVLM: a small Qwen2.5-VL trained on the ``shapes`` benchmark.

Qwen2.5-VL's architecture at a size that trains on a 2-core CPU: its vision tower (14-px patches, 2-D rotary
positions, windowed attention in most blocks and full attention in the others, the 2×2 patch merger), M-RoPE in
the LLM, a Qwen2 decoder. Dynamic resolution: a 336-px ``shapes`` image is 24×24 patches, 144 visual tokens after
the merge (the LLaVA reference has 576), so the LLM is deeper (8 layers) at the same cost, and pruning at layer 2
leaves three quarters of it pruned. The tokenizer is word-level over the benchmark's words with Qwen's special
tokens; the processor is ``Qwen2_5_VLProcessor`` with the ChatML template. A saved folder loads offline with the
Auto classes; ``model: {path: reference-qwen}`` names the shipped one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenprune.reference import shapes_video
from tokenprune.reference.model import ReferenceSize
from tokenprune.reference.model import path as reference_path
from tokenprune.reference.processors import (
    QWEN_EXTRA_TOKENS,
    benchmark_words,
    has_torchvision,
    images_only,
    word_tokenizer,
)
from tokenprune.reference.processors import QWEN_TEMPLATE as CHAT_TEMPLATE

#: Where the trained Qwen-architecture reference model lives (inside the package).
QWEN_DIR = Path(__file__).parent / "checkpoint_qwen"

#: The image side the processor keeps (a multiple of patch 14 x merge 2): 24×24 patches, 144 visual tokens
IMAGE_SIDE = 336
PATCH = 14
MERGE = 2

SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]

def qwen_vocabulary(video: bool = False) -> list[str]:
    """Qwen's special tokens, then the benchmark's words and the chat template's role words; ``video``: then the
    words of the ``shapes_video`` questions the image vocabulary lacks (appended, so every image word keeps its id
    and a video model fine-tuned from the image one keeps its embeddings)."""
    words = SPECIALS + [w for w in benchmark_words() if w not in SPECIALS]
    if video:
        words += [w for w in shapes_video.WORDS if w not in words]
    return words


def build_tokenizer(video: bool = False):
    """A word-level tokenizer over :func:`qwen_vocabulary` with Qwen's special tokens and the ChatML template."""
    vocab = {w: i for i, w in enumerate(qwen_vocabulary(video))}
    return word_tokenizer(vocab, [s for s in SPECIALS if s != "<unk>"], "<|endoftext|>", None, "<|im_end|>",
                          QWEN_EXTRA_TOKENS, CHAT_TEMPLATE)


def build_processor(video: bool = False):
    """``Qwen2_5_VLProcessor``: the PIL image processor keeping a 336-px image at 336 px (24×24 patches of 14 px,
    144 tokens after the 2×2 merge), the word tokenizer (``video``: with the ``shapes_video`` words), ChatML;
    without torchvision, the same class without its video processor
    (:func:`tokenprune.reference.processors.images_only`)."""
    import transformers as tf

    pixels = IMAGE_SIDE * IMAGE_SIDE
    image_processor = tf.Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                                  min_pixels=pixels, max_pixels=pixels)
    tokenizer = build_tokenizer(video)
    if not has_torchvision():
        return images_only(tf.Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                   chat_template=CHAT_TEMPLATE)
    video = tf.Qwen2VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    return tf.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                  chat_template=CHAT_TEMPLATE)


@dataclass
class QwenReferenceSize(ReferenceSize):
    """The architecture knobs of the Qwen reference model (defaults: the shipped one); those of the LLaVA
    reference but a 4-block tower and an 8-layer LLM."""

    vision_layers: int = 4
    text_layers: int = 8


def build_model(size: QwenReferenceSize | None = None, seed: int = 0, attn_implementation: str = "sdpa",
                video: bool = False):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` of :class:`QwenReferenceSize`: the tower
    attends in windows of 112 px (4×4 merged tokens) in blocks 0 and 2 and over the whole image in blocks 1 and 3
    (``fullatt_block_indexes``, as Qwen2.5-VL's 7, 15, 23, 31 of 32); M-RoPE sections split each head's rotary
    frequencies between time, height and width as the 7B's [16, 24, 24] do for 64 of them. ``video``: the
    vocabulary with the ``shapes_video`` words (:func:`qwen_vocabulary`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    size = size or QwenReferenceSize()
    vocab = qwen_vocabulary(video)
    head_dim = size.text_hidden // size.text_heads
    half = head_dim // 2
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # 16 -> [4, 6, 6]
    torch.manual_seed(seed)
    text = dict(hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
                num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                num_key_value_heads=size.text_kv_heads, vocab_size=len(vocab), max_position_embeddings=2048,
                bos_token_id=None, eos_token_id=vocab.index("<|im_end|>"), pad_token_id=vocab.index("<|endoftext|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections})
    depth = size.vision_layers
    vision = dict(depth=depth, hidden_size=size.vision_hidden, num_heads=size.vision_heads,
                  intermediate_size=2 * size.vision_hidden, out_hidden_size=size.text_hidden, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=list(range(1, depth, 2)) or [depth - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab.index("<|image_pad|>"),
                              video_token_id=vocab.index("<|video_pad|>"),
                              vision_start_token_id=vocab.index("<|vision_start|>"),
                              vision_end_token_id=vocab.index("<|vision_end|>"))
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = vocab.index("<|endoftext|>")
    model.generation_config.eos_token_id = vocab.index("<|im_end|>")
    return model


@contextmanager
def batched_windows():
    """Within this context, Qwen2.5-VL's vision attention runs its windows (or images) as one batched SDPA call
    when they all have the same length, instead of one call per window: the same arithmetic (each window
    attends within itself, no mask), ~150 calls fewer per block for a batch of 16 ``shapes`` images (9 windows
    of 64 patches each), which dominate a training step's backward pass on a CPU. Windows of unequal lengths
    run the stock code. Training only; the model's code and weights are untouched."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    stock = mq.Qwen2_5_VLVisionAttention.forward

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if self.config._attn_implementation != "sdpa" or lengths.numel() == 0 or bool((lengths != lengths[0]).any()):
            return stock(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                         max_seqlen=max_seqlen, **kwargs)
        seq, n, width = hidden_states.shape[0], lengths.numel(), int(lengths[0])
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = mq.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(n, width, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (n, H, L, d)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1))

    mq.Qwen2_5_VLVisionAttention.forward = forward
    try:
        yield
    finally:
        mq.Qwen2_5_VLVisionAttention.forward = stock


def path() -> Path:
    """The folder of the trained Qwen-architecture reference model (loadable with the Auto classes, offline)."""
    if not (QWEN_DIR / "config.json").exists():
        raise FileNotFoundError(f"the Qwen reference model is not trained yet: {QWEN_DIR} holds no config.json "
                                "(run `tokenprune train-reference experiments/train_reference_qwen.yaml`)")
    return QWEN_DIR


#: The names that stand for the shipped reference models (``model.path``, ``init_from``), and their folders' functions
#: (a folder that holds no model yet raises FileNotFoundError saying how to train it)
SHIPPED = {"reference": reference_path, "reference-qwen": path}
