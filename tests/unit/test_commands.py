"""Natural-language commands -> operations: the phrasing corpus (accuracy per part, latency), hostile text, the
schema, the CLI, and the LLM fallback against a real local HTTP server that answers like /v1/chat/completions."""

import json
import statistics
import time
from pathlib import Path

import jsonschema
import pytest

from rau_ray.cli import main as rau
from rau_ray.commands import (
    EXPORT_FORMATS,
    MAX_TEXT,
    OPERATION_SCHEMA,
    OPERATIONS,
    WINDOW_PRESETS,
    ChatFallback,
    CommandError,
    OpenAICompatibleFallback,
    check_grounding,
    parse_command,
    validate_operations,
)

DATA = Path(__file__).parents[1] / "data"
CORPUS = [json.loads(line) for line in (DATA / "commands_corpus.jsonl").read_text().splitlines() if line.strip()]
# issue 20, held-out round 1: written after the parser was frozen (commit 90c7364), committed before it was run on them
# (commit f050e75) and measured once (106 / 112, BENCHMARKS.md); development rows since ("round": 1), held out no more
ROUND_1 = [r for r in CORPUS if r.get("round") == 1]
# issue 20, held-out round 2: written after the parser was frozen (commit c38bf20) and committed (018b813) before it was
# run on them; measured once, the parser unchanged since
HELDOUT_2 = [json.loads(line) for line in (DATA / "commands_heldout2.jsonl").read_text().splitlines() if line.strip()]
COMMANDS = [r for r in CORPUS if r["ops"] is not None]
HOSTILE = [r["text"] for r in CORPUS if r["ops"] is None]
SCHEMA = jsonschema.Draft202012Validator(OPERATION_SCHEMA)


def test_corpus_covers_every_operation_many_ways():
    """The held-out share is that of issue 8's rows (those without a ``source``): the split it guards was written for
    them; issue 20's rows are all development rows (round 1's held-out rows included, once measured)."""
    per_op = {op: sum(any(o["op"] == op for o in r["ops"]) for r in COMMANDS) for op in OPERATIONS}
    assert min(per_op.values()) >= 15, per_op
    assert sum(len(r["ops"]) > 1 for r in COMMANDS) >= 20  # several operations in one text
    assert len(HOSTILE) >= 40
    issue_8 = [r for r in CORPUS if "source" not in r]
    heldout = sum(r["part"] == "heldout" for r in issue_8) / len(issue_8)
    assert len(issue_8) == 335 and 0.2 <= heldout <= 0.35, heldout  # written after the parser was frozen
    assert {r["part"] for r in CORPUS if "source" in r} == {"dev"}
    for r in COMMANDS:
        for op in r["ops"]:
            SCHEMA.validate(op)


@pytest.mark.parametrize("part", ["dev", "heldout"])
def test_corpus_accuracy_and_latency(part):
    rows = [r for r in COMMANDS if r["part"] == part]
    correct, times = 0, []
    for r in rows:
        t0 = time.perf_counter()
        try:
            got = parse_command(r["text"])
        except CommandError as e:
            got = f"CommandError: {e}"
        times.append((time.perf_counter() - t0) * 1e3)
        correct += got == r["ops"]
        if got != r["ops"]:
            print(f"MISS {r['text']!r}: {got}")
    accuracy = correct / len(rows)
    print(f"{part}: accuracy {accuracy:.3f} on {len(rows)} commands; median {statistics.median(times):.3f} ms, "
          f"max {max(times):.2f} ms")
    assert accuracy >= 0.94  # SpinalSAM-R1 reports 94.3%
    assert statistics.median(times) < 5.0


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_or_unrelated_text_is_never_an_operation(text):
    with pytest.raises(CommandError):
        parse_command(text)


def test_every_parsed_operation_matches_the_schema():
    ops = [op for r in COMMANDS for op in _try(r["text"])]
    assert {op["op"] for op in ops} == set(OPERATIONS)
    for op in ops:
        SCHEMA.validate(op)


def _try(text):
    try:
        return parse_command(text)
    except CommandError:
        return []


