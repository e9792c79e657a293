"""`milton serve` against llama-cpp-python called directly, and the cost of memory injection.

On the embedded Gemma 3 270M Q4_K_M, all usable cores, in one run:

* **generation**: a real ``milton serve`` child process on loopback, streamed through the
  official ``openai`` client (``stream=True``, greedy, ``X-Milton-Memory: off``), against
  llama-cpp-python in this process on the same GGUF with the same load settings (``n_ctx``,
  ``n_threads`` = ``n_threads_batch``, ``n_batch``, no GPU layers) and the same prompt token ids
  (the prompt serve renders: this GGUF has no chat template, so the plain "User:/Assistant:"
  format; checked against serve's ``usage.prompt_tokens``). Two direct sides, each on a
  ``Llama`` of its own so every side sees the same KV-prefix history: ``generate``, a bare
  ``Llama.generate`` loop with per-token detokenisation (the strictest baseline: serve runs the
  same loop inside) and ``completion``, ``Llama.create_completion(stream=True)`` (what an app
  using llama-cpp-python's streaming API gets). Sides are interleaved per (repeat, prompt) in a
  rotating order; the ratios are taken per pair and their median reported. Figures per side:
  time to first token (first chunk with visible text, from the call / request), decode tokens/s
  ((tokens - 1) / (last chunk - first chunk)) and end-to-end tokens/s.
* **memory injection**: the same server over a store of 10k synthetic memories (the `memory`
  benchmark's corpus, real embedder for queries): the time serve spends building the memory
  block (``milton.memory_ms`` of each response: query embedding, hybrid search, formatting,
  recency update) and end-to-end latency of the same request (``max_tokens=1``) with injection
  on vs off, which also includes processing the injected prompt tokens; plus
  ``build_context`` timed directly in this process on the same store, interleaved with them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import live_server, target
from milton.models.prompt import PLAIN_ASSISTANT, PLAIN_STOP, PLAIN_USER

TARGET_RATIO = 0.95
# Prompts on which Gemma 270M (plain format, greedy) uses its whole token budget, so decode
# rates are taken over full-length runs. Every side runs them in the same order, so each sees the
# same KV-prefix reuse from its previous request.
PROMPTS = [
    "Count from one to one hundred in words, separated by commas.",
    "Write the numbers from 1 to 200, separated by spaces.",
    "Translate the following into French, German and Spanish: good morning, good evening, "
    "thank you, please, goodbye.",
    "Write a detailed recipe for chocolate chip cookies with all the steps.",
]
TTFT_TOKENS = 4  # max_tokens of the extra time-to-first-token pairs
CLIENTS = ("http", "openai")  # the serve side's client, by round
# A passage that makes a prompt of ~240 tokens (like a request with a memory block or some
# history): with it the fixed cost of serving weighs less in the time to first token. It comes
# after the question, so two long prompts share no KV prefix.
PASSAGE = (
    "Background notes from the team wiki. The build server runs nightly jobs that compile the "
    "application, run the unit and integration tests, and publish the artifacts to the internal "
    "registry. When a job fails, the on-call engineer receives a notification and looks at the "
    "logs first, then at the recent commits. The staging database is refreshed every Monday from "
    "an anonymised copy of production, so tests that depend on fresh data should run after that. "
    "The deploy freeze starts on Friday afternoon and ends on Monday morning; urgent fixes need a "
    "second reviewer and a note in the release channel. Backups are taken every night and kept "
    "for thirty days, with one copy per month kept for a year. The monitoring dashboard shows the "
    "request rate, the error rate and the latency percentiles of every service, and an alert "
    "fires when the error rate stays above one percent for five minutes. New team members get a "
    "laptop, an account on the build server and a mentor for their first month, and they are "
    "asked to write down whatever was unclear so that the next person has an easier start."
)
SEED = 0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _stats(values: list[float], scale: float = 1.0, digits: int = 3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(statistics.median(values) * scale, digits),
            "p95": round((_pct(values, 0.95) or 0.0) * scale, digits),
            "max": round(max(values) * scale, digits), "n": len(values)}


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one generation per side ---------------------------------------------------------------------
def _record(t0: float, first: float | None, last: float | None, end: float, tokens: int,
            text: str, finish: str | None, prompt_tokens: int | None) -> dict[str, Any]:
    """One generation: times relative to its start; rates come from :func:`_rates`."""
    return {"ttft_s": (first - t0) if first else None,
            "decode_s": (last - first) if first and last else None, "total_s": end - t0,
            "tokens": tokens, "finish": finish, "text": text, "prompt_tokens": prompt_tokens}


def _rates(out: dict[str, Any]) -> None:
    """decode tokens/s (first to last visible chunk) and end-to-end tokens/s, once counted."""
    n, decode_s = out["tokens"], out["decode_s"]
    out["decode_tps"] = (n - 1) / decode_s if n > 1 and decode_s else None
    out["e2e_tps"] = n / out["total_s"] if n else None


class _Seen:
    """Streamed text as it arrives: when the first visible and the last text came."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.first: float | None = None
        self.last: float | None = None

    def add(self, text: str) -> None:
        if text:
            now = time.perf_counter()
            if self.first is None and text.strip():
                self.first = now
            self.last = now
            self.parts.append(text)


