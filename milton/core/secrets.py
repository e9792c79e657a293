"""Find secrets in text before it can reach a training set or a prompt.

A fine-tuned adapter can reproduce what it was trained on, and a memory injected into a system
prompt is shown to whatever model answers, so an API key pasted into a chat must never become a
training item or be injected verbatim. :class:`SecretFilter` runs four kinds of detector:

* **Yelp's detect-secrets plugins** (its regex-based ones: AWS, Azure storage, Discord,
  GitHub, GitLab, JWT, Mailchimp, npm, OpenAI, PyPI, SendGrid, Slack, Square, Stripe, Telegram,
  Twilio, basic-auth URLs, private-key headers...): their compiled patterns are run on the text
  directly (``finditer``, for positions), not through detect-secrets' file scanner, baseline or
  global settings, and nothing is ever verified over the network. Its keyword and quoted-string
  entropy plugins are not used (the rules below are written for prose, where those flag
  "password: enter it twice" and every quoted path), nor the public-IP one (not a secret).
  Kinds are their ``secret_type`` in snake case (``telegram_bot_token``).
* **Formats with a signature** of Milton's own (``sk-``/``sk-ant-``/``sk-proj-``, ``AKIA…``,
  ``ghp_``/``github_pat_``, ``glpat-``, ``hf_``, ``sk_live_``, ``xoxb-``, ``AIza…``, JWTs,
  ``Bearer …``, ``Authorization: Basic …``, PEM private-key blocks, crypt/bcrypt hashes), plus
  card numbers (known issuer prefix and length, Luhn checksum) and US social security numbers
  (``123-45-6789``): precise, reported under their own kind.
* **Credentials by name or by context**: a value assigned to a key that names a secret
  (``password=…``, ``DB_PASS=…``, ``"api_key": "…"``, ``--token=…``), a sentence that gives one
  ("the wifi password is …"), the password of a URL (``redis://:pw@host``), of a command line
  (``mysql -pX``, ``curl -u admin:X``, ``sshpass -p X``) or of a ``.netrc`` entry. Code that
  *handles* credentials is not a secret, so a bare (unquoted) value that reads like code is
  skipped: a call, an attribute or subscript, a type or literal (``str``, ``None``), a template
  (``${PASS}``, ``{{ pw }}``, ``<token>``), a path. A bare value must also contain a digit or a
  symbol (``hunter2``, ``p@ss``), or be one long run of letters that ends its clause (a
  passphrase: ``correcthorsebatterystaple``), which keeps prose such as "password: enter it
  twice" and "reset my password" out. Quoted values count unless they are placeholders.
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
    (``sha512-…`` integrity strings), and public material is left alone: an SSH public key
    (``ssh-ed25519 AAAA…``), a ``data:…;base64,`` URI, a certificate or public-key PEM block.

Overlapping findings are merged into one span (the most specific kind names it), so a secret
flagged by two detectors is replaced once and no part of either is left behind. Findings
never carry the secret itself, only its kind and position.

Speed: each rule runs only near a needle it must contain (``sk-``, ``password``, ``://``) or
inside a whitespace-free run as long as its shortest match, found with ``str.find`` and
``str.split``, not by the regex engine (see ``Gate``). On chat-sized messages that is about
0.2 CPU seconds per MB, half of what detect-secrets' patterns alone cost run the plain way
(``python -m benchmarks secrets``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from milton.core.errors import ConfigError

if TYPE_CHECKING:
    from milton.core.config import Settings

ENTROPY_MARGIN_BITS = 0.5  # below the entropy expected of random base64 of the same length
WORDY_COVERAGE = 0.8  # a run this much covered by word-like pieces is a name, not a key
BASE64_MIN_CHARS = 40
HEX_MIN_CHARS = 32
HASH_LABEL_WINDOW = 40  # characters before a hex/base64 run searched for a "this is a hash" word
TOKEN_MIN_CHARS = 11  # the shortest whitespace-free run a "token" gate may ask for
PASSPHRASE_MIN_CHARS = 16  # a bare run of lower-case letters this long, ending its clause


@dataclass(frozen=True)
class Finding:
    """Where a secret is; never what it is."""

    kind: str
    start: int
    end: int


# -- where each rule runs ----------------------------------------------------------------------
# Each rule runs only where it can match: chat text is mostly prose that no detector can match,
# and ~60 patterns over all of it took 5 s/MB (Python's re finds a literal prefix fast, but not
# a pattern that opens with a look-behind or an alternation). A gate says where:
#   ("token", n, back): inside a whitespace-free run of n+ characters (a key is one such run),
#                       the window starting ``back`` characters before it (a key name, a quote);
#   ("near", needles, before, after): around a (lower-case) needle the match must contain;
#   ("exact", needles, before, after): the same, the needles matched case-sensitively;
#   None: everywhere.
Gate = tuple[Any, ...] | None  # ("token", int, int) | ("near" | "exact", tuple[str, ...], int, int | None)


# -- detect-secrets' regex plugins ------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    gate: Gate = None
    valid: Callable[[str], bool] | None = None
    plugin: bool = False  # detect-secrets' pattern: its first matched group is the secret


def _mixed(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.islower() for c in value)


# Per detect-secrets plugin (class name): one gate for all its patterns, or one per pattern.
# A plugin missing here runs everywhere: correct, only slower.
_PLUGIN_GATES: dict[str, list[Gate]] = {
    "ArtifactoryDetector": [("exact", ("AKC", "AP"), 1, 300)],
    "AWSKeyDetector": [("token", 20, 1), ("near", ("aws",), 0, 120)],
    "AzureStorageKeyDetector": [("token", 99, 1)],
    "BasicAuthDetector": [("near", ("://",), 0, 300)],
    "CloudantDetector": [("token", 24, 100), ("token", 24, 100), ("token", 30, 1), ("token", 30, 1)],
    "DiscordBotTokenDetector": [("token", 58, 1)],
    "GitHubTokenDetector": [("token", 40, 1)],
    "GitLabTokenDetector": [("token", 25, 1)],
    "IbmCloudIamDetector": [("token", 44, 100)],
    "IbmCosHmacDetector": [("token", 48, 100)],
    "JwtTokenDetector": [("exact", ("eyJ",), 0, 4000)],
    "MailchimpDetector": [("exact", ("-us",), 40, 4)],
    "NpmDetector": [("near", ("_authtoken",), 300, 400)],
    "OpenAIDetector": [("exact", ("T3BlbkFJ",), 300, 30)],  # its [..]* prefix is quadratic on long runs
    "PrivateKeyDetector": [("near", ("private key", "putty-user-key"), 0, 40)],
    "PypiTokenDetector": [("token", 80, 1)],
    "SendGridDetector": [("token", 69, 1)],
    "SlackDetector": [("near", ("xox",), 0, 300), ("token", 40, 1)],
    "SoftlayerDetector": [("token", 64, 100), ("token", 64, 1)],
    "SquareOAuthDetector": [("token", 50, 1)],
    "StripeDetector": [("token", 32, 1)],
    "TelegramBotTokenDetector": [("token", 44, 1)],
    "TwilioKeyDetector": [("token", 34, 1)],
}


@cache
def detect_secrets_plugins() -> tuple[_Rule, ...]:
    """detect-secrets' regex-based detectors as rules, loaded on first use.

    Only their patterns (and the JWT plugin's structural check) are used: no scanner, no
    baseline, no global settings, no network verification."""
    from detect_secrets.plugins.artifactory import ArtifactoryDetector
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
    from detect_secrets.plugins.base import RegexBasedDetector
    from detect_secrets.plugins.basic_auth import BasicAuthDetector
    from detect_secrets.plugins.cloudant import CloudantDetector
    from detect_secrets.plugins.discord import DiscordBotTokenDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
    from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
    from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
    from detect_secrets.plugins.jwt import JwtTokenDetector
    from detect_secrets.plugins.mailchimp import MailchimpDetector
    from detect_secrets.plugins.npm import NpmDetector
    from detect_secrets.plugins.openai import OpenAIDetector
    from detect_secrets.plugins.private_key import PrivateKeyDetector
    from detect_secrets.plugins.pypi_token import PypiTokenDetector
    from detect_secrets.plugins.sendgrid import SendGridDetector
    from detect_secrets.plugins.slack import SlackDetector
    from detect_secrets.plugins.softlayer import SoftlayerDetector
    from detect_secrets.plugins.square_oauth import SquareOAuthDetector
    from detect_secrets.plugins.stripe import StripeDetector
    from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
    from detect_secrets.plugins.twilio import TwilioKeyDetector

    classes: list[type[RegexBasedDetector]] = [
        ArtifactoryDetector, AWSKeyDetector, AzureStorageKeyDetector, BasicAuthDetector,
        CloudantDetector, DiscordBotTokenDetector, GitHubTokenDetector, GitLabTokenDetector,
        IbmCloudIamDetector, IbmCosHmacDetector, JwtTokenDetector, MailchimpDetector, NpmDetector,
        OpenAIDetector, PrivateKeyDetector, PypiTokenDetector, SendGridDetector, SlackDetector,
        SoftlayerDetector, SquareOAuthDetector, StripeDetector, TelegramBotTokenDetector,
        TwilioKeyDetector]
    checks: dict[type[RegexBasedDetector], Callable[[str], bool]] = {
        JwtTokenDetector: JwtTokenDetector.is_formally_valid,
        # its unanchored "AP" + 9 alphanumerics also matches upper-case words (APEXLEGENDS)
        ArtifactoryDetector: _mixed,
        # user:pass@, user:${PASSWORD}@ in docs and examples: placeholders, as for url_password
        BasicAuthDetector: lambda value: _credential_value(value, quoted=True),
    }
    # Patterns that open with an unbounded run and then need a literal ("eyJ...+\." , "sk-...*T3Blbk")
    # rescan the rest of a long run from every start: quadratic. Starting them only where a run
    # starts keeps the same matches in real text and makes the scan linear.
    anchored = {JwtTokenDetector: r"(?<![A-Za-z0-9_=-])", OpenAIDetector: r"(?<![A-Za-z0-9_-])"}
    out = []
    for cls in classes:
        plugin = cls()
        kind = re.sub(r"[^a-z0-9]+", "_", str(plugin.secret_type).lower()).strip("_")
        patterns = [re.compile(anchored[cls] + p.pattern, p.flags) if cls in anchored else p
                    for p in plugin.denylist]
        if cls is NpmDetector:  # "//.+/:_authToken": the same, bounded to a plausible registry URL
            patterns = [re.compile(p.pattern.replace(r"\/\/.+\/", r"\/\/.{1,300}\/", 1), p.flags)
                        for p in patterns]
        gates = _PLUGIN_GATES.get(cls.__name__, [None])
        for i, pattern in enumerate(patterns):
            gate = gates[i] if len(gates) == len(patterns) else gates[0]
            out.append(_Rule(kind, pattern, gate, checks.get(cls), plugin=True))
    return tuple(out)


_PLUGIN_TRIM = " \t\r\n\"'=:"


def _plugin_span(m: re.Match[str]) -> tuple[int, int]:
    """The secret's span: the first group that matched (what detect-secrets reports), else the
    whole match less the delimiters some of its patterns include."""
    for group in range(1, (m.re.groups or 0) + 1):
        if m.group(group):
            return m.span(group)
    text = m.group()
    lead = len(text) - len(text.lstrip(_PLUGIN_TRIM))
    trail = len(text) - len(text.rstrip(_PLUGIN_TRIM))
    return m.start() + lead, max(m.start() + lead, m.end() - trail)


# -- signature formats --------------------------------------------------------------------------
_SIGNATURES: list[_Rule] = [
    _Rule("private_key", re.compile(
        r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----.*?"
        r"(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S),
        ("near", ("private key",), 40, None)),  # a cut-off block too
    _Rule("private_key", re.compile(r"PuTTY-User-Key-File-\d:.*?(?:Private-MAC:[^\n]*|\Z)", re.S), ("near", ("putty-user-key-file",), 0, None)),
    _Rule("anthropic_key", re.compile(r"(?<![\w-])sk-ant-(?=[\w-]*\d)[\w-]{20,}"), ("token", 27, 1)),
    _Rule("openai_key", re.compile(r"(?<![\w-])sk-(?!ant-)(?=[\w-]*\d)[\w-]{20,}"), ("token", 23, 1)),
    _Rule("aws_access_key_id", re.compile(
        r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}(?![A-Z0-9])"), ("token", 20, 1)),
    _Rule("aws_secret_key", re.compile(
        r"(?i)aws_?(?:secret|private)_?(?:access_?)?key[\"']?\s*(?:=|:|=>)\s*[\"']?"
        r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"), ("near", ("aws",), 0, 120)),
    _Rule("github_token", re.compile(
        r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"
        r"(?![A-Za-z0-9_])"), ("token", 26, 1)),
    _Rule("gitlab_token", re.compile(
        r"(?<![\w-])(?:gl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|agent|oas)-|GR1348941)[\w-]{20,}"), ("token", 25, 1)),
    _Rule("huggingface_token", re.compile(r"(?<![\w-])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])"), ("token", 33, 1)),
    _Rule("stripe_key", re.compile(r"(?<![\w-])[rs]k_(?:live|test)_[0-9A-Za-z]{16,}"), ("token", 24, 1)),
    _Rule("slack_token", re.compile(r"(?<![A-Za-z0-9])xox[abposre]-[A-Za-z0-9-]{10,}"), ("token", 15, 1)),
    _Rule("google_api_key", re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])"), ("token", 39, 1)),
    _Rule("google_oauth_secret", re.compile(r"(?<![\w-])GOCSPX-[\w-]{20,}"), ("token", 27, 1)),
    _Rule("npm_token", re.compile(r"(?<![\w-])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])"), ("token", 40, 1)),
    _Rule("pypi_token", re.compile(r"(?<![\w-])pypi-AgE[\w-]{50,}"), ("token", 58, 1)),
    _Rule("service_token", re.compile(  # Groq, Replicate, Linear, Postman, DigitalOcean, Shopify, Databricks
        r"(?<![\w-])(?:gsk_[A-Za-z0-9]{40,}|r8_[A-Za-z0-9]{30,}|lin_api_[A-Za-z0-9]{30,}|"
        r"PMAK-[a-f0-9]{24}-[a-f0-9]{34}|do[por]_v1_[a-f0-9]{64}|shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}|"
        r"dapi[a-f0-9]{32})(?![\w-])"), ("token", 33, 1)),
    _Rule("age_secret_key", re.compile(r"AGE-SECRET-KEY-1[0-9A-Z]{58}"), ("token", 74, 1)),
    _Rule("jwt", re.compile(r"(?<![\w-])eyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]*"), ("token", 18, 1)),
    _Rule("bearer_token", re.compile(r"(?i)\bbearer[ \t]+(?P<value>(?=[\w.~+/-]*\d)[\w.~+/-]{16,}=*)"), ("near", ("bearer",), 0, 600)),
    _Rule("basic_auth", re.compile(
        r"(?i)\b(?:proxy-)?authorization\b[\"']?[ \t]*[:=][ \t]*[\"']?basic[ \t]+"
        r"(?P<value>[A-Za-z0-9+/]{8,}={0,2})"), ("near", ("authorization",), 0, 200)),
    _Rule("password_hash", re.compile(  # bcrypt, and crypt(3) md5/sha/yescrypt: crackable offline
        r"(?<![\w$])\$(?:2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}|(?:1|5|6|apr1|y|gy|7)\$[^\s:'\"]{8,})"),
        ("exact", ("$2", "$1$", "$5$", "$6$", "$apr1$", "$y$", "$gy$", "$7$"), 0, 200)),
    _Rule("ssn", re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"), ("token", TOKEN_MIN_CHARS, 1)),
    _Rule("ssn", re.compile(
        r"(?i)\b(?:ssn|social[ \t]+security(?:[ \t]+(?:number|no\.?|#))?)\b[^\d\n]{0,20}"
        r"(?P<value>(?!000|666|9\d\d)\d{3}[ ]?(?!00)\d{2}[ ]?(?!0000)\d{4})(?!\d)"), ("near", ("ssn", "social"), 0, 80)),
]
_CARD = re.compile(r"(?<![\w.+-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")

# -- credentials by name or context ------------------------------------------------------------
_PASSWORD_WORDS = r"pass(?:word|wd|phrase|code)|pwd|(?<![A-Za-z])(?:pass|pw)"
_SECRET_WORDS = (r"secret(?:[_.-]?key)?|api[_.-]?key|apikey|access[_.-]?key|private[_.-]?key|"
                 r"token|credentials?")
_VALUE = r"""(?:"(?P<dq>[^"\n]{4,500})"|'(?P<sq>[^'\n]{4,500})'|(?P<bare>[^\s"'`,;)\]}<>]{4,500}))"""
# Starts at the key's last word (a literal the scan can look for): any identifier may come
# before it (DB_PASSWORD, client_secret), and a bare "pass"/"pw" must start a word (not bypass).
_ASSIGNMENT = re.compile(
    r"""(?:(?P<pw>""" + _PASSWORD_WORDS + r""")|""" + _SECRET_WORDS + r""")
        ["']?[ \t]*(?::=|=(?![=>~])|:(?![:/]))[ \t]*
    """ + _VALUE,
    re.I | re.X,
)
_ASSIGNMENT_GATE: Gate = ("near", ("pass", "pw", "secret", "api", "access", "private", "token", "credential"), 0, 600)

