"""`tokenprune run` on the video split (``shapes_video``) with a Qwen2-VL / 2.5-VL / 3-VL / 3.5 or LLaVA-OneVision model's real processor: the
video inputs built from the image processor (no torchvision), each answer checked against stock generate() on the
item alone, its prompt written out by hand."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import tokenprune as tp
from tokenprune.adapters.qwen2_vl import video_pixels
from tokenprune.core.errors import ConfigError
from tokenprune.eval.models import load_processor
from tokenprune.eval.run import run
from tokenprune.eval.run_config import load_run_config
from tokenprune.reference import shapes_video
from tokenprune.reference.processors import save_tiny

QUIET = ["logging.wandb.mode=disabled", "logging.progress_bar=false"]
PROMPT = "<|im_start|>user\n<|vision_start|>{video}<|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"


#: Qwen3-VL and Qwen3.5 date each temporal patch: frames (0, 1), (2, 3), ... of a clip at 2 frames a second are at
#: 0.25, 1.25, ... s, which their processor writes with one decimal (round half to even).
STAMPS = ["<0.2 seconds>", "<1.2 seconds>", "<2.2 seconds>", "<3.2 seconds>"]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def saved(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    folder = save_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=1)
    with warnings.catch_warnings(action="ignore"):
        processor = load_processor(str(folder), True)
    return request.param, folder, AutoModelForImageTextToText.from_pretrained(folder).eval(), processor


def test_a_clip_of_one_frame_twice_is_the_image_and_frames_pair_up_by_temporal_patch(saved):
    """The image processor lays an image out as a temporal patch of the same frame twice: a clip of that frame twice
    is exactly its pixel rows; a clip of frames a, b, c (odd: c repeated) is two temporal patches whose slices are
    the frames' own, in order."""
    _, _, _, processor = saved
    frames = shapes_video.load_split("test", size=1)[0]["video"][:3]
    ip = processor.image_processor
    image = ip(images=[frames[0]], return_tensors="pt")
    pixels, thw = video_pixels(ip, [frames[0], frames[0]])
    assert torch.equal(pixels, image["pixel_values"])
    assert thw.tolist() == [[1, *image["image_grid_thw"][0, 1:].tolist()]]
    pixels, thw = video_pixels(ip, frames)
    cells = int(image["image_grid_thw"][0].prod())
    assert thw[0, 0] == 2 and pixels.shape[0] == 2 * cells
    own = [ip(images=[f], return_tensors="pt")["pixel_values"].view(cells, 3, 2, -1)[:, :, 0] for f in frames]
    got = pixels.view(2, cells, 3, 2, -1)
    for t, (first, second) in enumerate([(0, 1), (2, 2)]):
        assert torch.equal(got[t, :, :, 0], own[first]) and torch.equal(got[t, :, :, 1], own[second])


def hand_inputs(family, processor, item) -> dict:
    """One clip's inputs with its prompt written out by hand: the placeholders of its merged cells (Qwen3-VL, Qwen3.5:
    per temporal patch, after its timestamp)."""
    pixels, thw = video_pixels(processor.image_processor, item["video"])
    n = int(thw.prod()) // processor.image_processor.merge_size ** 2
    if family in ("qwen3_vl", "qwen3_5"):
        t = int(thw[0, 0])
        frames = "".join(f"{stamp}<|vision_start|>{'<|video_pad|>' * (n // t)}<|vision_end|>" for stamp in STAMPS[:t])
        text = PROMPT.replace("<|vision_start|>{video}<|vision_end|>", frames).format(q=item["question"])
    else:
        text = PROMPT.format(video="<|video_pad|>" * n, q=item["question"])
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    video = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels,
           "video_grid_thw": thw, "mm_token_type_ids": (ids == video).long() * 2}
    if family == "qwen2_5_vl":
        enc["second_per_grid_ts"] = torch.tensor([1.0])
    return enc


def by_hand(family, model, processor, item, pipeline=None, new_tokens=3):
    """Stock greedy generate() on one clip alone (``pipeline`` attached), the prompt written out by hand."""
    import contextlib

    enc = hand_inputs(family, processor, item)
    with torch.no_grad(), (pipeline.attach(model) if pipeline is not None else contextlib.nullcontext()):
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_a_clips_inputs_are_the_prompt_written_out_by_hand(saved):
    from tokenprune.adapters import get_adapter
    from tokenprune.reference.model import prompt

    family, _, model, processor = saved
    item = shapes_video.load_split("test", size=1)[0]
    got = get_adapter(model).frame_video_inputs(processor, [prompt(processor, item["question"], video=True)], [item["video"]])
    want = hand_inputs(family, processor, item)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def run_fastvid_on_clips(folder, tmp_path) -> dict:
    """`tokenprune run` with ``fastvid`` on the first 3 clips of the video split, in batches of 2: its rows by id."""
    metrics = run(load_run_config("experiments/asap_shapes.yaml", [
        f"model.path={folder}", "data.source=shapes_video", "data.limit=3", "batch_size=2", "pipeline=fastvid",
        f"output_dir={tmp_path / 'run'}", "baseline_cache=null", *QUIET]))
    assert metrics["n"] == 3
    return {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "predictions.jsonl").read_text().splitlines())}


