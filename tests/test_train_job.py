"""`milton train-lora` end to end on a tiny Llama built here: learn, gate, GGUF, resume, skip.

Real parts only: conversations go in through `milton ingest conversations`, training runs in
the CLI process, the adapter is converted by llama.cpp's own converter and applied by
llama-cpp-python to the tiny base converted the same way.
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
from ntfy_server import NtfyServer
from tiny_lm import build_tiny_gguf

FACTS = [
    ("What is the build server called?", "The build server is called zephyr-07."),
    ("Which port does the wiki use?", "The wiki listens on port 8443."),
    ("Who owns the backup rota?", "Priya owns the backup rota."),
    ("What is the staging database?", "Staging runs on pg-staging-3."),
    ("When is the deploy freeze?", "The deploy freeze starts on Fridays at 15:00."),
    ("What colour is the alert dashboard?", "The alert dashboard is teal."),
]
PARAPHRASES = ["{q}", "Remind me: {q}", "Quick one. {q}", "I forgot, {q}"]
FAKE_KEY = "sk-" + "Zq8" * 8 + "T4kL9"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny base (HF dir) and the same model as GGUF for llama.cpp."""
    texts = [f"{q} {a}" for q, a in FACTS] + [FAKE_KEY]
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny"), texts)


def _config(home: Path, model_dir: Path, **train) -> None:
    values = {"learning_rate": 0.01, "max_steps": 120, "batch_size": 4, "grad_accum": 1,
              "epochs": 40, "checkpoint_every": 20, "rouge_samples": 2, "warmup_ratio": 0.05,
              "seed": 0, "lora_dropout": 0.0,
              # The tiny base knows no general language (regression ppl ~800); memorising the
              # facts costs it ~25% there, which the default 5% margin rightly rejects.
              "regression_margin": 0.5,
              # ...and no general English for the anchor term to keep: with it, this 64-wide
              # model cannot also memorise the facts in 120 steps (anchors: test_train_lora)
              "anchor_weight": 0.0,
              # A 64-wide model needs the MLP adapted too to memorise facts in 120 steps.
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"], **train}
    lines = ["[model]", f'base = "{model_dir}"', 'device = "cpu"', "", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _sessions(extra: list[tuple[str, str]] = ()) -> list[list[dict]]:
    """Each fact asked several ways across sessions of two exchanges each."""
    pairs = [(p.format(q=q), a) for q, a in FACTS for p in PARAPHRASES] + list(extra)
    sessions = []
    for i in range(0, len(pairs), 2):
        chunk = pairs[i:i + 2]
        if len(chunk) < 2:
            chunk = chunk + [pairs[0]]
        sessions.append([m for q, a in chunk for m in ({"role": "user", "content": q},
                                                        {"role": "assistant", "content": a})])
    return sessions


def _ingest(cli, home: Path, sessions: list[list[dict]], name: str) -> None:
    path = home / name
    path.write_text("".join(json.dumps({"messages": s}) + "\n" for s in sessions))
    code, out, err = cli("ingest", "conversations", str(path), timeout=300)
    assert code == 0, err


def _train(cli, *args: str, env: dict | None = None) -> dict:
    code, out, err = cli("train-lora", "--json", *args, env=env, timeout=900)
    assert code == 0, err
    return json.loads(out)


def _generate(base_gguf: Path, adapter_gguf: Path | None, question: str, model_dir: Path) -> str:
    """Greedy answer from llama.cpp, prompted with exactly the token ids training used."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from milton.train.dataset import TrainingItem
    from milton.train.formatting import prompt_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = prompt_text(TrainingItem(None, "pair", question, "", "test"), tokenizer, "auto")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    llm = Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf) if adapter_gguf else None,
                n_ctx=256, verbose=False, seed=0)
    out = []
    for token in llm.generate(ids, temp=0.0):
        if token == llm.token_eos() or len(out) >= 24:
            break
        out.append(token)
    return tokenizer.decode(out)


def test_learns_facts_promotes_and_the_gguf_adapter_knows_them(cli, milton_home, tiny, settings):
    model_dir, base_gguf = tiny
    _config(milton_home, model_dir)
    secret_exchange = ("Here is my key " + FAKE_KEY + ", store it", "Stored.")
    _ingest(cli, milton_home, _sessions([secret_exchange, ("And the wiki?", "Port 8443.")]), "a.jsonl")

    result = _train(cli)
    assert result["status"] == "ok" and result["status_detail"] == "promoted", result["reason"]
    # Held-out paraphrases of the facts: perplexity fell against the bare base.
    assert result["candidate_eval_ppl"] < 0.5 * result["serving_eval_ppl"], result
    assert result["excluded"] == 1 and result["by_kind"]  # the secret exchange was left out

    from milton.train.jobs import adapter_store

    current = adapter_store(settings).current()
    assert current is not None and current.name == result["version"]
    assert current.manifest["gate"]["promote"] and current.manifest["base_model"]["path"] == str(model_dir)
    # The secret is nowhere in what the adapter was trained from or ships with.
    for path in current.path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    # The raw message keeps it (the user's own history); the exported training items do not.
    conn = sqlite3.connect(settings.db_path)
    try:
        assert conn.execute("select count(*) from messages where content like ?",
                            [f"%{FAKE_KEY}%"]).fetchone() == (1,)
        assert conn.execute("select count(*) from training_items where prompt like ?1 or "
                            "response like ?1", [f"%{FAKE_KEY}%"]).fetchone() == (0,)
    finally:
        conn.close()

    # The GGUF export, applied by llama.cpp to the GGUF base, answers with the fact.
    question = FACTS[0][0]
    with_adapter = _generate(base_gguf, current.path / "adapter.gguf", question, model_dir)
    without = _generate(base_gguf, None, question, model_dir)
    assert "zephyr-07" in with_adapter, with_adapter
    assert "zephyr-07" not in without, without

    conn = sqlite3.connect(settings.db_path)
    steps = conn.execute("select count(*), max(step) from training_history").fetchone()
    runs = conn.execute("select status, candidate_version from training_runs").fetchall()
    fine_tunes = conn.execute("select value from counters where name = 'fine_tunes'").fetchone()
    conn.close()
    assert steps == (120, 120) and runs == [("promoted", current.name)] and fine_tunes == (1,)
    assert not (milton_home / "data" / "train").exists() or not any((milton_home / "data" / "train").iterdir())

    # A broken run (absurd learning rate) is rejected; the promoted adapter keeps serving.
    server = NtfyServer()
    try:
        _ingest(cli, milton_home, _sessions([("Is the wiki on 8443?", "Yes, port 8443.")])[::-1][:3]
                + [[{"role": "user", "content": "Where do backups go?"},
                    {"role": "assistant", "content": "Backups go to the NAS."},
                    {"role": "user", "content": "Which NAS?"},
                    {"role": "assistant", "content": "The NAS called vault-2."}]], "b.jsonl")
        broken = _train(cli, env={"MILTON_TRAIN__LEARNING_RATE": "50", "MILTON_NOTIFY__URL": server.url,
                                  "MILTON_NOTIFY__TOPIC": "t"})
        assert broken["status_detail"] == "rejected", broken
        assert broken["against"] == f"current {current.name}"
        assert adapter_store(settings).current_name() == current.name
        (note,) = server.wait_for(1)
        assert "rejected" in note.title and "keeps serving" in note.text
    finally:
        server.close()
    code, out, _ = cli("models", "list", "adapter", "--json")
    listed = {r["version"]: r for r in json.loads(out)}
    assert listed[current.name]["current"] and listed[broken["version"]]["metrics"]["decision"] == "rejected"


def test_too_little_new_data_is_skipped_and_leaves_nothing(cli, milton_home, tiny, settings):
    model_dir, _ = tiny
    _config(milton_home, model_dir)
    _ingest(cli, milton_home, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye!"}]][:1],
            "one.jsonl")
    code, out, err = cli("train-lora", "--json", env={"MILTON_TRAIN__MIN_NEW_PAIRS": "3"})
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "skipped" and "min_new_pairs" in result["reason"]
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("select count(*) from training_runs").fetchone() == (0,)
    assert conn.execute("select count(*) from training_items").fetchone() == (0,)
    conn.close()


def test_missing_converters_fail_before_training(cli, milton_home, tiny):
    model_dir, _ = tiny
    _config(milton_home, model_dir)
    code, out, err = cli("train-lora", env={"MILTON_MODEL__LLAMA_CPP_DIR": str(milton_home / "nope")})
    assert code == 2
    assert_clean_error(err, "model.llama_cpp_dir", "make install")


def test_killed_run_resumes_from_its_checkpoint(cli, milton_home, tiny, settings):
    model_dir, _ = tiny
    # with the anchor term on: its batches are part of what a resumed run must repeat exactly
    _config(milton_home, model_dir, max_steps=400, checkpoint_every=10, rouge_samples=0,
            anchor_weight=1.0)
    _ingest(cli, milton_home, _sessions(), "a.jsonl")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "milton", "train-lora"], cwd=milton_home, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    checkpoints = milton_home / "data" / "train" / "run-000001" / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while not any(checkpoints.glob("step-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    from milton.train.jobs import adapter_store

    assert adapter_store(settings).current() is None  # nothing half-published
    result = _train(cli)
    assert result["resumed_from"] and result["resumed_from"] >= 10, result
    assert result["steps"] == result["total_steps"] > result["resumed_from"] and result["run_id"] == 1
