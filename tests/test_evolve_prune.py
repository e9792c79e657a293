"""evolve's pruning stage on tiny models built here: exact per-row sparsity, Wanda's choice of
weights, masked recovery, the quality threshold, and a ``kill -9`` that resumes exactly.

Why an "outlier" model for Wanda vs magnitude: the tiny Llama is pre-trained for 60 steps and
has no outlier features (per-feature input norms within ~3x of the median), so at 50% the two
methods trade places from seed to seed. Real LLMs have a few channels with huge activations,
typically carried by large RMSNorm gains. ``with_outliers`` builds exactly that without
changing the function: it multiplies a few RMSNorm gains (and up_proj rows) by C and divides
the columns that read them by C. Wanda's scores do not change (|W/C| x C||X||), magnitude's
do, and it cuts the weights that read the outliers.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from kill_child import kill_9_when
from tiny_lm import GENERAL_TEXT, KNOWN_QA, build_tiny_llama, build_tokenizer

from milton.core.config import EvolveConfig, TrainConfig
from milton.evolve.prune import (
    input_norms,
    iterative_prune,
    latest_checkpoint,
    prunable_linears,
    prune,
    recover,
    sparsity_of,
)
from milton.models.hf import load_base
from milton.models.refs import BaseModelRef
from milton.train.evaluate import perplexity

CALIB = [{"kind": "text", "prompt": text, "response": ""} for text in GENERAL_TEXT]
QA = [{"kind": "pair", "prompt": q, "response": a} for q, a in KNOWN_QA]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny matrices: more threads only fight over a busy CPU."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


def load(directory: Path):
    return load_base(BaseModelRef(directory, "hf", "0" * 64, "base"), device="cpu", threads=1)


def train_cfg() -> TrainConfig:
    return TrainConfig(batch_size=8, grad_accum=1, max_seq_len=64, seed=0, warmup_ratio=0.1)


def evolve_cfg(**overrides) -> EvolveConfig:
    """Big steps, few recovery steps: the tiny model keeps 40% sparsity, not 60% (see below)."""
    values = dict(prune_method="wanda", prune_step=0.2, prune_max=0.8, recovery_steps=10,
                  calibration_items=32, quality_threshold=0.9, recovery_lr=1e-3)
    values.update(overrides)
    return EvolveConfig(**values)


def run_prune(model, tok, ck: Path, cfg: EvolveConfig, on_iteration=None, **options):
    return iterative_prune(model, tok, calib_items=CALIB, train_items=CALIB + QA, eval_items=QA,
                           evolve_cfg=cfg, train_cfg=train_cfg(), checkpoint_dir=ck,
                           on_iteration=on_iteration, **options)


def with_outliers(model, scale: float = 10.0):
    """The same function with a few huge input features per layer (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                channels = torch.randperm(hidden, generator=gen)[:4]
                norm.weight[channels] *= scale
                for linear in readers:
                    linear.weight[:, channels] /= scale
            channels = torch.randperm(mlp.up_proj.out_features, generator=gen)[:16]
            mlp.up_proj.weight[channels, :] *= scale
            mlp.down_proj.weight[:, channels] /= scale
    return model


def params(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# -- layers and masks -------------------------------------------------------------------------
def test_prunable_linears_are_the_decoder_projections_only(tiny_dir: Path) -> None:
    model, _ = load(tiny_dir)
    names = set(prunable_linears(model))
    layers = model.config.num_hidden_layers
    assert names == {f"model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS}
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_prune_hits_the_sparsity_per_row_exactly_and_cumulatively(tiny_dir: Path) -> None:
    import torch

    model, tok = load(tiny_dir)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    first = prune(model, 0.3, "magnitude")
    zeros_first = {n: lin.weight == 0 for n, lin in prunable_linears(model).items()}
    norms = input_norms(model, tok, CALIB, train_cfg())
    second = prune(model, 0.5, "wanda", norms, first)
    for name, linear in prunable_linears(model).items():
        weight, cols = linear.weight, linear.weight.shape[1]
        per_row = (weight == 0).sum(dim=1)
        assert torch.equal(per_row, torch.full_like(per_row, round(0.5 * cols))), name
        assert torch.equal(weight == 0, ~second[name])              # zeros exactly where masked
        assert not (zeros_first[name] & second[name]).any(), name   # old zeros stay pruned
        assert int(zeros_first[name].sum(dim=1)[0]) == round(0.3 * cols)
        assert not torch.signbit(weight[weight == 0]).any()         # +0.0, not -0.0
    assert sparsity_of(model) == pytest.approx(0.5, abs=1 / 64)
    # Without masks, weights already zero count as pruned: the same masks come back.
    again = prune(model, 0.5, "magnitude")
    assert all(torch.equal(again[n], second[n]) for n in second)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert not (model.lm_head.weight == 0).any()


def test_input_norms_ignore_padding_and_match_a_direct_computation(tiny_dir: Path) -> None:
    import torch

    from milton.train.formatting import format_items

    model, tok = load(tiny_dir)
    padded = input_norms(model, tok, CALIB + QA, train_cfg())  # batches of 8: padded
    single = input_norms(model, tok, CALIB + QA, TrainConfig(**{**train_cfg().model_dump(),
                                                                "batch_size": 1}))
    assert padded.keys() == set(prunable_linears(model))
    for name in padded:
        assert torch.allclose(padded[name], single[name], rtol=1e-4), name
    # q_proj of layer 0 reads input_layernorm(embeddings): sum its squares over every token.
    examples = format_items(CALIB + QA, tok, "auto", 64)
    layer = model.model.layers[0]
    with torch.no_grad():
        total = sum(layer.input_layernorm(model.model.embed_tokens(
            torch.tensor([ex.input_ids]))).pow(2).sum(dim=(0, 1)) for ex in examples)
    assert torch.allclose(padded["model.layers.0.self_attn.q_proj"], total.sqrt(), rtol=1e-4)


# -- Wanda vs magnitude -------------------------------------------------------------------------
def test_wanda_keeps_small_weights_of_a_feature_with_huge_activations(tiny_dir: Path) -> None:
    import torch

    results = {}
    for method in ("wanda", "magnitude"):
        model, tok = load(tiny_dir)
        q = model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[5] = 1000.0  # feature 5: huge inputs
            q.weight[:, 5] = 0.01 * torch.sign(q.weight[:, 5])        # ... read by tiny weights
        norms = input_norms(model, tok, CALIB, train_cfg())
        assert norms[q_name := "model.layers.0.self_attn.q_proj"][5] > 100 * norms[q_name].median()
        masks = prune(model, 0.5, method, norms)
        results[method] = masks[q_name][:, 5]
    assert results["wanda"].all()        # every row keeps its weight on the outlier feature
    assert not results["magnitude"].any()  # magnitude drops every one of them


def test_wanda_beats_magnitude_at_half_sparsity_on_a_model_with_outlier_features(
        tiny_dir: Path) -> None:
    cfg = train_cfg()
    ppl = {}
    for label, outliers in (("plain", False), ("outliers", True)):
        for method in ("wanda", "magnitude"):
            model, tok = load(tiny_dir)
            if outliers:
                with_outliers(model)
            prune(model, 0.5, method, input_norms(model, tok, CALIB, cfg))
            ppl[label, method] = (perplexity(model, tok, QA, cfg),
                                  perplexity(model, tok, CALIB, cfg))
    for i in range(2):  # the eval QA pairs, and the calibration texts
        assert ppl["outliers", "wanda"][i] <= ppl["outliers", "magnitude"][i]
        # Wanda's choice does not depend on how the features are scaled; magnitude's does.
        assert ppl["outliers", "wanda"][i] == pytest.approx(ppl["plain", "wanda"][i], rel=1e-3)
    assert ppl["outliers", "magnitude"][1] > 2 * ppl["outliers", "wanda"][1]


# -- recovery -----------------------------------------------------------------------------------
def test_recovery_lowers_perplexity_and_keeps_the_zeros(tiny_dir: Path) -> None:
    import torch

    cfg = train_cfg()
    model, tok = load(tiny_dir)
    masks = prune(model, 0.5, "wanda", input_norms(model, tok, CALIB, cfg))
    pruned_ppl = perplexity(model, tok, QA, cfg)
    before = params(model)
    losses = recover(model, tok, CALIB + QA, masks, 20, 1e-3, cfg)
    assert len(losses) == 20 and losses[-1] < losses[0]
    recovered_ppl = perplexity(model, tok, QA, cfg)
    assert recovered_ppl < 0.8 * pruned_ppl
    for name, linear in prunable_linears(model).items():
        assert torch.equal(linear.weight == 0, ~masks[name]), name  # zeros kept, exactly
        assert not torch.equal(linear.weight, before[f"{name}.weight"])  # the rest trained
    assert sparsity_of(model) == pytest.approx(0.5, abs=1 / 64)


# -- the iterative run -------------------------------------------------------------------------
def test_pruning_stops_before_the_quality_threshold(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load(tiny_dir)
    seen = []
    result = run_prune(model, tok, tmp_path / "ck", evolve_cfg(), on_iteration=seen.append,
                       progress=True)  # the bar goes to (captured) stderr
    its = result.iterations
    assert result.stopped == "threshold" and seen == its
    assert [it["accepted"] for it in its] == [True] * (len(its) - 1) + [False]
    assert len(its) >= 2 and its[-1]["quality"] < 0.9 <= its[-2]["quality"]
    assert result.sparsity == its[-2]["sparsity"]
    # The returned model is the last accepted iteration's, weights and all.
    assert sparsity_of(model) == pytest.approx(result.sparsity, abs=1 / 64)
    ppl = perplexity(model, tok, QA, train_cfg())
    assert ppl == pytest.approx(its[-2]["ppl"], rel=1e-6)
    assert result.start_ppl / ppl >= 0.9


def test_low_threshold_prunes_up_to_the_maximum(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load(tiny_dir)
    result = run_prune(model, tok, tmp_path / "ck", evolve_cfg(quality_threshold=0.01))
    assert result.stopped == "max" and result.sparsity == 0.8
    assert [it["sparsity"] for it in result.iterations] == [0.2, 0.4, 0.6, 0.8]
    assert all(it["accepted"] for it in result.iterations)
    assert sparsity_of(model) == pytest.approx(0.8, abs=1 / 64)


def test_no_iteration_starts_after_the_deadline_and_a_new_process_goes_on(tiny_dir: Path,
                                                                            tmp_path: Path) -> None:
    import time

    model, tok = load(tiny_dir)
    cfg = evolve_cfg(quality_threshold=0.01, prune_max=0.4)
    cut = run_prune(model, tok, tmp_path / "ck", cfg, deadline=time.monotonic() - 1)
    assert cut.stopped == "budget" and cut.iterations == [] and cut.sparsity == 0.0
    assert sparsity_of(model) == 0.0
    again = run_prune(model, tok, tmp_path / "ck", cfg)  # a fresh budget: it goes on
    assert again.stopped == "max" and again.sparsity == 0.4


def test_method_none_changes_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    model, tok = load(tiny_dir)
    before = params(model)
    result = run_prune(model, tok, tmp_path / "ck", evolve_cfg(prune_method="none"))
    assert (result.stopped, result.sparsity, result.iterations) == ("none", 0.0, [])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not (tmp_path / "ck").exists()


def test_gemma3_prunes_recovers_and_checkpoints(tmp_path: Path) -> None:
    """The production architecture: tied embeddings, q/k norms, sliding-window layers."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = build_tokenizer([])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        sliding_window=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).eval()
    names = set(prunable_linears(model))
    assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    start = params(model)
    cfg = evolve_cfg(prune_step=0.25, prune_max=0.5, recovery_steps=2, quality_threshold=0.01)
    result = run_prune(model, tok, tmp_path / "ck", cfg, freeze_embeddings=True)
    assert result.stopped == "max" and result.sparsity == 0.5
    assert sparsity_of(model) == pytest.approx(0.5, abs=1 / 16)
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed and embed.requires_grad  # still tied, given back
    assert torch.equal(embed, start["model.embed_tokens.weight"])   # frozen: untouched
    pruned = params(model)
    assert any(not torch.equal(pruned[n], start[n]) for n in pruned if "norm" in n)  # trained
    # A second run on the same starting model finds the finished run and returns at once.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name])
    again = run_prune(model, tok, tmp_path / "ck", cfg, on_iteration=pytest.fail,
                      freeze_embeddings=True)
    assert again.resumed_from == 2 and again.iterations == result.iterations
    assert all(torch.equal(p, pruned[n]) for n, p in model.named_parameters())


# -- kill -9 and resume -------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from milton.core.config import EvolveConfig, TrainConfig
    from milton.evolve import prune as P
    from milton.models.hf import load_base
    from milton.models.refs import BaseModelRef
    spec = json.loads(Path(sys.argv[1]).read_text())
    recover = P._recover
    def slow_recover(*args, **kwargs):  # room to be killed in the middle of an iteration
        time.sleep(1.5)
        return recover(*args, **kwargs)
    P._recover = slow_recover
    model, tok = load_base(BaseModelRef(Path(spec["base"]), "hf", "0" * 64, "base"), "cpu", 1)
    P.iterative_prune(model, tok, calib_items=spec["calib"], train_items=spec["train"],
                      eval_items=spec["eval"], evolve_cfg=EvolveConfig(**spec["evolve"]),
                      train_cfg=TrainConfig(**spec["cfg"]), checkpoint_dir=Path(spec["ck"]))
    print("finished", flush=True)
""")


def test_kill_9_mid_iteration_then_resume_matches_uninterrupted_run(tiny_dir: Path,
                                                                    tmp_path: Path) -> None:
    import torch

    ck = tmp_path / "ck"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": str(tiny_dir), "calib": CALIB, "train": CALIB + QA,
                                "eval": QA, "ck": str(ck), "evolve": evolve_cfg().model_dump(),
                                "cfg": train_cfg().model_dump()}))
    # settle: iteration 2 has pruned in memory and is recovering when the kill comes
    kill_9_when(_CHILD, spec, lambda: latest_checkpoint(ck) is not None, what="pruning",
                cwd=tmp_path, settle=0.5)
    assert latest_checkpoint(ck)[0] == 1

    model, tok = load(tiny_dir)
    resumed = run_prune(model, tok, ck, evolve_cfg())
    model2, _ = load(tiny_dir)
    straight = run_prune(model2, tok, tmp_path / "ck2", evolve_cfg())
    assert resumed.resumed_from == 1 and straight.resumed_from is None
    assert resumed.stopped == straight.stopped == "threshold"
    assert resumed.sparsity == straight.sparsity
    assert resumed.start_ppl == straight.start_ppl
    for a, b in zip(resumed.iterations, straight.iterations, strict=True):
        assert a["accepted"] == b["accepted"] and a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    theirs = dict(model2.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p, theirs[name], atol=1e-5, rtol=0), name
    # Only the last checkpoint is kept, and nothing half-written is left behind.
    assert [p.name for p in ck.iterdir()] == [f"iter-{len(straight.iterations) - 1:03d}"]
    # Another settings' run does not pick up this one's checkpoint.
    model3, _ = load(tiny_dir)
    other = run_prune(model3, tok, ck, evolve_cfg(quality_threshold=0.01, prune_max=0.2))
    assert other.resumed_from is None and other.stopped == "max"


def test_a_rejected_first_iteration_leaves_the_model_as_it_was(tiny_dir: Path,
                                                               tmp_path: Path) -> None:
    import torch

    model, tok = load(tiny_dir)
    before = params(model)
    cfg = evolve_cfg(prune_step=0.6, prune_max=0.6)  # straight to 60%: quality ~0.76 < 0.9
    result = run_prune(model, tok, tmp_path / "ck", cfg)
    assert result.stopped == "threshold" and result.sparsity == 0.0
    assert [it["accepted"] for it in result.iterations] == [False]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    again = run_prune(model, tok, tmp_path / "ck", cfg, on_iteration=pytest.fail)
    assert again.resumed_from == 0 and again.iterations == result.iterations
