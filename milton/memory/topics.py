"""What a conversation is about and what its user prefers, from the text alone.

:func:`extract_topics` ranks the languages, tools and words a session talks about (code blocks
count by their language); :func:`detect_preferences` finds evidence of how the user likes
answers (languages, tools, style); :func:`upsert_preferences` accumulates that evidence in the
``preferences`` table. Used when sessions are processed into memory.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import sqlite_utils

from milton.memory.search import STOPWORDS

TOP_TOPICS = 5

LANGUAGES = {  # word as typed -> canonical (unambiguous words only; see _GO for "go")
    "python": "python", "python3": "python", "rust": "rust", "golang": "go",
    "javascript": "javascript", "js": "javascript", "node.js": "javascript", "nodejs": "javascript",
    "typescript": "typescript", "c++": "c++", "cpp": "c++", "java": "java", "sql": "sql",
    "bash": "bash", "zsh": "bash", "ruby": "ruby", "kotlin": "kotlin", "swift": "swift",
    "haskell": "haskell", "scala": "scala", "php": "php", "lua": "lua", "perl": "perl",
    "c#": "c#", "csharp": "c#", "elixir": "elixir", "julia": "julia",
}
FENCE_LANGUAGES = {**LANGUAGES, "py": "python", "rs": "rust", "go": "go", "ts": "typescript",
                   "tsx": "typescript", "jsx": "javascript", "sh": "bash", "shell": "bash",
                   "console": "bash", "c": "c", "h": "c", "hpp": "c++", "cc": "c++",
                   "postgresql": "sql", "psql": "sql", "rb": "ruby", "kt": "kotlin", "cs": "c#"}
TOOLS = {
    "git": "git", "docker": "docker", "dockerfile": "docker", "docker-compose": "docker",
    "kubernetes": "kubernetes", "k8s": "kubernetes", "kubectl": "kubernetes", "helm": "helm",
    "vim": "vim", "neovim": "vim", "nvim": "vim", "emacs": "emacs", "vscode": "vscode",
    "pytest": "pytest", "numpy": "numpy", "pandas": "pandas", "systemd": "systemd",
    "systemctl": "systemd", "journalctl": "systemd", "sqlite": "sqlite", "sqlite3": "sqlite",
    "postgres": "postgres", "postgresql": "postgres", "psql": "postgres", "mysql": "mysql",
    "redis": "redis", "nginx": "nginx", "terraform": "terraform", "ansible": "ansible",
    "tmux": "tmux", "jupyter": "jupyter", "pytorch": "pytorch", "torch": "pytorch",
    "tensorflow": "tensorflow", "react": "react", "django": "django", "flask": "flask",
    "fastapi": "fastapi", "npm": "npm", "conda": "conda", "cargo": "cargo", "github": "github",
    "gitlab": "gitlab", "aws": "aws", "linux": "linux", "ssh": "ssh",
}
KNOWN = {*LANGUAGES.values(), *TOOLS.values()}

_STYLE = {
    "concise": re.compile(
        r"\b(?:brief(?:ly)?|concise(?:ly)?|tl;?dr|short answers?|keep it short|in short|one[- ]liner|"
        r"in (?:one|a) sentence|just the (?:code|answer|command)|no explanations?)\b", re.I),
    "detailed": re.compile(
        r"\b(?:in (?:great )?detail|detailed|step[- ]by[- ]step|thorough(?:ly)?|in[- ]depth|elaborate|"
        r"walk me through|comprehensive(?:ly)?|explain (?:it )?(?:fully|everything))\b", re.I),
}
_EXAMPLES = re.compile(
    r"\b(?:(?:an?|some|code|concrete|working|usage|more|full)(?: [\w+#]+)? examples?|examples? code|snippets?|"
    r"sample code|show me (?:the |some )?code|with code)\b", re.I)
_GO = re.compile(r"\b(?:in|using|with|learning) go\b|\bgo (?:code|program|modules?|routines?)\b", re.I)
_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
_WORD = re.compile(r"[a-z][a-z0-9+#]*(?:[.\-][a-z0-9+#]+)*")
_TOPIC_STOP = STOPWORDS | frozenset(
    """also always another anything around back best better bit come could doesn done dont else
    even every example examples fine first get gets getting give go going good got great help
    here hey hi hello how however i'm id ill im instead let lets like look looks make makes many
    may maybe mean might much must need needs new next nothing okay ok one really right say see
    seems show since something still sure take thank thanks thing things think though time try
    trying two use used uses using want wants way ways well whats work works would yeah yes yet
    able actually already answer code question problem file files run running value values""".split())


def _split_code(text: str) -> tuple[str, list[str]]:
    """(prose without fenced code, the fences' language tags). Code would drown topics in
    identifiers; the tag says more about the conversation than its contents."""
    tags = [m.group(2).lower() for m in _FENCE.finditer(text) if m.group(2)]
    return _FENCE.sub(" ", text), tags


def _tokens(prose: str) -> list[str]:
    return _WORD.findall(re.sub(r"\bvs ?code\b", "vscode", prose.lower()))


def extract_topics(texts: Iterable[str], limit: int = TOP_TOPICS) -> list[str]:
    """Frequent non-stopword terms and bigrams, known tech terms boosted; deterministic."""
    words: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    for text in texts:
        prose, tags = _split_code(text)
        kept = [t if t not in _TOPIC_STOP and (len(t) >= 3 or t in LANGUAGES or t in TOOLS) else None
                for t in _tokens(prose)]
        kept += [None] + [FENCE_LANGUAGES.get(t) or TOOLS.get(t) for t in tags]
        words.update(t for t in kept if t)
        pairs.update(f"{a} {b}" for a, b in zip(kept, kept[1:]) if a and b and a != b)
    scores: Counter[str] = Counter()
    for term, n in words.items():
        canonical = LANGUAGES.get(term) or TOOLS.get(term) or term
        if canonical in KNOWN:
            scores[canonical] += n + 2
        elif n >= 2:
            scores[canonical] += n
    for pair, n in pairs.items():
        if n >= 2:
            scores[pair] += n * 1.5
            for word in pair.split(" "):  # a word seen only inside the phrase adds nothing
                if words[word] <= n and word in scores and word not in KNOWN:
                    del scores[word]
    return [t for t, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def detect_preferences(messages: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """(key, value) -> evidence count from one session's (role, content) messages.

    Phrases and mentions count in the user's own messages; code-fence tags count in any message,
    since they show the language actually being worked in.
    """
    found: Counter[tuple[str, str]] = Counter()
    for role, content in messages:
        prose, tags = _split_code(content)
        for tag in tags:
            if tag in FENCE_LANGUAGES:
                found[("language", FENCE_LANGUAGES[tag])] += 1
            if tag in TOOLS:
                found[("tool", TOOLS[tag])] += 1
        if role != "user":
            continue
        for value, pattern in _STYLE.items():
            if n := len(pattern.findall(prose)):
                found[("response_style", value)] += n
        if n := len(_EXAMPLES.findall(prose)):
            found[("code_examples", "prefers")] += n
        if n := len(_GO.findall(prose)):
            found[("language", "go")] += n
        for token in _tokens(prose):
            if token in LANGUAGES:
                found[("language", LANGUAGES[token])] += 1
            elif token in TOOLS:
                found[("tool", TOOLS[token])] += 1
    return dict(found)


def upsert_preferences(db: sqlite_utils.Database, found: dict[tuple[str, str], int], seen: float) -> None:
    db.conn.executemany(
        "insert into preferences (key, value, evidence, sessions, first_seen, last_seen) "
        "values (?, ?, ?, 1, ?, ?) on conflict (key, value) do update set "
        "evidence = evidence + excluded.evidence, sessions = sessions + 1, "
        "first_seen = min(first_seen, excluded.first_seen), last_seen = max(last_seen, excluded.last_seen)",
        [(key, value, n, seen, seen) for (key, value), n in sorted(found.items())])
