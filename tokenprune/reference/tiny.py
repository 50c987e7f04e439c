"""Tiny random-init models built from config, for tests and the demo (no hub access needed)."""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.base import left_pad as adapter_left_pad

TINY_IMAGE_TOKEN = 127
TINY_VOCAB = 128
TINY_PAD, TINY_BOS, TINY_EOS = 0, 1, 2
TINY_VIDEO_TOKEN, TINY_VISION_START, TINY_VISION_END = 126, 124, 125
#: first of the tokens standing for Qwen3-VL's per-frame timestamps (``<0.0 seconds>``, ...) in tiny video inputs
TINY_TIMESTAMP = 100


def _for_tests(model: nn.Module) -> nn.Module:
    """Greedy generation pads with ``TINY_PAD`` and never stops early (no EOS); eval mode."""
    model.generation_config.pad_token_id = TINY_PAD
    model.generation_config.eos_token_id = None
    return model.eval()


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, max length) of token rows, left-padded with ``TINY_PAD``."""
    return adapter_left_pad(rows, TINY_PAD)


def tiny_llava(attn_implementation: str = "sdpa", layers: int = 4, image_size: int = 56, patch_size: int = 7,
               seed: int = 0, init_std: float = 0.2, vision_layers: int = 2) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` with a ``vision_layers``-layer CLIP tower ((image_size/patch_size)^2
    visual tokens, 64 by default) and a ``layers``-layer Llama (hidden 64, 4 heads, 2 KV heads: GQA).

    ``init_std`` is larger than usual so that random attention is peaked rather than uniform,
    which makes the choice of tokens (and so pruning) matter.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=1024,
                       pad_token_id=TINY_PAD, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS,
                       initializer_range=init_std)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=TINY_PAD)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return _for_tests(model)


def tiny_llava_inputs(model: nn.Module, prompts: list[list[int]] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch: each prompt is ``[bos, *text, <image> x V, *question]``.

    ``prompts`` gives the question token ids per sample (default: two samples of different
    lengths, so the first is padded).
    """
    cfg = model.config
    num_visual = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    rows = [[TINY_BOS, 5, 6] + [cfg.image_token_id] * num_visual + list(q) for q in prompts]
    input_ids, attention_mask = left_pad(rows)
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(len(rows), 3, size, size, generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def tiny_qwen2_vl(attn_implementation: str = "sdpa", layers: int = 4, version: str = "2", seed: int = 0,
                  init_std: float = 0.2, sliding_window: int | None = None, window_from: int = 0,
                  vision_layers: int = 1) -> nn.Module:
    """A ``Qwen2VLForConditionalGeneration`` (``version="2"``) or ``Qwen2_5_VLForConditionalGeneration``
    (``"2.5"``): a ``vision_layers``-block vision tower (patch 7, 2x2 merge; Qwen2.5-VL: windows of 2x2 merged
    tokens, full attention in block 0 of a 1-block tower, else in the odd blocks) and a ``layers``-layer LLM
    (hidden 64, 4 heads, 2 KV heads, M-RoPE sections [2, 3, 3]); with ``sliding_window``, Qwen2's
    ``use_sliding_window``: layers from ``window_from`` on attend within the window, the ones before it to
    everything."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=1024,
                initializer_range=init_std, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if sliding_window is not None:
        text.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=window_from)
    vision = dict(depth=vision_layers, hidden_size=32, num_heads=2, patch_size=7, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, initializer_range=init_std)
    ids = dict(image_token_id=TINY_IMAGE_TOKEN, video_token_id=TINY_VIDEO_TOKEN,
               vision_start_token_id=TINY_VISION_START, vision_end_token_id=TINY_VISION_END)
    if version == "2":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision.update(hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=28,
                      fullatt_block_indexes=[0] if vision_layers == 1 else list(range(1, vision_layers, 2)))
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version={version!r}; allowed: '2', '2.5'")
    model = cls._from_config(config, attn_implementation=attn_implementation)
    return _for_tests(model)


def _qwen3_tower(depth: int, init_std: float, **extra) -> dict:
    """The tiny Qwen3-VL-style tower's config (Qwen3-VL's and Qwen3.5's): patch 7, 2x2 merge, 2-frame temporal
    patches, learned position embeddings of an 8x8 grid, width 32, output 64."""
    return dict(depth=depth, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=7, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=64,
                initializer_range=init_std, **extra)


def tiny_qwen3_vl(attn_implementation: str = "sdpa", layers: int = 4, seed: int = 0, init_std: float = 0.2,
                  vision_layers: int = 3, deepstack: tuple[int, ...] | None = None, moe: bool = False) -> nn.Module:
    """A ``Qwen3VLForConditionalGeneration``: a ``vision_layers``-block tower (patch 7, 2x2 merge, learned
    position embeddings of an 8x8 grid) whose blocks ``deepstack`` (default: all) feed DeepStack levels, added
    after LLM layers 0, 1, ... in turn; a ``layers``-layer Qwen3 LLM (hidden 64, 4 heads, 2 KV heads, head
    dim 16, q/k norm, interleaved M-RoPE sections [2, 3, 3]). With ``moe``, ``Qwen3VLMoeForConditionalGeneration``:
    each layer's MLP is 4 experts, 2 per token. Inputs: :func:`tiny_qwen2_vl_inputs`.

    The q norm's weights are 3 instead of 1: normalised queries and keys bound the attention logits by the head
    dimension's root, which leaves a random model's attention nearly uniform (as ``init_std`` does elsewhere, this
    makes the choice of tokens matter)."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=TINY_VOCAB, max_position_embeddings=1024,
                initializer_range=init_std, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, pad_token_id=TINY_PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = _qwen3_tower(vision_layers, init_std,
                          deepstack_visual_indexes=list(deepstack if deepstack is not None else range(vision_layers)))
    config_cls, cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    if moe:
        config_cls, cls = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=TINY_IMAGE_TOKEN,
                        video_token_id=TINY_VIDEO_TOKEN, vision_start_token_id=TINY_VISION_START,
                        vision_end_token_id=TINY_VISION_END)
    model = cls._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(3.0)
    return _for_tests(model)


