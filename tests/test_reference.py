"""The reference model's tokenizer/processor, and its Lightning training: runs, checkpoints, resumes, exports a
folder the Auto classes load offline."""

import itertools

import pytest
import torch

from tokenprune.core.errors import ConfigError
from tokenprune.reference import model as reference
from tokenprune.reference import shapes


def test_tokenizer_covers_the_benchmark_without_unknown_words():
    tok = reference.build_tokenizer()
    unk = tok.unk_token_id
    for it in itertools.islice(shapes.load_split("train", seed=5), 200):
        ids = tok(f"{it['question']} ASSISTANT: {it['answer']} </s>")["input_ids"]
        assert unk not in ids, it["question"]
    assert tok.convert_tokens_to_ids("<image>") == reference.vocabulary().index("<image>")


def test_processor_expands_the_image_to_576_tokens_in_the_chat_template():
    proc = reference.build_processor()
    it = shapes.make_item("x/1", "color")
    text = reference.prompt(proc, it["question"])
    assert text == f"USER: <image> {it['question']} ASSISTANT:"
    enc = proc(images=it["image"], text=text, return_tensors="pt")
    image_id = reference.vocabulary().index("<image>")
    assert int((enc["input_ids"] == image_id).sum()) == 576
    assert tuple(enc["pixel_values"].shape) == (1, 3, 336, 336)


