"""Each family's real processor, built offline for the tiny models of :mod:`tokenprune.reference.tiny`.

A checkpoint's processor is its image processor plus a tokenizer with the family's special tokens and chat
template. The image processor classes need no hub files; only the tokenizer does. Here the tokenizer is
word-level over the ``shapes`` benchmark's words (as the reference model's is) with the family's special tokens
at the ids the tiny models use (:data:`tokenprune.reference.tiny.TINY_IMAGE_TOKEN` and the rest), so that
``processor(images=..., text=...)`` gives a tiny model exactly the inputs a real checkpoint's processor gives the
real model: LLaVA-NeXT's anyres tiles and ``image_sizes``, LLaVA-OneVision's too with ``batch_num_images``, Qwen2-VL's and Qwen2.5-VL's dynamic-resolution patches,
``image_grid_thw`` and ``mm_token_type_ids``, InternVL's crops and thumbnail, Gemma 3's ``token_type_ids``, Mllama's tiles, aspect-ratio ids and masks and cross-attention mask.

:func:`save_tiny` writes a tiny model and its processor to a folder that ``tokenprune run``, ``tokenprune sweep``
and the lmms-eval model load with the Auto classes, like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenprune.reference import tiny
from tokenprune.reference.model import vocabulary

#: The families with a real processor here, and their tiny model builders.
FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "internvl", "gemma3",
            "mllama")

_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen2-VL's ChatML layout (the real template also writes a default system turn; ours does not)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaMA-3.2-Vision's header layout, the image before the text as the real template places it
_MLLAMA_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# LLaVA-OneVision's ChatML layout: the role and the images on the turn's first line, the text on the next (a
# newline right after a block tag is trimmed by transformers' template settings: it is written as an expression)
_ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'video' %}<video>{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ '\\n' + part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL's ChatML layout: one <IMG_CONTEXT> per image on its own line before the text (the processor expands it
# into <img>, the tiles' context tokens and </img>)
_INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] + '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 3's turn layout: <start_of_image> where an image goes (the processor expands it)
_GEMMA3_TEMPLATE = (
    "<bos>{% for message in messages %}<start_of_turn>"
    "{{ ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

#: The ``extra_special_tokens`` Qwen2-VL's processor reads from its tokenizer
QWEN_EXTRA_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                     "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}

#: Per family: the special tokens at fixed ids (those the tiny models' configs name), the other special tokens,
#: the tokenizer's pad / bos / eos and the ``extra_special_tokens`` its processor reads, and the chat template.
_SPECIALS: dict[str, dict[str, Any]] = {
    "llava_next": {
        "fixed": {"<pad>": tiny.TINY_PAD, "<s>": tiny.TINY_BOS, "</s>": tiny.TINY_EOS, "<image>": tiny.TINY_IMAGE_TOKEN},
        "other": [], "pad": "<pad>", "bos": "<s>", "eos": "</s>", "extra": {"image_token": "<image>"},
        "template": _LLAVA_TEMPLATE},
    "llava_onevision": {
        "fixed": {"<|endoftext|>": tiny.TINY_PAD, "<|im_end|>": tiny.TINY_EOS, "<image>": tiny.TINY_IMAGE_TOKEN,
                  "<video>": tiny.TINY_VIDEO_TOKEN},
        "other": ["<|im_start|>"], "pad": "<|endoftext|>", "bos": None, "eos": "<|im_end|>",
        "extra": {"image_token": "<image>", "video_token": "<video>"}, "template": _ONEVISION_TEMPLATE},
    "internvl": {
        "fixed": {"<|endoftext|>": tiny.TINY_PAD, "<|im_end|>": tiny.TINY_EOS, "<IMG_CONTEXT>": tiny.TINY_IMAGE_TOKEN,
                  "<video>": tiny.TINY_VIDEO_TOKEN, "<img>": tiny.TINY_VISION_START, "</img>": tiny.TINY_VISION_END},
        "other": ["<|im_start|>"], "pad": "<|endoftext|>", "bos": None, "eos": "<|im_end|>",
        "extra": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}, "template": _INTERNVL_TEMPLATE},
    "gemma3": {
        "fixed": {"<pad>": tiny.TINY_PAD, "<bos>": tiny.TINY_BOS, "<end_of_turn>": tiny.TINY_EOS,
                  "<image_soft_token>": tiny.TINY_IMAGE_TOKEN, "<start_of_image>": tiny.TINY_VISION_START,
                  "<end_of_image>": tiny.TINY_VISION_END},
        "other": ["<start_of_turn>"], "pad": "<pad>", "bos": "<bos>", "eos": "<end_of_turn>",
        "extra": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                  "eoi_token": "<end_of_image>"}, "template": _GEMMA3_TEMPLATE},
    "qwen2_vl": {
        "fixed": {"<|endoftext|>": tiny.TINY_PAD, "<|im_end|>": tiny.TINY_EOS, "<|image_pad|>": tiny.TINY_IMAGE_TOKEN,
                  "<|video_pad|>": tiny.TINY_VIDEO_TOKEN, "<|vision_start|>": tiny.TINY_VISION_START,
                  "<|vision_end|>": tiny.TINY_VISION_END},
        "other": ["<|im_start|>"], "pad": "<|endoftext|>", "bos": None, "eos": "<|im_end|>",
        "extra": QWEN_EXTRA_TOKENS,
        "template": QWEN_TEMPLATE},
    "mllama": {
        "fixed": {"<|finetune_right_pad_id|>": tiny.TINY_PAD, "<|begin_of_text|>": tiny.TINY_BOS,
                  "<|eot_id|>": tiny.TINY_EOS, "<|image|>": tiny.TINY_IMAGE_TOKEN},
        "other": ["<|start_header_id|>", "<|end_header_id|>"], "pad": "<|finetune_right_pad_id|>",
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "extra": {"image_token": "<|image|>"},
        "template": _MLLAMA_TEMPLATE},
}
_SPECIALS["qwen2_5_vl"] = _SPECIALS["qwen3_vl"] = _SPECIALS["qwen3_5"] = _SPECIALS["qwen2_vl"]

#: Words of the chat templates beyond the benchmark's
_ROLE_WORDS = ["user", "assistant", "system"]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")


def benchmark_words() -> list[str]:
    """The ``shapes`` benchmark's words (the LLaVA reference's vocabulary without its special tokens) and the chat
    templates' role words: what every family's word tokenizer holds besides its special tokens."""
    llava_specials = {"<pad>", "<s>", "</s>", "<unk>", "<image>"}
    return [w for w in vocabulary() if w not in llava_specials] + [w for w in _ROLE_WORDS if w not in vocabulary()]


def word_tokenizer(vocab: dict[str, int], specials: list[str], pad: str, bos: str | None, eos: str,
                   extra: dict[str, str], template: str):
    """A word-level ``PreTrainedTokenizerFast`` over ``vocab`` (words and punctuation split apart; ``<unk>`` for
    the rest), ``specials`` matched whole before splitting, left padding, the chat ``template``; ``extra``: the
    ``extra_special_tokens`` a family's processor reads (``image_token`` and the like)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos,
                                   unk_token="<unk>", padding_side="left", extra_special_tokens=dict(extra))
    fast.chat_template = template
    return fast