@pytest.mark.parametrize(("text", "ops"), [
    ("exclude this area at 40,50", [{"op": "add_point", "positive": False, "x": 40, "y": 50, "count": 1}]),
    ("delete my last click", [{"op": "undo", "steps": 1}]),
    ("follow it through the volume", [{"op": "propagate", "direction": "both"}]),
    ("how accurate is it", [{"op": "show_metrics"}]),
])
def test_phrasings_a_new_user_tried_issue_20(text, ops):
    assert parse_command(text) == ops


@pytest.mark.parametrize("text", ["follow me", "carry on", "exclude me from this", "delete the last user",
                                  "how good is the weather", "fill the hole", "erase the disk", "restore the backup"])
def test_the_new_vocabulary_needs_its_objects(text):
    """The everyday verbs the radiology tools lend ("follow", "erase", "delete", "how good") are commands only with
    what they act on: a mask, slices, the last click, a position."""
    with pytest.raises(CommandError):
        parse_command(text)


def test_issue_20_rows_name_the_tool_their_wording_comes_from():
    rows = [r for r in CORPUS if "source" in r]
    assert len(rows) >= 100
    assert all(r["source"].strip() for r in rows)


def test_issue_20_round_1_rows_now_development():
    """Round 1's held-out rows, now development rows. Measured once as held out, after the freeze at 90c7364: 106 / 112
    exact (0.946, Wilson 95 % 0.888-0.975), 31 / 31 hostile refused (BENCHMARKS.md); that figure stays the record.
    As development rows (the parser was widened on the classes its six misses belong to) every row must pass."""
    commands = [r for r in ROUND_1 if r["ops"] is not None]
    assert len(ROUND_1) == 143 and all(r["source"] and r["part"] == "dev" for r in ROUND_1)
    assert {op["op"] for r in commands for op in r["ops"]} == set(OPERATIONS)
    wrong = [r["text"] for r in commands if _try(r["text"]) != r["ops"]]
    assert len(commands) == 112 and wrong == []
    assert [r["text"] for r in ROUND_1 if r["ops"] is None and _try(r["text"])] == []  # 31 hostile, all refused


def test_issue_20_round_2_heldout_exact_match_floor():
    """Measured once, after the freeze at c38bf20: 132 / 175 exact (0.754, Wilson 95 % 0.686-0.812); of the 43 misses,
    42 are refusals and one a wrong operation ("right click at 60 61" read as a positive point). The issue's target,
    0.97, is NOT reached; this floor is the measured figure, not the target."""
    commands = [r for r in HELDOUT_2 if r["ops"] is not None]
    assert {r["part"] for r in HELDOUT_2} == {"heldout_issue20_round2"} and all(r["source"] for r in HELDOUT_2)
    assert {op["op"] for r in commands for op in r["ops"]} == set(OPERATIONS)
    right = [r["text"] for r in commands if _try(r["text"]) == r["ops"]]
    assert len(commands) == 175 and len(right) >= 132, sorted({r["text"] for r in commands} - set(right))


@pytest.mark.parametrize("text", [r["text"] for r in HELDOUT_2 if r["ops"] is None])
def test_issue_20_round_2_heldout_hostile_texts_are_refused(text):
    with pytest.raises(CommandError):
        parse_command(text)


def test_issue_20_round_2_heldout_hostile_count():
    assert sum(r["ops"] is None for r in HELDOUT_2) == 38


def test_every_development_row_passes():
    wrong = [r["text"] for r in CORPUS if r["part"] == "dev" and _try(r["text"]) != (r["ops"] or [])]
    assert wrong == []


P = {"op": "add_point", "positive": True, "x": None, "y": None, "count": 1}
N = {**P, "positive": False}