def tiny_qwen3_5(attn_implementation: str = "sdpa", layers: int = 8, seed: int = 0, init_std: float = 0.2,
                 vision_layers: int = 2, moe: bool = False) -> nn.Module:
    """A ``Qwen3_5ForConditionalGeneration``: hybrid decoder layers — three Gated DeltaNet (linear attention)
    layers, then a full-attention one, repeated (layers 3 and 7 of 8 attend) — with a ``vision_layers``-block
    Qwen3-VL tower (patch 7, 2x2 merge, no DeepStack). The LLM has hidden 64; its attention layers 4 heads, 2 KV
    heads, head dim 16, a gated query projection (query and output gate per head), q/k norm, and interleaved M-RoPE
    on half of each head (``partial_rotary_factor`` 0.5, sections [2, 1, 1]); its DeltaNet layers 2 key heads and 4
    value heads of dimension 8 and a 4-wide causal convolution. With ``moe``,
    ``Qwen3_5MoeForConditionalGeneration``: each layer's MLP is 4 routed experts (2 per token) and a shared one.
    Inputs: :func:`tiny_qwen2_vl_inputs`.

    The q norm's weights are 2 instead of 0 (Qwen3.5's norms scale by 1 + weight: x3, as :func:`tiny_qwen3_vl`
    does), so that a random model's attention is not nearly uniform."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    pattern = ["linear_attention"] * 3 + ["full_attention"]
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
                layer_types=[pattern[i % 4] for i in range(layers)], vocab_size=TINY_VOCAB,
                max_position_embeddings=1024, initializer_range=init_std, bos_token_id=TINY_BOS,
                eos_token_id=TINY_EOS, pad_token_id=TINY_PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.5})
    vision = _qwen3_tower(vision_layers, init_std)
    config_cls, cls = Qwen3_5Config, Qwen3_5ForConditionalGeneration
    if moe:
        config_cls, cls = Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=TINY_IMAGE_TOKEN,
                        video_token_id=TINY_VIDEO_TOKEN, vision_start_token_id=TINY_VISION_START,
                        vision_end_token_id=TINY_VISION_END, tie_word_embeddings=False)
    model = cls._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "self_attn"):
                layer.self_attn.q_norm.weight.fill_(2.0)
    return _for_tests(model)


def tiny_qwen2_vl_inputs(model: nn.Module, grids: list[tuple[int, int]] | None = None,
                         prompts: list[list[int]] | None = None, seed: int = 0,
                         videos: list[tuple[int, int, int] | None] | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch with one image per sample, of patch grid ``grids[b]`` = (h, w) (even numbers).

    Sample b is ``[bos, 5, <vision_start>, <image> x (h*w/4), <vision_end>, *prompts[b]]``, with
    ``mm_token_type_ids`` (1 on image tokens) and ``image_grid_thw`` as the processor gives them.
    Different grids give different numbers of visual tokens per sample.

    ``videos[b]`` = (t, h, w): sample b holds a video of t frames (a multiple of the tower's temporal patch, 2)
    instead of its image — ``<video>`` x (t/2 · h·w/4) placeholders, ``pixel_values_videos``, ``video_grid_thw``
    (t/2, h, w) and type 2 in ``mm_token_type_ids``; ``second_per_grid_ts`` (1.0 each) for Qwen2.5-VL. Qwen3-VL and
    Qwen3.5 lay a video out as their processor does: each frame (temporal patch) its own ``<vision_start>``,
    placeholders, ``<vision_end>``, after a timestamp token (``TINY_TIMESTAMP + frame``: the stand-in for
    ``<k.0 seconds>``).
    """
    cfg = model.config
    v = cfg.vision_config
    grids = grids if grids is not None else [(8, 8), (6, 10)]
    videos = videos if videos is not None else [None] * len(grids)
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23]][:len(grids)]
    merge, step = v.spatial_merge_size, v.temporal_patch_size
    rows, image_thw, video_thw = [], [], []
    for (h, w), clip, q in zip(grids, videos, prompts):
        if clip is not None:
            t, h, w = clip
            if t % step:
                raise ValueError(f"a video of {t} frames: frames must be a multiple of the temporal patch {step}")
            thw, token, out = (t // step, h, w), cfg.video_token_id, video_thw
        else:
            thw, token, out = (1, h, w), cfg.image_token_id, image_thw
        if h % merge or w % merge:
            raise ValueError(f"grid {(h, w)} must be divisible by the merge size {merge}")
        out.append(thw)
        per_frame = h * w // merge ** 2
        if clip is not None and cfg.model_type in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
            body = [x for k in range(thw[0])
                    for x in [TINY_TIMESTAMP + k, TINY_VISION_START] + [token] * per_frame + [TINY_VISION_END]]
            rows.append([TINY_BOS, 5] + body + list(q))
            continue
        rows.append([TINY_BOS, 5, TINY_VISION_START] + [token] * (thw[0] * per_frame) + [TINY_VISION_END] + list(q))
    input_ids, attention_mask = left_pad(rows)
    gen = torch.Generator().manual_seed(seed)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": types}
    if image_thw:
        out["pixel_values"] = torch.randn(sum(h * w for _, h, w in image_thw), patch_dim, generator=gen)
        out["image_grid_thw"] = torch.tensor(image_thw)
    if video_thw:
        out["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in video_thw), patch_dim, generator=gen)
        out["video_grid_thw"] = torch.tensor(video_thw)
        if cfg.model_type == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.ones(len(video_thw))
    return out


def tiny_llava_next(attn_implementation: str = "sdpa", layers: int = 4, seed: int = 0, init_std: float = 0.2,
                    sliding_window: int | None = None, vision_layers: int = 2) -> nn.Module:
    """A ``LlavaNextForConditionalGeneration``: a CLIP tower of ``vision_layers`` layers on 56-px tiles of 7-px
    patches (64 tokens a tile), anyres pinpoints 56x112, 112x56 and 112x112, and the same LLM as
    :func:`tiny_llava`; with ``sliding_window`` a Mistral LLM of that shape whose every layer attends within the
    window (as llava-v1.6-mistral's base)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=56, patch_size=7, projection_dim=32)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=2048,
                 pad_token_id=TINY_PAD, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, initializer_range=init_std)
    text = LlamaConfig(**shape) if sliding_window is None else MistralConfig(**shape, sliding_window=sliding_window)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN,
                             image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             pad_token_id=TINY_PAD)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return _for_tests(model)


def tiny_llava_next_inputs(model: nn.Module, image_sizes: list[tuple[int, int]] | None = None,
                           prompts: list[list[int]] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch, one image per sample of (height, width) ``image_sizes[b]``: different
    aspect ratios give different anyres grids and so different numbers of visual tokens (counted
    with the model's own feature packing, as the processor would)."""
    cfg = model.config
    image_sizes = image_sizes if image_sizes is not None else [(100, 60), (60, 100)]
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23]][:len(image_sizes)]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tile = cfg.vision_config.image_size
    tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, tile) for s in image_sizes]
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(image_sizes), max(tiles), 3, tile, tile, generator=gen)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, sizes).pooler_output
    rows = [[TINY_BOS, 5, 6] + [cfg.image_token_id] * f.shape[0] + list(q) for f, q in zip(feats, prompts)]
    input_ids, attention_mask = left_pad(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": sizes}


def _tiny_siglip(layers: int):
    """The tiny SigLIP tower of LLaVA-OneVision and Gemma 3: ``layers`` layers, width 32, 2 heads, 56-px images of
    7-px patches (8 x 8, no CLS token)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                              image_size=56, patch_size=7)


def tiny_llava_onevision(attn_implementation: str = "sdpa", layers: int = 4, seed: int = 0, init_std: float = 0.2,
                         vision_layers: int = 2, aspect: str = "anyres_max_2") -> nn.Module:
    """A ``LlavaOnevisionForConditionalGeneration``: a SigLIP tower of ``vision_layers`` layers on 56-px tiles of
    7-px patches (64 tokens a tile, no CLS; ``vision_feature_select_strategy: full``, the last layer's features, as
    the released checkpoints), anyres pinpoints 56x112, 112x56 and 112x112, ``vision_aspect_ratio`` ``aspect``
    (``anyres_max_2``: a 2x2-tile grid is resized to about two tiles' worth of tokens, as ``anyres_max_9`` resizes
    a 6x6 grid) and a Qwen2 LLM of :func:`tiny_llava`'s shape."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    vision = _tiny_siglip(vision_layers)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=2048,
                       pad_token_id=TINY_PAD, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, initializer_range=init_std)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=TINY_IMAGE_TOKEN,
                                  video_token_index=TINY_VIDEO_TOKEN,
                                  image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio=aspect, pad_token_id=TINY_PAD)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return _for_tests(model)


