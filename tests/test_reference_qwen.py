"""The Qwen2.5-VL-architecture reference model's parts: its processor's geometry, its training batches against the
processor, its per-token labels by hand, and one training step of each phase."""

from __future__ import annotations

import warnings

import pytest
import torch

from tokenprune.reference import qwen, shapes


@pytest.fixture(scope="module")
def processor():
    with warnings.catch_warnings(action="ignore"):  # no torchvision: the images-only processor's warning
        return qwen.build_processor()


def test_a_shapes_image_is_24_by_24_patches_and_144_tokens(processor):
    item = shapes.make_item("q/0", "color", 0)
    enc = processor(images=[item["image"]], text=[qwen.build_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}],
        add_generation_prompt=True, tokenize=False)], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 24, 24]]
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 144
    assert enc["pixel_values"].shape == (576, 3 * 2 * 14 * 14)


def test_the_model_is_qwen2_5_vl_with_windowed_and_full_blocks_and_m_rope():
    model = qwen.build_model()
    cfg = model.config
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert cfg.text_config.num_hidden_layers >= 8
    assert cfg.vision_config.fullatt_block_indexes == [1, 3] and cfg.vision_config.depth == 4
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert sum(p.numel() for p in model.parameters()) * 4 < 25 * 2**20  # weights <= 25 MB in float32


