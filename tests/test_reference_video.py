"""Fine-tuning the Qwen reference on ``shapes_video`` clips with ``train-reference``: the video vocabulary, the clip
training batches against the inputs ``tokenprune run`` builds, the start from an image model's weights, the config's
refusals, and a run that trains, resumes, exports and answers clips."""

from __future__ import annotations

import itertools
import re
import warnings

import pytest
import torch

from tokenprune.core.errors import ConfigError
from tokenprune.reference import qwen, shapes_video
from tokenprune.reference.qwen import QwenReferenceSize

MICRO = dict(vision_hidden=16, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=3, text_heads=2,
             text_kv_heads=1)


def processor_of(video: bool):
    with warnings.catch_warnings(action="ignore"):  # no torchvision: the images-only processor's warning
        return qwen.build_processor(video)


def test_the_video_vocabulary_covers_the_clips_and_keeps_every_image_words_id():
    image, video = processor_of(False).tokenizer, processor_of(True).tokenizer
    words = set()
    for it in itertools.chain(shapes_video.load_split("val"), shapes_video.load_split("test", size=100)):
        words |= set(re.findall(r"\w+|[^\w\s]", f"{it['question']} {it['answer']}"))
    ids = video.convert_tokens_to_ids(sorted(words))
    assert video.unk_token_id not in ids
    assert image.unk_token_id in image.convert_tokens_to_ids(sorted(words))  # the image vocabulary lacks some
    old = image.get_vocab()
    assert {w: video.get_vocab()[w] for w in old} == old
    assert sorted(video.get_vocab().values()) == list(range(len(video.get_vocab())))


def test_clip_batches_are_the_inputs_tokenprune_run_builds_then_the_answer():
    """The training rows equal the runner's inputs for the clip (the adapter's ``frame_video_inputs``, without its
    left padding) followed by the answer and ``<|im_end|>``, the only labelled tokens; a clip of 8 frames resized to
    336 px is 4 temporal patches of 12 x 12 merged cells (576 placeholders, by hand)."""
    from tokenprune.adapters import get_adapter
    from tokenprune.reference.model import prompt
    from tokenprune.reference.train import encode_clips

    proc = processor_of(True)
    model = qwen.build_model(QwenReferenceSize(**MICRO), video=True)
    items = [shapes_video.make_item(f"t/{i}", t) for i, t in enumerate(("duration", "order"))]
    batch = encode_clips(proc, items)
    ref = get_adapter(model).frame_video_inputs(proc, [prompt(proc, it["question"], video=True) for it in items],
                                                [it["video"] for it in items])
    tok = proc.tokenizer
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    for b, it in enumerate(items):
        mine = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        theirs = ref["input_ids"][b][ref["attention_mask"][b].bool()].tolist()
        answer = tok.convert_tokens_to_ids([it["answer"], "<|im_end|>"])
        assert mine == theirs + answer
        assert mine.count(video_id) == (8 // 2) * (336 // 28) ** 2
        labels = batch["labels"][b]
        assert labels[labels != -100].tolist() == answer
        assert labels[len(theirs):len(mine)].tolist() == answer
    assert torch.equal(batch["pixel_values_videos"], ref["pixel_values_videos"])
    assert batch["video_grid_thw"].tolist() == [[4, 24, 24]] * 2
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == video_id).long() * 2)
    assert torch.equal(batch["second_per_grid_ts"], ref["second_per_grid_ts"])


