"""`milton chat` end to end: the real CLI, an in-process server on the tiny GGUF, piped input."""

from __future__ import annotations

import sqlite3


def test_chat_streams_remembers_forgets_and_ends_the_session(cli, milton_home, tiny_gguf):
    env = {"MILTON_MODEL__BASE": str(tiny_gguf), "MILTON_SERVE__N_THREADS": "1",
           "MILTON_SERVE__SNAPSHOT_ENABLED": "false", "MILTON_SERVE__N_CTX": "512"}
    script = "\n".join([
        "/good",
        "hello there",
        "/bad",
        "/remember The wiki listens on port 8443",
        "/forget which port is the wiki on",
        "y",
        "/bogus",
        "/end",
        "/quit",
    ]) + "\n"
    code, out, err = cli("chat", "--in-process", "--user", "tester", "--max-tokens", "8",
                         "--temperature", "0", input=script, env=env, timeout=300)
    assert code == 0, err + out
    assert "milton chat with tiny" in out and "(session tester)" in out
    assert "remembered (memory " in out
    assert "forgot: The wiki listens on port 8443" in out
    assert "unknown command /bogus" in out
    assert "/good: no answer to rate yet" in out and "rated bad: it will not be learned from" in out
    assert "session ended (1 processed)" in out

    conn = sqlite3.connect(milton_home / "data" / "milton.db")
    try:
        (status,) = conn.execute("select status from sessions where user = 'tester'").fetchone()
        roles = [r for (r,) in conn.execute(
            "select role from messages m join sessions s on s.id = m.session_id "
            "where s.user = 'tester' order by m.seq")]
        facts = conn.execute("select count(*) from memories where source = 'chat'").fetchone()
        rated = conn.execute("select completion_id, rating, source from feedback").fetchall()
        (request_id,) = conn.execute("select json_extract(metadata, '$.request_id') from messages "
                                     "where role = 'assistant'").fetchone()
    finally:
        conn.close()
    assert status == "processed" and roles == ["user", "assistant"]
    assert facts == (0,)  # remembered, then forgotten
    assert rated == [(request_id, "bad", "api")]  # /bad rated the answer through POST /v1/feedback


def test_chat_without_a_server_is_a_one_line_error(cli):
    from helpers import assert_clean_error

    code, out, err = cli("chat", "--url", "http://127.0.0.1:9", input="hi\n")
    assert code == 1
    assert_clean_error(err, "cannot reach milton serve", "--in-process")