def _serve_one(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    seen = _Seen()
    finish = usage = None
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], stream=True,
        stream_options={"include_usage": True}, temperature=0.0, seed=SEED, max_tokens=max_tokens,
        extra_headers={"X-Milton-Memory": "off"}, user="bench")
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        text = chunk.choices[0].delta.content or ""
        seen.add(text)
        finish = chunk.choices[0].finish_reason or finish
    end = time.perf_counter()
    return _record(t0, seen.first, seen.last, end, usage.completion_tokens if usage else 0,
                   "".join(seen.parts), finish, usage.prompt_tokens if usage else None)


def _http_one(http: Any, base: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The same request with a lean HTTP client (httpx, one ``json.loads`` per event): what
    curl or an app's own HTTP code sees, without the openai package's per-chunk models."""
    import json

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0, "seed": SEED,
            "max_tokens": max_tokens, "user": "bench"}
    seen = _Seen()
    finish = usage = None
    t0 = time.perf_counter()
    with http.stream("POST", f"{base}/v1/chat/completions", json=body,
                     headers={"X-Milton-Memory": "off"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if not event.get("choices"):
                continue
            text = event["choices"][0]["delta"].get("content") or ""
            seen.add(text)
            finish = event["choices"][0]["finish_reason"] or finish
    end = time.perf_counter()
    return _record(t0, seen.first, seen.last, end, usage["completion_tokens"] if usage else 0,
                   "".join(seen.parts), finish, usage["prompt_tokens"] if usage else None)


def _plain_ids(llm: Any, prompt: str) -> list[int]:
    """The prompt serve renders for a model without a chat template (LlamaEngine._render)."""
    return llm.tokenize(f"{PLAIN_USER}{prompt}\n{PLAIN_ASSISTANT}".encode(), add_bos=True, special=False)


def _generate_one(llm: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A bare ``Llama.generate`` loop, sampling as serve does (greedy at temperature 0)."""
    import llama_cpp

    vocab = llm._model.vocab
    t0 = time.perf_counter()
    ids = _plain_ids(llm, prompt)
    parts: list[bytes] = []
    first = last = None
    produced, finish = 0, "length"
    tokens = llm.generate(ids, temp=0.0, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0)
    try:
        while produced < max_tokens:
            token = next(tokens, None)
            if token is None or llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            produced += 1
            piece = llm.detokenize([token])
            parts.append(piece)
            now = time.perf_counter()
            if first is None and piece.strip():
                first = now
            last = now
            if PLAIN_STOP.encode() in b"".join(parts[-8:]):
                finish = "stop"
                break
    finally:
        tokens.close()
    end = time.perf_counter()
    text = b"".join(parts).decode("utf-8", "replace")
    return _record(t0, first, last, end, produced, text.split(PLAIN_STOP)[0].lstrip(" "), finish, len(ids))


def _completion_one(llm: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """``Llama.create_completion(stream=True)`` on the same prompt ids."""
    t0 = time.perf_counter()
    ids = _plain_ids(llm, prompt)
    seen = _Seen()
    finish = None
    for chunk in llm.create_completion(ids, stream=True, temperature=0.0, max_tokens=max_tokens,
                                       stop=[PLAIN_STOP], seed=SEED):
        text = chunk["choices"][0]["text"]
        seen.add(text)
        finish = chunk["choices"][0]["finish_reason"] or finish
    end = time.perf_counter()
    # llama-cpp-python's stream carries no usage: it stops exactly at max_tokens ('length');
    # a 'stop' finish is counted by the generate side of the same prompt (same greedy text).
    produced = max_tokens if finish == "length" else 0
    return _record(t0, seen.first, seen.last, end, produced, "".join(seen.parts).lstrip(" "), finish,
                   len(ids))


# -- part a: generation ----------------------------------------------------------------------------
def _generation(base: str, model: str, gguf: Path, threads: int, n_ctx: int, prompts: list[str],
                repeats: int, max_tokens: int, ttft_repeats: int, long_repeats: int) -> dict[str, Any]:
    import openai
    from llama_cpp import Llama

    def load() -> Any:  # exactly LlamaEngine._load_base's settings
        return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                     n_gpu_layers=0, n_batch=min(512, n_ctx), verbose=False)

    import httpx

    llms = {"generate": load(), "completion": load()}
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    http = httpx.Client(timeout=600)
    # The serve side's client alternates by round (the openai package, then plain HTTP), so the
    # server's context sees each prompt once per round, as each direct side's own Llama does.
    clients = {"openai": lambda p, n: _serve_one(client, model, p, n),
               "http": lambda p, n: _http_one(http, base, model, p, n)}
    sides = {"serve": None,
             "generate": lambda p, n: _generate_one(llms["generate"], p, n),
             "completion": lambda p, n: _completion_one(llms["completion"], p, n)}
    names = list(sides)

    def series(rounds: int, tokens: int, texts: list[str] = prompts) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r in range(rounds):
            via = CLIENTS[r % len(CLIENTS)]
            for i, prompt in enumerate(texts):
                k = (r * len(prompts) + i) % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    one = clients[via](prompt, tokens) if name == "serve" else sides[name](prompt, tokens)
                    one.update(repeat=r, prompt=i, client=via if name == "serve" else None)
                    out[name].append(one)
        return out

    try:
        for via in CLIENTS:  # warm-up (serve: its embedder for the session log; caches)
            clients[via](prompts[-1], max_tokens)
        for name in names[1:]:
            sides[name](prompts[-1], max_tokens)
        runs = series(repeats, max_tokens)
        short = series(ttft_repeats, TTFT_TOKENS)  # more pairs for the time to first token
        long = series(long_repeats, TTFT_TOKENS, [f"{p}\n\n{PASSAGE}" for p in prompts])
    finally:
        client.close()
        http.close()
        for llm in llms.values():
            llm.close()

    # llama-cpp-python's stream has no usage: a completion that stopped early takes the count of
    # the generate side's run of the same prompt when the text is the same (greedy).
    for out, ref in zip(runs["completion"], runs["generate"]):
        if not out["tokens"] and out["text"].strip() == ref["text"].strip():
            out["tokens"] = ref["tokens"]
    for outs in [*runs.values(), *short.values(), *long.values()]:
        for out in outs:
            _rates(out)
    same_text = {name: sum(o["text"].strip() == s["text"].strip() for o, s in zip(runs[name], runs["serve"]))
                 for name in ("generate", "completion")}
    same_prompt = all(o["prompt_tokens"] == s["prompt_tokens"]
                      for name in ("generate", "completion") for o, s in zip(runs[name], runs["serve"]))

    def ratios(num: str, den: str, key: str, invert: bool = False, via: str | None = None) -> list[float]:
        out = []
        pairs = zip(runs[num] + short[num], runs[den] + short[den]) if key == "ttft_s" else \
            zip(runs[num], runs[den])
        for a, b in pairs:
            if a[key] and b[key] and (via is None or a["client"] == via):
                out.append(b[key] / a[key] if invert else a[key] / b[key])
        return out

    def overhead_ms(via: str | None = None) -> float | None:
        """What serving adds to the time to first token: median of serve - generate per pair."""
        diffs = [(a["ttft_s"] - b["ttft_s"]) * 1e3 for a, b in
                 zip(runs["serve"] + short["serve"], runs["generate"] + short["generate"])
                 if a["ttft_s"] and b["ttft_s"] and (via is None or a["client"] == via)]
        return round(statistics.median(diffs), 2) if diffs else None

    figures: dict[str, Any] = {}
    for name in names:
        for key, scale in (("ttft_s", 1e3), ("decode_tps", 1.0), ("e2e_tps", 1.0)):
            values = [o[key] for o in runs[name] + (short[name] if key == "ttft_s" else []) if o[key]]
            label = "ttft_ms" if key == "ttft_s" else key
            figures[f"{name}_{label}"] = round(statistics.median(values) * scale, 2) if values else None
        figures[f"{name}_tokens"] = sum(o["tokens"] for o in runs[name])
        figures[f"{name}_finish"] = {f: sum(o["finish"] == f for o in runs[name])
                                     for f in {o["finish"] for o in runs[name]}}
    for via in CLIENTS:
        tps = ratios("serve", "generate", "decode_tps", via=via)
        ttft = ratios("serve", "generate", "ttft_s", invert=True, via=via)
        figures[f"tps_ratio_{via}"] = round(statistics.median(tps), 4) if tps else None
        figures[f"ttft_ratio_{via}"] = round(statistics.median(ttft), 4) if ttft else None
        values = [o["ttft_s"] for o in runs["serve"] + short["serve"] if o["ttft_s"] and o["client"] == via]
        figures[f"serve_ttft_ms_{via}"] = round(statistics.median(values) * 1e3, 2) if values else None
        figures[f"serve_ttft_overhead_ms_{via}"] = overhead_ms(via)
    for direct in ("generate", "completion"):
        tps = ratios("serve", direct, "decode_tps")
        ttft = ratios("serve", direct, "ttft_s", invert=True)
        e2e = ratios("serve", direct, "e2e_tps")
        figures[f"tps_ratio_vs_{direct}"] = round(statistics.median(tps), 4) if tps else None
        figures[f"ttft_ratio_vs_{direct}"] = round(statistics.median(ttft), 4) if ttft else None
        figures[f"e2e_tps_ratio_vs_{direct}"] = round(statistics.median(e2e), 4) if e2e else None
        figures[f"tps_ratios_vs_{direct}"] = [round(x, 4) for x in tps]
        figures[f"ttft_ratios_vs_{direct}"] = [round(x, 4) for x in ttft]
    figures["same_text_as_serve"] = same_text
    figures["same_prompt_tokens"] = same_prompt
    figures["prompt_tokens"] = sorted({o["prompt_tokens"] for o in runs["serve"]})
    figures["runs"] = {name: [{k: (round(v, 5) if isinstance(v, float) else v)
                               for k, v in o.items() if k != "text"} for o in outs]
                       for name, outs in runs.items()}
    figures["runs_with_uncounted_tokens"] = sum(not o["tokens"] for outs in runs.values() for o in outs)
    figures["ttft_runs_ms"] = {name: [round(o["ttft_s"] * 1e3, 2) if o["ttft_s"] else None for o in outs]
                               for name, outs in short.items()}
    # What serving adds to the time to first token, per pair (short prompts), and the same
    # comparison with ~240-token prompts, where that fixed cost weighs less.
    figures["serve_ttft_overhead_ms"] = overhead_ms()
    long_ratio = [b["ttft_s"] / a["ttft_s"] for a, b in zip(long["serve"], long["generate"])
                  if a["ttft_s"] and b["ttft_s"]]
    figures["ttft_long_ratio"] = round(statistics.median(long_ratio), 4) if long_ratio else None
    for name, outs in long.items():
        values = [o["ttft_s"] for o in outs if o["ttft_s"]]
        figures[f"{name}_ttft_long_ms"] = round(statistics.median(values) * 1e3, 2) if values else None
    figures["long_prompt_tokens"] = sorted({o["prompt_tokens"] for o in long["serve"]})
    figures["texts"] = {name: [o["text"][:120] for o in outs[:len(prompts)]] for name, outs in runs.items()}
    return figures


# -- part b: memory injection ----------------------------------------------------------------------
def _build_memories(db_path: Path, n: int, per_topic: int, n_queries: int) -> tuple[list[str], Any, float]:
    """``n`` synthetic memories (the memory benchmark's corpus and store builder) in the serve
    store; (queries, the embedder, build seconds)."""
    from benchmarks.bench_memory import Corpus, build_store, make_queries
    from milton.core.config import MemoryConfig
    from milton.memory.embed import get_embedder

    cfg = MemoryConfig()
    t0 = time.perf_counter()
    embedder = get_embedder(cfg.embedding_model, cfg.embedding_batch_size)
    corpus = Corpus()
    corpus.embed_anchors(embedder, per_topic)
    _matrix, rares, _ = build_store(db_path, corpus, n, embedder.name, embedder.dim)
    queries = make_queries(corpus, rares, n_queries + 5, 0)
    return queries, embedder, time.perf_counter() - t0


def _injection(base: str, model: str, queries: list[str], warmup: int, db_path: Path, embedder: Any,
               budget: int) -> dict[str, Any]:
    """Per query: the same request with injection on and off, and ``build_context`` called
    directly in this process on the same store (as serve calls it), in rotating order."""
    import openai

    from milton.core.config import MemoryConfig
    from milton.core.store import connect
    from milton.core.timeutil import utcnow
    from milton.memory.context import build_context

    cfg = MemoryConfig()
    db = connect(db_path)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    raw: dict[str, list[float]] = {"on_s": [], "off_s": [], "memory_ms": [], "direct_s": []}
    items, prompt_on, prompt_off = [], [], []

    def request(query: str, memory: bool) -> tuple[float, Any]:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": query}], max_tokens=1,
            temperature=0.0, seed=SEED, user="bench-memory",
            extra_headers={"X-Milton-Memory": "on" if memory else "off"})
        return time.perf_counter() - t0, reply

    try:
        for i, query in enumerate(queries):
            steps = ["on", "off", "direct"]
            k = i % len(steps)
            for step in steps[k:] + steps[:k]:
                if step == "direct":
                    t0 = time.perf_counter()
                    build_context(db, embedder, query, cfg, utcnow(), budget_tokens=budget)
                    seconds = time.perf_counter() - t0
                    if i >= warmup:
                        raw["direct_s"].append(seconds)
                    continue
                seconds, reply = request(query, step == "on")
                if i < warmup:
                    continue
                if step == "on":
                    ext = (reply.model_extra or {})["milton"]
                    raw["on_s"].append(seconds)
                    raw["memory_ms"].append(ext["memory_ms"])
                    items.append(ext["memory_items"])
                    prompt_on.append(reply.usage.prompt_tokens)
                else:
                    raw["off_s"].append(seconds)
                    prompt_off.append(reply.usage.prompt_tokens)
    finally:
        client.close()
        db.close()
    delta = [a - b for a, b in zip(raw["on_s"], raw["off_s"])]
    return {"memory_ms": _stats([m / 1e3 for m in raw["memory_ms"]], 1e3, 2),
            "direct_build_context_ms": _stats(raw["direct_s"], 1e3, 2),
            "latency_on_ms": _stats(raw["on_s"], 1e3, 1), "latency_off_ms": _stats(raw["off_s"], 1e3, 1),
            "latency_delta_ms": _stats(delta, 1e3, 1),
            "items_p50": statistics.median(items) if items else None,
            "injected_prompt_tokens_p50": (statistics.median([a - b for a, b in zip(prompt_on, prompt_off)])
                                           if prompt_on else None),
            "raw_ms": {k: [round(v if k == "memory_ms" else v * 1e3, 2) for v in values]
                       for k, values in raw.items()}}


