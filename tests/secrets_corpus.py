"""A corpus of secrets as people paste them into chats, and look-alikes that must pass.

Each secret is generated at import time from a fixed seed, so no secret-shaped literal sits in
the repository (push protection and secret scanners would flag it) and every run sees the same
values. ``SECRETS`` holds (name, text, secret): ``secret`` is the substring that must never
reach training data or a prompt. ``LOOKALIKES`` holds text that mentions passwords, keys and
tokens, or carries numbers and hashes shaped like them, and holds no secret.

Used by tests/test_secrets_corpus.py (the filter, and export_new_items in ``exclude`` mode)
and benchmarks (the filter's speed).
"""

from __future__ import annotations

import base64
import json
import random
import string

_rng = random.Random(19_2026)
ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
LOWER_HEX = "0123456789abcdef"
URLSAFE = ALNUM + "_-"


def rnd(n: int, alphabet: str = ALNUM) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _luhn_complete(prefix: str, length: int) -> str:
    """A card number with this issuer prefix and length whose Luhn check digit is right."""
    body = prefix + "".join(_rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        digits = body + check
        total = sum((d - 9 if d > 9 else d) for d in (int(c) * (2 if i % 2 else 1)
                                                     for i, c in enumerate(reversed(digits))))
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def _jwt() -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps({"sub": rnd(10, string.digits), "name": "Alice"}).encode())
    return f"{header}.{payload}.{rnd(43, URLSAFE)}"


def _pem(label: str) -> str:
    body = "\n".join(rnd(64, ALNUM + "+/") for _ in range(5))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"


_card_visa = _luhn_complete("4", 16)
_card_mc = _luhn_complete("5" + _rng.choice("12345"), 16)
_card_amex = _luhn_complete("37", 15)

