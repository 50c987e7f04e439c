"""Video inputs for Qwen2-VL and Qwen2.5-VL built with the family's image processor, so that a video split runs where
transformers' video processors cannot (they need torchvision).

Each frame goes through the image processor (its resize, rescale and normalisation) as an image would; the image
processor lays an image out as a temporal patch of the same frame twice, so a video's temporal patch ``t`` is the
image rows of frame ``2t`` with their second temporal slice taken from frame ``2t + 1`` — the layout of
``pixel_values_videos`` (temporal patch, then merged cell, then its patches), with ``video_grid_thw`` (frames / 2,
rows, cols). A clip of an odd number of frames repeats its last one, as the video processors pad. Each temporal patch
stands for ``second_per_grid`` seconds (Qwen2.5-VL's time scaling of temporal positions); shapes' clips have no
frame rate, so one second a temporal patch unless the item says otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.core.errors import ConfigError

#: the families whose video inputs this module builds (Qwen3-VL and Qwen3.5 lay a clip out frame by frame, after
#: timestamps their video processor writes; LLaVA-OneVision pools frames in its own processor)
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def check_video_family(model_type: str, key: str = "data.source") -> None:
    """Refuse a video split for a model this module cannot build video inputs for."""
    if model_type not in VIDEO_FAMILIES:
        raise ConfigError(key, f"a video split runs on Qwen2-VL and Qwen2.5-VL models (their video inputs are built "
                               f"from the image processor); this model is {model_type!r}")


def video_pixels(image_processor, frames: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values_videos (T/2 x rows x cols, C x 2 x p x p), video_grid_thw (1, 3))`` of one clip."""
    tp = image_processor.temporal_patch_size
    if tp != 2:
        raise ValueError(f"a temporal patch of {tp} frames; the layout here is for 2")
    frames = list(frames) + ([frames[-1]] if len(frames) % 2 else [])
    out = [image_processor(images=[f], return_tensors="pt") for f in frames]
    grids = {tuple(o["image_grid_thw"][0].tolist()) for o in out}
    if len(grids) != 1:
        raise ValueError(f"the clip's frames have different grids {sorted(grids)}; a clip's frames share one size")
    _, rows, cols = grids.pop()
    channels = len(image_processor.image_mean)
    patches = []
    for first, second in zip(out[0::2], out[1::2]):
        a = first["pixel_values"].view(-1, channels, tp, first["pixel_values"].shape[1] // (channels * tp))
        b = second["pixel_values"].view(a.shape)
        patches.append(torch.stack([a[:, :, 0], b[:, :, 0]], dim=2).flatten(1))  # (cells, C, tp, p*p)
    return torch.cat(patches), torch.tensor([[len(frames) // tp, rows, cols]])


def video_prompt(processor, question: str) -> str:
    """The chat template around one video (before the text) and ``question``, ending where the answer starts."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


def encode_videos(processor, model_config, prompts: list[str], clips: list[list], second_per_grid: float = 1.0
                  ) -> dict[str, Any]:
    """The model's inputs for ``prompts`` (each with one video placeholder, :func:`video_prompt`) and their
    ``clips`` (lists of PIL frames), left-padded: each placeholder expanded to the clip's merged cells, as the
    processor's own video path does."""
    tok = processor.tokenizer
    merge = processor.image_processor.merge_size
    video_token = tok.convert_tokens_to_ids("<|video_pad|>")
    pixels, grids, rows = [], [], []
    for prompt, clip in zip(prompts, clips):
        pv, thw = video_pixels(processor.image_processor, clip)
        pixels.append(pv)
        grids.append(thw)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if ids.count(video_token) != 1:
            raise ValueError(f"a video prompt holds one <|video_pad|>, this one {ids.count(video_token)}")
        at = ids.index(video_token)
        rows.append(ids[:at] + [video_token] * (int(thw.prod()) // merge ** 2) + ids[at + 1:])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    enc = {"input_ids": input_ids, "attention_mask": mask, "pixel_values_videos": torch.cat(pixels),
           "video_grid_thw": torch.cat(grids), "mm_token_type_ids": (input_ids == video_token).long() * 2}
    if model_config.model_type == "qwen2_5_vl":
        enc["second_per_grid_ts"] = torch.full((len(rows),), float(second_per_grid))
    return enc
