"""Prompt formats for models without a chat template (few-shot, plain), the format serve picks,
and the loop guard that ends a base model's degenerate answer. Pure functions: milliseconds."""

from __future__ import annotations

import pytest

from milton.models.prompt import (
    FEW_SHOT_EXAMPLES,
    FEW_SHOT_INTRO,
    PLAIN_STOP,
    StopScanner,
    few_shot_prompt,
    loop_start,
    plain_prompt,
    serve_format,
    stop_strings,
)

ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("chat_format, has_template, expected", [
    ("auto", True, "template"), ("auto", False, "few-shot"),
    ("template", True, "template"), ("template", False, "few-shot"),
    ("few-shot", True, "few-shot"), ("plain", True, "plain"), ("plain", False, "plain"),
])
def test_serve_format_uses_the_template_when_there_is_one_else_few_shot(chat_format, has_template,
                                                                        expected):
    assert serve_format(chat_format, has_template) == expected


def test_few_shot_prompt_is_the_frame_then_the_plain_turns():
    text = few_shot_prompt(ASK)
    assert text.startswith(FEW_SHOT_INTRO + "\n\n")
    assert text.endswith("\n\n" + plain_prompt(ASK))  # training's plain turns, unchanged, at the end
    for question, answer in FEW_SHOT_EXAMPLES:
        assert f"User: {question}\nAssistant: {answer}\n" in text
    # No example answers a benchmark question or shows a number (copied into arithmetic).
    assert not any(ch.isdigit() for q, a in FEW_SHOT_EXAMPLES for ch in q + a)


def test_system_text_and_injected_memories_sit_after_the_examples_before_the_conversation():
    memory = "Relevant memories (most useful first):\n[2 days ago] My cat is named Quillon."
    messages = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": memory},
                {"role": "user", "content": "What is my cat's name?"},
                {"role": "assistant", "content": "Quillon."},
                {"role": "user", "content": "And my dog's?"}]
    text = few_shot_prompt(messages)
    assert text.startswith(f"{FEW_SHOT_INTRO}\n\nUser: {FEW_SHOT_EXAMPLES[0][0]}\n")
    last_example = f"Assistant: {FEW_SHOT_EXAMPLES[-1][1]}\n"
    assert text.endswith(f"{last_example}\nBe brief.\n\n{memory}\n\n"
                         "User: What is my cat's name?\nAssistant: Quillon.\n"
                         "User: And my dog's?\nAssistant:")
    assert text.count(memory) == 1


def test_turn_formats_stop_at_the_next_user_turn():
    assert stop_strings(["###"], "few-shot") == ["###", PLAIN_STOP]
    assert stop_strings([], "plain") == [PLAIN_STOP]
    assert stop_strings(["###"], "template") == ["###"]


@pytest.mark.parametrize("text", [
    "100.000.000.000.000.000.000.000.000.000.000.000",
    "10 days in a week = 1000000000000000000000000000000000",
    "Ice is solid, solid, solid, solid, solid, solid, solid, solid",
    "ha" * 30,
])
def test_loop_start_finds_a_degenerate_tail_and_keeps_one_copy(text):
    start = loop_start(text)
    assert start is not None
    kept = text[:start]
    assert loop_start(kept) is None and len(kept) < len(text)


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.",
    "2 + 2 = 4.",
    "A mammal is a warm-blooded animal that feeds its young with milk, such as a cow.",
    "Call 555-0100 or 555-0199 between 9:00 and 17:00 on weekdays.",
    "1, 2, 3",  # short repeats are not a loop
])
def test_loop_start_leaves_ordinary_answers_alone(text):
    assert loop_start(text) is None


def test_stop_scanner_loop_guard_cuts_the_loop_and_stops():
    scanner = StopScanner([PLAIN_STOP], loop_guard=True)
    streamed = ""
    for piece in [" The", " answer", " is", " 100", "."] + ["000."] * 40:
        streamed += scanner.push(piece)
        if scanner.stopped:
            break
    streamed += scanner.finish()
    assert scanner.stopped and scanner.looped
    assert streamed.startswith("The answer is 100.000.")
    assert len(streamed) < 60 and loop_start(streamed) is None
    # Without the guard (template formats: instruct models), the same text streams through.
    plain = StopScanner([PLAIN_STOP])
    out = "".join(plain.push(p) for p in ["x", "000."] * 20) + plain.finish()
    assert not plain.stopped and out == "x000." * 20


def test_stop_scanner_loop_guard_cuts_a_loop_that_arrives_in_one_piece():
    # A loop of what could be a stop string's start ("\nUs") is cut too, keeping one copy.
    scanner = StopScanner(["\nUser:"], loop_guard=True)
    streamed = scanner.push("Yes" + "\nUs" * 12)
    streamed += scanner.finish()
    assert scanner.looped and loop_start(streamed) is None and streamed.startswith("Yes\nUs")