#: (name, text, secret): the secret is a substring of the text.
_RAW: list[tuple[str, str, str]] = [
    # -- the formats issue 19 saw reach training_items --------------------------------------
    ("env_db_pass", "my .env has DB_PASS={s} and the app still can't connect", "Qz7" + rnd(9)),
    ("env_smtp_pass", "SMTP_HOST=smtp.example.com\nSMTP_PASS='{s}'\nwhy does it time out?",
     "m4il-" + rnd(10)),
    ("wifi_phrase", "btw the wifi password is {s}", rnd(6, string.ascii_lowercase) + rnd(3, string.digits)),
    ("redis_url", "REDIS_URL=redis://:{s}@cache.internal:6379/0", rnd(16)),
    ("mysql_p", "I run mysql -u root -p{s} -h db.internal shop and get error 1045", "S3cr" + rnd(6)),
    ("curl_u", "curl -u admin:{s} https://ci.example.com/api/json works but the UI says 403",
     rnd(8) + "!" + rnd(3)),
    ("basic_header", "the request has `Authorization: Basic {s}` and the proxy strips it",
     base64.b64encode(f"admin:{rnd(12)}".encode()).decode()),
    ("gitlab_pat", "git remote set-url origin https://oauth2:{s}@gitlab.com/acme/app.git",
     "glpat-" + rnd(20, URLSAFE)),
    ("huggingface", "export HF_TOKEN={s}", "hf_" + rnd(34)),
    ("huggingface_prose", "my hugging face token is {s}, why 401 on the gated model?", "hf_" + rnd(34)),
    ("stripe_live", "stripe.api_key = {s}", "sk_live_" + rnd(24)),
    ("stripe_live_long", "Charges fail with key {s} since this morning", "sk_live_" + rnd(99)),
    ("telegram_bot", "bot = telebot.TeleBot({s}) raises 401",
     rnd(10, string.digits) + ":" + "AA" + rnd(33, URLSAFE)),
    ("discord_bot", "client.run('{s}') gives an improper token error",
     "M" + rnd(25, ALNUM) + "." + rnd(6, URLSAFE) + "." + rnd(27, URLSAFE)),
    ("passphrase_yaml", "database:\n  password: {s}\n", "correcthorsebatterystaple"),
    ("card_visa", "charge it to my card {s}, expiry 09/27",
     " ".join(_card_visa[i:i + 4] for i in range(0, 16, 4))),
    ("card_mc_plain", "card number: {s} cvv 123", _card_mc),
    ("card_amex", "amex {s}", f"{_card_amex[:4]}-{_card_amex[4:10]}-{_card_amex[10:]}"),
    ("ssn_dashed", "my SSN is {s}, can you fill in the W-4?",
     f"{_rng.randint(100, 665)}-{_rng.randint(10, 99)}-{_rng.randint(1000, 9999)}"),
    ("ssn_plain", "social security number: {s}",
     f"{_rng.randint(100, 665)}{_rng.randint(10, 99)}{_rng.randint(1000, 9999)}"),
    # -- signature formats -----------------------------------------------------------------------
    ("openai_proj", "here is my key {s} - is it valid?", "sk-proj-" + rnd(48, URLSAFE) + "7"),
    ("openai_legacy", "OPENAI_API_KEY={s}", "sk-" + rnd(48)),
    ("anthropic", "client = Anthropic(api_key=\"{s}\")", "sk-ant-api03-" + rnd(90, URLSAFE) + "7AA"),
    ("aws_access_key_id", "the access key id is {s} in us-east-1", "AKIA" + rnd(16, UPPER_DIGITS)),
    ("aws_secret_key", "aws_secret_access_key = {s}", rnd(40, ALNUM + "/+")),
    ("github_classic", "git clone https://{s}@github.com/acme/private.git", "ghp_" + rnd(36)),
    ("github_fine_grained", "GH token: {s}", "github_pat_" + rnd(22) + "_" + rnd(59)),
    ("slack_bot", "post with the bot token {s} to #alerts",
     "xoxb-" + rnd(12, string.digits) + "-" + rnd(12, string.digits) + "-" + rnd(24)),
    ("slack_webhook", "webhook: {s}",
     "https://hooks.slack.com/services/T" + rnd(8, UPPER_DIGITS) + "/B" + rnd(8, UPPER_DIGITS) + "/" + rnd(24)),
    ("google_api", "maps key {s} stopped working", "AIza" + rnd(35, URLSAFE)),
    ("google_oauth", "client_secret.json has {s} in it", "GOCSPX-" + rnd(28, URLSAFE)),
    ("jwt", "the session cookie is {s}", _jwt()),
    ("bearer", "curl -H 'Authorization: Bearer {s}' https://api.example.com/v1/me", rnd(30) + "9"),
    ("pem_rsa", "here is the deploy key:\n{s}\nwhy does ssh reject it?", _pem("RSA PRIVATE KEY")),
    ("pem_openssh", "{s}", _pem("OPENSSH PRIVATE KEY")),
    ("sendgrid", "SENDGRID key {s}", "SG." + rnd(22, URLSAFE) + "." + rnd(43, URLSAFE)),
    ("twilio", "twilio api key sid {s}", "SK" + rnd(32, LOWER_HEX)),
    ("npm", "//registry.npmjs.org/:_authToken={s}", "npm_" + rnd(36)),
    ("npm_prose", "publish fails with token {s}", "npm_" + rnd(36)),
    ("pypi", "twine upload -p {s} dist/*", "pypi-AgEIcHlwaS5vcmc" + rnd(80, URLSAFE)),
    ("azure_storage", "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={s};EndpointSuffix=core",
     rnd(86, ALNUM + "+/") + "=="),
    ("mailchimp", "mailchimp key {s}", rnd(32, string.ascii_lowercase + string.digits) + "-us21"),
    ("square", "square secret {s}", "sq0csp-" + rnd(43, URLSAFE)),
    ("age", "my age identity is {s}", "AGE-SECRET-KEY-1" + rnd(58, UPPER_DIGITS)),
    ("groq", "GROQ key: {s} (new one)", "gsk_" + rnd(52)),
    ("digitalocean", "doctl auth init -t {s}", "dop_v1_" + rnd(64, LOWER_HEX)),
    ("bcrypt_hash", "admin row: admin | {s}", "$2b$12$" + rnd(53, ALNUM + "./")),
    ("sha512_crypt", "root:{s}:19000:0:99999:7:::", "$6$" + rnd(16, ALNUM + "./") + "$" + rnd(86, ALNUM + "./")),
    # -- credentials by name / by context ------------------------------------------------------
    ("password_env", "DB_PASSWORD={s} in my .env", "hunter2!" + rnd(6)),
    ("password_json", '{{"user": "alice", "password": "{s}"}}', "Tr0ub4dor&" + rnd(4)),
    ("pgpassword", "PGPASSWORD={s} psql -h db -U app", rnd(12) + "9"),
    ("docker_env", "docker run -e MYSQL_ROOT_PASSWORD={s} mysql:8", "r00t" + rnd(8)),
    ("client_secret", 'CLIENT_SECRET = "{s}"', "cs-" + rnd(20)),
    ("api_key_yaml", "api_key: '{s}'", "key-" + rnd(18)),
    ("token_flag", "run it with --auth-token={s} please", rnd(12) + "7"),
    ("password_flag", "psql-wrapper --password {s} --host db", rnd(10) + "#1"),
    ("x_api_key", "send the header X-API-Key: {s}", rnd(24) + "3"),
    ("postgres_url", "DATABASE_URL=postgres://app:{s}@db.internal:5432/prod", "Pg" + rnd(10) + "9"),
    ("mongodb_url", "mongodb+srv://admin:{s}@cluster0.abcde.mongodb.net/test", rnd(14)),
    ("sshpass", "sshpass -p '{s}' ssh deploy@10.0.0.5", rnd(10) + "!"),
    ("netrc", "my ~/.netrc:\nmachine api.example.com\nlogin alice\npassword {s}\n", rnd(12) + "5"),
    ("pin", "the PIN for the alarm is {s}.", rnd(6, string.digits)),
    ("wifi_colon", "Guest wifi password: {s}", "Sunny" + rnd(4, string.digits) + "!"),
    ("phrase_quoted", "the password for root is '{s}'", "purple monkey " + rnd(4, string.digits)),
    ("passphrase_phrase", "The vault passphrase is {s}", "tangerinewindowbicycle"),
    ("hex_key", "the signing key is {s} (do not share)", rnd(40, LOWER_HEX)),
    ("base64_secret", "the webhook secret {s} goes in the header", rnd(50, ALNUM + "+/") + "Q9z"),
]

