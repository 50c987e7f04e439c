"""Writes notebooks/attention_maps.ipynb and notebooks/ablations.ipynb (without outputs) from the cells below.

`python notebooks/make_notebooks.py` after editing; the tests execute both notebooks with nbclient and fail
on a notebook committed with outputs.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

MODEL = '''import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import tokenprune as tp
from tokenprune.measure import viz
from tokenprune.reference import model as reference
from tokenprune.reference import shapes

torch.manual_seed(0)
folder = reference.path()  # the shipped reference model (docs/reference_model.md)
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
print("reference model:", folder)
'''

ATTENTION = [
    new_markdown_cell("# Where does the text look in the image?\n\n"
                      "The reference model (LLaVA architecture, 576 visual tokens on a 24×24 grid) on a few "
                      "`shapes` test items: text→image attention across layers, the attention shift and its "
                      "correction, and which tokens `asap`, `fastv`, `visionzip` and `random` keep at the same "
                      "budget, with the answer each gives. Attention rows are recomputed from each layer's "
                      "input (`tokenprune.measure.viz`), exactly as the pruning operators compute them."),
    new_code_cell(MODEL),
    new_code_cell('''items = shapes.load_split("test")[:3]
def encode(item):
    return processor(images=item["image"], text=reference.prompt(processor, item["question"]), return_tensors="pt")
for it in items:
    print(it["question"], "->", it["answer"])'''),
    new_markdown_cell("## Attention of the last token, layer by layer\n\nLog scale, attention sinks clipped at "
                      "the 99th percentile so a few massive tokens do not wash out the map."),
    new_code_cell('''item = items[0]
inputs = encode(item)
layers = list(range(model.config.text_config.num_hidden_layers))
maps = viz.text_to_image_attention(model, inputs, layers, queries="last")
panels = viz.image_panels(model, inputs)
for layer in layers:
    fig = viz.plot_attention(item["image"], maps[layer], panels, title=f"layer {layer}: {item['question']}",
                             log=True, sink_quantile=0.99)'''),
    new_markdown_cell("## The attention shift\n\nMean image row (0 = top, 1 = bottom) of the 25% visual tokens "
                      "the last token attends to most, with RoPE and without it (`rope_free`), against a uniform "
                      "choice. FEATHER reports FastV's choice near 80% of the image height on LLaVA-1.5."),
    new_code_cell('''stats = viz.attention_shift(model, inputs, layers, keep=0.25)
for s in stats:
    print(s)
fig = viz.plot_attention_shift(stats)'''),
    new_markdown_cell("## What each method keeps at 64 of 576 tokens"),
    new_code_cell('''budget = {"fastv": ["stages.0.operators.1.keep=64"], "random": ["stages.0.operators.1.keep=64"],
          "asap": ["stages.0.operators.3.keep=64"], "visionzip": []}  # visionzip: 54 dominant + 10 contextual
for item in items:
    inputs = encode(item)
    for name, overrides in budget.items():
        pipe = tp.load_pipeline(name, overrides)
        with torch.no_grad(), pipe.attach(model):
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        kept = pipe.trace[0].kept[0]
        viz.plot_kept(item["image"], model, inputs, kept,
                      title=f"{name}: {pipe.trace[0].visual_after[0]} kept; {item['question']} -> {answer} "
                            f"(truth: {item['answer']})")'''),
    new_markdown_cell("## Where ASAP's weighted soft merging folds the dropped tokens\n\nEach kept token and the "
                      "tokens merged into it share a colour (the strongest target of each soft merge); clear "
                      "patches were dropped without a target."),
    new_code_cell('''item = items[0]
inputs = encode(item)
pipe = tp.load_pipeline("asap", ["stages.0.operators.3.keep=64"])
with torch.no_grad(), pipe.attach(model):
    model(**inputs)
fig = viz.plot_merged(item["image"], model, inputs, pipe.trace[0], title="asap: merged groups at 64 tokens")'''),
]

ABLATIONS = [
    new_markdown_cell("# Reading an ablation sweep\n\nLoads a sweep's `results.csv` and run directories "
                      "(`SWEEP_DIR`, default `runs/sweeps/asap`); when none is there, runs a small one on 16 "
                      "test items first (fastv, random and ASAP without its shift, at keep 0.25). Then: "
                      "accuracy against FLOPs, accuracy per question type, and the predictions where the "
                      "variants disagree."),
    new_code_cell('''import json
import os
from pathlib import Path

import pandas as pd

from tokenprune.eval.sweep import Sweep, run_sweep

sweep_dir = Path(os.environ.get("SWEEP_DIR", "runs/sweeps/asap"))
if not (sweep_dir / "results.csv").exists():
    from tokenprune.reference import model as reference
    model_path = str(reference.path())
    import yaml
    sweep_dir = Path("runs/sweeps/notebook_demo")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = {"name": "notebook_demo", "output_dir": str(sweep_dir.resolve()),
            "base": {"model": {"path": model_path}, "pipeline": "asap", "data": {"limit": 16},
                     "logging": {"wandb": {"mode": "disabled"}, "progress_bar": False}},
            "budget": {"key": "stages.0.operators.3.keep", "values": [0.25]},
            "swap": {"stages.0.operators.0": [{"op": "none"}]},
            "methods": {"fastv": {"budget": {"stages.0.operators.1.keep": 1.0}},
                        "random": {"budget": {"stages.0.operators.1.keep": 1.0}}}}
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec))
    run_sweep(Sweep(sweep_dir / "sweep.yaml"))
results = pd.read_csv(sweep_dir / "results.csv")
results'''),
    new_code_cell('''import matplotlib.pyplot as plt

ok = results[results["error"].isna()] if "error" in results else results
fig, ax = plt.subplots(figsize=(6, 4))
ax.scatter(ok["flops_reduction"] * 100, ok["accuracy"] * 100)
for _, r in ok.iterrows():
    ax.annotate(r["variant"], (r["flops_reduction"] * 100, r["accuracy"] * 100), fontsize=7)
ax.set_xlabel("FLOPs reduction (%)")
ax.set_ylabel("accuracy (%)")'''),
    new_code_cell('''per_type = {}
for v in ok["variant"]:
    metrics = json.loads((sweep_dir / v / "metrics.json").read_text())
    per_type[v] = metrics["per_type"]
    per_type.setdefault("unpruned", metrics.get("baseline_per_type", {}))
pd.DataFrame(per_type).T.round(3)'''),
    new_code_cell('''preds = {}
for v in ok["variant"]:
    rows = [json.loads(line) for line in (sweep_dir / v / "predictions.jsonl").read_text().splitlines()]
    preds[v] = {r["id"]: r["prediction"] for r in rows}
    truth = {r["id"]: (r["question"], r["answer"]) for r in rows}
table = pd.DataFrame(preds)
disagree = table[table.nunique(axis=1) > 1]
disagree.insert(0, "question", [truth[i][0] for i in disagree.index])
disagree.insert(1, "answer", [truth[i][1] for i in disagree.index])
disagree.head(20)'''),
]


def write(name: str, cells) -> None:
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write("attention_maps.ipynb", ATTENTION)
    write("ablations.ipynb", ABLATIONS)
