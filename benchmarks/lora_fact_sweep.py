"""Which LoRA setup stores facts in the embedded Gemma 3 270M? A sweep, one process, CPU.

``python -m benchmarks.lora_fact_sweep '[{"r": 16, "mods": [...], "lr": 1e-3, "epochs": 6}]'``
(add ``base`` as a second argument to measure the bare base first). 16 made-up facts
(:data:`benchmarks.bench_learning.FACTS`), each trained in 8 question wordings plus 2 statement
forms (:func:`milton.train.facts.training_items`, as train-lora does), batch 8, warmup 5% +
cosine over all epochs; every ``every`` epochs the model answers one held-out wording per fact
greedily (plain format, 12 tokens) and recall = answers containing the value. Prints one JSON
line per measurement: config, epoch, last loss, probe recall, cumulative training seconds.
This is what chose the ``train`` defaults (see README, train-lora).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from typing import Any

from benchmarks.bench_learning import FACTS


def main(argv: list[str]) -> None:
    import torch

    from milton.core.config import TrainConfig, load_settings
    from milton.models.hf import load_base
    from milton.models.refs import resolve_base
    from milton.train.evaluate import generate
    from milton.train.facts import parse_fact, probe_questions, recalled, training_items
    from milton.train.formatting import format_items
    from milton.train.loop import adamw, collate, nll_step, pad_id_of, plan_batches
    from milton.train.lora import make_peft_model

    facts = [parse_fact(statement) for statement, _, _ in FACTS[:16]]
    settings = load_settings(environ={"MILTON_HOME": tempfile.mkdtemp()}).settings
    model, tok = load_base(resolve_base(settings), device="cpu", threads=2)

    def probe(m: Any) -> tuple[float, list[tuple[str, str]]]:
        hits, examples = 0, []
        for fact in facts:
            question = probe_questions(fact)[0]
            answer = generate(m, tok, {"kind": "pair", "prompt": question, "response": ""}, 12,
                              chat_format="plain")
            hits += recalled(answer, fact)
            examples.append((question, answer))
        return hits / len(facts), examples[:3]

    if len(argv) > 1 and argv[1] == "base":
        print(json.dumps({"cfg": "base", "probe_recall": probe(model)[0]}), flush=True)
    for c in json.loads(argv[0]):
        items = [it for f in facts for it in training_items(f, c.get("nq", 8))]
        cfg = TrainConfig(lora_r=c["r"], lora_alpha=c.get("alpha", 2 * c["r"]), lora_dropout=0.0,
                          target_modules=c["mods"], learning_rate=c["lr"],
                          batch_size=c.get("bs", 8), grad_accum=1)
        peft = make_peft_model(model, cfg)
        examples = format_items(items, tok, "plain", 128)
        order = plan_batches([len(e.input_ids) for e in examples], cfg.batch_size, c["epochs"], 0)
        per_epoch = math.ceil(len(examples) / cfg.batch_size)
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer, scheduler = adamw(params, cfg.learning_rate, len(order), 0.05)
        step, pad, train_s = nll_step(peft), pad_id_of(tok), 0.0
        for epoch in range(c["epochs"]):
            peft.train()
            t0, loss = time.time(), 0.0
            for batch in order[epoch * per_epoch:(epoch + 1) * per_epoch]:
                ids, mask, labels = collate([examples[i] for i in batch], pad)
                optimizer.zero_grad()
                loss = step(ids, mask, labels, int((labels[:, 1:] != -100).sum()))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
            train_s += time.time() - t0
            peft.eval()
            if (epoch + 1) % c.get("every", 1) == 0 or epoch == c["epochs"] - 1:
                recall, shown = probe(peft)
                print(json.dumps({"cfg": c, "epoch": epoch + 1, "loss": round(loss, 3),
                                  "probe_recall": recall, "train_s": round(train_s, 1),
                                  "n_items": len(items), "examples": shown}), flush=True)
        model = peft.unload()


if __name__ == "__main__":
    main(sys.argv[1:])
