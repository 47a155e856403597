"""bench/workloads: seeded generators (determinism, configured means, shared prefixes,
max_context, token ids), arrival processes, ShareGPT/BurstGPT loaders and their errors, and
the registry."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from bench.workloads import (
    Arrival,
    Session,
    TraceError,
    Turn,
    Workload,
    WorkloadError,
    build,
    fit_context,
    gamma,
    load_burstgpt,
    load_sharegpt,
    make_config,
    onoff,
    parse_arrival,
    poisson,
    prompt_lengths,
    trace,
)
from bench.workloads.registry import WORKLOADS
from common.tokenizer import Tokenizer, build_byte_tokenizer

GENERATORS = ["chat", "docs", "agent", "reasoning"]
HUGE = 1 << 30  # a max_context that never cuts, to see the configured distributions


def generate(name: str, sessions: int = 400, seed: int = 0, **overrides: Any) -> Workload:
    max_context = overrides.pop("max_context", HUGE)
    scale = overrides.pop("scale", 1.0)
    cfg = make_config(name, scale=scale, max_context=max_context, overrides=overrides)
    return WORKLOADS[name].generate(cfg, poisson(2.0), sessions, seed)


def near(actual: float, expected: float, tol: float) -> bool:
    return abs(actual - expected) <= tol * expected


def common_prefix(seqs: list[tuple[int, ...]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    return Tokenizer(build_byte_tokenizer())


# ---------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_is_deterministic_for_a_seed(name: str) -> None:
    a = build(name, sessions=30, rate=2.0, seed=7)
    assert a == build(name, sessions=30, rate=2.0, seed=7)
    assert a.sessions != build(name, sessions=30, rate=2.0, seed=8).sessions
    # Content and arrivals are separate streams: another arrival process, same sessions.
    bursty = build(name, sessions=30, rate=2.0, seed=7, arrival="gamma:4")
    assert [s.turns for s in bursty.sessions] == [s.turns for s in a.sessions]
    # A smaller run is a prefix of a larger one.
    assert build(name, sessions=10, rate=2.0, seed=7).sessions == a.sessions[:10]


@pytest.mark.parametrize("name", GENERATORS)
def test_params_record_config_seed_and_arrival_as_strict_json(name: str) -> None:
    w = build(name, sessions=3, rate=math.inf, seed=5, scale=0.5, arrival="poisson")
    text = json.dumps(w.params, allow_nan=False)
    assert json.loads(text) == w.params
    assert w.params["seed"] == 5 and w.params["workload"] == name
    assert w.params["config"]["scale"] == 0.5
    assert w.params["arrival"] == {"kind": "poisson", "rate": "inf"}


def test_chat_means_match_config() -> None:
    w = generate("chat")
    first = [s.turns[0] for s in w.sessions]
    later = [t for s in w.sessions for t in s.turns[1:]]
    user = [len(t.tokens) - 1 for t in first] + [len(t.tokens) for t in later]
    assert near(statistics.mean(len(s.turns) for s in w.sessions), 3.5, 0.10)
    assert near(statistics.mean(user), 160, 0.15)
    assert near(statistics.mean(t.max_tokens for t in first + later), 240, 0.15)
    assert all(t.think_s == 0 for t in first + later)


def test_chat_overrides_change_the_shape() -> None:
    w = generate(
        "chat", turns_mean=6.0, user_tokens_mean=50.0, answer_tokens_mean=20.0, think_s=2.0
    )
    later = [t for s in w.sessions for t in s.turns[1:]]
    assert near(statistics.mean(len(s.turns) for s in w.sessions), 6.0, 0.10)
    assert near(statistics.mean(len(t.tokens) for t in later), 50, 0.15)
    assert near(statistics.mean(t.max_tokens for s in w.sessions for t in s.turns), 20, 0.15)
    assert near(statistics.mean(t.think_s for t in later), 2.0, 0.15)
    assert all(s.turns[0].think_s == 0 for s in w.sessions)


def test_docs_means_match_config() -> None:
    w = generate("docs", num_docs=100, doc_tokens_sigma=0.3)
    later = [t for s in w.sessions for t in s.turns[1:]]
    assert near(statistics.mean(len(s.turns) for s in w.sessions), 3.0, 0.10)
    assert near(statistics.mean(len(t.tokens) for t in later), 30, 0.15)
    assert near(statistics.mean(t.max_tokens for s in w.sessions for t in s.turns), 40, 0.15)
    doc_len = {s.group: len(s.turns[0].tokens) for s in w.sessions}  # + BOS + a question
    assert near(statistics.mean(doc_len.values()), 3000 + 1 + 30, 0.10)


def test_docs_sessions_on_a_document_share_bos_and_the_document() -> None:
    w = generate("docs", sessions=120, doc_tokens_sigma=0.0, doc_tokens_mean=500.0)
    by_doc: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for s in w.sessions:
        by_doc[s.group].append(s.turns[0].tokens)
    assert set(by_doc) == {f"doc-{k}" for k in range(8)}
    prefixes = set()
    for firsts in by_doc.values():
        assert len(firsts) > 1 and common_prefix(firsts) >= 501
        assert firsts[0][0] == 1
        prefixes.add(firsts[0][:501])
    assert len(prefixes) == 8  # one document per group, all different


def test_docs_zipf_skews_towards_the_first_documents() -> None:
    uniform = Counter(s.group for s in generate("docs", sessions=400).sessions)
    skewed = Counter(s.group for s in generate("docs", sessions=400, doc_zipf=1.5).sessions)
    assert max(uniform.values()) < 2 * min(uniform.values())
    assert skewed.most_common(1)[0][0] == "doc-0"
    assert skewed["doc-0"] > 4 * skewed["doc-7"]


def test_agent_means_match_config() -> None:
    w = generate("agent")
    later = [t for s in w.sessions for t in s.turns[1:]]
    tasks = [len(s.turns[0].tokens) - 601 for s in w.sessions]
    assert near(statistics.mean(len(s.turns) for s in w.sessions), 6.0, 0.10)
    assert near(statistics.mean(tasks), 60, 0.15)
    assert near(statistics.mean(len(t.tokens) for t in later), 80, 0.15)
    assert near(statistics.mean(t.max_tokens for s in w.sessions for t in s.turns), 50, 0.15)


def test_agent_sessions_share_the_system_prompt_and_wait_for_tools() -> None:
    w = generate("agent", sessions=50, tool_latency_s=0.25)
    assert common_prefix([s.turns[0].tokens for s in w.sessions]) >= 601
    assert all(t.think_s == 0.25 for s in w.sessions for t in s.turns[1:])
    assert all(s.group == "" for s in w.sessions)


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("max_context", [300, 1024, 4096])
def test_every_request_fits_max_context(name: str, max_context: int) -> None:
    w = build(name, sessions=100, rate=1.0, max_context=max_context)
    for s in w.sessions:
        assert s.turns
        for turn, prompt in zip(s.turns, s.prompt_lengths(), strict=True):
            assert prompt + turn.max_tokens <= max_context


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("vocab", [(35, 130), (3, 5), (200, 259)])
def test_ids_are_in_vocab_and_bos_opens_each_session(name: str, vocab: tuple[int, int]) -> None:
    w = generate(name, sessions=40, vocab=vocab, scale=0.2)
    for s in w.sessions:
        assert s.turns[0].tokens[0] == 1
        ids = [*s.turns[0].tokens[1:], *(i for t in s.turns[1:] for i in t.tokens)]
        assert all(vocab[0] <= i < vocab[1] for i in ids)


@pytest.mark.parametrize("name", GENERATORS)
def test_scale_shrinks_lengths_and_keeps_the_shape(name: str) -> None:
    full_w, small_w = generate(name, sessions=200), generate(name, sessions=200, scale=0.1)
    # Lengths never shift the draws of the structure: same turns, groups and answers order.
    assert [(len(s.turns), s.group) for s in small_w.sessions] == [
        (len(s.turns), s.group) for s in full_w.sessions
    ]
    full, small = full_w.summary(), small_w.summary()
    assert near(small["mean_new_tokens"], 0.1 * full["mean_new_tokens"], 0.15)
    assert near(small["mean_max_tokens"], 0.1 * full["mean_max_tokens"], 0.15)


@pytest.mark.parametrize(
    ("name", "overrides", "bad"),
    [
        ("chat", {"user_tokens_mean": 0}, "user_tokens_mean"),
        ("chat", {"turns_mean": 0.5}, "turns_mean"),
        ("docs", {"num_docs": 0}, "num_docs"),
        ("agent", {"action_tokens_sigma": -1}, "action_tokens_sigma"),
        ("agent", {"vocab": (0, 100)}, "vocab"),
    ],
)
def test_bad_config_values_are_named(name: str, overrides: dict[str, Any], bad: str) -> None:
    with pytest.raises(WorkloadError, match=bad):
        make_config(name, overrides=overrides)


# ---------------------------------------------------------------------------- model


def test_prompt_lengths_include_history_and_answers() -> None:
    turns = [Turn((1, 40, 41), 5), Turn((42,), 2), Turn((43, 44), 1)]
    assert prompt_lengths(turns) == [3, 3 + 5 + 1, 3 + 5 + 1 + 2 + 2]


def test_fit_context_drops_trailing_turns_and_truncates_a_long_first_turn() -> None:
    turns = [Turn((1, 40, 41), 5), Turn((42,), 2), Turn((43, 44), 1)]
    assert fit_context(turns, 100) == tuple(turns)
    assert fit_context(turns, 11) == tuple(turns[:2])  # 3+5+1+2 = 11 fits, the third does not
    assert fit_context(turns, 9) == (turns[0],)
    assert fit_context(turns, 6) == (Turn((1,), 5),)  # prefix kept, answer kept
    assert fit_context([Turn((1, 40), 50)], 4) == (Turn((1,), 3),)  # answer cut to fit


def test_summary_matches_the_sessions() -> None:
    w = Workload(
        "hand",
        (
            Session("a", 0.0, (Turn((1, 40, 41), 5), Turn((42,), 2))),
            Session("b", 1.5, (Turn((1, 40), 3),)),
        ),
        {},
    )
    assert w.num_requests() == 3
    assert w.summary() == {
        "sessions": 2.0,
        "requests": 3.0,
        "mean_turns": 1.5,
        "mean_new_tokens": 2.0,
        "mean_prompt_tokens": (3 + 9 + 2) / 3,
        "mean_max_tokens": 10 / 3,
        "duration_s": 1.5,
    }
    assert w.limit(1).sessions == w.sessions[:1] and w.limit(1).params == {"limit": 1}
    assert w.limit(None) is w
    assert Workload("empty", (), {}).summary()["mean_prompt_tokens"] == 0.0


@pytest.mark.parametrize("name", GENERATORS)
def test_generated_summary_is_consistent(name: str) -> None:
    w = build(name, sessions=50, rate=3.0, seed=1)
    turns = [t for s in w.sessions for t in s.turns]
    summary = w.summary()
    assert summary["sessions"] == 50 and summary["requests"] == len(turns) == w.num_requests()
    assert summary["mean_turns"] == len(turns) / 50
    assert summary["mean_max_tokens"] == pytest.approx(statistics.mean(t.max_tokens for t in turns))
    assert summary["mean_prompt_tokens"] >= summary["mean_new_tokens"]
    assert summary["duration_s"] == w.sessions[-1].arrival_s > 0
    assert [s.arrival_s for s in w.sessions] == sorted(s.arrival_s for s in w.sessions)


def test_workload_rejects_unsorted_or_duplicate_sessions_and_empty_turns() -> None:
    one = (Turn((1,), 1),)
    with pytest.raises(WorkloadError, match="sorted"):
        Workload("w", (Session("a", 2.0, one), Session("b", 1.0, one)), {})
    with pytest.raises(WorkloadError, match="duplicate"):
        Workload("w", (Session("a", 0.0, one), Session("a", 1.0, one)), {})
    with pytest.raises(WorkloadError, match="no turns"):
        Session("a", 0.0, ())
    with pytest.raises(WorkloadError, match="max_tokens"):
        Turn((1,), 0)


# ---------------------------------------------------------------------------- arrivals


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_poisson_mean_gap_is_one_over_rate() -> None:
    times = poisson(4.0).times(5000, random.Random(1))
    assert times[0] == 0.0 and times == sorted(times)
    g = gaps(times)
    assert near(statistics.mean(g), 0.25, 0.05)
    assert near(statistics.stdev(g) / statistics.mean(g), 1.0, 0.05)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_gaps_have_the_configured_mean_and_cv(cv: float) -> None:
    g = gaps(gamma(2.0, cv).times(20000, random.Random(2)))
    assert near(statistics.mean(g), 0.5, 0.10)
    assert near(statistics.stdev(g) / statistics.mean(g), cv, 0.20)


def test_onoff_has_no_arrivals_in_off_windows() -> None:
    on_s, off_s = 2.0, 3.0
    times = onoff(10.0, on_s, off_s).times(2000, random.Random(3))
    assert times == sorted(times)
    period = on_s + off_s
    for t in times:
        phase = t % period
        assert phase < on_s + 1e-9 or phase > period - 1e-9, t
    # About rate * on_s arrivals per cycle.
    assert near(len(times) / (times[-1] / period), 10.0 * on_s, 0.10)


@pytest.mark.parametrize("rate", [0.0, math.inf])
def test_zero_or_infinite_rate_means_all_at_once(rate: float) -> None:
    for spec in ("poisson", "gamma:3", "onoff:1:1"):
        assert parse_arrival(spec, rate).times(5, random.Random(0)) == [0.0] * 5


def test_trace_times_are_sorted_and_shifted_to_zero() -> None:
    arrival = trace([105.0, 100.0, 101.5])
    assert arrival.times(3, random.Random(0)) == [0.0, 1.5, 5.0]
    assert arrival.times(2, random.Random(0)) == [0.0, 1.5]
    with pytest.raises(WorkloadError, match="trace has 3"):
        arrival.times(4, random.Random(0))


def test_parse_arrival_reads_each_form() -> None:
    assert parse_arrival("poisson", 2.0) == Arrival("poisson", 2.0)
    assert parse_arrival(" Gamma:4 ", 2.0) == Arrival("gamma", 2.0, cv=4.0)
    assert parse_arrival("onoff:5:10", 2.0) == Arrival("onoff", 2.0, on_s=5.0, off_s=10.0)


@pytest.mark.parametrize(
    ("spec", "rate", "message"),
    [
        ("uniform", 1.0, "unknown process 'uniform'"),
        ("trace", 1.0, "use workload burstgpt"),
        ("gamma", 1.0, "takes 1 parameter"),
        ("gamma:x", 1.0, "CV 'x' is not a number"),
        ("gamma:0", 1.0, "cv must be a positive number"),
        ("poisson:3", 1.0, "takes 0 parameter"),
        ("onoff:5", 1.0, "takes 2 parameter"),
        ("onoff:five:1", 1.0, "ON_S 'five'"),
        ("onoff:0:1", 1.0, "on_s > 0"),
        ("onoff:1:inf", 1.0, "OFF_S 'inf' must be finite"),
        ("poisson", -1.0, "rate must be >= 0"),
        ("poisson", math.nan, "rate must be >= 0"),
    ],
)
def test_parse_arrival_errors_name_the_bad_part(spec: str, rate: float, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        parse_arrival(spec, rate)


# ---------------------------------------------------------------------------- ShareGPT


def sharegpt_entry(cid: str, *messages: tuple[str, str]) -> dict[str, Any]:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in messages]}


SHAREGPT = [
    sharegpt_entry("a", ("human", "Hi there"), ("gpt", "Hello!"), ("human", "Why?"), ("gpt", "")),
    sharegpt_entry("starts-with-gpt", ("gpt", "I speak first"), ("human", "ok")),
    sharegpt_entry("no-human", ("system", "be nice"), ("gpt", "hm")),
    sharegpt_entry("b", ("system", "Be brief."), ("human", "Name a color"), ("gpt", "Red")),
    sharegpt_entry("c", ("human", "One"), ("human", "Two"), ("gpt", "ab"), ("human", "unanswered")),
    sharegpt_entry("empty", ("human", "only a question")),
]


def write_json(tmp_path: Path, data: Any, name: str = "sharegpt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_sharegpt_turns_and_answer_lengths(tmp_path: Path, byte_tokenizer: Tokenizer) -> None:
    path = write_json(tmp_path, SHAREGPT)
    sessions = load_sharegpt(path, byte_tokenizer, max_context=4096, seed=0)
    by_first = {s.turns[0].tokens: s for s in sessions}
    assert len(sessions) == 3  # a, b, c; the others have no usable human turn

    def enc(text: str, first: bool) -> tuple[int, ...]:
        return tuple(byte_tokenizer.encode(text, add_special_tokens=first))

    a = by_first[enc("Hi there", True)]
    assert a.turns == (Turn(enc("Hi there", True), 6), Turn(enc("Why?", False), 1))
    b = by_first[enc("Be brief.\nName a color", True)]
    assert b.turns == (Turn(enc("Be brief.\nName a color", True), 3),)
    c = by_first[enc("One\nTwo", True)]
    assert c.turns == (Turn(enc("One\nTwo", True), 2),)  # the unanswered turn is dropped
    assert all(s.arrival_s == 0.0 and s.turns[0].tokens[0] == 1 for s in sessions)
    assert len({s.session_id for s in sessions}) == 3


def test_load_sharegpt_picks_a_seeded_subset_and_fits_context(
    tmp_path: Path, byte_tokenizer: Tokenizer
) -> None:
    data = [sharegpt_entry(str(i), ("human", "x" * (10 + i)), ("gpt", "y" * 30)) for i in range(40)]
    path = write_json(tmp_path, data)
    five = load_sharegpt(path, byte_tokenizer, sessions=5, max_context=4096, seed=1)
    assert five == load_sharegpt(path, byte_tokenizer, sessions=10, max_context=4096, seed=1)[:5]
    assert five != load_sharegpt(path, byte_tokenizer, sessions=5, max_context=4096, seed=2)
    short = load_sharegpt(path, byte_tokenizer, sessions=40, max_context=32, seed=1)
    assert all(
        p + t.max_tokens <= 32
        for s in short
        for t, p in zip(s.turns, s.prompt_lengths(), strict=True)
    )
    with pytest.raises(TraceError, match="40 usable conversations .* 41 requested"):
        load_sharegpt(path, byte_tokenizer, sessions=41, max_context=4096, seed=1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "not valid JSON: .* at line 1"),
        ('{"conversations": []}', "expected a JSON list of conversations, got an object"),
        ('[{"id": "x"}]', "entry 0: expected an object with a 'conversations' list"),
        ('[{"conversations": "hi"}]', "entry 0: 'conversations' is a string, not a list"),
        ('[{"conversations": [{"from": "human"}]}]', "entry 0, message 0: expected"),
    ],
)
def test_sharegpt_errors_name_the_file_and_cause(
    tmp_path: Path, byte_tokenizer: Tokenizer, content: str, message: str
) -> None:
    path = tmp_path / "trace.json"
    path.write_text(content)
    with pytest.raises(TraceError, match=f"trace.json: {message}"):
        load_sharegpt(path, byte_tokenizer, max_context=4096, seed=0)


def test_missing_or_unreadable_trace_files(tmp_path: Path, byte_tokenizer: Tokenizer) -> None:
    with pytest.raises(TraceError, match="nope.json: no such file"):
        load_sharegpt(tmp_path / "nope.json", byte_tokenizer, max_context=4096, seed=0)
    with pytest.raises(TraceError, match="is a directory"):
        load_burstgpt(tmp_path)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match="binary.csv: not UTF-8"):
        load_burstgpt(binary)


# ---------------------------------------------------------------------------- BurstGPT

BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def write_burstgpt(tmp_path: Path, rows: str, header: str = BURSTGPT_HEADER) -> Path:
    path = tmp_path / "burst.csv"
    path.write_text(header + rows)
    return path


BURSTGPT_ROWS = (
    "5,ChatGPT,472,18,490,Conversation log\n"
    "7,ChatGPT,1087,0,1087,Conversation log\n"
    "8,GPT-4,20,30,50,API log\n"
    "12.5,ChatGPT,100,200,300,Conversation log\n"
)


def test_load_burstgpt_skips_failed_requests(tmp_path: Path) -> None:
    path = write_burstgpt(tmp_path, BURSTGPT_ROWS)
    assert load_burstgpt(path) == [(5.0, 472, 18), (8.0, 20, 30), (12.5, 100, 200)]


def test_burstgpt_workload_replays_trace_times_and_lengths(tmp_path: Path) -> None:
    path = write_burstgpt(tmp_path, BURSTGPT_ROWS)
    w = build("burstgpt", sessions=3, rate=1.0, arrival="trace", trace=str(path))
    assert [s.arrival_s for s in w.sessions] == [0.0, 3.0, 7.5]
    assert [len(s.turns[0].tokens) for s in w.sessions] == [472, 20, 100]
    assert [s.turns[0].max_tokens for s in w.sessions] == [18, 30, 200]
    assert all(len(s.turns) == 1 and s.turns[0].tokens[0] == 1 for s in w.sessions)
    assert all(35 <= i < 130 for s in w.sessions for i in s.turns[0].tokens[1:])
    synthetic = build("burstgpt", sessions=2, rate=math.inf, trace=str(path), scale=0.5)
    assert [s.arrival_s for s in synthetic.sessions] == [0.0, 0.0]
    assert [len(s.turns[0].tokens) for s in synthetic.sessions] == [236, 10]
    with pytest.raises(TraceError, match="3 successful requests, 4 requested"):
        build("burstgpt", sessions=4, rate=1.0, trace=str(path))


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("Timestamp,Model,Request tokens\n", "1,x,2\n", "missing column.*Response tokens"),
        ("", "", "missing column.*Timestamp.*header: none"),
        (BURSTGPT_HEADER, "1,x,lots,3,4,y\n", "line 2: Request tokens 'lots' is not a number"),
        (BURSTGPT_HEADER, "1,x,5,-3,4,y\n", "line 2: Response tokens '-3' must be >= 0"),
        (BURSTGPT_HEADER, '1,x,"5\n', "not valid CSV"),
    ],
)
def test_burstgpt_errors_name_the_file_and_cause(
    tmp_path: Path, header: str, rows: str, message: str
) -> None:
    path = write_burstgpt(tmp_path, rows, header)
    with pytest.raises(TraceError, match=f"burst.csv: .*{message}"):
        load_burstgpt(path)


# ---------------------------------------------------------------------------- registry


def test_unknown_workload_lists_the_known_ones() -> None:
    with pytest.raises(WorkloadError, match="unknown workload 'chatt'; known: chat, docs, agent"):
        build("chatt", sessions=1, rate=1.0)


def test_unknown_override_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(WorkloadError, match="unknown override 'num_doc'.*valid: .*num_docs"):
        build("docs", sessions=1, rate=1.0, overrides={"num_doc": 3})


def test_overrides_from_strings_are_converted() -> None:
    cfg = make_config("docs", overrides={"num_docs": "16", "doc_zipf": "1.2", "vocab": "40,90"})
    assert (cfg.num_docs, cfg.doc_zipf, cfg.vocab) == (16, 1.2, (40, 90))  # type: ignore[attr-defined]
    with pytest.raises(WorkloadError, match=r"num_docs='1\.5' is not a valid int"):
        make_config("docs", overrides={"num_docs": "1.5"})
    with pytest.raises(WorkloadError, match="scale is a build"):
        make_config("chat", overrides={"scale": 0.5})


def test_trace_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="pass trace=PATH"):
        build("sharegpt", sessions=1, rate=1.0)
    with pytest.raises(WorkloadError, match="trace= is for sharegpt and burstgpt only"):
        build("chat", sessions=1, rate=1.0, trace="x.json")
    with pytest.raises(WorkloadError, match="takes no overrides"):
        build("sharegpt", sessions=1, rate=1.0, trace="x.json", overrides={"a": 1})


def test_build_sharegpt_with_the_default_byte_tokenizer(tmp_path: Path) -> None:
    path = write_json(tmp_path, SHAREGPT)
    w = build("sharegpt", sessions=3, rate=10.0, seed=4, trace=str(path))
    assert w.name == "sharegpt" and len(w.sessions) == 3 and w.num_requests() == 4
    assert w.sessions[0].arrival_s == 0.0 < w.sessions[-1].arrival_s
    assert w.params["config"]["trace"] == str(path)
    assert w == build("sharegpt", sessions=3, rate=10.0, seed=4, trace=str(path))