# "the wifi password is X", "my PIN for the door was 4821", "password for root is 'x y'"
_PHRASE_GATE: Gate = ("near", ("pass", "pwd", "pin", "wifi", "wi-fi"), 0, 400)
_PHRASE = re.compile(
    r"""\b(?P<word>pass(?:word|phrase|code)|pwd|pin(?:[ \t]?code)?|wi-?fi[ \t]+key)
        (?:[ \t]+(?:for|to|of|on)[ \t]+(?:the[ \t]+|my[ \t]+|our[ \t]+|your[ \t]+)?[\w.@'-]{1,40}(?:[ \t]+[\w.@'-]{1,40})?)?
        [ \t]+(?:is|was|will[ \t]+be|=)[ \t]*:?[ \t]*(?:now[ \t]+|still[ \t]+|just[ \t]+|set[ \t]+to[ \t]+)?
    """ + _VALUE.replace("500", "200"),
    re.I | re.X,
)
_CLAUSE_END = re.compile(r"[.!?:,;)]*[ \t]*(?:\r?\n|$)|[.!?][ \t]+[A-Z]")
_CONTINUES = re.compile(r"[ \t]+(?:and|but|or|so|for|on|in|at|if|btw|please|thanks)\b", re.I)
_CLI_SECRETS: list[tuple[str, Gate, re.Pattern[str]]] = [
    ("cli_password", ("near", ("mysql", "mariadb"), 0, 400), re.compile(  # mysql -pSECRET (a bare -p prompts for it)
        r"\b(?:mysql|mysqldump|mysqladmin|mysqlimport|mysqlshow|mysqlcheck|mariadb(?:-dump)?)\b"
        r"[^\n|;&]{0,300}?[ \t]-p(?:(?P<dq>\"[^\"\n]+\")|'(?P<sq>[^'\n]+)'|(?P<bare>[^\s'\"]+))")),
    ("cli_password", ("near", ("sshpass",), 0, 400), re.compile(
        r"\bsshpass\b[^\n|;&]{0,300}?[ \t]-p[ \t]*(?:\"(?P<dq>[^\"\n]+)\"|'(?P<sq>[^'\n]+)'|(?P<bare>[^\s'\"]+))")),
    ("cli_password", ("near", ("--pass",), 0, 400), re.compile(
        r"(?<![\w-])--pass(?:word)?[ \t]+(?:\"(?P<dq>[^\"\n]+)\"|'(?P<sq>[^'\n]+)'|(?P<bare>[^\s'\"-][^\s'\"]*))")),
    ("basic_auth", ("near", ("curl", "wget", "http", "xh"), 0, 400), re.compile(  # curl -u user:SECRET, wget --user=..., httpie -a user:SECRET
        r"\b(?:curl|wget|http|https|xh)\b[^\n|;&]{0,300}?[ \t](?:-u|--user|--auth|-a)(?:[ \t]+|=)?[\"']?"
        r"[^\s:'\"]+:(?:\"(?P<dq>[^\"\n]+)\"|(?P<sq>(?!))|(?P<bare>[^\s'\"]+))")),
    ("netrc_password", ("near", ("login",), 0, 400), re.compile(
        r"\blogin[ \t]+\S+\s+password[ \t]+(?:\"(?P<dq>[^\"\n]+)\"|(?P<sq>(?!))|(?P<bare>\S+))")),
]
_URL_GATE: Gate = ("near", ("://",), 30, 400)
_URL_PASSWORD = re.compile(r"(?i)\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@?#]*:(?P<value>[^\s/@?#]+)@[^\s/@]")