@pytest.mark.parametrize(("text", "ops"), [
    # "prompt" is a point noun when a polarity qualifies it (SAM: foreground / background point prompts;
    # SlicerSegmentWithSAM: "Add Positive / Negative Prompt Point")
    ("positive prompt at (200, 210)", [{**P, "x": 200, "y": 210}]),
    ("negative prompt at 12, 30", [{**N, "x": 12, "y": 30}]),
    ("add a background prompt at x=5 y=9", [{**N, "x": 5, "y": 9}]),
    ("3 positive prompts", [{**P, "count": 3}]),
    # a count, include / exclude (OHIF Marker Guided Segment's markers), then the point noun
    ("add two exclude markers", [{**N, "count": 2}]),
    ("add three include markers", [{**P, "count": 3}]),
    ("place 4 exclusion points", [{**N, "count": 4}]),
    ("two more negative prompts", [{**N, "count": 2}]),
    # a position said loosely: around / near / close to (MONAI Label negative clicks "exclude a particular region")
    ("erase the area around (50, 52)", [{**N, "x": 50, "y": 52}]),
    ("a foreground click near 40, 60", [{**P, "x": 40, "y": 60}]),
    ("exclude the region close to (7, 8)", [{**N, "x": 7, "y": 8}]),
    # key chords (OHIF hotkeys: Undo ctrl+z, Redo ctrl+y; 3D Slicer Segment Editor: z undo, y redo, Undo / Redo
    # buttons), with or without press / hit
    ("press ctrl+z", [{"op": "undo", "steps": 1}]),
    ("hit cmd-z twice", [{"op": "undo", "steps": 2}]),
    ("Ctrl + Y", [{"op": "redo", "steps": 1}]),
    ("press ctrl+shift+z", [{"op": "redo", "steps": 1}]),
    ("press z", [{"op": "undo", "steps": 1}]),
    ("hit the y key", [{"op": "redo", "steps": 1}]),
    ("ctrl+z ctrl+z", [{"op": "undo", "steps": 2}]),
    ("click the undo button", [{"op": "undo", "steps": 1}]),
    ("press ctrl+z on the keyboard", [{"op": "undo", "steps": 1}]),
    # past-tense questions (Segment Statistics / Segment Comparison terms)
    ("how accurate was that", [{"op": "show_metrics"}]),
    ("what was the Dice", [{"op": "show_metrics"}]),
    ("what were the metrics", [{"op": "show_metrics"}]),
])
def test_issue_20_round_2_widened_classes(text, ops):
    """The classes of phrasing round 1 missed, widened (not the six texts only)."""
    assert parse_command(text) == ops


@pytest.mark.parametrize("text", [
    "press z to continue", "hit y for yes", "press ctrl+c", "ctrl+alt+delete", "press escape",
    "how accurate was the weather forecast", "what was the score of the game", "how good was the movie",
    "what was the dice roll", "add two exclude markers to my calendar", "positive prompt for my essay",
    "write a positive prompt", "negative prompt: blurry, low quality", "erase the area around my house",
    "a point near the hospital", "click near the window", "was it good"])
def test_issue_20_round_2_vocabulary_still_needs_its_objects(text):
    with pytest.raises(CommandError):
        parse_command(text)


# Every shape of operation an over-eager / compromised model could answer for a text without numbers.
EVERY_SHAPE = [{"op": "segment", "target": "liver"}, P, N, {"op": "add_box", "box": None}, {"op": "undo", "steps": 1},
               {"op": "redo", "steps": 1}, {"op": "clear"},
               *({"op": "set_window", "preset": p, "level": None, "width": None} for p in WINDOW_PRESETS),
               {"op": "goto_slice", "index": None, "delta": 1}, {"op": "goto_slice", "index": None, "delta": -1},
               *({"op": "propagate", "direction": d} for d in ("both", "forward", "backward")),
               *({"op": "export", "format": f} for f in EXPORT_FORMATS), {"op": "show_metrics"}]


@pytest.mark.parametrize("text", ["erase the hard drive", "track my parcel", "download DICOM RTSTRUCT"])
def test_grounding_refuses_verbs_without_their_objects(text):
    """Round 1's three hostile texts that the fallback's old check let through (clear, propagate, export png): the
    check is pure, so it is tested directly, with every operation shape a model could answer."""
    for op in EVERY_SHAPE:
        with pytest.raises(CommandError):
            check_grounding(op, text.lower())
        with pytest.raises(CommandError):
            validate_operations([op], text)


@pytest.mark.parametrize(("text", "op"), [
    ("make the contrast nice for the lungs", {"op": "set_window", "preset": "lung", "level": None, "width": None}),
    ("take me to image number 7 of the series", {"op": "goto_slice", "index": 7, "delta": None}),
    ("wipe out the mask I drew", {"op": "clear"}),
    ("carry the contour on to the neighbouring slices", {"op": "propagate", "direction": "both"}),
    ("save what I segmented as a nifti file please", {"op": "export", "format": "nifti"}),
    ("how good is the segmentation, Dice wise", {"op": "show_metrics"}),
    ("oops, cancel that last thing", {"op": "undo", "steps": 1}),
    ("stick a foreground point in the middle at 64 64", {**P, "x": 64, "y": 64}),
])
def test_grounding_still_accepts_what_the_text_asks_for(text, op):
    assert validate_operations([op], text) == [op]