SECRETS: list[tuple[str, str, str]] = [(name, text.format(s=secret), secret) for name, text, secret in _RAW]

#: Text that talks about secrets, or looks like one, and holds none.
LOOKALIKES: list[str] = [
    "How do I reset my password? I forgot it and the reset email never arrives.",
    "To reset your password, open Settings > Account and click 'Forgot password'.",
    "Password: enter it twice to confirm.",
    "The password is incorrect, says the login page, but I typed it right.",
    "The password is 12 characters long and must contain a digit.",
    "The wifi password is on the back of the router.",
    "The password for the guest network is printed on the card.",
    "my password manager is Bitwarden; is 1Password better?",
    "Change the password every 90 days? NIST no longer recommends that.",
    "The pin is connected to GPIO 17 on the Raspberry Pi.",
    "I need to rename the DB_PASS variable in the compose file.",
    "export DB_PASS=$(cat /run/secrets/db_pass)",
    "password = getpass.getpass()\napi_key = os.environ['OPENAI_API_KEY']",
    'password: "<your password here>"\napi_key: "YOUR_API_KEY"\ntoken: "${GITHUB_TOKEN}"',
    "class Login(BaseModel):\n    password: SecretStr\n    token: Optional[str] = None",
    "curl -u $USER:$API_TOKEN https://ci.example.com/api/json",
    "mysql -u root -p shop   # it prompts for the password",
    "mysql -h db.internal -P 3306 -u app -p",
    "redis://localhost:6379/0 and postgres://app@db.internal/prod need no password here",
    "postgres://app:${DB_PASSWORD}@db.internal:5432/prod",
    "WWW-Authenticate: Basic realm=\"staging\" means the server wants credentials.",
    "Authorization: Bearer <token> goes in every request.",
    "OpenAI keys start with sk-proj- and GitLab tokens with glpat-.",
    "Use hf_hub_download(repo_id='google/gemma-3-270m') to fetch the file.",
    "scikit-learn (sklearn) has sk_learn style names; Stripe test mode uses sk_test_ keys.",
    "The request id is 550e8400-e29b-41d4-a716-446655440000.",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8\nAuthor: Alice <alice@example.com>",
    "The sha256 of the file is e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.",
    "docker pull python@sha256:2d3c4b1a9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a392817065f4e",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq2Vx6Q0yE5n8oF1c3mZ7tT9bR4sW2kH8jL0pN6dC4e alice@laptop",
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
    "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBaMQswCQYDVQQGEwJJ\n"
    "RTESMBAGA1UEChMJQmFsdGltb3JlMRMwEQYDVQQLEwpDeWJlclRydXN0MSIwIAYD\n-----END CERTIFICATE-----",
    "Order 1234 5678 9012 3456 shipped; tracking 1Z999AA10123456784.",
    "Call +1 415 555 0132 or 020 7946 0958 after 5pm.",
    "The build finished at 1717200000000 ms since the epoch.",
    "ISBN 978-0-306-40615-7, published 2024-06-01; ticket JIRA-12345.",
    "Dial 555-123-4567 for support; the form code is 12-3456.",
    "A bearer token goes in the Authorization header; a Basic header carries user:password.",
    "Set max_tokens = 512 and temperature: 0.7 for shorter answers.",
    "SELECT id, password_hash FROM users WHERE token_expires < now();",
    "Secret: the recipe uses brown butter.",
    "Each token: roughly four characters of English text.",
    "pip install --require-hashes torch==2.3.0 --hash=sha256:1b6d3e4a9a2c7f8e0d5b6c4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e",
    "kubectl get --raw /api/v1/namespaces/Default/pods/WebServer-7d9f8b6c5d-x2kq9/log",
    "/home/alice/Documents/Work/Reports/2024/Q3/QuarterlyReview-Draft2.docx",
    "The token for the next step is: an opening brace.",
    "Your new password is: (shown once on screen)",
    "The passphrase is what you chose when creating the key.",
    "docker login --password-stdin < token.txt",
    "The 2FA code is sent by SMS; the PIN is 4 to 8 digits.",
    "Twilio Account SIDs start with AC, API keys with SK.",
    "Version 3.11.4 of Python; pi is 3.14159265358979323846.",
    "git fetch http://user:pass@example.org/repo now scrubs the credentials from the log.",
    "curl https://user:${PASSWORD}@example.org/ reads it from the environment.",
]