# -- the run ----------------------------------------------------------------------------------------
def run(quick: bool = False) -> dict[str, Any]:
    from milton.core.config import load_settings
    from milton.core.store import open_store
    from milton.models.hf import usable_cpus
    from milton.models.refs import embedded_gguf

    threads = usable_cpus()
    plan = {"n_ctx": 2048, "threads": threads, "prompts": 2 if quick else len(PROMPTS),
            "repeats": 1 if quick else 4, "max_tokens": 16 if quick else 64,
            "ttft_repeats": 2 if quick else 10, "long_repeats": 1 if quick else 4,
            "memories": 10_000, "anchor_texts_per_topic": 2 if quick else 24,
            "memory_queries": 4 if quick else 30, "memory_warmup": 1 if quick else 2,
            "memory_budget_tokens": 512}
    prompts = PROMPTS[:plan["prompts"]]
    gguf = embedded_gguf()
    load0 = os.getloadavg()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="milton-bench-serve-") as tmp:
        home = Path(tmp)
        env = {"MILTON_MODEL__BASE": str(gguf), "MILTON_MODEL__DEVICE": "cpu",
               "MILTON_SERVE__N_CTX": str(plan["n_ctx"]), "MILTON_SERVE__N_THREADS": str(threads),
               "MILTON_SERVE__ADAPTER_ENABLED": "false",
               "MILTON_SERVE__MEMORY_BUDGET_TOKENS": str(plan["memory_budget_tokens"])}
        db_path = load_settings(environ={"MILTON_HOME": str(home)}).settings.db_path
        open_store(db_path).close()
        phases: dict[str, float] = {}
        t_phase = time.perf_counter()
        queries, embedder, build_s = _build_memories(db_path, plan["memories"],
                                                     plan["anchor_texts_per_topic"],
                                                     plan["memory_queries"] + plan["memory_warmup"])
        queries = queries[:plan["memory_queries"] + plan["memory_warmup"]]
        import httpx

        phases["memory_store_s"] = time.perf_counter() - t_phase
        t_phase = time.perf_counter()
        with live_server(home, env, timeout=120) as srv:
            deadline = time.monotonic() + 120
            while True:
                lm = httpx.get(f"{srv.base}/ml/telemetry", timeout=10).json()["language_model"]
                if lm["load_error"]:
                    raise RuntimeError(f"serve could not load the model: {lm['load_error']}")
                if lm["engine_loaded"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            model = lm["model"]
            phases["serve_start_s"] = time.perf_counter() - t_phase
            busy0, wall0 = _machine_busy_s(), time.perf_counter()
            own0 = _own_cpu_s() + _proc_cpu_s(srv.proc.pid)
            generation = _generation(srv.base, model, gguf, threads, plan["n_ctx"], prompts,
                                     plan["repeats"], plan["max_tokens"], plan["ttft_repeats"],
                                     plan["long_repeats"])
            wall = time.perf_counter() - wall0
            busy = _machine_busy_s() - busy0
            other = max(0.0, busy - (_own_cpu_s() + _proc_cpu_s(srv.proc.pid) - own0)) / wall
            tel = httpx.get(f"{srv.base}/ml/telemetry", timeout=10).json()["language_model"]
            generation["serve_internal_tokens_per_s"] = tel["tokens"]["tokens_per_s"]
            phases["generation_s"] = wall
            t_phase = time.perf_counter()
            injection = _injection(srv.base, model, queries, plan["memory_warmup"], db_path, embedder,
                                   plan["memory_budget_tokens"])
            tel = httpx.get(f"{srv.base}/ml/telemetry", timeout=10).json()["language_model"]
            injection["telemetry_memory_injection"] = tel["memory_injection"]
            injection["fallbacks"] = tel["fallbacks"]
            phases["injection_s"] = time.perf_counter() - t_phase
        injection["store_build_s"] = round(build_s, 1)

    if not generation["same_prompt_tokens"]:
        notes.append("the direct sides' prompt token counts differ from serve's usage.prompt_tokens")
    runs = len(prompts) * plan["repeats"]
    if generation["same_text_as_serve"]["generate"] != runs:
        notes.append(f"greedy texts differ from serve's in {runs - generation['same_text_as_serve']['generate']}"
                     f" of {runs} generate runs")
    if other > 0.25:
        notes.append(f"other processes kept ~{other:.2f} of {os.cpu_count()} CPUs busy during the "
                     "generation part: absolute tokens/s are depressed and noisy; the ratios are "
                     "interleaved per pair")
    if injection["fallbacks"]:
        notes.append(f"serve fell back during the injection part: {injection['fallbacks']}")

    figures: dict[str, Any] = {
        "serve_tps": generation["serve_decode_tps"], "direct_tps": generation["generate_decode_tps"],
        "completion_tps": generation["completion_decode_tps"],
        "serve_ttft_ms": generation["serve_ttft_ms"], "direct_ttft_ms": generation["generate_ttft_ms"],
        "completion_ttft_ms": generation["completion_ttft_ms"],
        "tps_ratio": generation["tps_ratio_http"],
        "ttft_ratio": generation["ttft_ratio_http"],
        "tps_ratio_openai": generation["tps_ratio_openai"],
        "ttft_ratio_openai": generation["ttft_ratio_openai"],
        "serve_ttft_ms_http": generation["serve_ttft_ms_http"],
        "serve_ttft_ms_openai": generation["serve_ttft_ms_openai"],
        "serve_ttft_overhead_ms_http": generation["serve_ttft_overhead_ms_http"],
        "serve_ttft_overhead_ms_openai": generation["serve_ttft_overhead_ms_openai"],
        "tps_ratio_vs_completion": generation["tps_ratio_vs_completion"],
        "ttft_ratio_vs_completion": generation["ttft_ratio_vs_completion"],
        "e2e_tps_ratio": generation["e2e_tps_ratio_vs_generate"],
        "serve_ttft_overhead_ms": generation["serve_ttft_overhead_ms"],
        "serve_ttft_long_ms": generation["serve_ttft_long_ms"],
        "direct_ttft_long_ms": generation["generate_ttft_long_ms"],
        "ttft_long_ratio": generation["ttft_long_ratio"],
        "memory_p50_ms": injection["memory_ms"]["p50"], "memory_p95_ms": injection["memory_ms"]["p95"],
        "memory_direct_p50_ms": injection["direct_build_context_ms"]["p50"],
        "memory_direct_p95_ms": injection["direct_build_context_ms"]["p95"],
        "latency_on_p50_ms": injection["latency_on_ms"]["p50"],
        "latency_off_p50_ms": injection["latency_off_ms"]["p50"],
        "latency_delta_p50_ms": injection["latency_delta_ms"]["p50"],
        "latency_delta_p95_ms": injection["latency_delta_ms"]["p95"],
        "injected_prompt_tokens_p50": injection["injected_prompt_tokens_p50"],
        "other_processes_cpus_busy": round(other, 2),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "generation": generation, "injection": injection,
    }
    return {
        "params": {**plan, "model": gguf.name, "prompts_text": prompts, "load_avg_start": load0,
                   "stop": PLAIN_STOP, "sampling": "greedy (temperature 0), seed 0"},
        "figures": figures,
        "targets": [target("tps_ratio", figures["tps_ratio"], ">=", TARGET_RATIO, "x"),
                    target("ttft_ratio", figures["ttft_ratio"], ">=", TARGET_RATIO, "x")],
        "report_only": ["tps_ratio_openai", "ttft_ratio_openai", "serve_ttft_ms_http", "serve_ttft_ms_openai",
                        "serve_ttft_overhead_ms_http", "serve_ttft_overhead_ms_openai",
                        "serve_tps", "direct_tps", "completion_tps", "serve_ttft_ms", "direct_ttft_ms",
                        "completion_ttft_ms", "tps_ratio_vs_completion", "ttft_ratio_vs_completion",
                        "serve_ttft_overhead_ms", "serve_ttft_long_ms", "direct_ttft_long_ms", "ttft_long_ratio",
                        "memory_p50_ms", "memory_p95_ms", "memory_direct_p50_ms", "memory_direct_p95_ms",
                        "latency_delta_p50_ms", "latency_delta_p95_ms", "injected_prompt_tokens_p50",
                        "other_processes_cpus_busy"],
        "notes": notes + [
            "tps = decode tokens/s, (tokens - 1) / (last - first visible chunk), median over runs; "
            "ttft = first visible chunk from the call (direct: tokenising included) or from sending "
            "the request (serve: HTTP, session lookup, queue included); ratios are serve/direct for "
            "tps and direct/serve for ttft, per interleaved pair, median; 'direct' is the bare "
            "Llama.generate loop, 'completion' Llama.create_completion(stream=True)",
            "memory_* = time serve spent building the memory block (milton.memory_ms per response: "
            "query embedding + hybrid search + formatting + recency update); latency_delta = "
            "end-to-end on - off for the same query with max_tokens=1, which also includes "
            "prompt processing of the injected tokens",
        ],
    }


def _machine_busy_s() -> float:
    from benchmarks.bench_memory import _cpu_busy_s

    return _cpu_busy_s() or 0.0


def _own_cpu_s() -> float:
    from benchmarks.bench_memory import _own_cpu_s as own

    return own()