def tiny_llava_onevision_inputs(model: nn.Module, image_sizes: list[tuple[int, int]] | None = None,
                                prompts: list[list[int]] | None = None, seed: int = 0,
                                videos: list[int] | None = None) -> dict[str, torch.Tensor]:
    """As :func:`tiny_llava_next_inputs`, on LLaVA-OneVision; the default sizes give one 2x1 grid kept as it is
    and one 2x2 grid the model resizes (``anyres_max_2``). ``videos``: per sample, the frames of a clip placed after
    its image (0: none; the model takes one frame count for all clips of a batch), each frame 4x4 pooled tokens and
    the clip closed by a newline token, as the model packs them; ``image_sizes=[]`` with ``videos``: clips only."""
    if not videos:
        return tiny_llava_next_inputs(model, image_sizes if image_sizes is not None else [(100, 60), (100, 100)],
                                      prompts, seed)
    cfg = model.config
    frames = {f for f in videos if f}
    if len(frames) != 1:
        raise ValueError(f"videos={videos}: the clips of a batch share one frame count")
    count = frames.pop()
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23]][:len(videos)]
    out = tiny_llava_next_inputs(model, image_sizes, prompts, seed) if image_sizes != [] else None
    side = cfg.vision_config.image_size
    per_frame = (-(-(side // cfg.vision_config.patch_size) // 2)) ** 2
    gen = torch.Generator().manual_seed(seed + 1)
    clips = torch.randn(sum(1 for f in videos if f), count, 3, side, side, generator=gen)
    rows = []
    for b, (f, q) in enumerate(zip(videos, prompts)):
        image = []
        if out is not None:
            ids = out["input_ids"][b][out["attention_mask"][b].bool()].tolist()
            image = [t for t in ids if t == cfg.image_token_id]
        clip = [30] + [cfg.video_token_id] * (f * per_frame + 1) if f else []
        rows.append([TINY_BOS, 5, 6] + image + clip + list(q))
    input_ids, attention_mask = left_pad(rows)
    result = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values_videos": clips}
    if out is not None:
        result.update(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"])
    return result


def tiny_internvl(attn_implementation: str = "sdpa", layers: int = 4, seed: int = 0, init_std: float = 0.2,
                  vision_layers: int = 2) -> nn.Module:
    """An ``InternVLForConditionalGeneration``: an InternViT of ``vision_layers`` layers (CLS token, q/k norm) on
    56-px tiles of 7-px patches, pixel-shuffled 2x2 into 16 visual tokens a tile (``downsample_ratio`` 0.5, as
    the released checkpoints), and a Qwen2 LLM of :func:`tiny_llava`'s shape; ``<IMG_CONTEXT>`` is
    ``TINY_IMAGE_TOKEN``."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                  num_attention_heads=2, image_size=[56, 56], patch_size=[7, 7], use_qk_norm=True,
                                  initializer_range=init_std, layer_scale_init_value=1.0)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=2048,
                       pad_token_id=TINY_PAD, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, initializer_range=init_std)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN,
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                            pad_token_id=TINY_PAD)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return _for_tests(model)


def tiny_internvl_inputs(model: nn.Module, tiles: list[int] | None = None, prompts: list[list[int]] | None = None,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch, one image per sample of ``tiles[b]`` tiles (default 3, as two crops and a thumbnail,
    and 1): sample b is ``[bos, 5, <img>, <IMG_CONTEXT> x 16 * tiles[b], </img>, *prompts[b]]`` (``<img>`` and
    ``</img>`` are ``TINY_VISION_START`` and ``TINY_VISION_END``), ``pixel_values`` the tiles of every image in
    order, as InternVL's processor lays them out."""
    cfg = model.config
    v = cfg.vision_config
    tiles = tiles if tiles is not None else [3, 1]
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23]][:len(tiles)]
    per_tile = int((v.image_size[0] // v.patch_size[0]) ** 2 * cfg.downsample_ratio ** 2)
    rows = [[TINY_BOS, 5, TINY_VISION_START] + [cfg.image_token_id] * (per_tile * t) + [TINY_VISION_END] + list(q)
            for t, q in zip(tiles, prompts)]
    input_ids, attention_mask = left_pad(rows)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(sum(tiles), 3, v.image_size[0], v.image_size[1], generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def tiny_gemma3(attn_implementation: str = "sdpa", layers: int = 4, seed: int = 0, init_std: float = 0.2,
                vision_layers: int = 2, sliding_window: int = 12) -> nn.Module:
    """A ``Gemma3ForConditionalGeneration``: a SigLIP tower of ``vision_layers`` layers on 56-px images of 7-px
    patches (8 x 8), average-pooled 2 x 2 to 16 tokens an image, and a Gemma 3 LLM (hidden 64, 4 heads, 2 KV
    heads, head dim 16, q/k norm) whose layers alternate sliding-window (``sliding_window`` tokens, shorter than
    the prompts) and global attention, with different rotary bases. ``<start_of_image>`` / ``<end_of_image>`` are
    ``TINY_VISION_START`` / ``TINY_VISION_END``. The q norm's weights are 3, as in :func:`tiny_qwen3_vl`; the LM head
    is not tied to the embeddings (tied, Gemma's sqrt(hidden)-scaled embeddings make a random model repeat its last
    input token whatever the image)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
    )

    torch.manual_seed(seed)
    vision = _tiny_siglip(vision_layers)
    text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=TINY_VOCAB,
                            max_position_embeddings=2048, sliding_window=sliding_window,
                            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                            pad_token_id=TINY_PAD, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS,
                            initializer_range=init_std)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                          image_token_index=TINY_IMAGE_TOKEN, boi_token_index=TINY_VISION_START,
                          eoi_token_index=TINY_VISION_END, pad_token_id=TINY_PAD, tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(3.0)
    return _for_tests(model)


def tiny_gemma3_inputs(model: nn.Module, images: list[int] | None = None, prompts: list[list[int]] | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch, ``images[b]`` images in sample b (default 1 and 2), each ``<start_of_image>, <image> x
    16, <end_of_image>`` followed by a word (6): ``[bos, 5, *images, *prompts[b]]``, with ``token_type_ids`` 1 on
    the image tokens (as Gemma 3's processor gives them); ``pixel_values`` every image in order."""
    cfg = model.config
    images = images if images is not None else [1, 2]
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23]][:len(images)]
    one = [TINY_VISION_START] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [TINY_VISION_END, 6]
    rows = [[TINY_BOS, 5] + one * n + list(q) for n, q in zip(images, prompts)]
    input_ids, attention_mask = left_pad(rows)
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.randn(sum(images), 3, size, size, generator=gen),
            "token_type_ids": (input_ids == cfg.image_token_id).long()}


def tiny_mllama(attn_implementation: str = "sdpa", seed: int = 0, init_std: float = 0.2, gate: float = 1.0) -> nn.Module:
    """A ``MllamaForConditionalGeneration``: a 2-layer vision tower on 28-px tiles of 7-px patches
    (16 patches + CLS = 17 features a tile, up to 4 tiles) and a 5-layer LLM whose layers 1 and 3
    are cross-attention layers.

    A random Mllama starts with its cross-attention gates at 0 (images ignored); they are set to
    ``gate`` so that the image features matter.
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
                  vision_output_dim=96, image_size=28, patch_size=7, max_num_tiles=4,
                  intermediate_layers_indices=[0, 1])
    text = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1, 3], bos_token_id=TINY_BOS,
                eos_token_id=TINY_EOS, pad_token_id=TINY_PAD, initializer_range=init_std, max_position_embeddings=512)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=TINY_IMAGE_TOKEN)
    model = MllamaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(gate)
                layer.cross_attn_mlp_gate.fill_(gate)
    return _for_tests(model)


def tiny_mllama_inputs(model: nn.Module, tiles: list[int] | None = None, prompts: list[list[int]] | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch, one image per sample with ``tiles[b]`` tiles (aspect ratios 1x``tiles[b]``).

    Sample b is ``[bos, 5, <|image|>, *prompts[b]]``; ``cross_attention_mask`` opens the image's real
    tiles to the tokens from the image token on, as the processor does.
    """
    cfg = model.config.vision_config
    tiles = tiles if tiles is not None else [4, 2]
    prompts = prompts if prompts is not None else [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23]][:len(tiles)]
    rows = [[TINY_BOS, 5, TINY_IMAGE_TOKEN] + list(q) for q in prompts]
    input_ids, attention_mask = left_pad(rows)
    b, width = input_ids.shape
    cross = torch.zeros((b, width, 1, cfg.max_num_tiles), dtype=torch.long)
    for i, r in enumerate(rows):
        cross[i, width - len(r) + 2:, 0, :tiles[i]] = 1  # from the image token on
    ratios = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    gen = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.randn(b, 1, cfg.max_num_tiles, 3, size, size, generator=gen),
            "aspect_ratio_ids": torch.tensor([[ratios.index([1, t]) + 1] for t in tiles]),
            "aspect_ratio_mask": torch.tensor([[[1] * t + [0] * (cfg.max_num_tiles - t)] for t in tiles]),
            "cross_attention_mask": cross}
