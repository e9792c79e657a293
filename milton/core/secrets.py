"""Find secrets in text before it can reach a training set.

A fine-tuned adapter can reproduce what it was trained on, so an API key pasted into a chat
must never become a training item. :class:`SecretFilter` runs three kinds of detector:

* **Formats with a signature** (``sk-``/``sk-ant-``/``sk-proj-``, ``AKIA…``, ``ghp_``/
  ``github_pat_``, ``xoxb-``, ``AIza…``, JWTs, ``Bearer …``, PEM private-key blocks): precise,
  reported under their own kind.
* **Credentials by name**: a value assigned to a key that names a secret (``password=…``,
  ``DB_PASSWORD: …``, ``"api_key": "…"``, ``--token=…``) and the password of a URL
  (``postgres://user:pass@host``). Code that *handles* credentials is not a secret, so a bare
  (unquoted) value that reads like code is skipped: a call, an attribute or subscript, a type
  or literal (``str``, ``None``), a template (``${PASS}``, ``{{ pw }}``, ``<token>``), a path.
  A bare value must also contain a digit or a symbol (``hunter2``, ``p@ss``), which keeps
  prose such as "password: enter it twice" out. Quoted values count unless they are
  placeholders.
* **Anonymous high-entropy strings**, for keys with no recognisable prefix:

  - *hex*: a run of 32+ hex digits holding both letters and digits. That is also the shape of
    every MD5/SHA-1/SHA-256 digest and git commit id, which engineers paste all the time; a run
    preceded (within 40 characters, across a line break) by a word that labels it as a hash
    (sha256, md5, commit, digest, checksum, git rev-parse, integrity…) is left alone. An
    unlabelled digest is treated as a secret: dropping an exchange costs little, leaking a key
    costs a lot.
  - *base64-ish*: a run of 40+ characters from ``[A-Za-z0-9+/_-]`` (optionally ``=``-padded)
    that mixes upper case, lower case and digits and whose Shannon entropy is within 0.5 bit of
    what a random base64 string of that length measures (the Miller-Madow estimate
    ``6 - 63 / (2 n ln 2)``: 4.86 bits at 40 characters, 5.5 at 90). A fixed threshold does
    not work: entropy grows with length for any text, so a 60-character path scores what a
    40-character key does. Measured: random 40-character keys fall below the bar about 0.15%
    of the time (none from 88 characters on); long identifiers, CamelCase names and paths
    stay 0.2-0.6 bit under it. A run at least 80% covered by word-like pieces (``Word``,
    ``word``, ``WORD``, 3+ letters) is a name, not a key, whatever its entropy; random base64
    reaches that coverage well under 0.01% of the time. The three-class rule alone removes
    snake_case names, lower-case paths and hex (handled above). Same hash-label exemption
    (``sha512-…`` integrity strings).

Overlapping findings are merged into one span (the most specific kind names it), so a secret
flagged by two detectors is replaced once and no part of either is left behind. Findings
never carry the secret itself, only its kind and position.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from milton.core.errors import ConfigError

ENTROPY_MARGIN_BITS = 0.5  # below the entropy expected of random base64 of the same length
WORDY_COVERAGE = 0.8  # a run this much covered by word-like pieces is a name, not a key
BASE64_MIN_CHARS = 40
HEX_MIN_CHARS = 32
HASH_LABEL_WINDOW = 40  # characters before a hex/base64 run searched for a "this is a hash" word


@dataclass(frozen=True)
class Finding:
    """Where a secret is; never what it is."""

    kind: str
    start: int
    end: int


# -- signature formats --------------------------------------------------------------------------
_SIGNATURES: list[tuple[str, re.Pattern[str]]] = [
    ("private_key", re.compile(
        r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----.*?"
        r"(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S)),  # a cut-off block too
    ("anthropic_key", re.compile(r"(?<![\w-])sk-ant-(?=[\w-]*\d)[\w-]{20,}")),
    ("openai_key", re.compile(r"(?<![\w-])sk-(?!ant-)(?=[\w-]*\d)[\w-]{20,}")),
    ("aws_access_key_id", re.compile(
        r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}(?![A-Z0-9])")),
    ("aws_secret_key", re.compile(
        r"(?i)aws_?(?:secret|private)_?(?:access_?)?key[\"']?\s*(?:=|:|=>)\s*[\"']?"
        r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])")),
    ("github_token", re.compile(
        r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"
        r"(?![A-Za-z0-9_])")),
    ("slack_token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}")),
    ("google_api_key", re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])")),
    ("jwt", re.compile(r"(?<![\w-])eyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]*")),
    ("bearer_token", re.compile(r"(?i)\bbearer[ \t]+(?P<value>(?=[\w.~+/-]*\d)[\w.~+/-]{16,}=*)")),
]

# -- credentials by name -----------------------------------------------------------------------
_PASSWORD_WORDS = r"pass(?:word|wd|phrase)|pwd"
_SECRET_WORDS = (r"secret(?:[_.-]?key)?|api[_.-]?key|apikey|access[_.-]?key|private[_.-]?key|"
                 r"(?:access|auth|api|refresh|session|bearer|id|bot)?[_.-]?token|credentials?")
_ASSIGNMENT = re.compile(
    r"""(?<![A-Za-z0-9_.-])
        (?P<q>["']?)
        (?P<key>[A-Za-z0-9_.-]*?(?:(?P<pw>""" + _PASSWORD_WORDS + r""")|""" + _SECRET_WORDS + r"""))
        (?P=q)
        [ \t]*(?::=|=(?![=>~])|:(?![:/]))[ \t]*
        (?:"(?P<dq>[^"\n]{4,500})"|'(?P<sq>[^'\n]{4,500})'|(?P<bare>[^\s"'`,;)\]}<>]{4,500}))
    """,
    re.I | re.X,
)
_URL_PASSWORD = re.compile(r"(?i)\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@?#]+:(?P<value>[^\s/@?#]+)@[^\s/@]")

_PLACEHOLDER = re.compile(
    r"""^(?:\$\{?[A-Za-z_]|\{\{|\{[A-Za-z_][\w.]*\}$|%\(|%s$|<[^>]*>$|\*{3,}|x{3,}$|\.{3}|…|
        your[\w-]*|my[_-]?(?:password|secret|token|key)|example|placeholder|redacted|changeme$|
        (?:password|passwd|secret|token|api[_-]?key)$|\[REDACTED)""",
    re.I | re.X,
)
_CODE_WORDS = frozenset(
    "none null nil true false undefined str string bytes int integer bool boolean optional "
    "secretstr any required self cls env getpass input prompt ask".split())
_CODE_REFERENCE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$|[(\[{]")
_BARE_SIGNAL = re.compile(r"[0-9!#$%^&*+=?@~|\\]")
_NOT_BARE_START = tuple("$%{<([/~.*&@!")

# -- anonymous high-entropy strings ----------------------------------------------------------
_HEX = re.compile(  # both letters and digits: a long run of either alone is a number or a word
    r"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{%d,}(?![0-9A-Za-z])"
    % HEX_MIN_CHARS)
_BASE64 = re.compile(r"(?<![\w+/=-])[\w+/-]{%d,}={0,2}(?![\w+/=-])" % BASE64_MIN_CHARS, re.A)
_WORDY = re.compile(r"[A-Z]?[a-z]{3,}|[A-Z]{3,}")
_HASH_LABEL = re.compile(
    r"(?i)(?:\bsha-?(?:1|224|256|384|512)?(?:sum)?|\bmd5(?:sum)?|blake2[bs]?(?:sum)?|b3sum|hash(?:es)?\b|"
    r"digests?\b|checksums?\b|commit(?:s|ted)?\b|integrity|fingerprint|etag|rev-parse|revision)")

#: Ties between overlapping findings go to the earlier kind here (the more specific one).
_PRIORITY = [name for name, _ in _SIGNATURES] + [
    "url_password", "password", "secret_assignment", "custom", "hex_secret",
    "high_entropy"]


def shannon_entropy(text: str) -> float:
    """Bits per character of the string's own character distribution."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _labelled_as_hash(text: str, start: int) -> bool:
    return bool(_HASH_LABEL.search(text[max(0, start - HASH_LABEL_WINDOW):start]))


def _credential_value(value: str, quoted: bool) -> bool:
    """Is this assigned value a credential, rather than code or a placeholder that names one?"""
    value = value.strip()
    if len(value) < 4 or _PLACEHOLDER.match(value):
        return False
    if quoted:
        return True
    if value.lower() in _CODE_WORDS or value.startswith(_NOT_BARE_START) or _CODE_REFERENCE.search(value):
        return False
    return bool(_BARE_SIGNAL.search(value))


def random_base64_bits(length: int) -> float:
    """Expected entropy of ``length`` random base64 characters (Miller-Madow bias correction)."""
    return math.log2(64) - 63 / (2 * length * math.log(2))


def _looks_random(token: str) -> bool:
    body = token.rstrip("=")
    if not (any(c.isupper() for c in body) and any(c.islower() for c in body)
            and any(c.isdigit() for c in body)):
        return False
    if sum(len(m.group()) for m in _WORDY.finditer(body)) >= WORDY_COVERAGE * len(body):
        return False
    return shannon_entropy(body) >= random_base64_bits(len(body)) - ENTROPY_MARGIN_BITS


class SecretFilter:
    """Built-in detectors plus ``extra_patterns`` (regular expressions from
    ``train.sensitive_patterns``; each whole match is a secret of kind ``custom``)."""

    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        self.extra: list[re.Pattern[str]] = []
        for index, pattern in enumerate(extra_patterns):
            try:
                self.extra.append(re.compile(pattern))
            except (re.error, TypeError, RecursionError, OverflowError) as exc:
                raise ConfigError(
                    f"train.sensitive_patterns[{index}]: invalid regular expression {pattern!r}: {exc}"
                ) from None

    # -- detection ---------------------------------------------------------------------------
    def _raw(self, text: str) -> Iterator[Finding]:
        for kind, pattern in _SIGNATURES:
            for m in pattern.finditer(text):
                group = "value" if "value" in pattern.groupindex else 0
                yield Finding(kind, m.start(group), m.end(group))
        for m in _ASSIGNMENT.finditer(text):
            group = next(g for g in ("dq", "sq", "bare") if m.group(g) is not None)
            value = m.group(group)
            if group == "bare":
                value = value.rstrip(".,!?:")  # the end of a sentence is not part of the secret
            if _credential_value(value, quoted=group != "bare"):
                kind = "password" if m.group("pw") else "secret_assignment"
                yield Finding(kind, m.start(group), m.start(group) + len(value))
        for m in _URL_PASSWORD.finditer(text):
            if _credential_value(m.group("value"), quoted=True):
                yield Finding("url_password", m.start("value"), m.end("value"))
        for pattern in self.extra:
            for m in pattern.finditer(text):
                if m.end() > m.start():
                    yield Finding("custom", m.start(), m.end())
        for m in _HEX.finditer(text):
            if not _labelled_as_hash(text, m.start()):
                yield Finding("hex_secret", m.start(), m.end())
        for m in _BASE64.finditer(text):
            if _looks_random(m.group()) and not _labelled_as_hash(text, m.start()):
                yield Finding("high_entropy", m.start(), m.end())

    def find(self, text: str) -> list[Finding]:
        """Secrets in ``text``, in order, overlapping detections merged into one span."""
        rank = {kind: i for i, kind in enumerate(_PRIORITY)}
        merged: list[Finding] = []
        for f in sorted(self._raw(text), key=lambda f: (f.start, -f.end)):
            if merged and f.start < merged[-1].end:
                last = merged[-1]
                kind = min(last.kind, f.kind, key=rank.__getitem__)
                merged[-1] = Finding(kind, last.start, max(last.end, f.end))
            else:
                merged.append(f)
        return merged

    def redact(self, text: str) -> tuple[str, int]:
        """``text`` with each secret replaced by ``[REDACTED:<kind>]``, and how many there were."""
        findings = self.find(text)
        out, pos = [], 0
        for f in findings:
            out += [text[pos:f.start], f"[REDACTED:{f.kind}]"]
            pos = f.end
        out.append(text[pos:])
        return "".join(out), len(findings)
