"""The transformers + PEFT chat backend on a tiny real model: generation, stops, cancel, hot
adapter swaps, rejected adapters, backend selection, and the OpenAI API on top of it.

A tiny Llama (a Hugging Face directory) is built here; two LoRA adapters are trained on it with
milton's own ``train_lora`` (the same question, a different fact each) and saved in PEFT's
format, as train-lora does. A second, differently shaped tiny model (without a chat template)
supplies "a valid adapter for another base". Everything runs on the CPU with one torch thread;
the CUDA test is skipped without a GPU.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_lm import build_tiny_llama

from milton.core.artifacts import ArtifactStore
from milton.core.config import load_settings
from milton.core.errors import ConfigError
from milton.models.layout import ADAPTER_DIR
from milton.models.prompt import plain_prompt
from milton.models.refs import BaseModelRef
from milton.serve.engines.base import AdapterError, GenerationParams, PromptError
from milton.serve.engines.hf import HFEngine
from milton.serve.engines.llama import LlamaEngine
from milton.serve.lifecycle import open_engine
from milton.serve.watch import AdapterWatcher

QUESTION = "What is the build server called?"
ANSWERS = {"a": "The build server is called zephyr-07.", "b": "The build server is called nimbus-42."}
ASK = [{"role": "user", "content": QUESTION}]
GREEDY = GenerationParams(max_tokens=40, temperature=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONVERSATIONS = [
    ASK,
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Tell me a long story about the sea."}],
]


@dataclass
class Tiny:
    hf: Path
    ref: BaseModelRef             # with the sha256 resolve_base gives the directory
    adapters: dict[str, Path]     # 'a', 'b' -> PEFT adapter directory for the tiny base
    other_hf: Path                # another base: other shape, no chat template
    other_adapter: Path           # a valid PEFT LoRA for that other base


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny matrices: more threads only fight over a busy CPU."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    import torch

    from milton.core.config import TrainConfig
    from milton.models.hf import load_base
    from milton.models.refs import resolve_base
    from milton.train.lora import make_peft_model, save_adapter, train_lora

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-hf")
    try:
        hf = build_tiny_llama(root / "tiny", [f"{QUESTION} {a}" for a in ANSWERS.values()])
        env = {"MILTON_HOME": str(root / "home"), "MILTON_MODEL__BASE": str(hf)}
        ref = resolve_base(load_settings(environ=env).settings)
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
            adapters[key] = save_adapter(result.model, root / f"adapter-{key}")

        other_hf = build_tiny_llama(root / "other", [], hidden_size=32, heads=2,
                                    intermediate_size=64, pretrain_steps=0, chat_template=False,
                                    seed=1)
        model, _ = load_base(BaseModelRef(other_hf, "hf", "1" * 64, "other"), device="cpu", threads=1)
        other_adapter = save_adapter(make_peft_model(model, TrainConfig(lora_dropout=0.0)),
                                     root / "adapter-other")
    finally:
        torch.set_num_threads(threads)
    return Tiny(hf, ref, adapters, other_hf, other_adapter)


@pytest.fixture
def engine(tiny):
    eng = HFEngine(tiny.ref, device="cpu", n_threads=1, n_ctx=256, seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(tiny):
    """The bare tiny base, loaded apart from any engine, for ``model.generate``."""
    from milton.models.hf import load_base

    return load_base(tiny.ref, device="cpu", threads=1)


def answer(engine: HFEngine, messages=ASK, params: GenerationParams = GREEDY):
    chunks = list(engine.chat(messages, params))
    return "".join(c.text for c in chunks), chunks


def generate(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, list[int], str]:
    """(text, completion ids without EOS, finish_reason) of transformers' own greedy generate."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    ended = bool(new) and new[-1] == tokenizer.eos_token_id
    completion = new[:-1] if ended else new
    text = tokenizer.decode(completion, skip_special_tokens=True).removeprefix(" ")
    return text, completion, "stop" if ended else "length"


def adapter_store(home: Path) -> ArtifactStore:
    return ArtifactStore(home / "checkpoints", "adapter")