def _tiny_vocab(spec: dict, pieces: list[str]) -> dict[str, int]:
    """``tiny.TINY_VOCAB`` ids: the family's special tokens (``spec["fixed"]``) at the ids the tiny models' configs
    name, ``pieces`` in the free ids in order, and placeholder names on the rest, so ids and vocabulary agree."""
    fixed: dict[str, int] = dict(spec["fixed"])
    free = (i for i in range(tiny.TINY_VOCAB) if i not in set(fixed.values()))
    vocab = dict(fixed)
    for w in pieces:
        if w not in vocab:
            vocab[w] = next(free)
    for i in free:
        vocab[f"<unused{i}>"] = i
    return vocab


def build_tokenizer(family: str):
    """A word-level tokenizer (:func:`word_tokenizer`) of ``tiny.TINY_VOCAB`` ids: the family's special tokens at
    the ids the tiny models' configs name, the benchmark's words and the template's role words in between, its
    chat template."""
    _check_family(family)
    spec = _SPECIALS[family]
    vocab = _tiny_vocab(spec, ["<unk>"] + spec["other"] + benchmark_words())
    return word_tokenizer(vocab, list(spec["fixed"]) + spec["other"], spec["pad"], spec["bos"], spec["eos"], spec["extra"],
                          spec["template"])