def test_clip_hints_target_the_named_or_event_shapes_centre_cell_in_every_frame_that_shows_it():
    """Read off the pixels (each colour is one shape in a clip): the event shape of a question that names none is the
    colour whose pixels move (moved) or are missing from the first frame (appeared); each slot's targets are, for
    every frame showing its shape, the token of that frame's temporal patch (frame // 2) whose 224/12-px cell holds
    the centre of the colour's bounding box; the gather targets are the name's words; the row is the answer's."""
    import numpy as np

    from tokenprune.reference.shapes import COLORS
    from tokenprune.reference.train import encode_clips

    proc = processor_of(True)
    tok = proc.tokenizer
    items = [shapes_video.make_item(f"h/{i}", t) for i, t in enumerate(shapes_video.TYPES)]
    batch = encode_clips(proc, items, hints=True)
    masks = [[{c: (np.asarray(f, dtype=np.int32) == np.array(rgb)).all(-1) for c, rgb in COLORS.items()}
              for f in it["video"]] for it in items]
    for b, it in enumerate(items):
        frames = masks[b]
        shown = [{c for c, m in f.items() if m.any()} for f in frames]
        named = re.findall(r"\b(" + "|".join(COLORS) + r") \w+", it["question"])
        if it["type"] == "moved":
            colours = [c for c in shown[0] if not np.array_equal(frames[0][c], frames[-1][c])]
        elif it["type"] == "appeared":
            colours = list(shown[-1] - shown[0])
        else:
            colours = named
        assert len(colours) == (2 if it["type"] == "order" else 1)
        row = int(batch["hint_row"][b, 0])
        assert batch["labels"][b, row + 1] != -100 and (batch["labels"][b, :row + 1] == -100).all()
        ids = batch["input_ids"][b].tolist()
        start = ids.index(tok.convert_tokens_to_ids("<|video_pad|>"))
        for slot in range(2):
            colour = colours[min(slot, len(colours) - 1)]
            want = set()
            for f, frame in enumerate(frames):
                if frame[colour].any():
                    ys, xs = np.nonzero(frame[colour])
                    cx, cy = -(-(xs.min() + xs.max()) // 2), -(-(ys.min() + ys.max()) // 2)  # the centre, rounded up
                    want.add(start + (f // 2) * 144 + (cy * 12 // 224) * 12 + cx * 12 // 224)
            assert set(batch["hint_retrieve"][b, 0, slot].nonzero().flatten().tolist()) == want, (it["type"], slot)
            gathered = tok.convert_ids_to_tokens([ids[i] for i in batch["hint_gather"][b, 0, slot].nonzero().flatten()])
            if named:
                assert gathered[0] == colour and len(gathered) == 2
            else:
                assert gathered == []


def test_a_fine_tune_starts_from_the_image_models_weights_and_new_words_at_their_mean(tmp_path):
    from tokenprune.reference.train import start_weights

    image = qwen.build_model(QwenReferenceSize(**MICRO), seed=1)
    image.save_pretrained(tmp_path)
    video = qwen.build_model(QwenReferenceSize(**MICRO), seed=2, video=True)
    start_weights(video, tmp_path)
    n = len(qwen.qwen_vocabulary())
    grown = len(qwen.qwen_vocabulary(video=True))
    theirs, mine = image.state_dict(), video.state_dict()
    for key, value in theirs.items():
        if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
            assert mine[key].shape == (grown, value.shape[1])
            assert torch.equal(mine[key][:n], value)
            for row in range(n, grown):  # the mean of the image words' rows, summed by hand
                assert torch.allclose(mine[key][row], sum(value[i] for i in range(n)) / n, atol=1e-6)
        else:
            assert torch.equal(mine[key], value), key
    # the same model on an image: every image word's logit as before
    proc = processor_of(False)
    from tokenprune.reference import shapes
    from tokenprune.reference.model import prompt

    it = shapes.make_item("w/0", "exist")
    enc = proc(images=[it["image"]], text=[prompt(proc, it["question"])], return_tensors="pt")
    with torch.no_grad():
        a, b = image(**enc).logits, video(**enc).logits
    assert torch.allclose(a, b[..., :n], atol=1e-5)


def test_a_video_config_refuses_what_it_cannot_train(tmp_path):
    from tokenprune.reference.train import load_config

    yaml = "experiments/train_reference_video.yaml"
    out = f"output_dir={tmp_path / 'run'}"
    with pytest.raises(ConfigError, match=r"^benchmark: shapes_video trains a family whose reference takes videos "
                                          r"\(qwen2_5_vl\); family is 'llava'"):
        load_config(yaml, [out, "family=llava", "init_from=null"])
    with pytest.raises(ConfigError, match=r"^aux_weight: is a shapes image training signal; .* \(got 1.0; allowed: 0\)"):
        load_config(yaml, [out, "aux_weight=1.0"])
    with pytest.raises(ConfigError, match=r"^multi_turn.turns: .* \(got 3; allowed: 1\)"):
        load_config(yaml, [out, "multi_turn.turns=3"])
    with pytest.raises(ConfigError, match=r"^attention_hints.retrieve: on clips .* 'center' \(got 'shape'\)"):
        load_config(yaml, [out, "attention_hints.weight=1.0", "attention_hints.retrieve=shape"])
    with pytest.raises(ConfigError, match=r"^benchmark: 'clips'; allowed: shapes, shapes_video"):
        load_config(yaml, [out, "benchmark=clips"])
    with pytest.raises(ConfigError, match=r"^init_from: '.*nowhere': no model folder there"):
        load_config(yaml, [out, f"init_from={tmp_path / 'nowhere'}"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"^init_from: .*config.json is not JSON"):
        load_config(yaml, [out, f"init_from={tmp_path / 'broken'}"])
    with pytest.raises(ConfigError, match=r"^init_from: 'reference' holds a 'llava' model; family 'qwen2_5_vl' starts "
                                          r"from a 'qwen2_5_vl' one"):
        load_config(yaml, [out, "init_from=reference"])
    qwen.build_model(QwenReferenceSize(**MICRO)).save_pretrained(tmp_path / "micro")
    with pytest.raises(ConfigError, match=r"^model.vision_hidden: init_from '.*micro' is a model of vision_hidden=16; "
                                          r"this config gives 64"):
        load_config(yaml, [out, f"init_from={tmp_path / 'micro'}"])
    # the image recipe keeps its image signals
    assert load_config("experiments/train_reference_qwen.yaml", [out]).aux_weight == 1.0


def test_video_fine_tuning_trains_resumes_exports_and_the_export_answers_clips(tmp_path):
    """From a micro image model (saved, as a run exports one): two steps on clips with the attention hints, a resume to
    three, an export with
    the video vocabulary that the project's loader reads and that answers a clip through stock ``generate()`` with
    the runner's inputs; a resume under another benchmark is refused."""
    from transformers import AutoModelForImageTextToText

    from tokenprune.adapters import get_adapter
    from tokenprune.eval.models import load_processor
    from tokenprune.reference.model import prompt
    from tokenprune.reference.train import load_config, train

    init = tmp_path / "image"
    qwen.build_model(QwenReferenceSize(**MICRO)).save_pretrained(init)
    micro = [f"model.{k}={v}" for k, v in MICRO.items()] + [
        f"init_from={init}", "data.batch_size=2", "data.num_workers=0", "val.items=2", "val.every=0",
        "logging.wandb=false", "logging.every=1", "checkpoint_every=1", f"output_dir={tmp_path / 'run'}",
        f"export_dir={tmp_path / 'export'}", "accelerator=cpu", "attention_hints.weight=1.0",
        "attention_hints.retrieve_layer=1"]
    yaml = "experiments/train_reference_video.yaml"
    assert train(load_config(yaml, micro + ["optim.max_steps=2"]))["steps"] == 2
    result = train(load_config(yaml, micro + ["optim.max_steps=3"]))
    assert result["steps"] == 3 and result["val"]["n"] == 2
    metrics = (tmp_path / "run" / "metrics" / "version_1" / "metrics.csv").read_text()
    assert [row.split(",")[1] for row in metrics.splitlines()[1:]] == ["2"]
    assert "train/hint_loss" in metrics
    with pytest.raises(ConfigError, match="^benchmark: output_dir .* holds a run trained with benchmark='shapes_video'"):
        load_config(yaml, micro + ["benchmark=shapes", "init_from=null"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", local_files_only=True)
    assert model.get_input_embeddings().weight.shape[0] == len(qwen.qwen_vocabulary(video=True))
    with warnings.catch_warnings(action="ignore"):
        proc = load_processor(str(tmp_path / "export"), True)
    it = shapes_video.make_item("z/0", "direction")
    assert proc.tokenizer.unk_token_id not in proc.tokenizer(it["question"])["input_ids"]
    enc = get_adapter(model).frame_video_inputs(proc, [prompt(proc, it["question"], video=True)], [it["video"]])
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 2
