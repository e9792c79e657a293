"""train-lora's data: watermark, pairing, dedupe, split, replay, regression set, the skip rule
and the secret filter. Real SQLite through the store; conversations enter through the real
ingest and the live session tracker, documents through the real document ingest."""

from __future__ import annotations

import json
import random
import string
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from milton.core.config import MemoryConfig, load_settings
from milton.core.errors import ConfigError
from milton.core.jobs import Skip
from milton.core.store import open_store
from milton.memory.conversations import ingest_conversations
from milton.memory.documents import ingest_documents
from milton.memory.sessions import SessionTracker
from milton.train.dataset import (
    DATASET_FILES,
    GENERAL_SOURCE,
    build_dataset,
    exchanges,
    export_new_items,
    general_items,
    require_enough,
    write_dataset_files,
)
from milton.train.redact import SecretFilter, random_base64_bits, shannon_entropy

NOW = datetime(2024, 6, 1, 2, 0, tzinfo=timezone.utc)


# -- helpers -----------------------------------------------------------------------------------
def make_settings(**train):
    # Every answer is a target here (these tests are about export, split and replay); which
    # answers may be is tests/test_train_targets.py's subject.
    return load_settings(train={"assistant_targets": "filtered", **train}).settings


def qa(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    """An OpenAI-format message list from (question, answer) pairs."""
    return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def ingest(db, folder: Path, conversations: list[list[dict]], name: str = "chats.jsonl") -> None:
    """Through `milton ingest conversations`' own function (sessions stored 'ended')."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    ingest_conversations(db, path, max_message_chars=100_000, now=NOW)


def conversation(tag: str, n_pairs: int = 2) -> list[dict[str, str]]:
    return qa(*[(f"{tag} question {i}?", f"{tag} answer {i}.") for i in range(n_pairs)])


def new_run(db) -> int:
    with db.atomic():
        cur = db.conn.execute("insert into training_runs (started, status) values (?, 'running')",
                              [NOW.isoformat()])
    return int(cur.lastrowid)


def finish(db, run_id: int, status: str = "promoted") -> None:
    with db.atomic():
        db.conn.execute("update training_runs set status = ? where id = ?", [status, run_id])


def items(db, run_id: int | None = None) -> list[dict]:
    where, args = ("where run_id = ?", [run_id]) if run_id is not None else ("", [])
    return [dict(zip(("kind", "prompt", "response", "split", "run_id", "redacted"), r)) for r in db.execute(
        f"select kind, prompt, response, split, run_id, redacted from training_items {where} order by id", args)]


@pytest.fixture
def db(memory_db):
    return memory_db


# -- secrets corpus (built at run time: no secret-shaped literal sits in the repository) ------
_rng = random.Random(20240601)
_ALNUM = string.ascii_letters + string.digits


def _rnd(n: int, alphabet: str = _ALNUM) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


SECRETS: dict[str, tuple[str, str]] = {  # case -> (kind, secret); the text embeds the secret
    "openai": ("openai_key", "sk-proj-" + _rnd(48)),
    "openai_legacy": ("openai_key", "sk-" + _rnd(48)),
    "anthropic": ("anthropic_key", "sk-ant-api03-" + _rnd(80, _ALNUM + "-_") + "7AA"),
    "aws_id": ("aws_access_key_id", "AKIA" + _rnd(16, string.ascii_uppercase + string.digits)),
    "aws_secret": ("aws_secret_key", _rnd(39, _ALNUM + "/+") + "x"),
    "github": ("github_token", "ghp_" + _rnd(36)),
    "github_pat": ("github_token", "github_pat_" + _rnd(22) + "_" + _rnd(59)),
    "slack": ("slack_token", "xoxb-" + _rnd(12, string.digits) + "-" + _rnd(24)),
    "google": ("google_api_key", "AIza" + _rnd(35, _ALNUM + "_-")),
    "jwt": ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0." + _rnd(43, _ALNUM + "_-")),
    "bearer": ("bearer_token", _rnd(30) + "9"),
    "pem": ("private_key", "-----BEGIN RSA PRIVATE KEY-----\n"
            + "\n".join(_rnd(64, _ALNUM + "+/") for _ in range(4)) + "\n-----END RSA PRIVATE KEY-----"),
    "password_env": ("password", "hunter2!" + _rnd(6)),
    "password_json": ("password", "Tr0ub4dor&" + _rnd(4)),
    "password_yaml": ("password", "s3cr3t-" + _rnd(8)),
    "pwd": ("password", "Zebra#" + _rnd(5)),
    "client_secret": ("secret_assignment", "cs-" + _rnd(20)),
    "api_key_assign": ("secret_assignment", "key-" + _rnd(18)),
    "token_flag": ("secret_assignment", _rnd(12) + "7"),
    "url_password": ("url_password", "Pg" + _rnd(10) + "9"),
    "hex": ("hex_secret", "".join(_rng.choice("0123456789abcdef") for _ in range(39)) + "a"),
    "base64": ("high_entropy", _rnd(50, _ALNUM + "+/") + "Q9z"),
}
TEXTS: dict[str, str] = {
    "openai": "export OPENAI_API_KEY={s}",
    "openai_legacy": "my old key was {s}, is it still valid?",
    "anthropic": "client = Anthropic(api_key=\"{s}\")",
    "aws_id": "the access key id is {s} in us-east-1",
    "aws_secret": "aws_secret_access_key = {s}",
    "github": "git clone https://{s}@github.com/acme/private.git",
    "github_pat": "GH token: {s}",
    "slack": "post with the bot token {s} to #alerts",
    "google": "maps key {s} stopped working",
    "jwt": "the session cookie is {s}",
    "bearer": "curl -H 'Authorization: Bearer {s}' https://api.example.com/v1/me",
    "pem": "here is the deploy key:\n{s}\nwhy does ssh reject it?",
    "password_env": "DB_PASSWORD={s} in my .env",
    "password_json": '{{"user": "alice", "password": "{s}"}}',
    "password_yaml": "database:\n  user: app\n  password: {s}\n",
    "pwd": "wifi pwd: {s}",
    "client_secret": 'CLIENT_SECRET = "{s}"',
    "api_key_assign": "api_key: '{s}'",
    "token_flag": "run it with --auth-token={s} please",
    "url_password": "DATABASE_URL=postgres://app:{s}@db.internal:5432/prod",
    "hex": "the signing key is {s} (do not share)",
    "base64": "the webhook secret {s} goes in the header",
}

CLEAN = [
    "The quick brown fox jumps over the lazy dog. Photosynthesis turns light into chemical energy.",
    "To reset your password, open Settings > Account and click 'Forgot password'. "
    "The password must be at least 12 characters.",
    "Password: enter it twice to confirm.",
    "Each token: roughly four characters of English text.",
    "Set max_tokens = 512 and temperature: 0.7 for shorter answers.",
    "def login(user: str, password: str) -> bool:\n    token = create_token(user)\n"
    "    return check(password, token)",
    "password = getpass.getpass()\napi_key = os.environ['OPENAI_API_KEY']\ntoken = self.token\n"
    "secret = settings.secret_key",
    'client = OpenAI(api_key=api_key)\nheaders = {"Authorization": f"Bearer {token}"}',
    "class Settings(BaseModel):\n    api_key: SecretStr\n    password: str | None = None\n"
    "    token: Optional[str] = None",
    "DATABASE_URL=postgres://${DB_USER}:${DB_PASSWORD}@localhost:5432/app",
    'password: "<your password here>"\napi_key: "YOUR_API_KEY"\ntoken: "${GITHUB_TOKEN}"\n'
    'secret: "{{ vault_secret }}"',
    "if password == confirm_password:\n    tokens = tokenizer.encode(text)\n    num_tokens = len(tokens)",
    "pwd = os.getcwd()\n$ pwd\n/home/alice/projects/milton",
    "The sha256 of the file is e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.",
    "$ git rev-parse HEAD\n4b825dc642cb6eb9a060e54bf8d69288fbee4904",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8\nAuthor: Alice <alice@example.com>",
    "pip install --require-hashes torch==2.3.0 "
    "--hash=sha256:1b6d3e4a9a2c7f8e0d5b6c4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e",
    "Traceback (most recent call last):\n  File \"/usr/local/lib/python3.11/site-packages/torch/nn/"
    "modules/module.py\", line 1501, in _call_impl",
    "See https://github.com/simonw/sqlite-utils/blob/main/docs/python-api.rst#atomic-transactions.",
    "kubectl get --raw /api/v1/namespaces/Default/pods/WebServer-7d9f8b6c5d-x2kq9/log",
    "HKEY_LOCAL_MACHINE/SOFTWARE/Microsoft/Windows/CurrentVersion/Run holds startup entries.",
    # entropy alone would flag these two; they are names (mostly words), not keys
    "reg query HKEY_LOCAL_MACHINE/SOFTWARE/Microsoft/Windows/CurrentVersion/Run2",
    "Turn off com/fasterxml/jackson/databind/DeserializationFeature/FAIL_ON_UNKNOWN_PROPERTIES_V2.",
    "public class AbstractSingletonProxyFactoryBean2FooBarBaz extends "
    "ThisIsAVeryLongCamelCaseIdentifierName123ForTesting {}",
    "def test_secret_filter_does_not_flag_ordinary_python_code_or_long_snake_case_names_2(): pass",
    "The request id is 550e8400-e29b-41d4-a716-446655440000 and the build took 93.5 s.",
    "ssh://git@github.com:22/owner/repo.git and https://user@example.com/path are fine.",
    "SELECT id, password_hash FROM users WHERE token_expires < now();",
    "Bearer bonds were common in the 19th century; the bearer of the certificate owned it.",
    "A monkey: yes, a primate. Secret: the recipe uses brown butter.",
    "npm WARN deprecated request@2.88.2: see https://github.com/request/request/issues/3142",
    "docker run -e POSTGRES_PASSWORD=$POSTGRES_PASSWORD -p 5432:5432 postgres:16",
    "Use `milton train-lora --now 2024-05-01T02:00:00Z` to replay a night.",
    "export AWS_SECRET_ACCESS_KEY=$(pass show aws/secret)",
    "The isolation forest uses n_estimators=100 and contamination=0.05 by default.",
    "img/2024/Screenshots/MainWindow-Dark-Theme-Preview-1920x1080-Final.png",
    "/home/alice/Documents/Work/Reports/2024/Q3/QuarterlyReview-Draft2.docx",
    "MyProject-Backend-Service-Deployment-2024-Production-Cluster1 is healthy.",
]


# -- the filter --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(SECRETS))
def test_each_kind_of_secret_is_found_and_redacted(case):
    kind, secret = SECRETS[case]
    text = TEXTS[case].format(s=secret)
    found = SecretFilter().find(text)
    assert [f.kind for f in found] == [kind], (case, found)
    assert secret in text[found[0].start:found[0].end] or text[found[0].start:found[0].end] in secret
    redacted, n = SecretFilter().redact(text)
    assert n == 1 and f"[REDACTED:{kind}]" in redacted
    assert secret not in redacted
    # no fragment of it survives either (a partial match would leave a usable tail)
    assert all(chunk not in redacted for chunk in (secret[:12], secret[-12:]))


@pytest.mark.parametrize("text", CLEAN, ids=range(len(CLEAN)))
def test_ordinary_prose_and_code_has_no_findings(text):
    assert SecretFilter().find(text) == []


def test_built_in_general_set_is_clean():
    assert all(SecretFilter().find(f"{i.prompt or ''}\n{i.response}") == [] for i in general_items())


def test_entropy_rule_separates_random_keys_from_long_names():
    rng = random.Random(1)
    keys = ["".join(rng.choice(_ALNUM + "+/") for _ in range(n)) for n in (40, 48, 64, 100) for _ in range(50)]
    found = sum(bool(SecretFilter().find(f"key {k} end")) for k in keys)
    assert found >= 0.97 * len(keys)  # measured miss rate ~0.15% at 40 chars, 0 at 88+
    names = ["TestSecretFilterRejectsInvalidPatternsQuickly2", "org/apache/commons/lang3/StringUtils/Version3"]
    for name in names:
        assert shannon_entropy(name) < random_base64_bits(len(name)) - 0.5


def test_extra_patterns_and_invalid_ones():
    filt = SecretFilter([r"ACME-\d{6}"])
    assert [f.kind for f in filt.find("ticket ACME-123456 has the vault code")] == ["custom"]
    assert filt.redact("use ACME-123456")[0] == "use [REDACTED:custom]"
    with pytest.raises(ConfigError) as err:
        SecretFilter([r"fine", r"(unclosed"])
    message = str(err.value)
    assert "train.sensitive_patterns[1]" in message and "(unclosed" in message and "\n" not in message


def test_invalid_pattern_in_config_fails_the_export(db):
    run = new_run(db)
    with pytest.raises(ConfigError, match=r"train\.sensitive_patterns\[0\]"):
        export_new_items(db, make_settings(sensitive_patterns=["[a-"]), run, NOW)
    assert items(db) == []


# -- pairing, watermark, dedupe -------------------------------------------------------------------
def test_exchanges_join_users_and_replies_and_drop_system_and_tools():
    rows = [
        (1, "system", "You are Milton.", None),
        (2, "assistant", "Hello!", None),  # before any question: not an answer
        (3, "user", "First part.", None),
        (4, "user", "Second part?", None),
        (5, "assistant", "Answer one.", None),
        (6, "assistant", "Answer two.", None),
        (7, "user", "Weather in Ghent?", None),
        (8, "assistant", "", json.dumps({"tool_calls": [{"function": {"name": "weather"}}]})),
        (9, "tool", "{\"temp\": 12}", None),
        (10, "assistant", "It is 12 degrees.", None),
        (11, "user", "Thanks!", None),
        (12, "assistant", "You're welcome.", None),
        (13, "user", "Tell me a long story.", None),
        # serve logs a reply cut off by a disconnect or timeout as incomplete: not an answer
        (14, "assistant", "Once upon a", json.dumps({"incomplete": True, "cancel_reason": "timeout"})),
        (15, "user", "Unanswered?", None),
    ]
    pairs, dropped = exchanges(rows)
    assert pairs == [("First part.\n\nSecond part?", "Answer one.\n\nAnswer two.", [3, 4, 5, 6]),
                     ("Thanks!", "You're welcome.", [11, 12])]
    assert dropped == 2


def test_watermark_open_and_short_sessions(db, embedder, milton_home):
    settings = make_settings()
    ingest(db, milton_home / "in", [conversation("alpha"), conversation("beta"),
                                    qa(("short one?", "yes."))])  # 2 messages: too short
    clock = [NOW - timedelta(hours=1)]
    tracker = SessionTracker(db, embedder, MemoryConfig(), milton_home / "data" / "logs",
                             clock=lambda: clock[0])
    live = tracker.start_session("alice")
    for m in conversation("live"):
        tracker.log_message(m["role"], m["content"], session_id=live)  # still open

    run1 = new_run(db)
    report = export_new_items(db, settings, run1, NOW)
    prompts = {i["prompt"] for i in items(db, run1)}
    assert report.new_pairs == 4 and report.sessions == 2
    assert prompts == {"alpha question 0?", "alpha question 1?", "beta question 0?", "beta question 1?"}
    first_live = db.execute("select min(id) from messages where session_id = ?", [live]).fetchone()[0]
    assert report.watermark_message_id == first_live - 1  # held below the open session
    stored = db.execute("select watermark_message_id from training_runs where id = ?", [run1]).fetchone()
    assert stored[0] == report.watermark_message_id
    finish(db, run1, "promoted")

    tracker.end_session(live)  # the live conversation is finished now
    ingest(db, milton_home / "in", [conversation("gamma")], name="more.jsonl")
    run2 = new_run(db)
    report = export_new_items(db, settings, run2, NOW + timedelta(days=1))
    assert {i["prompt"] for i in items(db, run2)} == {
        "live question 0?", "live question 1?", "gamma question 0?", "gamma question 1?"}
    assert report.new_pairs == 4 and report.duplicates == 0  # alpha/beta are below the watermark
    top = db.execute("select max(id) from messages").fetchone()[0]
    assert report.watermark_message_id == top
    finish(db, run2, "rejected")  # rejected runs move the watermark too

    run3 = new_run(db)
    report = export_new_items(db, settings, run3, NOW + timedelta(days=2))
    assert report.new_pairs == 0 and items(db, run3) == []


def test_dedupe_resume_and_failed_runs(db, milton_home):
    settings = make_settings()
    same = qa(("How do I list files?", "Use ls."), ("And hidden ones?", "ls -a."))
    ingest(db, milton_home / "in", [same + [{"role": "user", "content": "ok"}],
                                    same + [{"role": "user", "content": "thanks"}]])
    run1 = new_run(db)
    first = export_new_items(db, settings, run1, NOW)
    assert first.new_pairs == 2 and first.duplicates == 2  # the same two exchanges in two sessions
    again = export_new_items(db, settings, run1, NOW)  # a resumed run exports the same items
    assert (again.train_ids, again.eval_ids) == (first.train_ids, first.eval_ids)
    assert len(items(db)) == 2

    finish(db, run1, "failed")  # never trained: the next run takes its items over
    run2 = new_run(db)
    taken = export_new_items(db, settings, run2, NOW)
    assert taken.new_pairs == 2 and sorted(taken.train_ids + taken.eval_ids) == sorted(first.train_ids + first.eval_ids)
    assert {i["run_id"] for i in items(db)} == {run2}
    finish(db, run2, "promoted")
    run3 = new_run(db)
    assert export_new_items(db, settings, run3, NOW).new_pairs == 0
    assert len(items(db)) == 2


def test_skip_below_min_new_pairs(db, milton_home):
    ingest(db, milton_home / "in", [qa(("only one?", "yes."), ("sure?", "sure."))])
    run = new_run(db)
    report = export_new_items(db, make_settings(min_new_pairs=3), run, NOW)
    with pytest.raises(Skip) as skip:
        require_enough(report, make_settings(min_new_pairs=3))
    assert skip.value.reason == "too little new data: 2 new question/answer pairs (need train.min_new_pairs=3)"
    assert skip.value.metrics["new_pairs"] == 2 and "train_ids" not in skip.value.metrics
    require_enough(report, make_settings(min_new_pairs=2))  # enough: no exception


def test_documents_become_text_items_after_the_document_watermark(db, embedder, milton_home):
    settings = make_settings()
    docs = milton_home / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text("# Guide\n\nMilton trains nightly.\n\n## Backups\n\nWeekly, keep four.\n")
    ingest_documents(db, embedder, [docs / "guide.md"], NOW - timedelta(hours=3), 1200)
    (docs / "faq.md").write_text("# FAQ\n\nAsk away.\n")
    ingest_documents(db, embedder, [docs / "faq.md"], NOW - timedelta(hours=2), 1200)
    ingest(db, milton_home / "in", [conversation("chat")])
    run0 = new_run(db)
    assert export_new_items(db, make_settings(include_documents=False), run0, NOW).new_texts == 0
    finish(db, run0, "failed")

    run1 = new_run(db)
    report = export_new_items(db, settings, run1, NOW)
    texts = [i for i in items(db, run1) if i["kind"] == "text"]
    assert report.new_texts == 3 and {t["prompt"] for t in texts} == {None}
    assert any("Weekly, keep four." in t["response"] for t in texts)
    assert report.watermark_document_ts == (NOW - timedelta(hours=2)).timestamp()
    finish(db, run1, "promoted")

    (docs / "later.md").write_text("# Later\n\nAdded the next day.\n")
    ingest_documents(db, embedder, [docs / "later.md"], NOW + timedelta(days=1), 1200)
    run2 = new_run(db)
    report = export_new_items(db, settings, run2, NOW + timedelta(days=1))
    assert report.new_texts == 1 and report.new_pairs == 0
    assert report.duplicates == 1  # only the chunk at the watermark itself is read again
    assert [i["response"] for i in items(db, run2)] == ["Later\n\nAdded the next day."]


# -- split, replay, regression --------------------------------------------------------------------
def _many(n: int, tag: str) -> list[list[dict]]:
    return [qa((f"{tag} {i}: what is {i} + {i}?", f"{2 * i}."), (f"{tag} {i}: and doubled?", f"{4 * i}."))
            for i in range(n)]


def test_split_is_deterministic_seeded_and_never_leaves_eval_empty(milton_home):
    def split_of(name: str, seed: int, convs) -> dict[str, str]:
        store = open_store(milton_home / f"{name}.db")
        try:
            ingest(store, milton_home / name, convs)
            run = new_run(store)
            export_new_items(store, make_settings(seed=seed), run, NOW)
            return {r[0]: r[1] for r in store.execute("select prompt, split from training_items")}
        finally:
            store.close()

    a, b = split_of("a", 0, _many(30, "q")), split_of("b", 0, _many(30, "q"))
    assert a == b and len(a) == 60
    assert 4 <= sum(s == "eval" for s in a.values()) <= 24  # ~20% of 60
    assert split_of("c", 1, _many(30, "q")) != a  # the seed changes the split
    for seed in range(6):  # two items: one of each, whatever the hash says
        two = split_of(f"two{seed}", seed, [qa(("one?", "1."), ("two?", "2."))])
        assert sorted(two.values()) == ["eval", "train"]


def test_replay_and_regression_set(db, milton_home):
    settings = make_settings(replay_fraction=0.3, regression_items=32)
    ingest(db, milton_home / "in", _many(10, "old"), name="old.jsonl")
    run1 = new_run(db)
    old = export_new_items(db, settings, run1, NOW)
    finish(db, run1, "promoted")
    ingest(db, milton_home / "in", _many(5, "new"), name="new.jsonl")
    run2 = new_run(db)
    new = export_new_items(db, settings, run2, NOW + timedelta(days=1))

    data = build_dataset(db, settings, run2)
    new_train = [i for i in data.train if i.id in new.train_ids]
    replayed = [i for i in data.train if i.id not in new.train_ids]
    assert len(new_train) == len(new.train_ids) and data.replayed == len(replayed)
    assert len(replayed) == -(-3 * len(new.train_ids) // 10)  # ceil(0.3 x new)
    assert all(i.id in old.train_ids for i in replayed)
    assert sorted(i.id for i in data.eval) == sorted(new.eval_ids)
    user = [i for i in data.regression if i.source != GENERAL_SOURCE]
    assert sorted(i.id for i in user) == sorted(old.eval_ids)  # all older eval items (< 32)
    general = [i for i in data.regression if i.source == GENERAL_SOURCE]
    assert len(general) == data.general == len(general_items()) >= 25
    assert {i.kind for i in general} == {"pair", "text"}
    assert build_dataset(db, settings, run2) == data  # deterministic

    few = build_dataset(db, make_settings(regression_items=1, replay_fraction=0.0), run2)
    assert few.replayed == 0 and len([i for i in few.regression if i.source != GENERAL_SOURCE]) == 1
    assert few.regression[0].id in old.eval_ids


def test_a_pattern_added_later_keeps_older_items_out(db, milton_home):
    ingest(db, milton_home / "in", [qa(("vault code?", "ACME-123456."), ("backup code?", "ACME-654321."))],
           name="old.jsonl")
    run1 = new_run(db)
    export_new_items(db, make_settings(), run1, NOW)  # no built-in rule knows these codes
    finish(db, run1, "promoted")
    ingest(db, milton_home / "in", _many(3, "new"), name="new.jsonl")
    run2 = new_run(db)
    settings = make_settings(sensitive_patterns=[r"ACME-\d{6}"], replay_fraction=1.0)
    export_new_items(db, settings, run2, NOW)
    data = build_dataset(db, settings, run2)
    assert data.filtered == 2
    write_dataset_files(data, milton_home / "audit")
    for name in DATASET_FILES:
        assert b"ACME-" not in (milton_home / "audit" / name).read_bytes()


# -- secrets end to end ---------------------------------------------------------------------------
def _secret_conversations() -> list[list[dict]]:
    """Per secret: the secret in one exchange (question or answer), a clean exchange beside it."""
    convs = []
    for n, case in enumerate(sorted(SECRETS)):
        text = TEXTS[case].format(s=SECRETS[case][1])
        leaky = (text, f"Noted ({n}).") if n % 2 else (f"What goes in config {n}?", text)
        convs.append(qa(leaky, (f"Clean question {n}?", f"Clean answer {n}.")))
    return convs


def _assert_no_secret(data: bytes) -> None:
    for case, (_, secret) in SECRETS.items():
        for piece in (secret, secret[:16], secret[-16:]) if len(secret) > 16 else (secret,):
            assert piece.encode() not in data, case


@pytest.mark.parametrize("mode", ["exclude", "redact"])
def test_secrets_never_reach_the_dataset(db, embedder, milton_home, mode):
    settings = make_settings(sensitive_mode=mode)
    ingest(db, milton_home / "in", _secret_conversations())
    docs = milton_home / "docs"
    docs.mkdir()
    (docs / "ops.md").write_text(f"# Ops\n\nRotate keys monthly.\n\n## Keys\n\n{TEXTS['github'].format(s=SECRETS['github'][1])}\n")
    ingest_documents(db, embedder, [docs / "ops.md"], NOW - timedelta(hours=1), 1200)
    run = new_run(db)
    report = export_new_items(db, settings, run, NOW)

    leaky = len(SECRETS) + 1  # one exchange per secret, plus the document chunk with a token
    expected_kinds = {kind for kind, _ in SECRETS.values()}
    assert set(report.by_kind) == expected_kinds
    assert report.by_kind["github_token"] == 3  # two conversations' tokens + the document's
    if mode == "exclude":
        assert (report.excluded, report.redacted) == (leaky, 0)
        assert report.new_pairs == len(SECRETS)  # only the clean exchanges
        assert all(i["prompt"].startswith("Clean question") for i in items(db) if i["kind"] == "pair")
    else:
        assert (report.excluded, report.redacted) == (0, leaky)
        assert report.new_pairs == 2 * len(SECRETS)
        stored = items(db)
        assert sum(i["redacted"] for i in stored) == leaky
        marked = " ".join(f"{i['prompt']} {i['response']}" for i in stored)
        assert all(f"[REDACTED:{kind}]" in marked for kind in expected_kinds)

    dump = "\n".join(map(str, db.execute("select * from training_items").fetchall())).encode()
    _assert_no_secret(dump)
    _assert_no_secret(json.dumps(report.as_metrics()).encode())
    paths = write_dataset_files(build_dataset(db, settings, run), milton_home / "adapter")
    assert [p.name for p in paths] == list(DATASET_FILES)
    for path in paths:
        _assert_no_secret(path.read_bytes())
        [json.loads(line) for line in path.read_text().splitlines()]  # valid JSONL
    assert sorted(p.name for p in (milton_home / "adapter").iterdir()) == sorted(DATASET_FILES)  # no temp files