def byte_level_tokenizer(family: str):
    """Qwen3.5's own tokenizer class (a byte-level BPE; ``AutoTokenizer`` builds it for ``qwen3_5`` whatever a folder
    declares) over single characters: the family's special tokens at the ids the tiny models' configs name, one id
    per printable ASCII character and the newline (as byte-level BPE spells them), no merges — so every word is
    spelled out, within ``tiny.TINY_VOCAB`` ids, and text splits where Qwen's pre-tokenizer splits it."""
    from tokenizers import AddedToken
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    spec = _SPECIALS[family]
    # byte-level BPE's printable stand-ins: a space is "Ġ", a newline "Ċ"
    vocab = _tiny_vocab(spec, spec["other"] + [_byte_char(byte) for byte in [10, *range(32, 127)]])
    tok = Qwen3_5Tokenizer(vocab=vocab, merges=[], unk_token=None, pad_token=spec["pad"], eos_token=spec["eos"],
                           bos_token=spec["bos"], padding_side="left", extra_special_tokens=dict(spec["extra"]))
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, normalized=False, special=True)
                                                          for s in [*spec["fixed"], *spec["other"]]]})
    tok.chat_template = spec["template"]
    return tok


def _byte_char(byte: int) -> str:
    """The character byte-level BPE (GPT-2's scheme) writes for ``byte``: printable Latin-1 bytes stand for
    themselves, the others are shifted past 255 in order (space, 32, is the 33rd: "Ġ")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in keep:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in keep].index(byte))


def has_torchvision() -> bool:
    """Whether torchvision imports: transformers' video processors (Qwen2-VL's, Qwen2.5-VL's) need it."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: a torchvision built for another torch
        return False
    return True


def images_only(processor_class):
    """``processor_class`` (a processor with a video processor, e.g. ``Qwen2VLProcessor``) without its video
    processor: built from, and loading, the image processor and the tokenizer alone; images work as with the full
    class, videos do not. transformers cannot build such a processor at all without torchvision, which its video
    processors need (the class check of every sub-processor fails); the name stays the class's own, so a folder it
    saves loads with ``AutoProcessor`` where torchvision is installed."""
    def get_attributes(cls):
        return [a for a in processor_class.get_attributes() if a != "video_processor"]

    return type(processor_class.__name__, (processor_class,),
                {"get_attributes": classmethod(get_attributes), "__module__": processor_class.__module__,
                 "__doc__": f"{processor_class.__name__} without its video processor (images only)."})