def test_tokenprune_run_answers_clips_as_stock_generate(saved, tmp_path):
    family, folder, model, processor = saved
    rows = run_fastvid_on_clips(folder, tmp_path)
    pipeline = tp.load_pipeline("fastvid")
    for i, item in enumerate(shapes_video.load_split("test", size=3)):
        row = rows[f"shapes-video-test-{i}"]
        assert row["baseline_prediction"] == by_hand(family, model, processor, item)
        assert row["prediction"] == by_hand(family, model, processor, item, pipeline)
        _, thw = video_pixels(processor.image_processor, item["video"])
        assert thw[0, 0] == 4  # 8 frames: 4 temporal patches, 4 timestamps on Qwen3-VL / Qwen3.5
        assert row["visual_tokens"] == int(thw.prod()) // 4  # the clip's placeholders: what the FLOPs count
        assert row["visual_tokens_kept"][0] < row["visual_tokens"] and row["flops"] < row["baseline_flops"]


def test_a_video_split_on_a_model_without_video_inputs_is_refused_before_it_loads(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="a video split runs on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision models"):
        run(load_run_config("experiments/asap_shapes.yaml", [
            f"model.path={tiny_folder}", "data.source=shapes_video", "data.limit=2",
            f"output_dir={tmp_path / 'run'}", *QUIET]))


# --- LLaVA-OneVision: a frame is the image processor's base tile ----------------------------------------------------
ONEVISION_PROMPT = "<|im_start|>user <video>{video}\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    folder = save_tiny("llava_onevision", tmp_path_factory.mktemp("llava_onevision"), seed=1)
    with warnings.catch_warnings(action="ignore"):
        processor = load_processor(str(folder), True)
    return folder, AutoModelForImageTextToText.from_pretrained(folder).eval(), processor


def frame_by_hand(frame, processor) -> torch.Tensor:
    """(C, s, s): the frame resized to the tower's tile (bicubic, as the video processor resizes), rescaled to [0, 1]
    and normalised with the processor's mean and std, by hand."""
    import numpy as np
    from PIL import Image

    ip = processor.image_processor
    side = ip.size["height"]
    x = np.asarray(frame.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    x = (x - np.array(ip.image_mean, dtype=np.float32)) / np.array(ip.image_std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


def onevision_by_hand(model, processor, item, pipeline=None, new_tokens=3):
    """Stock greedy generate() on one clip alone: frames by hand, the prompt written out with 8 frames x 4 x 4
    pooled tokens and the newline."""
    import contextlib

    pixels = torch.stack([frame_by_hand(f, processor) for f in item["video"]])[None]
    text = ONEVISION_PROMPT.format(video="<video>" * (len(item["video"]) * 16), q=item["question"])
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
    with torch.no_grad(), (pipeline.attach(model) if pipeline is not None else contextlib.nullcontext()):
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_onevision_frames_are_the_frames_resized_to_the_tile(onevision):
    _, model, processor = onevision
    item = shapes_video.load_split("test", size=1)[0]
    from tokenprune.adapters import get_adapter

    enc = get_adapter(model).frame_video_inputs(processor, ["<video>\nq", "<video>\nq"], [item["video"]] * 2)
    assert enc["pixel_values_videos"].shape == (2, 8, 3, 56, 56)
    for f, frame in enumerate(item["video"]):
        assert torch.allclose(enc["pixel_values_videos"][1, f], frame_by_hand(frame, processor), atol=1e-5)
    video = model.config.video_token_id
    assert (enc["input_ids"] == video).sum(1).tolist() == [8 * 16 + 1] * 2


def test_tokenprune_run_answers_onevision_clips_as_stock_generate(onevision, tmp_path):
    folder, model, processor = onevision
    rows = run_fastvid_on_clips(folder, tmp_path)
    pipeline = tp.load_pipeline("fastvid")
    for i, item in enumerate(shapes_video.load_split("test", size=3)):
        row = rows[f"shapes-video-test-{i}"]
        assert row["baseline_prediction"] == onevision_by_hand(model, processor, item)
        assert row["prediction"] == onevision_by_hand(model, processor, item, pipeline)
        assert row["visual_tokens"] == 8 * 16 + 1  # the clip's placeholders: what the FLOPs count
        assert row["visual_tokens_kept"][0] < row["visual_tokens"] and row["flops"] < row["baseline_flops"]
