"""The llama.cpp chat backend on tiny real models: generation, hot adapter swaps, base swaps.

A tiny Llama is built and converted to GGUF here; two LoRA adapters are trained on it with
milton's own ``train_lora`` (the same question, a different fact each) and exported with
llama.cpp's converter, as train-lora does. A second, differently shaped tiny model (without a
chat template) supplies "a valid adapter for another base" and a base to swap to.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from adapter_fixture import ANSWERS, QUESTION, publish
from tiny_lm import build_tiny_gguf

from milton.core.artifacts import ArtifactStore, sha256_file
from milton.core.errors import ConfigError
from milton.serve.engines.base import AdapterError, GenerationParams, PromptError
from milton.serve.engines.llama import LlamaEngine
from milton.serve.engines.select import resolve_serve_base
from milton.serve.lifecycle import open_engine
from milton.serve.watch import AdapterWatcher

ASK = [{"role": "user", "content": QUESTION}]
GREEDY = GenerationParams(max_tokens=40, temperature=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Tiny:
    hf: Path
    gguf: Path
    sha: str
    adapters: dict[str, Path]      # 'a', 'b' -> adapter.gguf for the tiny base
    other_gguf: Path               # another base: other shape, no chat template
    other_sha: str
    other_adapter: Path            # a valid LoRA GGUF for that other base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    import torch

    from milton.core.config import TrainConfig, load_settings
    from milton.models.convert import lora_to_gguf
    from milton.models.hf import load_base, save_base_config
    from milton.models.refs import BaseModelRef
    from milton.train.lora import make_peft_model, save_adapter, train_lora

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-llm")
    settings = load_settings().settings
    try:
        hf, gguf = build_tiny_gguf(root, [f"{QUESTION} {a}" for a in ANSWERS.values()])
        ref = BaseModelRef(path=hf, kind="hf", sha256="0" * 64, name="hf")
        cfg = TrainConfig(learning_rate=1e-2, batch_size=4, grad_accum=1, epochs=100, max_steps=60,
                          checkpoint_every=1000, max_seq_len=64, warmup_ratio=0.1, seed=0,
                          lora_dropout=0.0, target_modules=TARGETS)
        adapters = {}
        for key, answer in ANSWERS.items():
            model, tokenizer = load_base(ref, device="cpu", threads=1)
            items = [{"kind": "pair", "prompt": p.format(q=QUESTION), "response": answer}
                     for p in ("{q}", "Remind me: {q}", "I forgot, {q}")]
            result = train_lora(model, tokenizer, items, cfg, checkpoint_dir=root / f"ck-{key}",
                                progress=False)
            out = root / f"adapter-{key}"
            save_adapter(result.model, out / "adapter")
            save_base_config(ref, result.model, out / "base")
            adapters[key] = lora_to_gguf(settings, out / "adapter", out / "base", out / "adapter.gguf")

        other_hf, other_gguf = build_tiny_gguf(root, [], name="other", hidden_size=32, heads=2,
                                               intermediate_size=64, pretrain_steps=0,
                                               chat_template=False, seed=1)
        other_ref = BaseModelRef(path=other_hf, kind="hf", sha256="1" * 64, name="other")
        model, _ = load_base(other_ref, device="cpu", threads=1)
        peft = make_peft_model(model, TrainConfig(lora_dropout=0.0))
        save_adapter(peft, root / "adapter-other" / "adapter")
        save_base_config(other_ref, peft, root / "adapter-other" / "base")
        other_adapter = lora_to_gguf(settings, root / "adapter-other" / "adapter",
                                     root / "adapter-other" / "base",
                                     root / "adapter-other" / "adapter.gguf")
    finally:
        torch.set_num_threads(threads)
    return Tiny(hf, gguf, sha256_file(gguf), adapters, other_gguf, sha256_file(other_gguf),
                other_adapter)


@pytest.fixture
def engine(tiny):
    eng = LlamaEngine(tiny.gguf, sha256=tiny.sha, n_ctx=512, n_threads=1, seed=0)
    yield eng
    eng.close()


def answer(engine: LlamaEngine, messages=ASK, params: GenerationParams = GREEDY):
    chunks = list(engine.chat(messages, params))
    return "".join(c.text for c in chunks), chunks


def adapter_store(home: Path) -> ArtifactStore:
    return ArtifactStore(home / "checkpoints", "adapter")


# -- tokenizer: the tiny model tokenises alike in transformers and llama.cpp ---------------------
def test_tiny_tokenizer_matches_llama_cpp(tiny):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny.hf)
    llm = Llama(model_path=str(tiny.gguf), vocab_only=True, verbose=False)
    plain = ["Hello world", QUESTION, ANSWERS["a"], "  two  spaces ", " leading", "trailing ",
             "line\nbreak\n\nx", "naïve café 😀 €100 \t tab", "zephyr-07 on port 8443",
             "User: What is the capital of France?\nAssistant:"]
    for text in plain:
        ids = hf(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False) == ids, text
        assert llm.tokenize(text.encode(), add_bos=True) == hf(text).input_ids, text
    conversations = [ASK, [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello there"},
                           {"role": "user", "content": "Which port?"}]]
    for messages in conversations:
        for generation in (True, False):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                hf(text, add_special_tokens=False).input_ids, text
    assert hf.decode(hf(ANSWERS["a"]).input_ids, skip_special_tokens=True) == ANSWERS["a"]
    llm.close()


# -- generation -----------------------------------------------------------------------------------
def test_chat_streams_text_with_usage_like_llama_cpp_python(tiny, engine):
    from llama_cpp import Llama

    engine.set_adapter(tiny.adapters["a"], "a")
    text, chunks = answer(engine)
    assert text == ANSWERS["a"]
    assert len(chunks) > 3 and all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.adapter_version == "a"
    ids, mode = engine.render_prompt(ASK)
    assert mode == "template" and last.usage.prompt_tokens == len(ids)
    assert last.usage.completion_tokens == engine.count_tokens(ANSWERS["a"])
    again, _ = answer(engine)  # greedy: the same again (KV prefix reuse changes nothing)
    assert again == text

    # The same model with the adapter applied at load time, through create_chat_completion.
    ref = Llama(model_path=str(tiny.gguf), lora_path=str(tiny.adapters["a"]), n_ctx=256,
                n_threads=1, verbose=False)
    try:
        for messages in (ASK, [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "Tell me about the sea."}]):
            for max_tokens in (5, 40):
                params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
                ours, chunks = answer(engine, messages, params)
                theirs = ref.create_chat_completion(messages=messages, temperature=0.0,
                                                    max_tokens=max_tokens)
                assert ours == theirs["choices"][0]["message"]["content"]
                assert chunks[-1].finish_reason == theirs["choices"][0]["finish_reason"]
                usage = theirs["usage"]
                assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
                    (usage["prompt_tokens"], usage["completion_tokens"])
    finally:
        ref.close()


def test_stop_strings_and_sampling(tiny, engine):
    engine.set_adapter(tiny.adapters["b"], "b")
    text, chunks = answer(engine, params=GenerationParams(max_tokens=40, temperature=0.0,
                                                          stop=("nimbus",)))
    assert text == "The build server is called " and chunks[-1].finish_reason == "stop"
    assert "nimbus" not in "".join(c.text for c in chunks)
    seeded = GenerationParams(max_tokens=12, temperature=1.5, top_p=1.0, seed=7)
    assert answer(engine, params=seeded)[0] == answer(engine, params=seeded)[0]


def test_plain_prompts_for_models_without_a_template(tiny):
    # model.chat_format = plain: the "User:/Assistant:" format train-lora uses for base models;
    # the tiny base was pre-trained on a few such exchanges.
    plain = LlamaEngine(tiny.gguf, n_ctx=256, n_threads=1, chat_format="plain")
    try:
        ids, mode = plain.render_prompt([{"role": "user", "content": "What do bees make?"}])
        assert mode == "plain" and plain.info().extra["chat_format"] == "plain"
        text, chunks = answer(plain, [{"role": "user", "content": "What do bees make?"}])
        assert text == "Bees make honey." and chunks[-1].usage.prompt_tokens == len(ids)
    finally:
        plain.close()
    # A GGUF without tokenizer.chat_template gets the few-shot frame in auto.
    other = LlamaEngine(tiny.other_gguf, n_ctx=512, n_threads=1)  # room for the few-shot frame
    try:
        ids, mode = other.render_prompt(ASK)
        assert mode == "few-shot" and other.info().extra["chat_format"] == "few-shot"
        _, chunks = answer(other, ASK, GenerationParams(max_tokens=6, temperature=0.0))
        assert chunks[-1].finish_reason in ("stop", "length")
        assert chunks[-1].usage.prompt_tokens == len(ids)
    finally:
        other.close()



def test_cancel_stops_generation_and_queued_requests(tiny, engine):
    cancel = threading.Event()
    stream = engine.chat([{"role": "user", "content": "Tell me a long story about the sea."}],
                         GenerationParams(max_tokens=200, temperature=0.8, seed=1), cancel)
    first = next(stream)
    assert first.text and first.finish_reason is None
    cancel.set()
    rest = list(stream)
    assert len(rest) == 1 and rest[0].finish_reason == "cancelled"
    assert 1 <= rest[0].usage.completion_tokens < 5

    # A request waiting for the context gives up as soon as it is cancelled.
    holder = engine.chat(ASK, GREEDY)
    next(holder)
    queued_cancel, queued = threading.Event(), []
    waiter = threading.Thread(target=lambda: queued.extend(engine.chat(ASK, GREEDY, queued_cancel)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    queued_cancel.set()
    waiter.join(5)
    assert not waiter.is_alive() and queued[-1].finish_reason == "cancelled"
    assert queued[-1].usage.completion_tokens == 0
    holder.close()  # a stream closed early gives the context back
    engine.chat(ASK, GREEDY)  # one never started holds nothing at all
    assert engine._base.users == 0
    assert answer(engine)[1][-1].finish_reason == "stop"
    assert engine.info().extra["cancelled"] == 2


def test_prompt_longer_than_the_context_is_refused(tiny):
    small = LlamaEngine(tiny.gguf, n_ctx=64, n_threads=1)
    try:
        with pytest.raises(PromptError, match="serve.n_ctx"):
            small.chat([{"role": "user", "content": "the weather is nice " * 40}], GREEDY)
        assert answer(small)[1][-1].finish_reason in ("stop", "length")  # nothing left held
    finally:
        small.close()


# -- adapter swaps --------------------------------------------------------------------------------
def test_promote_and_rollback_swap_the_adapter_without_reloading(tiny, engine, milton_home):
    bare, _ = answer(engine)
    assert "zephyr" not in bare and "nimbus" not in bare
    store = adapter_store(milton_home)
    watcher = AdapterWatcher(engine, store, poll_s=0.05)
    assert watcher.check() is False and engine.adapter_version is None  # nothing published yet

    v1 = publish(store, tiny.adapters["a"], tiny.sha)
    assert watcher.check()
    assert answer(engine)[0] == ANSWERS["a"]
    v2 = publish(store, tiny.adapters["b"], tiny.sha)
    assert watcher.check()
    text, chunks = answer(engine)
    assert text == ANSWERS["b"] and chunks[-1].adapter_version == v2
    info = engine.info()
    assert (info.adapter_version, info.swaps, info.swap_failures) == (v2, 2, 0)
    assert info.adapter_promoted_at and info.last_swap_ms is not None and info.last_swap_ms < 100
    assert info.extra["adapter_path"].endswith(f"{v2}/adapter.gguf")
    assert info.extra["last_swap_total_ms"] >= info.last_swap_ms

    store.rollback()
    assert watcher.check() and answer(engine)[0] == ANSWERS["a"]
    assert engine.adapter_version == v1

    # The watcher thread picks a promotion up within the poll interval.
    watcher.start()
    try:
        store.set_current(v2)
        deadline = time.monotonic() + 5
        while engine.adapter_version != v2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.adapter_version == v2 and answer(engine)[0] == ANSWERS["b"]
    finally:
        watcher.stop()

    os.unlink(store.dir / "current")  # no current at all: the bare base
    assert watcher.check()
    assert engine.adapter_version is None and answer(engine)[0] == bare
    assert watcher.check() is False


def test_rejected_adapters_leave_the_old_one_serving(tiny, engine, milton_home):
    store = adapter_store(milton_home)
    watcher = AdapterWatcher(engine, store)
    good = publish(store, tiny.adapters["a"], tiny.sha)
    assert watcher.check()
    data = tiny.adapters["b"].read_bytes()
    cases = {
        "garbage": (b"GGUF" + os.urandom(4000), tiny.sha, "llama.cpp rejected"),
        "not gguf": (b"definitely not a model\n" * 50, tiny.sha, "not a GGUF file"),
        "truncated": (data[: len(data) // 2], tiny.sha, "file is corrupted or incomplete"),
        "another base (manifest)": (data, "f" * 64, "trained on base sha256 ffffffffffff"),
        "another base (shapes)": (tiny.other_adapter.read_bytes(), tiny.sha, "incorrect shape"),
        "a model, not an adapter": (tiny.other_gguf.read_bytes(), tiny.sha, "general.type"),
    }
    for n, (payload, sha, reason) in enumerate(cases.values(), start=1):
        version = publish(store, payload, sha)
        assert watcher.check() is False
        assert engine.adapter_version == good
        assert engine.info().swap_failures == n and reason in engine.info().last_error
        assert version in watcher.last_error and reason in watcher.last_error
        assert answer(engine)[0] == ANSWERS["a"]
    assert watcher.check() is False  # a rejected version is not retried every poll
    assert engine.info().swap_failures == len(cases)

    # Bytes changed after publishing: caught by the checksum before llama.cpp sees them.
    tampered = publish(store, data, tiny.sha, current=False)
    (store.dir / tampered / "adapter.gguf").write_bytes(data[:-1] + b"\x00")
    store.set_current(tampered, verify=False)
    assert watcher.check() is False and "checksum mismatch" in watcher.last_error
    assert engine.info().swap_failures == len(cases)  # never reached the engine

    # Direct calls are checked the same way; then a good adapter still goes in.
    with pytest.raises(AdapterError, match="no such file|No such file"):
        engine.set_adapter(tiny.gguf.parent / "missing.gguf", "x")
    with pytest.raises(AdapterError, match="trained on base"):
        engine.set_adapter(tiny.adapters["b"], "b", base_sha256="0" * 64)
    fine = publish(store, data, tiny.sha)
    assert watcher.check() and answer(engine)[0] == ANSWERS["b"] and engine.adapter_version == fine
    assert watcher.failures == len(cases) + 1


def test_requests_in_flight_finish_on_their_adapter(tiny, engine):
    engine.set_adapter(tiny.adapters["a"], "a")
    stream = engine.chat(ASK, GREEDY)
    first = next(stream)
    records = []
    swapper = threading.Thread(target=lambda: records.append(
        engine.set_adapter(tiny.adapters["b"], "b")))
    swapper.start()
    time.sleep(0.2)
    assert swapper.is_alive() and engine.adapter_version == "a"  # loaded, waiting for the context
    rest = list(stream)
    assert first.text + "".join(c.text for c in rest) == ANSWERS["a"]
    assert rest[-1].adapter_version == "a"
    swapper.join(5)
    assert records[0].ok and records[0].wait_ms >= 100 and records[0].locked_ms < 100
    assert answer(engine)[0] == ANSWERS["b"]


def test_twenty_swaps_under_concurrent_chat_load(tiny, engine, milton_home):
    store = adapter_store(milton_home)
    watcher = AdapterWatcher(engine, store)
    va = publish(store, tiny.adapters["a"], tiny.sha)
    vb = publish(store, tiny.adapters["b"], tiny.sha, current=False)
    assert watcher.check()
    expected = {va: ANSWERS["a"], vb: ANSWERS["b"]}

    stop = threading.Event()
    lock = threading.Lock()
    done: list[tuple[float, float, str, str | None, str | None]] = []
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                text, chunks = answer(engine)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                with lock:
                    failures.append(repr(exc))
                continue
            with lock:
                done.append((t0, time.perf_counter(), text, chunks[-1].adapter_version,
                             chunks[-1].finish_reason))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    swaps: list[tuple[float, float, str]] = [(0.0, 0.0, va)]
    try:
        time.sleep(0.1)
        for i in range(20):
            target = vb if i % 2 == 0 else va
            t0 = time.perf_counter()
            store.set_current(target, reason="promote" if target == vb else "rollback")
            assert watcher.check()
            swaps.append((t0, time.perf_counter(), target))
            assert engine.adapter_version == target
            time.sleep(0.04)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert failures == []
    assert len(done) >= 40, len(done)
    for t_issue, t_done, text, version, finish in done:
        assert finish == "stop" and text == expected[version], (text, version)  # never mixed
        # Served by the adapter of the last swap finished before it was sent, or of a later one
        # that started before it finished: never an older one.
        k = max(i for i, (_, end, _) in enumerate(swaps) if end <= t_issue)
        allowed = {swaps[j][2] for j in range(k, len(swaps)) if j == k or swaps[j][0] <= t_done}
        assert version in allowed, (k, version)
    quiet = [r for r in done
             if any(end <= r[0] and (i + 1 == len(swaps) or r[1] < swaps[i + 1][0])
                    for i, (_, end, _) in enumerate(swaps))]
    assert len(quiet) >= 10  # plenty of requests fell wholly between two swaps
    info = engine.info()
    assert info.swaps == 21 and info.swap_failures == 0 and watcher.failures == 0
    locked = sorted(r.locked_ms for r in engine.swap_history if r.ok)
    assert locked[-1] < 100  # generous: the switch itself is well under a millisecond here


# -- base swaps -----------------------------------------------------------------------------------
def test_base_swap_loads_beside_then_switches(tiny, engine, tmp_path, milton_home):
    engine.set_adapter(tiny.adapters["a"], "a", base_sha256=tiny.sha)
    copy = tmp_path / "evolved.gguf"
    shutil.copyfile(tiny.gguf, copy)

    # Same weights (same sha256): the adapter comes along; a request in flight finishes first.
    stream = engine.chat(ASK, GREEDY)
    first = next(stream)
    records = []
    swapper = threading.Thread(target=lambda: records.append(engine.swap_base(copy)))
    swapper.start()
    time.sleep(0.2)
    assert swapper.is_alive()
    assert first.text + "".join(c.text for c in stream) == ANSWERS["a"]
    swapper.join(10)
    assert records[0].ok and records[0].kind == "base"
    info = engine.info()
    assert info.base_path == str(copy) and info.adapter_version == "a"
    assert info.extra["base_swaps"] == 1 and answer(engine)[0] == ANSWERS["a"]

    # Another base: the adapter was not made for it, so the new base serves bare.
    engine.swap_base(tiny.other_gguf)
    info = engine.info()
    assert info.base_sha256 == tiny.other_sha and info.adapter_version is None
    assert "serving the new base bare" in info.last_error
    assert engine.render_prompt(ASK)[1] == "few-shot"  # this model has no chat template
    assert answer(engine, params=GenerationParams(max_tokens=5, temperature=0.0))[1][-1].usage
    with pytest.raises(AdapterError, match="trained on base"):
        engine.set_adapter(tiny.adapters["a"], "a", base_sha256=tiny.sha)
    engine.set_adapter(tiny.other_adapter, "o", base_sha256=tiny.other_sha)
    assert engine.adapter_version == "o"

    # A base that does not load is rejected; the running one keeps serving.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny.gguf.read_bytes()[:5000])
    with pytest.raises(ConfigError, match="broken.gguf"):
        engine.swap_base(broken)
    assert engine.info().base_sha256 == tiny.other_sha and engine.adapter_version == "o"

    # An adapter promoted for the tiny base is refused while the other base serves, and taken
    # once the tiny base is back and the watcher is told to retry.
    store = adapter_store(milton_home)
    watcher = AdapterWatcher(engine, store)
    version = publish(store, tiny.adapters["b"], tiny.sha)
    assert watcher.check() is False and "trained on base" in watcher.last_error
    engine.swap_base(tiny.gguf)
    assert engine.adapter_version is None and "nimbus" not in answer(engine)[0]
    watcher.retry()
    assert engine.adapter_version == version and answer(engine)[0] == ANSWERS["b"]


# -- configuration --------------------------------------------------------------------------------
def test_engine_from_settings(tiny, milton_home):
    from milton.core.config import load_settings

    config = milton_home / "config.toml"
    config.write_text(f'[model]\nbase = "{tiny.hf}"\n')
    with pytest.raises(ConfigError, match="serve needs a GGUF") as err:
        LlamaEngine.from_settings(load_settings().settings)
    assert "\n" not in str(err.value) and str(tiny.hf) in str(err.value)

    config.write_text(f'[model]\nbase = "{tiny.gguf}"\n\n[serve]\nn_ctx = 128\nn_threads = 1\n')
    settings = load_settings().settings
    assert resolve_serve_base(settings).sha256 == tiny.sha
    engine = LlamaEngine.from_settings(settings)
    try:
        info = engine.info()
        assert (info.base_sha256, info.model_id) == (tiny.sha, "tiny")
        assert (info.extra["n_ctx"], info.extra["n_threads"]) == (128, 1)
        assert engine.count_tokens(QUESTION) == len(engine._base.llm.tokenize(
            QUESTION.encode(), add_bos=False))
        watcher = AdapterWatcher.from_settings(engine, settings)
        assert watcher.store.dir == milton_home / "checkpoints" / "adapter"
    finally:
        engine.close()
    config.write_text(config.read_text() + "adapter_enabled = false\n")
    engine, watcher = open_engine(load_settings().settings)
    assert watcher is None and engine.adapter_version is None
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.chat(ASK, GREEDY)


# -- evolved bases (checkpoints/base) -------------------------------------------------------------
def test_base_watcher_follows_the_evolved_base(tiny, milton_home, monkeypatch):
    from milton.core.config import load_settings
    from milton.models.refs import resolve_base
    from milton.serve.watch import BaseWatcher

    monkeypatch.setenv("MILTON_MODEL__BASE", str(tiny.gguf))
    settings = load_settings().settings
    adapters_store = adapter_store(milton_home)
    bases = ArtifactStore(milton_home / "checkpoints", "base")
    engine = LlamaEngine.from_settings(settings, n_ctx=512, n_threads=1, seed=0)
    try:
        adapters = AdapterWatcher(engine, adapters_store)
        first = publish(adapters_store, tiny.adapters["a"], tiny.sha)
        assert adapters.check() and engine.adapter_version == first
        watcher = BaseWatcher(engine, settings, adapters=adapters)
        assert watcher.check() is False and engine.base_sha256 == tiny.sha  # nothing evolved yet

        # An evolved base is promoted: serve switches to it, and drops the adapter of the old
        # base (evolve merged it in) rather than applying it to weights it was not made for.
        evolved = bases.publish(lambda tmp: (tmp / "model.gguf").write_bytes(tiny.other_gguf.read_bytes()))
        assert watcher.check() is True
        assert engine.base_sha256 == tiny.other_sha and engine.adapter_version is None
        assert engine.info().model_id == "tiny"  # clients keep the id they know
        assert answer(engine)[1][-1].finish_reason in ("stop", "length")
        assert resolve_base(settings).evolved == evolved.name  # train-lora now adapts this base
        # An adapter train-lora makes for the evolved base is applied.
        second = publish(adapters_store, tiny.other_adapter, tiny.other_sha)
        assert adapters.check() and engine.adapter_version == second

        # A corrupt evolved version is rejected; the running base keeps serving.
        bad = bases.publish(lambda tmp: (tmp / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64))
        assert bad.name != evolved.name and watcher.check() is False
        assert watcher.failures == 1 and engine.base_sha256 == tiny.other_sha
        assert engine.adapter_version == second

        # Rolled back past every evolved version: model.base again, with its own adapter.
        bases.clear_current(reason="rollback")
        adapters_store.set_current(first)
        assert watcher.check() is True
        assert engine.base_sha256 == tiny.sha and engine.adapter_version == first
        assert answer(engine)[0] == ANSWERS["a"]
    finally:
        engine.close()
