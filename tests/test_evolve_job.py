"""`milton evolve` end to end on a tiny Llama built here: merge, distil, prune, quantize, gate.

Real parts only: conversations go in through `milton ingest conversations`, `milton
train-lora` makes the adapter that evolve merges, llama.cpp's converter and quantizer make the
GGUFs and llama-cpp-python loads, measures and runs them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_clean_error
from tiny_lm import build_tiny_gguf

FACTS = [
    ("What is the build server called?", "The build server is called zephyr-07."),
    ("Which port does the wiki use?", "The wiki listens on port 8443."),
    ("Who owns the backup rota?", "Priya owns the backup rota."),
    ("What is the staging database?", "Staging runs on pg-staging-3."),
]
PARAPHRASES = ["{q}", "Remind me: {q}", "Quick one. {q}", "I forgot, {q}"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer tiny Llama (HF dir + GGUF); the GGUF is model.base, as the packaged model is."""
    texts = [f"{q} {a}" for q, a in FACTS]
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny"), texts, layers=3)


def _config(home: Path, gguf: Path, **evolve) -> None:
    values = {"distil_steps": 30, "distil_lr": 3e-3, "teacher_prompts": 4, "teacher_max_new_tokens": 12,
              "prune_step": 0.2, "prune_max": 0.4, "recovery_steps": 4, "calibration_items": 8,
              "eval_items": 16, "min_train_items": 4, "bench_tokens": 8, "quality_threshold": 0.05,
              "quantizations": ["q8_0", "q4_k_m"], "vocab_top": 60, "train_stages": "always",
              "keep_stages": True, **evolve}
    train = {"learning_rate": 0.01, "max_steps": 40, "batch_size": 4, "grad_accum": 1, "epochs": 20,
             "checkpoint_every": 5, "rouge_samples": 0, "seed": 0, "lora_dropout": 0.0,
             "regression_margin": 10.0, "max_seq_len": 96,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    lines = ["[model]", f'base = "{gguf}"', 'device = "cpu"', "threads = 1", "",
             "[serve]", "n_threads = 1", "", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    lines += ["", "[evolve]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _ingest(cli, home: Path) -> None:
    pairs = [(p.format(q=q), a) for q, a in FACTS for p in PARAPHRASES]
    sessions = [[m for q, a in pairs[i:i + 2] for m in ({"role": "user", "content": q},
                                                         {"role": "assistant", "content": a})]
                for i in range(0, len(pairs), 2)]
    path = home / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": s}) + "\n" for s in sessions))
    code, _, err = cli("ingest", "conversations", str(path), timeout=300)
    assert code == 0, err


def _evolve(cli, *args: str, env: dict | None = None) -> dict:
    code, out, err = cli("evolve", "--json", *args, env=env, timeout=900)
    assert code == 0, err
    return json.loads(out)


def _prepared(cli, home: Path, gguf: Path, **evolve) -> None:
    _config(home, gguf, **evolve)
    _ingest(cli, home)
    code, out, err = cli("train-lora", "--json", timeout=600)
    assert code == 0, err
    assert json.loads(out)["status_detail"] == "promoted", out


def _generate(gguf: Path, prompt: str, n: int = 8) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=128, n_threads=1, verbose=False)
    try:
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0)
    finally:
        llm.close()
    return out["choices"][0]["text"]


def test_every_stage_loads_and_the_promoted_gguf_becomes_the_base(cli, milton_home, tiny, settings):
    from transformers import AutoModelForCausalLM

    from milton.evolve.runs import base_store, run_dir
    from milton.models.refs import resolve_base

    _, gguf = tiny
    _prepared(cli, milton_home, gguf)
    result = _evolve(cli)
    assert result["status"] == "ok" and result["status_detail"] == "promoted", result

    work = run_dir(settings, result["run_id"])
    stages = {name: json.loads((work / name / "stage.json").read_text())
              for name in ("merge", "trim", "distil", "prune")}
    # Each model stage is a loadable HF model directory, and all its GGUFs were measured.
    for name, layers in (("merge", 3), ("distil", 2), ("prune", 2)):
        model = AutoModelForCausalLM.from_pretrained(work / name)
        assert model.config.num_hidden_layers == layers, name
        assert set(stages[name]["types"]) == {"f16", "q8_0", "q4_k_m"}, name
        assert all(f["eval_ppl"] > 0 and f["size_mb"] > 0 for f in stages[name]["types"].values())
        # The export check: llama.cpp's f16 runs what HF measured (within 0.5%).
        assert stages[name]["excluded"] is None and stages[name]["export_drift"] <= 0.005, stages[name]
    assert stages["merge"]["adapter_version"] == "v000001"
    # Distillation brought the student closer to the teacher on held-out items.
    assert stages["distil"]["kl_after"] < stages["distil"]["kl_before"], stages["distil"]
    assert 0 < stages["prune"]["sparsity"] <= 0.4 + 1e-6
    # The trim stage cut the merged model's quantized files to the kept vocabulary: smaller,
    # same weights otherwise, measured on the same text.
    trim = stages["trim"]
    assert not trim.get("excluded"), trim
    assert set(trim["types"]) == {"q8_0", "q4_k_m"} and trim["kept"] < trim["vocab"], trim
    for kind in ("q8_0", "q4_k_m"):
        assert (work / "trim" / f"model-{kind}.gguf").stat().st_size < \
            (work / "merge" / f"model-{kind}.gguf").stat().st_size
        assert trim["types"][kind]["eval_ppl"] > 0
    assert (work / "trim" / "vocab.gguf").is_file() and (work / "trim" / "config.json").is_file()
    # f16, q8_0 and q4_k_m all load in llama.cpp and generate; quantized files are smaller.
    files = {k: work / "prune" / v for k, v in stages["prune"]["files"].items()}
    for path in files.values():
        assert _generate(path, "The build server").strip()
    sizes = {k: p.stat().st_size for k, p in files.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]

    # The gate saw all eleven and promoted the one its rule picks: the fastest qualifying, ties
    # (within 5%) to the smaller.
    code, out, err = cli("evolve", "report", str(result["run_id"]), "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = [r for r in report["rows"] if r["stage"] != "serving"]
    assert len(rows) == 11 and all(r.get("verdict") for r in rows), rows
    won = [r for r in rows if r.get("won")]
    assert len(won) == 1 and report["winner"] == f"{won[0]['stage']} {won[0]['format']}"
    assert result["winner"] == report["winner"]
    # The speeds the gate compared were timed again, interleaved with the serving model's; each
    # stage's own timing is kept beside them.
    assert result["candidate_tokens_per_s_stage"] > 0 and result["serving_tokens_per_s_stage"] > 0
    assert result["candidate_tokens_per_s"] == won[0]["tokens_per_s"]
    qualifying = [r for r in rows if not r["verdict"].startswith(("held-out", "regression", "neither"))]
    fastest = max(r["tokens_per_s"] for r in qualifying)
    assert won[0]["tokens_per_s"] * 1.05 >= fastest
    assert won[0]["size_mb"] == min(r["size_mb"] for r in qualifying if r["tokens_per_s"] * 1.05 >= fastest)

    # Promoted: the artifact is current, and it is now what serve and train-lora use.
    current = base_store(settings).current()
    assert current is not None and current.name == result["version"]
    assert current.manifest["gate"]["promote"] and current.manifest["gguf_type"] == won[0]["format"]
    assert current.manifest["stage"] == won[0]["stage"]
    assert (current.path / "hf" / "config.json").is_file()
    ref = resolve_base(settings)
    assert ref.evolved == current.name and ref.path == current.path / "model.gguf"
    assert result["candidate_size_mb"] < result["serving_size_mb"]

    # The report: a table row per stage and type, a PNG beside the run.
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [c["sparsity"] for c in report["prune_curve"]][:2] == [0.0, 0.2]
    code, out, err = cli("evolve", "report", env={"COLUMNS": "250"})
    assert code == 0 and "distil" in out and "q4_k_m" in out and "promoted" in out, out + err

    # Next month starts from the evolved base (its full-precision copy), with no adapter for it:
    # its merged q4_k_m is the served file itself, not a candidate. A run that wrecks the student
    # (absurd learning rate) is rejected by the gate and the promoted base stays.
    again = _evolve(cli, env={"MILTON_EVOLVE__DISTIL_LR": "50", "MILTON_EVOLVE__QUALITY_THRESHOLD": "0.9",
                              "MILTON_EVOLVE__PROMOTE_TYPE": won[0]["format"],
                              "MILTON_EVOLVE__QUANTIZATIONS": json.dumps([won[0]["format"]]),
                              "MILTON_EVOLVE__PRUNE_METHOD": "none", "MILTON_EVOLVE__KEEP_STAGES": "false",
                              "MILTON_EVOLVE__VOCAB_TOP": "0"})
    assert again["status_detail"] == "rejected", again
    assert "perplexity" in again["reason"], again["reason"]
    assert base_store(settings).current_name() == current.name
    conn = sqlite3.connect(settings.db_path)
    rows = conn.execute("select status, source from evolve_runs order by id").fetchall()
    conn.close()
    assert [r[0] for r in rows] == ["promoted", "rejected"] and "base/" not in rows[0][1]
    assert str(current.path / "model.gguf") == rows[1][1]
    assert sorted(p.name for p in run_dir(settings, again["run_id"]).iterdir()) == ["report.json", "report.png"]


def test_killed_stage_resumes(cli, milton_home, tiny, settings):
    from milton.evolve.runs import run_dir

    _, gguf = tiny
    _prepared(cli, milton_home, gguf, distil_steps=400, prune_method="none")
    env = {**os.environ, "MILTON_HOME": str(milton_home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "milton", "evolve", "--json"], env=env,
                            cwd=milton_home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoints = run_dir(settings, 1) / "distil-checkpoints"
    deadline = time.monotonic() + 300
    try:
        while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no distillation checkpoint in time"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert (run_dir(settings, 1) / "merge" / "stage.json").is_file()
    assert not (run_dir(settings, 1) / "distil").exists()

    result = _evolve(cli, env={"MILTON_EVOLVE__DISTIL_STEPS": "400"})
    assert result["run_id"] == 1, result
    stages = {n: json.loads((run_dir(settings, 1) / n / "stage.json").read_text())
              for n in ("merge", "distil")}
    assert stages["distil"]["distil_resumed_from"], stages["distil"]
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("select count(*), max(status) from evolve_runs").fetchone()[0] == 1
    conn.close()


def test_bad_quantization_type_is_a_one_line_error(cli, milton_home, tiny):
    _, gguf = tiny
    _config(milton_home, gguf, quantizations=["q8_0", "q9_x"])
    code, _, err = cli("evolve")
    assert code == 2
    assert_clean_error(err, "evolve.quantizations[1]", "q9_x")


def test_too_little_data_is_skipped(cli, milton_home, tiny, settings):
    _, gguf = tiny
    _config(milton_home, gguf, min_train_items=50, teacher_prompts=0)
    result = _evolve(cli)
    assert result["status"] == "skipped" and "min_train_items" in result["reason"]
    assert "0 fact items" in result["reason"], result["reason"]
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("select count(*) from evolve_runs").fetchone() == (0,)
    conn.close()


def test_training_stages_run_on_a_cpu_only_when_asked(settings):
    """auto: distillation and pruning cost hours on a CPU and never reached the threshold on
    the embedded model, so a CPU-only machine skips them (with the reason in the report)."""
    from milton.evolve.jobs import training_stages_skipped

    cpu = settings.model_copy(update={"model": settings.model.model_copy(update={"device": "cpu"})})
    assert "no CUDA device" in (training_stages_skipped(cpu) or "")
    always = cpu.model_copy(update={"evolve": cpu.evolve.model_copy(update={"train_stages": "always"})})
    assert training_stages_skipped(always) is None
    never = cpu.model_copy(update={"evolve": cpu.evolve.model_copy(update={"train_stages": "never"})})
    assert training_stages_skipped(never) == "evolve.train_stages is never"


def test_a_trimmed_base_is_next_months_source(cli, milton_home, tiny, settings, tmp_path):
    """A promoted base with a trimmed vocabulary: next month's merge is exported with its full
    tokenizer (vocab.gguf beside it), passes the tokenizer and llama.cpp checks, and the serving
    trimmed file is measured on the same text as the candidates."""
    import shutil

    from milton.evolve.export import quantize
    from milton.evolve.runs import base_store, run_dir
    from milton.evolve.vocab import keep_ids, kept_ids, read_vocab, trim_gguf, write_vocab_only

    hf, gguf = tiny
    _config(milton_home, gguf, quantizations=["q8_0"], vocab_top=0, train_stages="never")
    _ingest(cli, milton_home)
    q4 = quantize(gguf, tmp_path / "q4.gguf", "q4_k_m", threads=1)

    def build(tmp: Path) -> None:
        trim_gguf(q4, tmp / "model.gguf", keep_ids(read_vocab(gguf), top=60))
        write_vocab_only(gguf, tmp / "vocab.gguf")
        shutil.copytree(hf, tmp / "hf")

    version = base_store(settings).publish(build, metrics={}, extra={"stage": "trim"})
    assert kept_ids(version.path / "model.gguf") is not None
    result = _evolve(cli)
    assert result["status"] == "ok", result
    merge = json.loads((run_dir(settings, result["run_id"]) / "merge" / "stage.json").read_text())
    assert not merge["excluded"] and merge["export_drift"] <= 0.005, merge
    assert len(read_vocab(run_dir(settings, result["run_id"]) / "merge" / "model-f16.gguf").tokens) \
        == len(read_vocab(gguf).tokens)
    serving = result["serving_eval_ppl"], result["serving_regression_ppl"]
    assert all(isinstance(v, float) and v > 0 for v in serving), result