def test_training_runs_resumes_and_exports_a_loadable_folder(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokenprune.reference.train import load_config, train

    micro = ["model.vision_hidden=16", "model.vision_layers=1", "model.vision_heads=2", "model.text_hidden=32",
             "model.text_layers=2", "model.text_heads=2", "model.text_kv_heads=1", "data.batch_size=2",
             "data.num_workers=0", "val.items=3", "val.every=0", "logging.wandb=false", "logging.every=1", "checkpoint_every=1",
             f"output_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}", "accelerator=cpu",
             "vision_warmup_steps=1", "attention_hints.from_step=1", "attention_hints.retrieve_layer=1"]  # step 0 trains the tower alone, then both
    first = train(load_config("experiments/train_reference.yaml", micro + ["optim.max_steps=2"]))
    assert first["steps"] == 2 and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    second = train(load_config("experiments/train_reference.yaml", micro + ["optim.max_steps=3"]))
    assert second["steps"] == 3  # continued from step 2, not from scratch
    # resuming under another recipe is refused before anything loads, naming the key (its steps may change)
    with pytest.raises(ConfigError, match=r"aux_weight: output_dir .*run holds a run trained with aux_weight=1.0 .* "
                                          r"this config gives 0.5"):
        load_config("experiments/train_reference.yaml", micro + ["optim.max_steps=4", "aux_weight=0.5"])
    with pytest.raises(ConfigError, match=r"model.text_layers: .* trained with model.text_layers=2 .* gives 3"):
        load_config("experiments/train_reference.yaml", micro + ["model.text_layers=3"])
    load_config("experiments/train_reference.yaml", micro + ["optim.max_steps=9", "val.items=5"])
    # the resume writes version_1 and keeps the first run's version_0 (steps 0-1; the resume logs step 2)
    before = (tmp_path / "run" / "metrics" / "version_0" / "metrics.csv").read_text()
    metrics = (tmp_path / "run" / "metrics" / "version_1" / "metrics.csv").read_text()
    assert [row.split(",")[1] for row in before.splitlines()[1:]][-1] == "1"
    assert [row.split(",")[1] for row in metrics.splitlines()[1:]] == ["2"]
    assert "train/loss" in metrics and "train/aux_loss" in metrics and "train/hint_loss" in metrics
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", local_files_only=True)
    proc = AutoProcessor.from_pretrained(tmp_path / "export", local_files_only=True)
    it = shapes.make_item("y/0", "exist")
    enc = proc(images=it["image"], text=reference.prompt(proc, it["question"]), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 2


def test_a_bad_training_key_is_named():
    import pytest

    from tokenprune.reference.train import load_config

    with pytest.raises(ConfigError, match="optim.max_steps: must be a positive integer, got 0"):
        load_config("experiments/train_reference.yaml", ["optim.max_steps=0"])
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config("experiments/train_reference.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="vision_warmup_steps: trains on the auxiliary patch loss only"):
        load_config("experiments/train_reference.yaml", ["aux_weight=0"])
    with pytest.raises(ConfigError, match=r"attention_hints.retrieve_layer: must be a layer of the LLM, 0..3; got 4"):
        load_config("experiments/train_reference.yaml", ["attention_hints.retrieve_layer=4"])
    with pytest.raises(ConfigError, match="attention_hints.retrieve_layer: must come after gather_layer=2"):
        load_config("experiments/train_reference.yaml", ["attention_hints.gather_layer=2"])
    with pytest.raises(ConfigError, match=r"attention_hints.heads: must be 1..4 \(model.text_heads\); got 5"):
        load_config("experiments/train_reference.yaml", ["attention_hints.heads=5"])
    with pytest.raises(ConfigError, match=r"attention_hints.absent: .sink.; allowed: none, first_token"):
        load_config("experiments/train_reference.yaml", ["attention_hints.absent=sink"])
    with pytest.raises(ConfigError, match=r"attention_hints.gather: .words.; allowed: mass, split"):
        load_config("experiments/train_reference.yaml", ["attention_hints.gather=words"])


def test_path_names_the_training_command_when_the_model_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "REFERENCE_DIR", tmp_path / "reference_model")
    with pytest.raises(FileNotFoundError, match="tokenprune train-reference experiments/train_reference.yaml"):
        reference.path()


def test_the_shipped_model_is_a_stock_llava_folder_that_loads_offline(monkeypatch):
    """The issue's contract: LLaVA-1.5 geometry, loadable with the Auto classes without a hub, <= 25 MB."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = reference.path()
    assert folder == reference.REFERENCE_DIR
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert 0 < weights <= 25 * 2**20
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is LlavaForConditionalGeneration
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)  # 24 x 24 = 576 visual tokens
    assert model.config.text_config.model_type == "llama"
    enc = processor(images=shapes.make_item("x/1", "color")["image"], text="USER: <image> x ASSISTANT:",
                    return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 576


def test_the_shipped_model_answers_the_first_100_test_items():
    """>= 85% exact match on test[:100] through stock generate() (the full-split numbers are in
    docs/reference_model.md)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokenprune.reference.train import answer_accuracy

    folder = reference.path()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    scores = answer_accuracy(model, processor, shapes.load_split("test")[:100], batch_size=25)
    assert scores["overall"] >= 0.85, scores


def test_size_curriculum_draws_larger_shapes_early_then_the_benchmarks():
    import pytest

    from tokenprune.reference.train import ShapesStream

    stream = ShapesStream(None, 0, 2, curriculum=[{"until": 3, "sizes": [110, 150]}, {"until": 5, "sizes": [60, 90]}])
    assert [stream.sizes_at(b) for b in (0, 2, 3, 4, 5, 99)] == [(110, 150)] * 2 + [(60, 90)] * 2 + [(20, 60)] * 2
    big = shapes.make_item("c/0", "color", 0, (110, 150))
    assert all(110 <= s["size"] <= 150 for s in big["shapes"])
    with pytest.raises(ValueError, match=r"sizes=\(10, 200\): need 4 <= min <= max <= 168"):
        shapes.make_item("c/0", "color", 0, (10, 200))


def test_training_batches_match_the_processor():
    """encode() builds pixels and ids without the processor's PIL path; they must be what it gives."""
    import torch

    from tokenprune.reference.train import encode

    proc = reference.build_processor()
    items = [shapes.make_item(f"enc/{i}", shapes.TYPES[i], 0) for i in range(5)]
    batch = encode(proc, items)
    for i, it in enumerate(items):
        enc = proc(images=it["image"], text=reference.prompt(proc, it["question"]), return_tensors="pt")
        n = enc["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, :n], enc["input_ids"][0])
        assert torch.allclose(batch["pixel_values"][i], enc["pixel_values"][0], atol=1e-5)
        answer = proc.tokenizer(f" {it['answer']} </s>", add_special_tokens=False)["input_ids"]
        assert batch["labels"][i, n:n + len(answer)].tolist() == answer and (batch["labels"][i, :n] == -100).all()


def test_patch_targets_by_hand():
    import torch

    from tokenprune.reference.train import patch_targets

    # a red square, 28 px, centred at (24, 24): pixels 10..37 on both axes; per axis the 14-px patches
    # 0, 1, 2 hold 4, 14 and 10 of its pixels, so a patch's share is the product of (4, 14, 10) / 14.
    item = {"shapes": [{"kind": "square", "color": "red", "cx": 24, "cy": 24, "size": 28}]}
    t = patch_targets([item])
    on = {(r, c) for r in range(3) for c in range(3) if (4, 14, 10)[r] * (4, 14, 10)[c] / 196 >= 0.25}
    assert on == {(0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    kind = t["aux_kind"].view(24, 24)
    assert {tuple(p) for p in torch.nonzero(kind).tolist()} == on
    assert (kind[kind > 0] == shapes.KINDS.index("square") + 1).all()
    assert (t["aux_color"].view(24, 24)[kind > 0] == list(shapes.COLORS).index("red") + 1).all()
    assert torch.nonzero(t["aux_center"].view(24, 24)).tolist() == [[1, 1]]
    assert torch.allclose(t["aux_xy"].view(24, 24, 2)[1, 2], torch.tensor([24 / 336, 24 / 336]))
    assert t["aux_xy"].view(24, 24, 2)[0, 0].isnan().all()
    # a 6-px circle covers under a quarter of any patch; it still marks the patch it covers most
    tiny = {"shapes": [{"kind": "circle", "color": "blue", "cx": 100, "cy": 100, "size": 6}]}
    assert torch.nonzero(patch_targets([tiny])["aux_kind"].view(24, 24)).tolist() == [[7, 7]]


def test_vision_positions_start_as_2d_sine_cosine_codes():
    """Row-major: two patches in the same row share the row half of their code, and vice versa."""
    import torch

    model = reference.build_model()
    pos = model.model.vision_tower.embeddings.position_embedding.weight[1:].view(24, 24, -1)
    half = pos.shape[-1] // 2
    assert torch.allclose(pos[3, 5, :half], pos[3, 17, :half]) and not torch.allclose(pos[3, 5, half:], pos[3, 17, half:])
    assert torch.allclose(pos[3, 5, half:], pos[20, 5, half:]) and not torch.allclose(pos[3, 5, :half], pos[20, 5, :half])
    assert torch.allclose(pos[0, 0, :half], torch.tensor([0.0] * (half // 2) + [1.0] * (half // 2)))  # sin 0, cos 0


def test_describe_lists_every_shape_in_reading_order():
    from tokenprune.reference.train import ShapesStream, describe

    item = {"image": None, "question": "q", "answer": "a", "type": "color", "shapes": [
        {"kind": "square", "color": "red", "cx": 300, "cy": 200, "size": 30},
        {"kind": "circle", "color": "blue", "cx": 40, "cy": 30, "size": 20},
        {"kind": "cross", "color": "white", "cx": 20, "cy": 250, "size": 40}]}
    d = describe(item)
    assert d["question"] == "What is there ?" and d["type"] == "describe"
    assert d["answer"] == "blue circle top left , red square bottom right , white cross bottom left ."
    stream = ShapesStream(reference.build_processor(), 0, 4, start=1, describe={"share": 0.25, "from_step": 1})
    batch = next(iter(stream))  # batch 1: samples 4..7, every 4th (sample 4) described
    tok = reference.build_processor().tokenizer
    prompts = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert ["What is there ?" in p for p in prompts] == [True, False, False, False]


def test_more_turns_ask_other_types_about_the_same_scene_with_right_answers():
    import re

    from tokenprune.reference.train import encode, more_turns

    item = shapes.make_item("turns/0", "color", 0)
    scene = item["shapes"]
    got = more_turns(item, 5, "turns/0/more")["more"]
    assert 1 <= len(got) <= 4
    for q, a in got:  # each answer recomputed from the scene by hand
        if m := re.match(r"How many (\w+)s are there\?", q):
            assert a == str(sum(s["kind"] == m[1] for s in scene))
        elif m := re.match(r"Is there a (\w+) (\w+)\?", q):
            assert a == ("yes" if any((s["color"], s["kind"]) == (m[1], m[2]) for s in scene) else "no")
        elif m := re.match(r"Is the (\w+) (\w+) on the left or the right\?", q):
            s = next(s for s in scene if (s["color"], s["kind"]) == (m[1], m[2]))
            assert a == ("left" if s["cx"] < 168 else "right")
        elif m := re.match(r"Is the (\w+) (\w+) at the top or the bottom\?", q):
            s = next(s for s in scene if (s["color"], s["kind"]) == (m[1], m[2]))
            assert a == ("top" if s["cy"] < 168 else "bottom")
        elif m := re.match(r"Is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?", q):
            s = next(s for s in scene if (s["color"], s["kind"]) == (m[1], m[2]))
            o = next(s for s in scene if (s["color"], s["kind"]) == (m[4], m[5]))
            expected = ("left" if s["cx"] < o["cx"] else "right") if m[3].startswith("left") else \
                ("above" if s["cy"] < o["cy"] else "below")
            assert a == expected
        else:
            raise AssertionError(f"unexpected question {q!r}")
    # every turn's answer and </s> are supervised, nothing else
    batch = encode(reference.build_processor(), [{**item, "more": got}])
    tok = reference.build_processor().tokenizer
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tok.convert_ids_to_tokens(labels) == [w for _, a in [("", item["answer"])] + got for w in (a, "</s>")]


def test_more_turns_go_round_the_types_without_repeating_a_question():
    from tokenprune.reference.train import more_turns

    item = shapes.make_item("turns/1", "exist", 0)
    got = more_turns(item, 10, "turns/1/more")["more"]
    assert 5 <= len(got) <= 9
    questions = [q for q, _ in got]
    assert len(set(questions)) == len(questions) and item["question"] not in questions
    # the first round asks each other type once, in the benchmark's order, before any type comes twice
    first = [next(t for t, p in (("color", "What color"), ("count", "How many"), ("exist", "Is there"),
                                 ("position", "on the left or|at the top"), ("relation", "left or right of|above or"))
                  if any(x in q for x in p.split("|"))) for q in questions[:4]]
    assert first == [t for t in shapes.TYPES if t != "exist"][:4]


def test_align_loss_on_centre_patches_ignores_the_rest_of_the_shape():
    """patches=center: 1 - cos against E[colour] + E[kind] on the centre patches only (hand-built tokens)."""
    from tokenprune.reference.model import vocabulary
    from tokenprune.reference.train import align_loss

    vocab = vocabulary()
    emb = torch.randn(len(vocab), 8)
    kind = torch.zeros(1, 576, dtype=torch.long)
    color, center = torch.zeros_like(kind), torch.zeros(1, 576)
    kind[0, 10:13], color[0, 10:13], center[0, 11] = 2, 3, 1.0  # one shape on patches 10-12, centre 11
    target = emb[vocab.index(list(shapes.COLORS)[2])] + emb[vocab.index(list(shapes.KINDS)[1])]
    tokens = torch.randn(1, 576, 8)
    tokens[0, 11] = 2.5 * target  # the centre matches (cosine 1); patches 10 and 12 are noise
    batch = {"aux_kind": kind, "aux_color": color, "aux_center": center}
    assert float(align_loss(tokens, batch, emb, "center")) == pytest.approx(0.0, abs=1e-6)
    noisy = 1 - torch.nn.functional.cosine_similarity(tokens[0, 10:13], target[None], dim=-1)
    assert float(align_loss(tokens, batch, emb, "shape")) == pytest.approx(float(noisy.mean()), rel=1e-5)


def test_named_shapes_reads_colour_and_kind_words_by_hand():
    from tokenprune.reference.train import named_shapes

    scene = [{"kind": "circle", "color": "red"}, {"kind": "circle", "color": "blue"}, {"kind": "square", "color": "red"}]
    pick = lambda q: [[(d["color"], d["kind"]) for d in m] for m in named_shapes(q, scene)]  # noqa: E731
    assert pick("What color is the square?") == [[("red", "square")]]
    assert pick("How many circles are there?") == [[("red", "circle"), ("blue", "circle")]]
    assert pick("Is there a blue circle?") == [[("blue", "circle")]]
    assert pick("Is there a blue square?") == [[]]  # absent: nothing in the image matches
    assert pick("Is the red square left or right of the blue circle?") == [[("red", "square")], [("blue", "circle")]]
    assert pick("Is the red circle above or below the circle?") == [[("red", "circle")],
                                                                     [("red", "circle"), ("blue", "circle")]]


def _hinted_batch(n_turns=4, absent="none", retrieve="shape"):
    from tokenprune.reference.train import describe, encode, more_turns

    proc = reference.build_processor()
    items = [more_turns(shapes.make_item(f"hint/{i}", shapes.TYPES[i % 5], i), n_turns, f"hint/{i}/more")
             for i in range(5)]
    items[4] = describe(items[4])
    return proc, items, encode(proc, items, hints=True, absent=absent, retrieve=retrieve)


def _words_of_each_name(question: str) -> list[list[str]]:
    """By hand: the question's (colour) kind phrases, in order ("the red circle", "circles")."""
    words, names = question.replace("?", " ").split(), []
    for i, w in enumerate(words):
        if w in shapes.KINDS or w[:-1] in shapes.KINDS:
            names.append([words[i - 1], w] if words[i - 1] in shapes.COLORS else [w])
    return names


def _patches_by_hand(scene: list[dict], words: list[str]) -> torch.Tensor:
    kind = words[-1] if words[-1] in shapes.KINDS else words[-1][:-1]
    color = words[0] if len(words) == 2 else None
    out = torch.zeros(576, dtype=torch.bool)
    for d in scene:
        if d["kind"] == kind and color in (None, d["color"]):
            left, top = d["cx"] - d["size"] // 2, d["cy"] - d["size"] // 2  # the bounding box's pixels and patches
            x0, y0, x1, y1 = left // 14, top // 14, (left + d["size"] - 1) // 14, (top + d["size"] - 1) // 14
            box = torch.zeros(24, 24, dtype=torch.bool)
            box[y0:y1 + 1, x0:x1 + 1] = True
            out |= box.flatten()
    return out


@pytest.mark.parametrize("absent", ["none", "first_token"])
def test_hint_targets_are_the_answer_rows_named_words_and_their_shapes(absent):
    proc, items, batch = _hinted_batch(absent=absent)
    tok = proc.tokenizer
    image = int((batch["input_ids"][0] == proc.tokenizer.convert_tokens_to_ids("<image>")).nonzero()[0])
    checked = {"two names": 0, "absent": 0}
    for b, it in enumerate(items[:4]):
        questions = [it["question"]] + [q for q, _ in it["more"]]
        answers = [it["answer"]] + [a for _, a in it["more"]]
        for j, (q, a) in enumerate(zip(questions, answers)):
            row = int(batch["hint_row"][b, j])
            # the row predicts the answer: it is unlabelled and the next token is the answer word
            assert batch["labels"][b, row] == -100 and tok.convert_ids_to_tokens(int(batch["labels"][b, row + 1])) == a
            names = _words_of_each_name(q)
            checked["two names"] += len(names) == 2
            for slot in range(2):
                name = names[min(slot, len(names) - 1)]
                gathered = tok.convert_ids_to_tokens(batch["input_ids"][b][batch["hint_gather"][b, j, slot]].tolist())
                assert gathered == name, (q, slot)
                retrieve = batch["hint_retrieve"][b, j, slot]
                assert not retrieve[1:image].any() and not retrieve[image + 576:].any()
                wanted = _patches_by_hand(it["shapes"], name)
                image_part = retrieve[image:image + 576]
                # shape_patches keeps the patches a shape covers by >= 1/4: a subset of its box, never empty
                assert not (image_part & ~wanted).any() and image_part.any() == wanted.any()
                if not wanted.any():
                    checked["absent"] += 1
                    assert bool(retrieve[0]) == (absent == "first_token")
                else:
                    assert not retrieve[0]
        assert (batch["hint_row"][b, len(questions):] == -1).all()
    assert (batch["hint_row"][4] == -1).all()  # descriptions get no hints
    assert checked["two names"] and checked["absent"]  # the batch exercised relations and absent shapes


def test_hint_retrieval_of_centres_targets_the_cell_of_each_matching_shapes_centre():
    proc, items, batch = _hinted_batch(absent="first_token", retrieve="center")
    image = int((batch["input_ids"][0] == proc.tokenizer.convert_tokens_to_ids("<image>")).nonzero()[0])
    seen = 0
    for b, it in enumerate(items[:4]):
        questions = [it["question"]] + [q for q, _ in it["more"]]
        for j, q in enumerate(questions):
            for slot in range(2):
                name = _words_of_each_name(q)[min(slot, len(_words_of_each_name(q)) - 1)]
                kind = name[-1] if name[-1] in shapes.KINDS else name[-1][:-1]
                color = name[0] if len(name) == 2 else None
                # by hand: the 14-px cell of each matching shape's centre pixel, row-major over 24 x 24
                cells = sorted({d["cy"] // 14 * 24 + d["cx"] // 14 for d in it["shapes"]
                                if d["kind"] == kind and color in (None, d["color"])})
                got = batch["hint_retrieve"][b, j, slot, image:image + 576].nonzero().flatten().tolist()
                assert got == cells, (q, slot)
                assert bool(batch["hint_retrieve"][b, j, slot, 0]) == (not cells)
                seen += len(cells) > 1
    assert seen  # some name matched several shapes (a count question)


def test_hint_positions_are_the_named_shapes_mean_centres_by_hand():
    """``hint_xy``: for each turn and name, the mean centre of the shapes matching the name, over the image side;
    nan when none matches (and for rows without a turn)."""
    proc, items, batch = _hinted_batch(absent="first_token")
    seen = {"several": 0, "none": 0}
    for b, it in enumerate(items[:4]):
        questions = [it["question"]] + [q for q, _ in it["more"]]
        for j, q in enumerate(questions):
            names = _words_of_each_name(q)
            for slot in range(2):
                name = names[min(slot, len(names) - 1)]
                kind = name[-1] if name[-1] in shapes.KINDS else name[-1][:-1]
                color = name[0] if len(name) == 2 else None
                match = [d for d in it["shapes"] if d["kind"] == kind and color in (None, d["color"])]
                got = batch["hint_xy"][b, j, slot]
                if not match:
                    seen["none"] += 1
                    assert got.isnan().all()
                    continue
                seen["several"] += len(match) > 1
                want = torch.tensor([sum(d["cx"] for d in match), sum(d["cy"] for d in match)]) / len(match) / 336
                assert torch.allclose(got, want), (q, slot)
        assert batch["hint_xy"][b, len(questions):].isnan().all()
    assert seen["several"] and seen["none"]


def test_answer_probe_loss_by_hand():
    """Rows 1 and 3 of a sample (a third turn absent), a head reading feature 0 into every output: sigmoid(h) for
    each of the four (x, y) of the two names; the second row's second name matches nothing. 10 x the mean squared
    error over the six known values."""
    from tokenprune.reference.train import answer_probe_loss

    hidden = torch.tensor([[[0.0, 5.0], [0.0, 1.0], [9.0, 9.0], [1.0, -2.0]]])
    head = torch.nn.Linear(2, 4)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, 0] = 1.0
        head.bias.zero_()
    rows = torch.tensor([[1, 3, -1]])
    nan = float("nan")
    xy = torch.tensor([[[[0.5, 0.25], [0.75, 1.0]], [[0.1, 0.2], [nan, nan]], [[nan, nan], [nan, nan]]]])
    p0, p1 = torch.sigmoid(torch.tensor(0.0)), torch.sigmoid(torch.tensor(1.0))
    errors = [(p0 - 0.5) ** 2, (p0 - 0.25) ** 2, (p0 - 0.75) ** 2, (p0 - 1.0) ** 2, (p1 - 0.1) ** 2,
              (p1 - 0.2) ** 2]
    want = 10 * torch.stack(errors).mean()
    assert torch.allclose(answer_probe_loss(head, hidden, rows, xy), want)


def test_the_answer_probe_needs_the_hints_rows():
    from tokenprune.reference.train import load_config

    with pytest.raises(ConfigError, match="answer_probe.weight: reads the rows the attention hints mark"):
        load_config("experiments/train_reference.yaml", ["answer_probe.weight=1.0", "attention_hints.weight=0"])


def test_shape_patches_by_hand():
    from tokenprune.reference.train import shape_patches

    # a 28-px square centred on (41, 41): pixels 27..54, i.e. patches 1..3 on both axes (14 px each):
    # patch 1 (14..27) holds one column (1/14 < 1/4, off), 2 (28..41) and 3 (42..55, 13 px) are covered
    got = shape_patches(shapes.Shape("square", "red", 41, 41, 28)).view(24, 24)
    assert got.nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    tiny = shape_patches(shapes.Shape("circle", "red", 100, 100, 4)).view(24, 24)  # < 1/4 of any patch
    assert tiny.sum() == 1 and tiny[100 // 14, 100 // 14]


@pytest.mark.parametrize("gather", ["mass", "split"])
def test_hint_loss_equals_minus_log_attention_mass_of_the_eager_model(gather):
    """hint_loss recomputes two layers' attention rows; the reference is the eager model's own attention maps.
    ``gather="split"``: the gather term is the mean over the name's words of -log(attention on each word)."""
    from tokenprune.reference.train import hint_loss

    proc, items, batch = _hinted_batch(absent="first_token")
    hints = {k: batch.pop(k) for k in list(batch) if k.startswith("hint_")}
    model = reference.build_model(attn_implementation="eager").eval()
    layers = model.model.language_model.layers
    with torch.no_grad():  # peaked attention rows, so that which words or patches a head is scored on matters
        for layer in (0, 2):
            layers[layer].self_attn.q_proj.weight.mul_(30)
    captured, hooks = {}, []
    for layer in (0, 2):
        def grab(module, args, kwargs, layer=layer):
            captured[layer] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        hooks.append(layers[layer].register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        got = hint_loss(model, captured, {**batch, **hints}, gather_layer=0, retrieve_layer=2, heads=3, gather=gather)
    for h in hooks:
        h.remove()
    per_layer = []
    for layer, key in ((0, "hint_gather"), (2, "hint_retrieve")):
        attn = out.attentions[layer]  # (B, H, L, L)
        terms = []
        for b in range(len(items)):
            for j in range(hints["hint_row"].shape[1]):
                row = int(hints["hint_row"][b, j])
                for head in range(3):  # head 2 follows the first name again
                    cols = hints[key][b, j, head % 2].nonzero().flatten()
                    if row >= 0 and len(cols):
                        if key == "hint_gather" and gather == "split":
                            terms.append(torch.stack([-torch.log(attn[b, head, row, c].double()) for c in cols]).mean())
                        else:
                            terms.append(-torch.log(attn[b, head, row, cols].sum() + 1e-6))
        per_layer.append(torch.stack(terms).mean())
    assert float(got) == pytest.approx(float(torch.stack(per_layer).mean()), rel=1e-4)


def test_the_training_config_is_typed_and_its_outputs_checked_before_training(tmp_path):
    import pytest

    from tokenprune.reference import model as reference
    from tokenprune.reference.train import load_config

    cases = [
        ("logging.wandb='false'", "logging.wandb: must be true or false, got 'false' .a string"),
        ("data.batch_size='16'", "data.batch_size: must be a positive integer, got '16' .a string"),
        ("optim.lr=-1", "optim.lr: must be a number > 0, got -1"),
        ("accelerator=tpu", "accelerator: 'tpu' .did you mean 'gpu'.*allowed: auto, cpu, gpu, cuda, mps"),
        ("output_dir=${oc.env:HOME}", "output_dir: .*oc.env:HOME.*interpolation .* is not allowed in a training config"),
        ("curriculum=[{until: 10, sizes: [60, 20]}]", r"curriculum.0.sizes: must be \[MIN, MAX\]"),
        ("curriculum=[{until: 10}]", "curriculum.0.sizes: missing"),
        (f"export_dir={reference.path()}", "export_dir: .* already holds a model; set overwrite_export=true"),
    ]
    (tmp_path / "a_file").write_text("x")
    cases += [(f"output_dir={tmp_path / 'a_file'}", "output_dir: .* is a file, not a folder"),
              (f"export_dir={tmp_path / 'a_file' / 'm'}", "export_dir: .* cannot be created: .* is a file")]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config("experiments/train_reference.yaml", [f"output_dir={tmp_path / 'run'}", override])
    # replacing the shipped model is one explicit key away (nothing is trained here: load_config only checks)
    cfg = load_config("experiments/train_reference.yaml", [f"export_dir={reference.path()}", "overwrite_export=true"])
    assert cfg.overwrite_export is True and cfg.export_dir == str(reference.path())
    assert load_config("experiments/train_reference.yaml").export_dir is None  # the shipped config keeps it
