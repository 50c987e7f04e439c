"""Local lmms-eval tasks built from the shapes benchmark (tokenprune.reference.shapes), for offline runs of the
lmms-eval integration: ``tokenprune lmms-task FOLDER`` writes, in FOLDER,

- ``data/``: the split as a ``datasets`` folder (``save_to_disk``; columns id, image, question, answer, type);
- ``shapes_vqa.yaml``: a ``generate_until`` task scored by exact match after normalisation (the benchmark's
  scoring), overall (``accuracy``) and per question type (``color_accuracy``, ...);
- ``shapes_yes_no.yaml``: the existence questions as a ``multiple_choice`` task over (yes, no), which lmms-eval
  scores through ``loglikelihood`` (metric ``acc``);
- ``utils.py``: the functions the YAML files name (``!function utils.…``), which call this module.

Then ``lmms-eval --model tokenprune --include_path FOLDER --tasks shapes_vqa,shapes_yes_no`` or
``tokenprune run`` with ``data: {lmms_eval: {tasks: [shapes_vqa], include_path: FOLDER}}``. Nothing here
imports lmms-eval (only ``datasets``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenprune.core.errors import ConfigError
from tokenprune.eval.scoring import item_score
from tokenprune.reference import shapes
from tokenprune.reference.shapes import TYPES

VQA_TASK = "shapes_vqa"
YES_NO_TASK = "shapes_yes_no"
PROMPT_SUFFIX = ""  # the reference model was trained on the bare question


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    """Exact match after the benchmark's normalisation (``tokenprune run``'s own scoring), under ``accuracy`` and
    under ``<type>_accuracy``."""

    score = item_score(results[0], {"answer": doc["answer"], "metric": "exact_match"})
    entry = {"type": doc["type"], "score": score}
    return {"accuracy": entry, **{f"{t}_accuracy": entry for t in question_types()}}


def question_types() -> tuple[str, ...]:

    return TYPES


def mean_score(results: list[dict], kind: str | None = None) -> float:
    """Mean score of the results (of question type ``kind`` only, when given); NaN when there are none."""
    scores = [r["score"] for r in results if kind is None or r["type"] == kind]
    return sum(scores) / len(scores) if scores else float("nan")


_UTILS = '''"""Written by `tokenprune lmms-task` (tokenprune/eval/lmms_tasks.py): the functions the task YAML files name."""
from functools import partial

from tokenprune.eval.lmms_tasks import doc_to_text, doc_to_visual, mean_score, process_results  # noqa: F401


def aggregate_accuracy(results):
    return mean_score(results)


def yes_no_choices(doc):
    return ["yes", "no"]


def yes_no_target(doc):
    return ["yes", "no"].index(doc["answer"])

'''


def _vqa_yaml(data: Path, types: tuple[str, ...]) -> str:
    metrics = "".join(f"  - metric: {m}\n    aggregation: !function utils.aggregate_{m}\n    higher_is_better: true\n"
                      for m in ("accuracy", *(f"{t}_accuracy" for t in types)))
    return (f"task: {VQA_TASK}\ndataset_path: {data}\ndataset_kwargs: {{load_from_disk: true}}\ntest_split: test\n"
            "output_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\n"
            "generation_kwargs: {max_new_tokens: 4, temperature: 0, do_sample: false, until: ['\\n']}\n"
            "process_results: !function utils.process_results\n"
            f"metric_list:\n{metrics}"
            f"lmms_eval_specific_kwargs: {{default: {{pre_prompt: '', post_prompt: '{PROMPT_SUFFIX}'}}}}\n"
            "metadata: {version: 1.0}\n")


def _yes_no_yaml(data: Path) -> str:
    return (f"task: {YES_NO_TASK}\ndataset_path: {data}\ndataset_kwargs: {{load_from_disk: true}}\ntest_split: yes_no\n"
            "output_type: multiple_choice\ndoc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: !function utils.doc_to_text\ndoc_to_choice: !function utils.yes_no_choices\n"
            "doc_to_target: !function utils.yes_no_target\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            f"lmms_eval_specific_kwargs: {{default: {{pre_prompt: '', post_prompt: '{PROMPT_SUFFIX}'}}}}\n"
            "metadata: {version: 1.0}\n")


def write_shapes_task(folder: str | Path, split: str = "test", limit: int | None = None) -> Path:
    """Write the shapes tasks (module docstring) for ``split`` (its first ``limit`` items) into ``folder``."""
    import datasets

    if split not in shapes.SPLIT_SIZES:
        raise ConfigError("split", f"shapes split {split!r}; allowed: {', '.join(shapes.SPLIT_SIZES)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError("limit", f"must be a positive integer or None, got {limit!r}")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    items = shapes.load_split(split, size=limit)
    rows = {"id": [f"shapes-{split}-{i}" for i in range(len(items))], "image": [it["image"] for it in items],
            "question": [it["question"] for it in items], "answer": [it["answer"] for it in items],
            "type": [it["type"] for it in items]}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "type": datasets.Value("string")})
    full = datasets.Dataset.from_dict(rows, features=features)
    yes_no = full.filter(lambda t: t == "exist", input_columns="type")
    datasets.DatasetDict({"test": full, "yes_no": yes_no}).save_to_disk(str(folder / "data"))
    types = question_types()
    utils = _UTILS + "".join(f"def aggregate_{t}_accuracy(results):\n    return mean_score(results, {t!r})\n\n\n"
                             for t in types)
    (folder / "utils.py").write_text(utils.rstrip() + "\n")
    (folder / f"{VQA_TASK}.yaml").write_text(_vqa_yaml(folder / "data", types))
    (folder / f"{YES_NO_TASK}.yaml").write_text(_yes_no_yaml(folder / "data"))
    return folder