def test_grounding_refuses_numbers_the_operations_leave_out():
    with pytest.raises(CommandError, match="none of the model's operations"):
        validate_operations([{"op": "add_box", "box": None}], "add box 1 2 3")
    assert validate_operations([{"op": "undo", "steps": 3}], "go back 3 steps") == [{"op": "undo", "steps": 3}]


def test_a_fake_model_answering_every_shape_never_turns_hostile_text_into_an_operation():
    """Server-free: the fallback is any function text -> operations; every hostile corpus text (issue 8's, issue 20's
    development rows and round 1's), every shape -> CommandError."""
    accepted = []
    for op in EVERY_SHAPE:
        for text in HOSTILE:
            try:
                accepted.append((text, parse_command(text, fallback=lambda _text, op=op: [op])))
            except CommandError:
                pass
    # known: a point without a position is grounded by the word "point" alone
    assert accepted == [("add a point at the top of the world", [P]), ("add a point at the top of the world", [N])]


def test_a_fake_model_on_round_2_hostile_texts_known_gaps():
    """Measured after the round-2 freeze (the parser alone refuses all 38): four held-out hostile texts pass the
    grounding check when a model answers the matching shape; the verbs ground themselves ("redo my kitchen") or the
    object is not checked against the rest of the text ("undo my last bank transfer"). Open for the next round."""
    accepted = []
    for op in EVERY_SHAPE:
        for text in (r["text"] for r in HELDOUT_2 if r["ops"] is None):
            try:
                accepted.append((text, parse_command(text, fallback=lambda _text, op=op: [op])[0]["op"]))
            except CommandError:
                pass
    assert sorted(accepted) == [("box up my belongings", "add_box"), ("redo my kitchen", "redo"),
                                ("undo my last bank transfer", "undo"), ("what's the dice roll probability",
                                                                          "show_metrics")]


def test_clauses_join_when_one_alone_is_not_a_command():
    assert parse_command("set level to 40 and width to 400") == [
        {"op": "set_window", "preset": None, "level": 40.0, "width": 400.0}]
    assert parse_command("box between (1, 2) and (30, 40) then undo") == [
        {"op": "add_box", "box": [1, 2, 30, 40]}, {"op": "undo", "steps": 1}]


def test_one_bad_clause_refuses_the_whole_text():
    with pytest.raises(CommandError, match="drop table"):
        parse_command("segment the liver; drop table users")
    with pytest.raises(CommandError, match="four coordinates"):
        parse_command("undo and add a box 1 2 3")


def test_targets_must_name_anatomy_unless_the_caller_knows_the_structure():
    with pytest.raises(CommandError):
        parse_command("segment my homework")
    assert parse_command("segment the hepatic flexure") == [{"op": "segment", "target": "hepatic flexure"}]
    assert parse_command("segment widget_7", structures=["widget_7"]) == [{"op": "segment", "target": "widget_7"}]