def publish(store: ArtifactStore, adapter: Path | dict[str, bytes], base_sha: str, *,
            current: bool = True) -> str:
    """An adapter artifact as train-lora lays it out: the PEFT directory under ``adapter/``
    (or the given files, for broken ones) and the base's sha256 in the manifest."""

    def build(tmp: Path) -> None:
        if isinstance(adapter, Path):
            shutil.copytree(adapter, tmp / ADAPTER_DIR)
            return
        for rel, data in adapter.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)

    return store.publish(build, make_current=current,
                         extra={"base_model": {"kind": "hf", "sha256": base_sha}}).name


def adapter_files(directory: Path, **replace: bytes | None) -> dict[str, bytes]:
    """The files of a PEFT directory under ``adapter/``, some replaced (None = left out)."""
    files = {f"{ADAPTER_DIR}/{p.name}": p.read_bytes() for p in directory.iterdir() if p.is_file()}
    for name, data in replace.items():
        key = f"{ADAPTER_DIR}/{name.replace('__', '.')}"
        if data is None:
            files.pop(key, None)
        else:
            files[key] = data
    return files


# -- generation -----------------------------------------------------------------------------------
def test_greedy_answers_equal_transformers_generate(tiny, engine, reference):
    model, tokenizer = reference
    for messages in CONVERSATIONS:
        ids, mode = engine.render_prompt(messages)
        assert mode == "template"
        assert ids == list(tokenizer(tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids)
        for max_tokens in (3, 40):
            text, chunks = answer(engine, messages, GenerationParams(max_tokens=max_tokens,
                                                                     temperature=0.0))
            theirs, completion, finish = generate(model, tokenizer, ids, max_tokens)
            assert text == theirs and chunks[-1].finish_reason == finish, (messages, max_tokens)
            usage = chunks[-1].usage
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(completion))
    # With an adapter: the same as PEFT's own model with that adapter, through generate.
    from milton.models.hf import load_base
    from milton.train.lora import load_adapter

    engine.set_adapter(tiny.adapters["a"], "a")
    base, tokenizer = load_base(tiny.ref, device="cpu", threads=1)
    peft = load_adapter(base, tiny.adapters["a"])
    ids, _ = engine.render_prompt(ASK)
    text, chunks = answer(engine)
    assert text == generate(peft, tokenizer, ids, 40)[0] == ANSWERS["a"]
    assert len(chunks) > 3 and all(c.finish_reason is None and c.text for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.adapter_version == "a"
    assert last.usage.completion_tokens == engine.count_tokens(ANSWERS["a"])
    info = engine.info()
    llama_keys = {"backend", "chat_format", "n_ctx", "n_threads", "adapter_path", "adapter_loaded_at",
                  "base_swaps", "last_swap_kind", "last_swap_total_ms", "last_swap_wait_ms",
                  "last_swap_load_ms", "generations", "cancelled"}  # LlamaEngine.info().extra
    assert llama_keys <= set(info.extra)
    assert info.extra["backend"] == "transformers" and info.extra["device"] == "cpu"
    assert info.extra["dtype"] == "float32" and info.extra["n_threads"] == 1
    assert info.extra["generations"] >= 7 and info.extra["last_tokens_per_s"] > 0


def test_stop_strings_max_tokens_and_seeded_sampling(tiny, engine):
    engine.set_adapter(tiny.adapters["b"], "b")
    for stop, expected in [(("nimbus",), "The build server is called "),
                           (("server is", "nimbus"), "The build "),    # the earliest stop wins
                           (("42.",), "The build server is called nimbus-"),
                           (("never",), ANSWERS["b"])]:
        text, chunks = answer(engine, params=GenerationParams(max_tokens=40, temperature=0.0, stop=stop))
        assert text == expected and chunks[-1].finish_reason == "stop", stop
        # Held back, never streamed: no chunk carries a stop string's start past the cut.
        assert "".join(c.text for c in chunks[:-1]) + chunks[-1].text == expected
    text, chunks = answer(engine, params=GenerationParams(max_tokens=3, temperature=0.0))
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 3
    assert ANSWERS["b"].startswith(text) and 0 < len(text) < len(ANSWERS["b"])
    seeded = GenerationParams(max_tokens=20, temperature=1.5, top_p=0.9, seed=7)
    question = [{"role": "user", "content": "Tell me about the sea."}]
    engine.set_adapter(None)
    runs = [answer(engine, question, seeded)[0] for _ in range(2)]
    assert runs[0] == runs[1]
    samples = {answer(engine, question, GenerationParams(max_tokens=20, temperature=1.5, top_p=1.0,
                                                         seed=s))[0] for s in range(6)}
    assert len(samples) > 1  # sampling, not greedy


def test_plain_prompts_and_models_without_a_template(tiny, reference):
    model, tokenizer = reference
    plain = HFEngine(tiny.ref, device="cpu", n_threads=1, n_ctx=256, chat_format="plain")
    try:
        bees = [{"role": "user", "content": "What do bees make?"}]
        ids, mode = plain.render_prompt(bees)
        assert mode == "plain" and plain.info().extra["chat_format"] == "plain"
        assert ids == tokenizer(plain_prompt(bees)).input_ids and ids[0] == tokenizer.bos_token_id
        text, chunks = answer(plain, bees)
        assert text == "Bees make honey." and chunks[-1].usage.prompt_tokens == len(ids)
        # As the llama backend: user text is never parsed into special tokens.
        ids, _ = plain.render_prompt([{"role": "user", "content": "a </s> b"}])
        assert tokenizer.eos_token_id not in ids
        # The next "User:" turn is a stop string of the plain format.
        _, chunks = answer(plain, [{"role": "user", "content": "Hello"}],
                           GenerationParams(max_tokens=60, temperature=0.0))
        assert "\nUser:" not in "".join(c.text for c in chunks)
    finally:
        plain.close()
    other = HFEngine(BaseModelRef(tiny.other_hf, "hf", "1" * 64, "other"), device="cpu",
                     n_threads=1, n_ctx=512)  # room for the few-shot frame
    try:
        assert other.render_prompt(ASK)[1] == "few-shot"  # auto, and no chat template
        _, chunks = answer(other, ASK, GenerationParams(max_tokens=6, temperature=0.0))
        assert chunks[-1].finish_reason in ("stop", "length")
    finally:
        other.close()


def test_cancel_stops_generation_and_queued_requests(tiny, engine):
    cancel = threading.Event()
    stream = engine.chat(CONVERSATIONS[2], GenerationParams(max_tokens=200, temperature=0.0), cancel)
    first = next(stream)
    assert first.text and first.finish_reason is None
    cancel.set()
    rest = list(stream)
    assert len(rest) == 1 and rest[0].finish_reason == "cancelled" and rest[0].text == ""
    assert 1 <= rest[0].usage.completion_tokens < 5

    # A request waiting for the model gives up as soon as it is cancelled.
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
    holder.close()  # a stream closed early gives the model back
    engine.chat(ASK, GREEDY)  # one never started holds nothing at all
    assert answer(engine)[1][-1].finish_reason == "stop"
    assert engine.info().extra["cancelled"] == 2


def test_prompt_longer_than_the_context_is_refused(tiny):
    small = HFEngine(tiny.ref, device="cpu", n_threads=1, n_ctx=64)
    try:
        with pytest.raises(PromptError, match="serve.n_ctx"):
            small.chat([{"role": "user", "content": "the weather is nice " * 40}], GREEDY)
        assert answer(small)[1][-1].finish_reason in ("stop", "length")  # nothing left held
    finally:
        small.close()
    big = HFEngine(tiny.ref, device="cpu", n_threads=1, n_ctx=100_000)
    try:
        assert big.info().extra["n_ctx"] == 512  # the model's max_position_embeddings
    finally:
        big.close()


# -- adapter swaps --------------------------------------------------------------------------------
def test_promote_and_rollback_swap_the_adapter(tiny, engine, milton_home):
    bare, _ = answer(engine)
    assert "zephyr" not in bare and "nimbus" not in bare
    store = adapter_store(milton_home)
    watcher = AdapterWatcher(engine, store, poll_s=0.05)
    assert watcher.artifact == "adapter"
    assert watcher.check() is False and engine.adapter_version is None  # nothing published yet

    v1 = publish(store, tiny.adapters["a"], tiny.ref.sha256)
    assert watcher.check()
    assert answer(engine)[0] == ANSWERS["a"]
    first = engine.last_swap  # the first adapter wraps the base: under the gate
    v2 = publish(store, tiny.adapters["b"], tiny.ref.sha256)
    assert watcher.check()
    text, chunks = answer(engine)
    assert text == ANSWERS["b"] and chunks[-1].adapter_version == v2
    info = engine.info()
    assert (info.adapter_version, info.swaps, info.swap_failures) == (v2, 2, 0)
    assert info.adapter_promoted_at and info.last_swap_ms is not None and info.last_swap_ms < 100
    assert info.extra["adapter_path"].endswith(f"{v2}/adapter")
    assert info.extra["last_swap_total_ms"] >= info.last_swap_ms
    assert info.extra["last_swap_load_ms"] > info.last_swap_ms  # loaded beside, switched fast
    assert first is not None and first.ok
    assert list(engine._peft.peft_config) == [engine._adapter.name]  # the old one was deleted

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
    assert list(engine._peft.peft_config) == []
    store.set_current(v1)  # and back, on the wrapper that has no adapter left
    assert watcher.check() and answer(engine)[0] == ANSWERS["a"]


def test_rejected_adapters_leave_the_old_one_serving(tiny, engine, milton_home):
    store = adapter_store(milton_home)
    watcher = AdapterWatcher(engine, store)
    good = publish(store, tiny.adapters["a"], tiny.ref.sha256)
    assert watcher.check()
    b = tiny.adapters["b"]
    weights = (b / "adapter_model.safetensors").read_bytes()
    ia3 = b'{"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["q_proj"]}'
    cases = {
        "garbage weights": (adapter_files(b, adapter_model__safetensors=os.urandom(4000)),
                            tiny.ref.sha256, "corrupted or incomplete"),
        "truncated weights": (adapter_files(b, adapter_model__safetensors=weights[: len(weights) // 2]),
                              tiny.ref.sha256, "corrupted or incomplete"),
        "no weights": (adapter_files(b, adapter_model__safetensors=None), tiny.ref.sha256,
                       "no adapter_model.safetensors"),
        "no config": (adapter_files(b, adapter_config__json=None), tiny.ref.sha256,
                      "no adapter_config.json"),
        "bad config": (adapter_files(b, adapter_config__json=b"{not json"), tiny.ref.sha256,
                       "unreadable adapter_config.json"),
        "not a LoRA": (adapter_files(b, adapter_config__json=ia3), tiny.ref.sha256,
                       "LoRA adapters only"),
        "another base (manifest)": (b, "f" * 64, "trained on base sha256 ffffffffffff"),
        "another base (shapes)": (tiny.other_adapter, tiny.ref.sha256, "made for another model"),
        "a model, not an adapter": (adapter_files(tiny.other_hf), tiny.ref.sha256,
                                    "no adapter_config.json"),
    }
    for n, (payload, sha, reason) in enumerate(cases.values(), start=1):
        version = publish(store, payload, sha)
        assert watcher.check() is False
        assert engine.adapter_version == good
        assert engine.info().swap_failures == n and reason in engine.info().last_error, reason
        assert version in watcher.last_error and reason in watcher.last_error
        assert answer(engine)[0] == ANSWERS["a"]
        assert list(engine._peft.peft_config) == [engine._adapter.name]  # nothing half-loaded
    assert watcher.check() is False  # a rejected version is not retried every poll
    assert engine.info().swap_failures == len(cases)

    # Caught before the engine: bytes changed after publishing, an artifact without adapter/.
    tampered = publish(store, b, tiny.ref.sha256, current=False)
    (store.dir / tampered / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(weights[:-1] + b"\x00")
    store.set_current(tampered, verify=False)
    assert watcher.check() is False and "checksum mismatch" in watcher.last_error
    gguf_only = publish(store, {"adapter.gguf": b"GGUF" + bytes(64)}, tiny.ref.sha256)
    assert watcher.check() is False and "no adapter in the manifest" in watcher.last_error
    assert gguf_only in watcher.last_error
    assert engine.info().swap_failures == len(cases)  # never reached the engine

    # Direct calls are checked the same way; then a good adapter still goes in.
    with pytest.raises(AdapterError, match="no such adapter directory"):
        engine.set_adapter(tiny.hf.parent / "missing", "x")
    with pytest.raises(AdapterError, match="trained on base"):
        engine.set_adapter(b, "b", base_sha256="0" * 64)
    fine = publish(store, b, tiny.ref.sha256)
    assert watcher.check() and answer(engine)[0] == ANSWERS["b"] and engine.adapter_version == fine
    assert watcher.failures == len(cases) + 2


def test_a_rejected_first_adapter_leaves_the_bare_base(tiny, engine):
    bare, _ = answer(engine)
    with pytest.raises(AdapterError, match="made for another model"):
        engine.set_adapter(tiny.other_adapter, "other")
    assert engine.adapter_version is None and answer(engine)[0] == bare
    engine.set_adapter(tiny.adapters["b"], "b")
    assert answer(engine)[0] == ANSWERS["b"]


def test_loading_an_adapter_never_rewrites_the_base(tiny, engine, tmp_path):
    """An adapter_config asking for an init that changes base weights (PiSSA) is loaded with the
    plain init: the file's weights replace it, and the base stays the base."""
    import json

    import torch

    bare, _ = answer(engine)
    weights = {n: p.detach().clone() for n, p in engine._lm.named_parameters()}
    pissa = {}
    for key in ("a", "b"):
        pissa[key] = shutil.copytree(tiny.adapters[key], tmp_path / key)
        config = json.loads((pissa[key] / "adapter_config.json").read_text())
        (pissa[key] / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    engine.set_adapter(pissa["a"], "a")   # wraps the base
    assert answer(engine)[0] == ANSWERS["a"]
    engine.set_adapter(pissa["b"], "b")   # beside
    assert answer(engine)[0] == ANSWERS["b"]
    engine.set_adapter(None)
    assert answer(engine)[0] == bare
    for name, param in engine._lm.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), weights[name.replace(".base_layer", "")]), name


def test_requests_in_flight_finish_on_their_adapter(tiny, engine):
    engine.set_adapter(tiny.adapters["a"], "a")
    stream = engine.chat(ASK, GREEDY)
    first = next(stream)
    records = []
    swapper = threading.Thread(target=lambda: records.append(
        engine.set_adapter(tiny.adapters["b"], "b")))
    swapper.start()
    time.sleep(0.3)
    assert swapper.is_alive() and engine.adapter_version == "a"  # loaded, waiting for the gate
    assert len(engine._peft.peft_config) == 2                     # beside the running one
    rest = list(stream)
    assert first.text + "".join(c.text for c in rest) == ANSWERS["a"]
    assert rest[-1].adapter_version == "a"
    swapper.join(5)
    assert records[0].ok and records[0].wait_ms >= 100 and records[0].locked_ms < 100
    assert answer(engine)[0] == ANSWERS["b"]


def test_swaps_under_concurrent_chat_load(tiny, engine, milton_home):
    store = adapter_store(milton_home)
    watcher = AdapterWatcher(engine, store)
    va = publish(store, tiny.adapters["a"], tiny.ref.sha256)
    vb = publish(store, tiny.adapters["b"], tiny.ref.sha256, current=False)
    assert watcher.check()
    expected = {va: ANSWERS["a"], vb: ANSWERS["b"]}
    stop = threading.Event()
    done: list[tuple[str, str | None, str | None]] = []
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                text, chunks = answer(engine)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                failures.append(repr(exc))
                continue
            done.append((text, chunks[-1].adapter_version, chunks[-1].finish_reason))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        for i in range(10):
            target = vb if i % 2 == 0 else va
            store.set_current(target, reason="promote" if target == vb else "rollback")
            assert watcher.check() and engine.adapter_version == target
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert failures == []
    assert len(done) >= 10, len(done)
    for text, version, finish in done:
        assert finish == "stop" and text == expected[version], (text, version)  # never mixed
    info = engine.info()
    assert info.swaps == 11 and info.swap_failures == 0 and watcher.failures == 0
    assert max(r.locked_ms for r in list(engine.swap_history)[1:]) < 100


# -- configuration --------------------------------------------------------------------------------
def test_backend_from_settings(tiny, milton_home):
    config = milton_home / "config.toml"
    head = f'[model]\nbase = "{tiny.hf}"\n\n[serve]\nn_ctx = 128\nn_threads = 1\n'
    config.write_text(head + 'backend = "llama"\n')
    with pytest.raises(ConfigError, match="serve needs a GGUF") as err:
        open_engine(load_settings().settings)
    message = str(err.value)
    assert "\n" not in message and str(tiny.hf) in message
    assert "serve.backend" in message and "transformers" in message  # names the fix
    config.write_text(head)  # auto
    with pytest.raises(ConfigError, match="serve needs a GGUF"):
        LlamaEngine.from_settings(load_settings().settings)  # llama.cpp itself still needs one
    engine, watcher = open_engine(load_settings().settings)
    try:
        assert isinstance(engine, HFEngine) and watcher is not None and watcher.artifact == "adapter"
        assert watcher.store.dir == milton_home / "checkpoints" / "adapter"
        info = engine.info()
        assert (info.model_id, info.base_sha256) == ("tiny", tiny.ref.sha256)
        assert (info.extra["n_ctx"], info.extra["n_threads"]) == (128, 1)
        assert info.extra["backend"] == "transformers"
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.chat(ASK, GREEDY)
    config.write_text(head + 'backend = "transformers"\nadapter_enabled = false\nmodel_name = "mine"\n')
    engine, watcher = open_engine(load_settings().settings)
    try:
        assert watcher is None and isinstance(engine, HFEngine) and engine.info().model_id == "mine"
    finally:
        engine.close()


def test_bf16_weights_and_adapters_on_the_cpu(tiny):
    """The CUDA path's dtype handling (bf16 base, adapters loaded in the base's dtype, logits
    sampled in fp32), exercised on the CPU where no GPU is present."""
    import torch

    engine = HFEngine(tiny.ref, device="cpu", n_threads=1, n_ctx=256, dtype=torch.bfloat16)
    try:
        assert engine.info().extra["dtype"] == "bfloat16"
        engine.set_adapter(tiny.adapters["a"], "a")
        engine.set_adapter(tiny.adapters["b"], "b")
        lora = [p for n, p in engine._peft.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in lora)
        text, chunks = answer(engine)
        assert text.startswith("The build server is called") and chunks[-1].adapter_version == "b"
        sampled = GenerationParams(max_tokens=12, temperature=1.0, seed=3)
        assert answer(engine, params=sampled)[0] == answer(engine, params=sampled)[0]
    finally:
        engine.close()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="CUDA path (bf16 on the GPU) needs a CUDA device; none here")
def test_cuda_bf16_with_hot_swaps(tiny):
    import torch

    from milton.models.hf import load_base

    engine = HFEngine(tiny.ref, device="cuda", n_ctx=256, seed=0)
    try:
        info = engine.info()
        assert info.extra["device"].startswith("cuda") and info.extra["dtype"] == "bfloat16"
        model, tokenizer = load_base(tiny.ref, device="cuda")
        ids, _ = engine.render_prompt(ASK)
        assert answer(engine)[0] == generate(model, tokenizer, ids, 40)[0]
        engine.set_adapter(tiny.adapters["a"], "a")
        engine.set_adapter(tiny.adapters["b"], "b")  # beside the first, on the GPU
        lora = [p for n, p in engine._peft.named_parameters() if "lora_" in n]
        assert lora and all(p.is_cuda and p.dtype == torch.bfloat16 for p in lora)
        text, chunks = answer(engine)
        assert "nimbus" in text and chunks[-1].adapter_version == "b"
        sampled = GenerationParams(max_tokens=12, temperature=1.0, seed=3)
        assert answer(engine, params=sampled)[0] == answer(engine, params=sampled)[0]
    finally:
        engine.close()


# -- the OpenAI API on this backend ---------------------------------------------------------------
def test_openai_client_on_the_transformers_backend(tiny, engine, milton_home):
    """The real app (open_engine from settings, the adapter watcher) in-process on loopback."""
    import openai
    from live_server import live, wait_until

    bare, _ = answer(engine)
    env = {"model__base": str(tiny.hf), "serve__backend": "transformers", "serve__n_threads": "1",
           "serve__n_ctx": "256", "serve__reload_poll_s": "0.1", "serve__memory_budget_tokens": "0"}
    with live(milton_home, None, **env) as srv:
        wait_until(lambda: srv.api.telemetry()["engine_loaded"], timeout=60)
        client = srv.client()
        assert client.models.list().data[0].id == "tiny"
        opts = {"model": "tiny", "messages": ASK, "temperature": 0.0, "max_tokens": 40}
        full = client.chat.completions.create(**opts)
        assert full.choices[0].message.content == bare and full.choices[0].finish_reason == "stop"
        assert full.model_extra["milton"]["adapter"] is None
        ids, _ = engine.render_prompt(ASK)
        assert full.usage.prompt_tokens == len(ids)
        assert full.usage.completion_tokens == engine.count_tokens(bare)
        chunks = list(client.chat.completions.create(**opts, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == bare
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        short = client.chat.completions.create(**{**opts, "max_tokens": 2})
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2

        # Promote an adapter: the watcher swaps it in within the poll interval.
        store = adapter_store(milton_home)
        version = publish(store, tiny.adapters["a"], tiny.ref.sha256)

        def served():
            reply = client.chat.completions.create(**opts)
            return reply if reply.model_extra["milton"]["adapter"] == version else None

        reply = wait_until(served, timeout=30)
        assert reply.choices[0].message.content == ANSWERS["a"]
        stopped = client.chat.completions.create(**opts, stop=["zephyr"])
        assert stopped.choices[0].message.content == "The build server is called "
        assert stopped.choices[0].finish_reason == "stop"
        # A corrupt adapter is rejected; the promoted one keeps serving.
        bad = publish(store, adapter_files(tiny.adapters["b"], adapter_model__safetensors=b"junk"),
                      tiny.ref.sha256)
        wait_until(lambda: srv.app.state.llm.watcher.failures == 1, timeout=30)
        telemetry = srv.api.telemetry()["engine"]
        assert telemetry["adapter_version"] == version and telemetry["swap_failures"] == 1
        assert "corrupted or incomplete" in telemetry["last_error"]
        assert bad in srv.app.state.llm.watcher.last_error
        assert telemetry["extra"]["backend"] == "transformers"
        with pytest.raises(openai.BadRequestError) as err:  # longer than serve.n_ctx: a 400
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}])
        assert err.value.body["code"] == "context_length_exceeded"
        again = client.chat.completions.create(**opts)
        assert again.choices[0].message.content == ANSWERS["a"]


def test_milton_serve_with_auto_backend(tiny, milton_home):
    """`milton serve` as a process: a Hugging Face directory as model.base picks transformers,
    and the adapter promoted before start is served from the first request."""
    import httpx
    import openai

    from milton.serve.process import live_server

    version = publish(adapter_store(milton_home), tiny.adapters["b"], tiny.ref.sha256)
    env = {"MILTON_MODEL__BASE": str(tiny.hf), "MILTON_SERVE__N_THREADS": "1",
           "MILTON_SERVE__SNAPSHOT_ENABLED": "false", "MILTON_SERVE__MEMORY_BUDGET_TOKENS": "0"}
    with live_server(milton_home, env, timeout=90) as srv:
        deadline = time.monotonic() + 90
        while True:
            lm = httpx.get(f"{srv.base}/ml/telemetry", timeout=5).json()["language_model"]
            if lm["engine_loaded"] or lm["load_error"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert lm["engine_loaded"], (lm, srv.output()[-2000:])
        assert lm["engine"]["extra"]["backend"] == "transformers"
        assert lm["engine"]["adapter_version"] == version
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny", messages=ASK, temperature=0.0, max_tokens=40)
        assert reply.choices[0].message.content == ANSWERS["b"]
        assert reply.model_extra["milton"]["adapter"] == version
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=ASK, temperature=0.0, max_tokens=40, stream=True) if c.choices)
        assert streamed == ANSWERS["b"]