_PLACEHOLDER = re.compile(
    r"""^(?:\$\{?[A-Za-z_(]|\{\{|\{[A-Za-z_][\w.]*\}$|%\(|%s$|<[^>]*>$|\*{3,}|x{3,}$|\.{3}|…|
        your[\w-]*|my[_-]?(?:password|secret|token|key)|example|placeholder|redacted|changeme$|
        (?:pass|password|passwd|secret|token|api[_-]?key)$|\[REDACTED)""",
    re.I | re.X,
)
_CODE_WORDS = frozenset(
    "none null nil true false undefined str string bytes int integer bool boolean optional "
    "secretstr any required self cls env getpass input prompt ask".split())
_CODE_REFERENCE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$|[(\[{]")
_BARE_SIGNAL = re.compile(r"[0-9!#$%^&*+=?@~|\\]")
_PASSPHRASE = re.compile(r"[a-z]{%d,}" % PASSPHRASE_MIN_CHARS)
_NOT_BARE_START = tuple("$%{<([/~.*&@!")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_DIGIT = re.compile(r"\d")

# -- anonymous high-entropy strings ----------------------------------------------------------
_HEX_GATE: Gate = ("token", HEX_MIN_CHARS, 1)
_BASE64_GATE: Gate = ("token", BASE64_MIN_CHARS, 1)
_HEX = re.compile(  # both letters and digits: a long run of either alone is a number or a word
    r"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{%d,}(?![0-9A-Za-z])"
    % HEX_MIN_CHARS)
_BASE64 = re.compile(r"(?<![\w+/=-])[\w+/-]{%d,}={0,2}(?![\w+/=-])" % BASE64_MIN_CHARS, re.A)
_WORDY = re.compile(r"[A-Z]?[a-z]{3,}|[A-Z]{3,}")
_HASH_LABEL = re.compile(
    r"(?i)(?:\bsha-?(?:1|224|256|384|512)?(?:sum)?|\bmd5(?:sum)?|blake2[bs]?(?:sum)?|b3sum|hash(?:es)?\b|"
    r"digests?\b|checksums?\b|commit(?:s|ted)?\b|integrity|fingerprint|etag|rev-parse|revision)")
# Public material that looks random: an SSH public key, a data: URI, certificates.
_PUBLIC_PREFIX = re.compile(
    r"(?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp\d+|sk-(?:ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com|"
    r";base64,)[ \t]*$")
_PUBLIC_BLOCK = re.compile(
    r"-----BEGIN (?:CERTIFICATE|TRUSTED CERTIFICATE|CERTIFICATE REQUEST|PUBLIC KEY|RSA PUBLIC KEY|"
    r"PGP PUBLIC KEY BLOCK|PGP SIGNATURE|X509 CRL)-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.S)

#: Ties between overlapping findings go to the earlier kind here (the more specific one);
#: detect-secrets' kinds come after the named-credential rules, unknown kinds last.
_PRIORITY = [rule.kind for rule in _SIGNATURES] + [
    "basic_auth", "cli_password", "netrc_password", "url_password", "password", "secret_assignment",
    "card_number"]
_PRIORITY_TAIL = ["custom", "hex_secret", "high_entropy"]


def shannon_entropy(text: str) -> float:
    """Bits per character of the string's own character distribution."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _labelled_as_hash(text: str, start: int) -> bool:
    return bool(_HASH_LABEL.search(text[max(0, start - HASH_LABEL_WINDOW):start]))


def _clause_end(text: str, end: int, *, continues: bool = False) -> bool:
    """Does the sentence or line end at ``end`` (a value given last, not a word mid-prose)?"""
    return bool(_CLAUSE_END.match(text, end) or (continues and _CONTINUES.match(text, end)))


def _credential_value(value: str, quoted: bool, clause_end: bool = False) -> bool:
    """Is this assigned value a credential, rather than code or a placeholder that names one?"""
    value = value.strip()
    if len(value) < 4 or _PLACEHOLDER.match(value):
        return False
    if quoted:
        return True
    if value.lower() in _CODE_WORDS or value.startswith(_NOT_BARE_START) or _CODE_REFERENCE.search(value):
        return False
    return bool(_BARE_SIGNAL.search(value)) or (clause_end and bool(_PASSPHRASE.fullmatch(value)))


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def card_issuer_ok(digits: str) -> bool:
    """A known issuer prefix with a length that issuer uses (Visa, Mastercard, Amex, Discover,
    JCB, Diners, UnionPay): most long numbers that pass Luhn by chance fail this."""
    n, p2, p3, p4 = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if p4 == 6011 or p2 == 65 or 644 <= p3 <= 649 or 3528 <= p4 <= 3589 or p2 == 62:
        return 16 <= n <= 19
    if p2 in (36, 38, 39) or 300 <= p3 <= 305:
        return 14 <= n <= 19
    return False


def _cards(m: re.Match[str]) -> Iterator[Finding]:
    """Card numbers in a run of digit groups: the longest valid run of whole groups from each
    start (the scan is greedy, so "4000 0000 0000 0002 7" holds a card and a stray digit)."""
    groups = [(g.start() + m.start(), g.end() + m.start(), g.group()) for g in re.finditer(r"\d+", m.group())]
    i = 0
    while i < len(groups):
        for j in range(len(groups), i, -1):
            digits = "".join(g[2] for g in groups[i:j])
            if 13 <= len(digits) <= 19 and card_issuer_ok(digits) and luhn_ok(digits):
                yield Finding("card_number", groups[i][0], groups[j - 1][1])
                i = j - 1
                break
        i += 1


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


def _value_group(m: re.Match[str]) -> str:
    return next(g for g in ("dq", "sq", "bare") if m.group(g) is not None)




@cache
def gate_needles(gate: Gate) -> frozenset[str]:
    """A needle gate's needles, marked "=" (case-sensitive) or "~" (in the lower-case copy)."""
    if gate is None or gate[0] == "token":
        return frozenset()
    mark = "=" if gate[0] == "exact" else "~"
    return frozenset(mark + n for n in gate[1])


class _Scan:
    """One text prepared for gated rules: its long whitespace-free runs and a lower-case copy
    to find needles in (same length as the text, so positions carry over)."""

    def __init__(self, text: str, needles: frozenset[str]) -> None:
        self.text = text
        low = text.lower()
        self.low = low if len(low) == len(text) else text.translate(_ASCII_LOWER)
        self.has_digits = bool(_DIGIT.search(text))
        self.tokens: list[tuple[int, int]] = []  # (start, end) of runs of TOKEN_MIN_CHARS or more
        pos = 0
        for word in text.split():
            if len(word) >= TOKEN_MIN_CHARS:
                start = text.find(word, pos)  # in order: no earlier copy can sit between pos and it
                self.tokens.append((start, start + len(word)))
                pos = start + len(word)
        self.longest = max((b - a for a, b in self.tokens), default=0)
        self._cache: dict[Gate, list[tuple[int, int]]] = {}
        self.present = {n for n in needles if n[1:] in (self.text if n[0] == "=" else self.low)}

    def spans(self, gate: Gate) -> list[tuple[int, int]]:
        """Disjoint (start, end) windows where a rule with this gate can match."""
        if gate is None:
            return [(0, len(self.text))]
        if gate[0] == "token":
            if self.longest < gate[1]:
                return []
        elif self.present.isdisjoint(gate_needles(gate)):
            return []
        if gate not in self._cache:
            n = len(self.text)
            raw: list[tuple[int, int]] = []
            if gate[0] == "token":
                _, size, back = gate
                raw = [(max(0, a - back), min(n, b + 1)) for a, b in self.tokens if b - a >= size]
            else:
                kind, needles, before, after = gate
                hay = self.text if kind == "exact" else self.low
                for needle in needles:
                    i = hay.find(needle)
                    while i != -1:
                        raw.append((max(0, i - before), n if after is None else min(n, i + len(needle) + after)))
                        i = hay.find(needle, i + 1)
            merged: list[tuple[int, int]] = []
            for a, b in sorted(raw):
                if merged and a <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], b))
                else:
                    merged.append((a, b))
            self._cache[gate] = merged
        return self._cache[gate]


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
        self.plugins = detect_secrets_plugins()
        kinds = _PRIORITY + [p.kind for p in self.plugins] + _PRIORITY_TAIL
        self._rank = {kind: i for i, kind in reversed(list(enumerate(kinds)))}
        gates = [r.gate for r in (*_SIGNATURES, *self.plugins)] + [g for _, g, _ in _CLI_SECRETS] + [
            _ASSIGNMENT_GATE, _PHRASE_GATE, _URL_GATE]
        self._needles = frozenset().union(*(gate_needles(g) for g in gates))
        groups: dict[Gate, list[_Rule]] = {}
        for rule in (*_SIGNATURES, *self.plugins):
            groups.setdefault(rule.gate, []).append(rule)
        self._groups = list(groups.items())

    # -- detection ---------------------------------------------------------------------------
    def _raw(self, text: str) -> Iterator[Finding]:
        scan = _Scan(text, self._needles)
        for gate, rules in self._groups:
            spans = scan.spans(gate)
            for rule, (a, b) in ((r, s) for s in spans for r in rules):
                for m in rule.pattern.finditer(text, a, b):
                    if rule.plugin:
                        start, end = _plugin_span(m)
                    else:
                        group = "value" if "value" in rule.pattern.groupindex else 0
                        start, end = m.span(group)
                    if end > start and (rule.valid is None or rule.valid(text[start:end])):
                        yield Finding(rule.kind, start, end)
        if scan.has_digits:
            for m in _CARD.finditer(text):
                yield from _cards(m)
        for a, b in scan.spans(_ASSIGNMENT_GATE):
            for m in _ASSIGNMENT.finditer(text, a, b):
                group = _value_group(m)
                value = m.group(group)
                if group == "bare":
                    value = value.rstrip(".,!?:")  # the end of a sentence is not part of the secret
                end = m.start(group) + len(value)
                if _credential_value(value, quoted=group != "bare", clause_end=_clause_end(text, end)):
                    kind = "password" if m.group("pw") else "secret_assignment"
                    yield Finding(kind, m.start(group), end)
        for a, b in scan.spans(_PHRASE_GATE):
            for m in _PHRASE.finditer(text, a, b):
                group = _value_group(m)
                value = m.group(group).rstrip(".,!?:") if group == "bare" else m.group(group)
                end = m.start(group) + len(value)
                if m.group("word").lower().startswith("pin"):
                    ok = group == "bare" and bool(re.fullmatch(r"\d{4,8}", value)) and _clause_end(
                        text, end, continues=True)
                else:
                    ok = group != "bare" or _clause_end(text, end, continues=True)
                    ok = ok and _credential_value(value, quoted=group != "bare", clause_end=True)
                if ok:
                    yield Finding("password", m.start(group), end)
        for kind, gate, pattern in _CLI_SECRETS:
            for a, b in scan.spans(gate):
                for m in pattern.finditer(text, a, b):
                    group = _value_group(m)
                    if _credential_value(m.group(group), quoted=group != "bare" or kind == "basic_auth"):
                        yield Finding(kind, m.start(group), m.end(group))
        for a, b in scan.spans(_URL_GATE):
            for m in _URL_PASSWORD.finditer(text, a, b):
                if _credential_value(m.group("value"), quoted=True):
                    yield Finding("url_password", m.start("value"), m.end("value"))
        for pattern in self.extra:
            for m in pattern.finditer(text):
                if m.end() > m.start():
                    yield Finding("custom", m.start(), m.end())
        public = [m.span() for m in _PUBLIC_BLOCK.finditer(text)] if "-----BEGIN" in text else []

        def exempt(start: int) -> bool:
            return (_labelled_as_hash(text, start) or bool(_PUBLIC_PREFIX.search(text, max(0, start - 60), start))
                    or any(a <= start < b for a, b in public))

        for a, b in scan.spans(_HEX_GATE):
            for m in _HEX.finditer(text, a, b):
                if not exempt(m.start()):
                    yield Finding("hex_secret", m.start(), m.end())
        for a, b in scan.spans(_BASE64_GATE):
            for m in _BASE64.finditer(text, a, b):
                if _looks_random(m.group()) and not exempt(m.start()):
                    yield Finding("high_entropy", m.start(), m.end())

    def find(self, text: str) -> list[Finding]:
        """Secrets in ``text``, in order, overlapping detections merged into one span."""
        rank = self._rank
        last_rank = len(rank)
        merged: list[Finding] = []
        for f in sorted(self._raw(text), key=lambda f: (f.start, -f.end)):
            if merged and f.start < merged[-1].end:
                last = merged[-1]
                kind = min(last.kind, f.kind, key=lambda k: rank.get(k, last_rank))
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


def secret_filter_for(settings: Settings) -> SecretFilter:
    """The filter for these settings: the built-in detectors plus ``train.sensitive_patterns``."""
    return SecretFilter(settings.train.sensitive_patterns)