def test_non_text_and_oversized_text_are_refused():
    with pytest.raises(CommandError, match="must be text"):
        parse_command(42)
    with pytest.raises(CommandError, match="too long"):
        parse_command("undo " * (MAX_TEXT // 4))


def test_cli_prints_operations_and_refuses_with_exit_2(capsys):
    assert rau(["command", "parse", "add three points then bone window"]) == 0
    assert [op["op"] for op in json.loads(capsys.readouterr().out)] == ["add_point", "set_window"]
    assert rau(["command", "parse", "rm -rf /"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------- the LLM fallback, against a real HTTP server
# ``llm``: tests/conftest.py's local /v1/chat/completions server (shared with the Serve test of the fallback)
def _url(server):
    return server.url


def _answer(ops):
    return lambda body: (200, json.dumps({"operations": ops}))


def test_fallback_is_off_by_default_and_asked_only_when_the_parser_refuses(llm):
    fallback = OpenAICompatibleFallback(_url(llm), "tiny-policy")
    assert parse_command("segment the liver", fallback=fallback) == [{"op": "segment", "target": "liver"}]
    assert llm.requests == []
    with pytest.raises(CommandError):
        parse_command("make the contrast nice for the lungs")  # no fallback: refused
    assert llm.requests == []


def test_fallback_reads_what_the_parser_cannot(llm):
    window = {"op": "set_window", "preset": "lung", "level": None, "width": None}
    llm.answer = lambda body: (200, "```json\n" + json.dumps({"operations": [window]}) + "\n```")
    fallback = OpenAICompatibleFallback(_url(llm) + "/v1", "tiny-policy", api_key="k")
    assert parse_command("make the contrast nice for the lungs", fallback=fallback) == [window]
    (request,) = llm.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
    body = request["body"]
    assert body["model"] == "tiny-policy" and body["temperature"] == 0
    assert body["response_format"]["json_schema"]["schema"]["properties"]["operations"]["items"] == OPERATION_SCHEMA
    system, user = body["messages"]
    assert '"set_window"' in system["content"] and json.loads(user["content"]) == {
        "instruction": "make the contrast nice for the lungs"}


@pytest.mark.parametrize("content", [
    "sure! I will set the lung window",                                                    # not JSON
    '{"operations": []}',                                                                 # not a command
    '{"operations": [{"op": "set_window", "preset": "lung"}]}',                           # fields missing
    '{"operations": [{"op": "set_window", "preset": "lung", "level": null, "width": null, "run": "rm -rf /"}]}',
    '{"operations": [{"op": "shell", "cmd": "rm -rf /"}]}',                               # no such operation
    '{"operations": [{"op": "set_window", "preset": "bone", "level": null, "width": null}]}',  # bone: not said
    '{"operations": [{"op": "set_window", "preset": null, "level": -600, "width": 1500}]}',  # numbers not said
    '{"operations": [{"op": "clear"}]}',                                                  # not asked for
    '{"operations": [{"op": "segment", "target": "lungs"}, {"op": "export", "format": "rle"}]}',
])
def test_fallback_answers_that_fail_validation_are_command_errors(llm, content):
    llm.answer = lambda body: (200, content)
    with pytest.raises(CommandError):
        parse_command("make the contrast nice for the lungs", fallback=OpenAICompatibleFallback(_url(llm), "m"))


def test_fallback_that_fails_to_answer_is_a_command_error(llm):
    llm.answer = lambda body: (500, "")
    with pytest.raises(CommandError, match="did not answer"):
        parse_command("make the contrast nice for the lungs", fallback=OpenAICompatibleFallback(_url(llm), "m"))
    port = llm.server_address[1]
    llm.shutdown()
    llm.server_close()
    with pytest.raises(CommandError, match="did not answer"):
        parse_command("make the contrast nice for the lungs",
                      fallback=OpenAICompatibleFallback(f"http://127.0.0.1:{port}", "m", timeout=2))


ADVERSARIAL = [{"op": "segment", "target": "liver"}, {"op": "add_point", "positive": True, "x": 1, "y": 1, "count": 1},
               {"op": "add_box", "box": [1, 1, 2, 2]}, {"op": "undo", "steps": 1}, {"op": "redo", "steps": 1},
               {"op": "clear"}, {"op": "set_window", "preset": "bone", "level": None, "width": None},
               {"op": "goto_slice", "index": 1, "delta": None}, {"op": "propagate", "direction": "both"},
               {"op": "export", "format": "png"}, {"op": "show_metrics"}]


def test_a_model_that_always_answers_an_operation_never_turns_hostile_text_into_one(llm):
    """Even a compromised / over-eager model: every hostile corpus text, every operation -> CommandError."""
    accepted = []
    for op in ADVERSARIAL:
        llm.answer = _answer([op])
        fallback = OpenAICompatibleFallback(_url(llm), "m")
        for text in HOSTILE:
            try:
                accepted.append((text, parse_command(text, fallback=fallback)))
            except CommandError:
                pass
    assert accepted == []


def test_chat_fallback_wraps_any_chat_function_such_as_the_served_policy():
    seen = []

    def policy_chat(messages):
        seen.append(messages)
        return '<think>the user wants slices</think>{"operations": [{"op": "goto_slice", "index": 7, "delta": null}]}'

    assert parse_command("take me to image number 7 of the series", fallback=ChatFallback(policy_chat)) == [
        {"op": "goto_slice", "index": 7, "delta": None}]
    assert seen and seen[0][0]["role"] == "system"