def build_processor(family: str, model_config):
    """The family's processor class with its PIL image processor sized to ``model_config`` (a tiny model's
    config: tile size, patch size, anyres pinpoints, merge size, tiles) and :func:`build_tokenizer`'s tokenizer."""
    import transformers as tf

    _check_family(family)
    tokenizer = byte_level_tokenizer(family) if family == "qwen3_5" else build_tokenizer(family)
    template = _SPECIALS[family]["template"]
    v = model_config.vision_config
    if family == "llava_next":
        tile = v.image_size
        images = tf.LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                               image_grid_pinpoints=[list(p) for p in model_config.image_grid_pinpoints])
        return tf.LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=v.patch_size,
                                     vision_feature_select_strategy=model_config.vision_feature_select_strategy,
                                     image_token="<image>", num_additional_image_tokens=1, chat_template=template)
    if family == "llava_onevision":
        tile = v.image_size
        images = tf.LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                    image_grid_pinpoints=[list(p) for p in
                                                                          model_config.image_grid_pinpoints])
        options = dict(image_processor=images, tokenizer=tokenizer, chat_template=template,
                       num_image_tokens=(v.image_size // v.patch_size) ** 2,
                       vision_feature_select_strategy=model_config.vision_feature_select_strategy,
                       vision_aspect_ratio=model_config.vision_aspect_ratio)
        if not has_torchvision():
            return images_only(tf.LlavaOnevisionProcessor)(**options)
        return tf.LlavaOnevisionProcessor(video_processor=tf.LlavaOnevisionVideoProcessor(), **options)
    if family == "gemma3":
        images = tf.Gemma3ImageProcessorPil(size={"height": v.image_size, "width": v.image_size})
        return tf.Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=template,
                                  image_seq_length=model_config.mm_tokens_per_image)
    if family == "internvl":
        # at most 4 crops (and the thumbnail) an image: a tiny model's inputs stay small
        images = tf.GotOcr2ImageProcessorPil(size={"height": v.image_size[0], "width": v.image_size[1]},
                                             crop_to_patches=True, min_patches=1, max_patches=4)
        per_tile = int((v.image_size[0] // v.patch_size[0]) ** 2 * model_config.downsample_ratio ** 2)
        options = dict(image_processor=images, tokenizer=tokenizer, chat_template=template, image_seq_length=per_tile)
        if not has_torchvision():
            return images_only(tf.InternVLProcessor)(**options)
        return tf.InternVLProcessor(video_processor=tf.InternVLVideoProcessor(), **options)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"):
        unit = v.patch_size * v.spatial_merge_size  # the resize rounds each side to a multiple of this
        # at most 8x8 merged tokens an image: a tiny model's inputs stay small
        images = tf.Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                             temporal_patch_size=v.temporal_patch_size,
                                             min_pixels=(2 * unit) ** 2, max_pixels=(8 * unit) ** 2)
        cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
               "qwen3_vl": tf.Qwen3VLProcessor, "qwen3_5": tf.Qwen3VLProcessor}[family]
        if not has_torchvision():
            return images_only(cls)(image_processor=images, tokenizer=tokenizer, chat_template=template)
        video_cls = tf.Qwen3VLVideoProcessor if family in ("qwen3_vl", "qwen3_5") else tf.Qwen2VLVideoProcessor
        video = video_cls(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                          temporal_patch_size=v.temporal_patch_size)
        return cls(image_processor=images, tokenizer=tokenizer, video_processor=video, chat_template=template)
    images = tf.MllamaImageProcessorPil(size={"height": v.image_size, "width": v.image_size},
                                        max_image_tiles=v.max_num_tiles)
    return tf.MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)


def build_tiny(family: str, seed: int = 0, **kwargs):
    """The family's tiny random-init model (:mod:`tokenprune.reference.tiny`) and its processor."""
    _check_family(family)
    if family == "llava_next":
        model = tiny.tiny_llava_next(seed=seed, **kwargs)
    elif family == "llava_onevision":
        model = tiny.tiny_llava_onevision(seed=seed, **kwargs)
    elif family == "internvl":
        model = tiny.tiny_internvl(seed=seed, **kwargs)
    elif family == "gemma3":
        model = tiny.tiny_gemma3(seed=seed, **kwargs)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        model = tiny.tiny_qwen2_vl(version="2" if family == "qwen2_vl" else "2.5", seed=seed, **kwargs)
    elif family == "qwen3_vl":
        model = tiny.tiny_qwen3_vl(seed=seed, **kwargs)
    elif family == "qwen3_5":
        model = tiny.tiny_qwen3_5(seed=seed, **kwargs)
    else:
        model = tiny.tiny_mllama(seed=seed, **kwargs)
    return model, build_processor(family, model.config)


def save_tiny(family: str, folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write the family's tiny model (safetensors, config, generation config) and its processor to ``folder``: a
    checkpoint folder the Auto classes load offline (``tokenprune run ... model.path=FOLDER``)."""
    folder = Path(folder)
    model, processor = build_tiny(family, seed=seed, **kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