def test_training_batches_match_the_processor(processor):
    """encode() builds the Qwen batch from the processor's image processor and the ChatML turns: the same ids,
    pixels, grids and token types as the processor gives for the first turn; labels only on answer + <|im_end|>."""
    from tokenprune.reference.model import prompt
    from tokenprune.reference.train import FAMILIES, encode

    items = [shapes.make_item(f"enc/{i}", shapes.TYPES[i], 0) for i in range(5)]
    batch = encode(processor, items, family=FAMILIES["qwen2_5_vl"])
    for i, it in enumerate(items):
        enc = processor(images=[it["image"]], text=[prompt(processor, it["question"])], return_tensors="pt")
        n = enc["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, :n], enc["input_ids"][0])
        assert torch.equal(batch["mm_token_type_ids"][i, :n], enc["mm_token_type_ids"][0].to(batch["mm_token_type_ids"].dtype))
        assert torch.allclose(batch["pixel_values"][576 * i:576 * (i + 1)], enc["pixel_values"], atol=1e-5)
        answer = processor.tokenizer(f"{it['answer']}<|im_end|>", add_special_tokens=False)["input_ids"]
        assert answer[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert batch["labels"][i, n:n + len(answer)].tolist() == answer and (batch["labels"][i, :n] == -100).all()
    assert batch["image_grid_thw"].tolist() == [[1, 24, 24]] * 5


def test_patch_targets_on_the_12_by_12_tokens_by_hand():
    from tokenprune.reference.train import patch_targets

    # a red square of 40 px centred at (50, 50): pixels 30..69 on both axes; the 28-px cells 1 (28..55) and
    # 2 (56..83) hold 26 and 14 of its pixels a side, cell 0 none: cells (1,1) 26*26/784 = 0.86, (1,2) and
    # (2,1) 26*14/784 = 0.46, (2,2) 14*14/784 = 0.25 — all four at least a quarter
    item = {"shapes": [{"kind": "square", "color": "red", "cx": 50, "cy": 50, "size": 40}]}
    t = patch_targets([item], grid=12)
    kind = t["aux_kind"].view(12, 12)
    assert torch.nonzero(kind).tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert torch.nonzero(t["aux_center"].view(12, 12)).tolist() == [[50 // 28, 50 // 28]]


def test_one_step_of_each_phase_runs_and_the_tower_tokens_are_the_merged_ones_in_raster_order(processor):
    """The warm-up's tower tokens are the model's own image features (what the LLM's placeholders receive)."""
    from tokenprune.reference.train import FAMILIES, encode

    family = FAMILIES["qwen2_5_vl"]
    model = qwen.build_model(qwen.QwenReferenceSize(vision_layers=2, text_layers=3)).eval()
    items = [shapes.make_item(f"p/{i}", shapes.TYPES[i], 0) for i in range(2)]
    batch = encode(processor, items, family=family)
    with torch.no_grad():
        tokens = family.tower_tokens(model, batch)
        own = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        seen = []
        hook = family.token_module(model).register_forward_hook(lambda m, a, o: seen.append(o))
        loss = model(**{k: v for k, v in batch.items()}).loss
        hook.remove()
    assert tokens.shape == (2, 144, model.config.text_config.hidden_size)
    assert torch.allclose(tokens, torch.stack(list(own)))
    assert torch.allclose(family.tokens_of(seen[0], 2), tokens, atol=1e-6)
    assert torch.isfinite(loss)


def test_the_position_probe_reads_the_centre_tokens_by_hand():
    """Hidden states entering the probe's layer: the image's run of tokens starts at 3 (one row) and 1 (another);
    only the centre cells count, and the probe's sigmoid output is compared with the centre's (x, y)."""
    from tokenprune.reference.train import probe_loss

    image = 9
    input_ids = torch.tensor([[5, 6, 7, image, image, image, image, 8], [5, image, image, image, image, 8, 8, 8]])
    hidden = torch.zeros(2, 8, 4)
    hidden[0, 3 + 2, :2] = torch.tensor([1.0, -1.0])  # row 0, cell 2
    hidden[0, 3 + 0, :2] = 50.0  # not a centre: ignored
    probe = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(2, 4))  # (x, y) = the first two channels, before the sigmoid
    aux = {"aux_center": torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
           "aux_xy": torch.full((2, 4, 2), float("nan"))}
    aux["aux_xy"][0, 2] = torch.tensor([0.25, 0.75])
    aux["aux_xy"][1, 1] = torch.tensor([0.5, 0.5])  # row 1's cell 1 (token 2) holds zeros: sigmoid 0.5, no error
    s = torch.sigmoid(torch.tensor([1.0, -1.0]))
    want = 10 * (((s[0] - 0.25) ** 2 + (s[1] - 0.75) ** 2 + 0.0 + 0.0) / 4)
    with torch.no_grad():
        got = float(probe_loss(probe, hidden, input_ids, image, aux))
    assert got == pytest.approx(float(want))
    # patches="shape": every covered cell asks for its shape's centre; row 0's cell 0 (a huge 50) now counts
    aux["aux_xy"][0, 0] = torch.tensor([0.25, 0.75])
    big = torch.sigmoid(torch.tensor(50.0))
    want = 10 * (((s[0] - 0.25) ** 2 + (s[1] - 0.75) ** 2 + (big - 0.25) ** 2 + (big - 0.75) ** 2) / 6)
    with torch.no_grad():
        assert float(probe_loss(probe, hidden, input_ids, image, aux)) == pytest.approx(float(
            10 * (((s[0] - 0.25) ** 2 + (s[1] - 0.75) ** 2) / 4)))  # centres only: the new cell is no centre
        got = float(probe_loss(probe, hidden, input_ids, image, aux, patches="shape"))
    assert got == pytest.approx(float(want))


def test_batched_windows_give_the_stock_towers_tokens_and_gradients():
    """The training path runs equal windows as one SDPA call: the same tokens and the same gradients as the stock
    tower (one call per window); unequal windows (a 20x28-patch image next to a 24x24 one) take the stock path."""
    model = qwen.build_model(qwen.QwenReferenceSize(vision_layers=2, text_layers=1))
    visual = model.model.visual
    gen = torch.Generator().manual_seed(0)
    for grids in ([[1, 24, 24], [1, 24, 24]], [[1, 24, 24], [1, 20, 28]]):
        thw = torch.tensor(grids)
        pixels = torch.randn(int(thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=gen)
        outs = []
        for batched in (False, True):
            visual.zero_grad()
            with qwen.batched_windows() if batched else torch.enable_grad():
                out = visual(pixels, grid_thw=thw).pooler_output
            out.pow(2).sum().backward()
            outs.append((out.detach(), visual.blocks[0].attn.qkv.weight.grad.clone()))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
        assert torch.allclose(outs[0][1], outs[1][1], atol=1e-4)


def test_reference_qwen_names_the_shipped_folder_or_says_how_to_train_it(tmp_path, monkeypatch):
    from tokenprune.core.errors import ConfigError
    from tokenprune.eval.models import model_path

    monkeypatch.setattr(qwen, "QWEN_DIR", tmp_path)
    with pytest.raises(ConfigError) as e:
        model_path({"path": "reference-qwen"})
    assert e.value.key == "model.path" and "train_reference_qwen.yaml" in str(e.value)
    (tmp_path / "config.json").write_text("{}")
    assert model_path({"path": "reference-qwen"}) == str(tmp_path)
    assert model_path({"path": "some/folder"}) == "some/folder"


def test_qwen_training_runs_resumes_and_exports_a_folder_that_loads_and_generates(tmp_path):
    """The Lightning loop with family: qwen2_5_vl: the tower-only step, then joint steps with the hints, the
    alignment, the position probe and the answer probe; a resume continues the step count; the export loads through the project's
    loader (AutoProcessor, or the images-only class without torchvision) and generates through stock generate()."""
    from transformers import AutoModelForImageTextToText

    from tokenprune.eval.models import load_processor
    from tokenprune.reference.model import prompt
    from tokenprune.reference.train import load_config, train

    micro = ["model.vision_hidden=16", "model.vision_layers=2", "model.vision_heads=2", "model.text_hidden=32",
             "model.text_layers=3", "model.text_heads=2", "model.text_kv_heads=1", "data.batch_size=2",
             "data.num_workers=0", "val.items=3", "val.every=0", "logging.wandb=false", "logging.every=1",
             "checkpoint_every=1", f"output_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}",
             "accelerator=cpu", "vision_warmup_steps=1", "attention_hints.from_step=1", "align.from_step=1",
             "attention_hints.retrieve_layer=1", "position_probe.from_step=1", "position_probe.layer=1",
             "describe.from_step=1", "multi_turn.from_step=1", "answer_probe.weight=1.0", "answer_probe.from_step=1",
             "answer_probe.layer=2"]
    first = train(load_config("experiments/train_reference_qwen.yaml", micro + ["optim.max_steps=2"]))
    assert first["steps"] == 2
    second = train(load_config("experiments/train_reference_qwen.yaml", micro + ["optim.max_steps=3"]))
    assert second["steps"] == 3
    # the resume writes version_1 and keeps the first run's version_0 (steps 0-1; the resume logs step 2)
    before = (tmp_path / "run" / "metrics" / "version_0" / "metrics.csv").read_text()
    metrics = (tmp_path / "run" / "metrics" / "version_1" / "metrics.csv").read_text()
    assert [row.split(",")[1] for row in before.splitlines()[1:]][-1] == "1"
    assert [row.split(",")[1] for row in metrics.splitlines()[1:]] == ["2"]
    for key in ("train/loss", "train/aux_loss", "train/hint_loss", "train/align_loss", "train/probe_loss",
                "train/answer_probe_loss"):
        assert key in metrics
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", local_files_only=True)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with warnings.catch_warnings(action="ignore"):
        proc = load_processor(str(tmp_path / "export"), True)
    it = shapes.make_item("y/0", "exist")
    enc = proc(images=[it["image"]], text=[prompt(proc, it["question"])], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 2


#: The shipped weights' tests (a checkout without ``tokenprune/reference/checkpoint_qwen/`` skips them).
NEEDS_WEIGHTS = pytest.mark.skipif(not (qwen.QWEN_DIR / "config.json").exists(),
                                   reason="tokenprune/reference/checkpoint_qwen/ holds no model")

@NEEDS_WEIGHTS
def test_the_shipped_qwen_model_is_a_stock_qwen2_5_vl_folder_that_loads_offline(monkeypatch):
    """The shipped folder loads with the Auto classes without a hub (the processor through the project's loader:
    without torchvision, the images-only class), <= 25 MB, 144 visual tokens for a shapes image."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    from tokenprune.eval.models import load_processor
    from tokenprune.reference.model import prompt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = qwen.path()
    assert folder == qwen.QWEN_DIR
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert 0 < weights <= 25 * 2**20
    model = AutoModelForImageTextToText.from_pretrained(folder)
    with warnings.catch_warnings(action="ignore"):
        processor = load_processor(str(folder), True)
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    enc = processor(images=[shapes.make_item("x/1", "color")["image"]], text=[prompt(processor, "x")],
                    return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 144


@NEEDS_WEIGHTS
def test_the_shipped_qwen_model_answers_the_first_100_test_items():
    """>= 85% exact match on test[:100] through stock generate() (the full-split numbers are in
    docs/reference_model.md)."""
    from transformers import AutoModelForImageTextToText

    from tokenprune.eval.models import load_processor
    from tokenprune.reference.train import answer_accuracy

    folder = qwen.path()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with warnings.catch_warnings(action="ignore"):
        processor = load_processor(str(folder), True)
    scores = answer_accuracy(model, processor, shapes.load_split("test")[:100], batch_size=25)
    assert scores["overall"] >= 0.85, scores
