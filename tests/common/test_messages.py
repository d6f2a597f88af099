"""Message types: round-trips, every way decoding refuses, and a fuzz test of decode()."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    TYPES,
    CancelJob,
    Chunk,
    ChunkRequest,
    CommitSeen,
    DecodeError,
    Goodbye,
    Heartbeat,
    Hello,
    Job,
    JobAbandoned,
    JobRejected,
    JobResult,
    JobStarted,
    Mark,
    Message,
    Reply,
    Request,
    RunnerCommand,
    decode,
)

SHA1 = "0123456789abcdef0123456789abcdef01234567"
SHA256 = "0123456789abcdef" * 4

SAMPLES: list[Message] = [
    CommitSeen(repo="/srv/git/app", branch="main", commit=SHA1, seen_at=1700000000.5, source="hook"),
    CommitSeen(repo="https://example.com/app.git", branch="feature/x", commit=SHA256, seen_at=1.0),
    CommitSeen(repo="/srv/git/app", branch="main", commit=SHA1, seen_at=2.0, labels=["gpu", "python3.12"]),
    Job(job_id="j1", attempt=2, repo="/srv/git/app", branch="main", commit=SHA1),
    Job(job_id="j1", attempt=1, repo="/srv/git/app", branch="main", commit=SHA1, labels=["linux"]),
    Job(job_id="j1.2", attempt=1, repo="/srv/git/app", branch="main", commit=SHA1, run="j1", lease="L"),
    CommitSeen(repo="/srv/git/app", branch="main", commit=SHA1, seen_at=3.0, split=4, rerun_failures=1),
    ChunkRequest(job_id="j1.2", attempt=1, runner_id="r1", lease="L", seq=1, collected=["t.py::a", "t.py::b"]),
    ChunkRequest(job_id="j1.2", attempt=1, runner_id="r1", lease="L", seq=2, results=[["t.py::a", "passed", 0.5]]),
    Chunk(job_id="j1.2", lease="L", seq=1, tests=["t.py::a"]),
    Chunk(job_id="j1.2", lease="L", seq=3, stop="the run ended"),
    CancelJob(job_id="j1", attempt=2, reason="given away"),
    RunnerCommand(action="pause", reason="maintenance"),
    RunnerCommand(action="drain"),
    Hello(runner_id="r1", session="s1", host="box", pid=42, labels=["linux", "gpu"], sent_at=5.0),
    Heartbeat(runner_id="r1", session="s1", state="busy", job_id="j1", attempt=1, interval=0.5),
    Goodbye(runner_id="r1", session="s1", job_id="j1", attempt=1, reason="shutdown"),
    Mark(token="5f0c1e2d3a4b"),
    JobStarted(job_id="j1", attempt=1, runner_id="r1", session="s1", started_at=10.25),
    JobRejected(job_id="j1", attempt=1, runner_id="r1", reason="busy", lease="L1"),
    JobAbandoned(job_id="j1", attempt=1, runner_id="r1", lease="L1", reason="lease lost"),
    Job(job_id="j1", attempt=1, repo="/srv/git/app", branch="main", commit=SHA1, lease="L1", lease_s=6.0),
    JobResult(
        job_id="j1",
        attempt=1,
        runner_id="r1",
        status="failed",
        exit_code=1,
        passed=3,
        failed=1,
        errors=0,
        skipped=2,
        duration_s=1.5,
        reason="1 failing test(s)",
        log_head="héllo ✓\n",
        log_tail="bye",
        log_bytes=12,
        log_full="eJzLSM3JyQcABiwCFQ==",
    ),
    JobResult(job_id="j2", attempt=1, runner_id="r1", status="timeout", exit_code=None),
    Request(method="results", params={"limit": 5, "commit": "abcd"}),
    Reply(ok=True, data={"jobs": [1, 2.5, None, "x", {"nested": True}]}),
    Reply(ok=False, error="no such job"),
]


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def job_body(**overrides: Any) -> bytes:
    fields = {"type": "job", "schema_version": SCHEMA_VERSION, "job_id": "j1", "attempt": 1}
    fields.update(repo="/srv/git/app", branch="main", commit=SHA1)
    fields.update(overrides)
    return body(**fields)


def refused(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data)
    return str(info.value)


# -- round-trips ----------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: Message) -> None:
    data = msg.to_json()
    again = decode(data)
    assert type(again) is type(msg)
    assert again == msg
    assert type(msg).from_json(data) == msg
    raw = json.loads(data)
    assert raw["type"] == msg.TYPE
    assert raw["schema_version"] == SCHEMA_VERSION


def test_from_json_refuses_another_type() -> None:
    with pytest.raises(DecodeError, match="expected job, got hello"):
        Job.from_json(Hello(runner_id="r", session="s").to_json())


def test_heartbeat_is_not_decoded_as_hello_or_the_reverse() -> None:
    assert type(decode(Heartbeat(runner_id="r", session="s").to_json())) is Heartbeat
    assert type(decode(Hello(runner_id="r", session="s").to_json())) is Hello


def test_unknown_fields_are_ignored() -> None:
    msg = decode(job_body(added_in_v2="whatever", TYPE="sneaky", priority=[1, 2]))
    assert msg == Job(job_id="j1", attempt=1, repo="/srv/git/app", branch="main", commit=SHA1)


def test_optional_fields_get_their_defaults() -> None:
    msg = decode(body(type="heartbeat", schema_version=1, runner_id="r1", session="s1"))
    assert msg == Heartbeat(runner_id="r1", session="s1")
    assert isinstance(msg, Heartbeat)
    assert (msg.host, msg.pid, msg.state, msg.interval, msg.labels) == ("", 0, "idle", 2.0, [])
    result = decode(body(type="job_result", schema_version=1, job_id="j", attempt=1, runner_id="r", status="error"))
    assert isinstance(result, JobResult)
    assert (result.exit_code, result.passed, result.log_full, result.reason) == (None, 0, "", "")


def test_int_is_accepted_where_a_float_is_expected() -> None:
    msg = decode(body(type="commit_seen", schema_version=1, repo="r", branch="b", commit=SHA1, seen_at=7))
    assert isinstance(msg, CommitSeen)
    assert msg.seen_at == 7


# -- refusals, each with its reason ---------------------------------------


def test_invalid_utf8() -> None:
    assert "not UTF-8 JSON" in refused(b'{"type": "job", "repo": "\xff\xfe"}')


@pytest.mark.parametrize("data", [b"", b"{", b'{"type": "job",}', b"{'type': 'job'}", b"nul"])
def test_invalid_json(data: bytes) -> None:
    assert "not UTF-8 JSON" in refused(data)


@pytest.mark.parametrize("data", [b"[]", b'"job"', b"1", b"null", b"true", b'[{"type": "job"}]'])
def test_not_an_object(data: bytes) -> None:
    assert refused(data) == "not a JSON object"


@pytest.mark.parametrize("kind", ["nope", "", "JOB", 1, None, ["job"], {"x": 1}])
def test_unknown_type(kind: Any) -> None:
    assert "unknown message type" in refused(body(type=kind, schema_version=1))


def test_missing_type() -> None:
    assert refused(body(schema_version=1, job_id="j")) == "unknown message type None"


@pytest.mark.parametrize("version", [0, 2, 99, "1", 1.0, 1.5, True, None, [1]])
def test_unknown_schema_version(version: Any) -> None:
    reason = refused(job_body(schema_version=version))
    assert "unknown schema_version" in reason
    assert "job" in reason


def test_missing_schema_version() -> None:
    data = job_body()
    fields = json.loads(data)
    del fields["schema_version"]
    assert "unknown schema_version None" in refused(json.dumps(fields).encode())


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("attempt", "1", "str"),
        ("attempt", True, "bool"),
        ("attempt", 1.5, "float"),
        ("attempt", None, "NoneType"),
        ("job_id", 7, "int"),
        ("repo", ["/srv/git/app"], "list"),
        ("branch", {"name": "main"}, "dict"),
        ("commit", None, "NoneType"),
    ],
)
def test_wrong_field_type(field: str, value: Any, shown: str) -> None:
    assert refused(job_body(**{field: value})) == f"job: field {field!r} has the wrong type ({shown})"


@pytest.mark.parametrize("labels", [[1], ["ok", None], "linux", [["nested"]], {"a": "b"}])
def test_labels_must_be_a_list_of_strings(labels: Any) -> None:
    data = body(type="hello", schema_version=1, runner_id="r", session="s", labels=labels)
    assert "field 'labels' has the wrong type" in refused(data)


def test_bool_is_not_a_number_and_number_is_not_a_bool() -> None:
    assert "field 'seen_at' has the wrong type (bool)" in refused(
        body(type="commit_seen", schema_version=1, repo="r", branch="b", commit=SHA1, seen_at=True)
    )
    assert "field 'ok' has the wrong type (int)" in refused(body(type="reply", schema_version=1, ok=1))


def test_nullable_field_accepts_null_but_not_other_types() -> None:
    base = {"type": "job_result", "schema_version": 1, "job_id": "j", "attempt": 1, "runner_id": "r"}
    msg = decode(body(**base, status="timeout", exit_code=None))
    assert isinstance(msg, JobResult)
    assert msg.exit_code is None
    assert "field 'exit_code' has the wrong type (str)" in refused(body(**base, status="error", exit_code="1"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempt", 2**63), ("attempt", -(2**63) - 1), ("attempt", 10**30), ("passed", 2**64)],
)
def test_integers_beyond_64_bits_are_refused(field: str, value: int) -> None:
    # SQLite cannot store them: the dispatcher would fail on every redelivery.
    base = {
        "type": "job_result",
        "schema_version": 1,
        "job_id": "j",
        "attempt": 1,
        "runner_id": "r",
        "status": "passed",
    }
    base[field] = value
    assert f"field {field!r} is out of range" in refused(body(**base))


def test_largest_64_bit_integer_is_fine() -> None:
    data = body(type="job_result", schema_version=1, job_id="j", attempt=2**63 - 1, runner_id="r", status="passed")
    assert decode(data).attempt == 2**63 - 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_non_finite_floats_are_refused(number: bytes) -> None:
    # A NaN heartbeat interval would make a runner's deadline never pass.
    data = b'{"type": "hello", "schema_version": 1, "runner_id": "r", "session": "s", "interval": ' + number + b"}"
    assert "field 'interval' is out of range" in refused(data)


def test_a_huge_integer_where_a_float_is_expected_is_refused() -> None:
    data = body(type="commit_seen", schema_version=1, repo="r", branch="b", commit=SHA1, seen_at=10**400)
    assert "field 'seen_at' is out of range" in refused(data)


@pytest.mark.parametrize(
    "data",
    [
        job_body(repo="\ud800"),
        job_body(unknown_field=["ok", "\udfff"]),
        body(type="request", schema_version=1, method="results", params={"repo": "a\udc80b"}),
        body(type="request", schema_version=1, method="results", params={"\ud83d": 1}),
    ],
)
def test_lone_surrogates_are_refused(data: bytes) -> None:
    # They cannot be encoded as UTF-8 again, so SQLite or a log line would choke later.
    assert refused(data) == "a string holds a lone UTF-16 surrogate"


def test_surrogate_pairs_are_fine() -> None:
    data = body(type="cancel_job", schema_version=1, job_id="j", attempt=1, reason="\U0001f600 done")
    assert b"\\ud83d\\ude00" in data
    assert decode(data) == CancelJob(job_id="j", attempt=1, reason="\U0001f600 done")


def test_missing_required_field() -> None:
    fields = json.loads(job_body())
    del fields["commit"]
    reason = refused(json.dumps(fields).encode())
    assert reason.startswith("job: ")
    assert "missing" in reason
    assert "'commit'" in reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (job_body(job_id="j" * 129), "job: field 'job_id' is not an id"),
        (job_body(job_id="\u4e00" * 1000), "job: field 'job_id' is not an id"),
        (job_body(lease="a b"), "job: field 'lease' is not an id"),
        (job_body(run="x\ny"), "job: field 'run' is not an id"),
        (body(type="heartbeat", schema_version=1, runner_id="r" * 200, session="s"), "heartbeat: field 'runner_id'"),
        (
            body(type="job_started", schema_version=1, job_id="j", attempt=1, runner_id="r1", session="s/../x"),
            "job_started: field 'session'",
        ),
        (job_body(repo="/srv/" + "\u4e00" * 400), "job: field 'repo' is longer than 1000 bytes"),
    ],
)
def test_ids_and_repositories_of_a_size_no_store_key_can_hold_are_refused(data: bytes, reason: str) -> None:
    # A job id, a lease or a repository is a key in the dispatcher's store: one
    # over an index entry's limit (about 2,700 bytes on PostgreSQL) would fail
    # the store for every message of its round.
    assert refused(data).startswith(reason)


def test_the_ids_volt_ci_makes_are_fine() -> None:
    shard = "0123456789abcdef.12"
    msg = decode(job_body(job_id=shard, run="0123456789abcdef", lease="f" * 32))
    assert isinstance(msg, Job) and (msg.job_id, msg.run) == (shard, "0123456789abcdef")
    assert decode(job_body(repo="https://git.example.com/" + "a" * 900 + ".git"))


@pytest.mark.parametrize("field", ["job_id", "repo", "branch"])
def test_required_text_must_not_be_empty(field: str) -> None:
    assert refused(job_body(**{field: ""})) == f"job: {field} must not be empty"


def test_attempt_must_be_positive() -> None:
    assert "attempt must be at least 1" in refused(job_body(attempt=0))


def test_unknown_status_is_refused() -> None:
    data = body(type="job_result", schema_version=1, job_id="j", attempt=1, runner_id="r", status="green")
    assert "unknown status 'green'" in refused(data)


def test_oversized_body_is_refused_before_parsing() -> None:
    padding = b" " * (MAX_MESSAGE_BYTES + 1 - len(job_body()))
    assert decode(job_body()[:-1] + padding[:-1] + b"}") is not None  # exactly at the limit: fine
    reason = refused(job_body() + padding)
    assert "too large" in reason
    assert str(MAX_MESSAGE_BYTES) in reason


def test_deeply_nested_json_is_refused_not_a_crash() -> None:
    assert "not UTF-8 JSON" in refused(b"[" * 200_000 + b"]" * 200_000)
    nested = b'{"type": "reply", "schema_version": 1, "ok": true, "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "not UTF-8 JSON" in refused(nested)


BAD_COMMITS = [
    "g" * 40,  # not hex
    "a" * 39,  # too short
    "a" * 41,  # too long
    "a" * 63,
    "a" * 65,
    "A" * 40,  # uppercase
    SHA1.upper(),
    SHA1[:12],  # abbreviated
    "",
    "$(touch /tmp/x)",
    "; rm -rf / #" + "a" * 28,
    "--upload-pack=touch /tmp/x",
    SHA1 + "\n",  # `$` in a regex would let this through
    " " + SHA1,
    SHA1[:-1] + "\u0660",  # a non-ASCII digit
    "HEAD",
    "main",
]


@pytest.mark.parametrize("commit", BAD_COMMITS)
def test_bad_commit_ids_are_refused(commit: str) -> None:
    assert "not a commit id" in refused(job_body(commit=commit))
    seen = body(type="commit_seen", schema_version=1, repo="r", branch="b", commit=commit, seen_at=1.0)
    assert "not a commit id" in refused(seen)


@pytest.mark.parametrize("commit", BAD_COMMITS)
def test_bad_commit_ids_cannot_be_constructed_either(commit: str) -> None:
    with pytest.raises(ValueError, match="not a commit id"):
        Job(job_id="j", attempt=1, repo="r", branch="b", commit=commit)


@pytest.mark.parametrize("commit", [SHA1, SHA256, "f" * 40, "0" * 64])
def test_good_commit_ids(commit: str) -> None:
    assert decode(job_body(commit=commit)).commit == commit  # type: ignore[attr-defined]


# -- fuzzing: decode() returns a Message or raises DecodeError, nothing else --


HINTS = {cls: typing.get_type_hints(cls) for cls in TYPES.values()}


def decodes_or_refuses(data: bytes) -> Message | None:
    try:
        msg = decode(data)
    except DecodeError:
        return None
    assert isinstance(msg, Message)
    # Whatever decodes is well-formed: it can be written as real UTF-8 (no lone
    # surrogates), its numbers fit SQLite and are finite, and it round-trips.
    json.dumps(msg.to_dict(), ensure_ascii=False).encode("utf-8")
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if HINTS[type(msg)][f.name] is Any:
            continue  # free-form (Reply.data): anything JSON holds
        if isinstance(value, float):
            assert math.isfinite(value), f.name
        elif isinstance(value, int):
            assert -(2**63) <= value < 2**63, f.name
    assert decode(msg.to_json()) == msg
    return msg


# Every code point, lone surrogates included (json.dumps escapes them).
any_text = st.text(st.characters() | st.sampled_from("\ud800\udbff\udc00\udfff"), max_size=20)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities too: json.dumps writes them, json.loads reads them
    | any_text
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=10,
)

# Per field, a value of the right type most of the time, so that random
# messages get past the type checks and exercise the constructors too.
RIGHT_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "commit": st.sampled_from([SHA1, SHA256, SHA1.upper(), SHA1[:-1], "", "$(touch /tmp/x)"]),
    "status": st.sampled_from(["passed", "failed", "error", "timeout", "cancelled", "green", ""]),
    "attempt": st.integers(min_value=-1, max_value=3),
}
RIGHT_BY_TYPE: dict[Any, st.SearchStrategy[Any]] = {
    str: st.text(max_size=10) | any_text,
    int: st.integers(min_value=-5, max_value=2**40) | st.integers(min_value=2**63 - 2, max_value=2**63 + 1),
    float: st.floats(),  # NaN and infinities are floats too
    bool: st.booleans(),
    int | None: st.none() | st.integers(min_value=-255, max_value=255),
    list[str]: st.lists(st.text(max_size=5), max_size=3),
    list[str] | None: st.none() | st.lists(st.text(max_size=5), max_size=3),
    list[list[Any]]: st.lists(st.lists(json_leaves, max_size=3), max_size=3),
    dict[str, Any]: st.dictionaries(st.text(max_size=5), json_leaves, max_size=3),
    Any: json_leaves,
}
FIELD_NAMES = sorted({f.name for cls in TYPES.values() for f in dataclasses.fields(cls)})


VALID = {type(m): m.to_dict() for m in SAMPLES}


@st.composite
def typed_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A message object of a real type: a valid one with a few fields changed,
    or one made field by field, mostly with values of the right type."""
    cls = draw(st.sampled_from(sorted(TYPES.values(), key=lambda c: c.TYPE)))
    names = [f.name for f in dataclasses.fields(cls)]

    def value_for(name: str) -> Any:
        return draw(RIGHT_BY_NAME.get(name, RIGHT_BY_TYPE[HINTS[cls][name]]))

    if draw(st.booleans()):
        obj = dict(VALID[cls])
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.sampled_from(names))
            change = draw(st.sampled_from(["right", "junk", "delete"]))
            if change == "delete":
                obj.pop(name, None)
            else:
                obj[name] = value_for(name) if change == "right" else draw(json_leaves)
    else:
        obj = {name: value_for(name) for name in names}
    obj.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), json_leaves, max_size=2)))
    obj["type"] = cls.TYPE
    obj["schema_version"] = draw(st.sampled_from([SCHEMA_VERSION] * 8 + [0, 2, "1", True, None]))
    return obj


FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(FUZZ, max_examples=2000)
@given(json_values)
def test_fuzz_random_json(value: Any) -> None:
    decodes_or_refuses(json.dumps(value).encode())


@FUZZ
@given(typed_objects())
def test_fuzz_messages_with_a_valid_type_and_random_fields(obj: dict[str, Any]) -> None:
    msg = decodes_or_refuses(json.dumps(obj).encode())
    if msg is not None:
        assert msg.TYPE == obj["type"]


@settings(FUZZ, max_examples=1000)
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_mangled_real_messages(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(msg.to_json())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    decodes_or_refuses(bytes(raw))


def test_fuzz_finds_successful_decodes_too() -> None:
    # Guards the fuzz tests against only ever exercising the early refusals.
    found = []

    @settings(max_examples=500, deadline=None, database=None, derandomize=True)
    @given(typed_objects())
    def probe(obj: dict[str, Any]) -> None:
        if decodes_or_refuses(json.dumps(obj).encode()) is not None:
            found.append(obj["type"])

    probe()
    assert len(found) >= 50
    assert len(set(found)) >= len(TYPES) // 2


@pytest.mark.parametrize("labels", [["has space"], ["-leading"], [""], ["x" * 65], [f"l{i}" for i in range(33)]])
def test_bad_labels_are_refused(labels: list[str]) -> None:
    with pytest.raises(DecodeError, match="label"):
        decode(job_body(labels=labels))
    with pytest.raises(ValueError, match="label"):
        CommitSeen(repo="/r", branch="main", commit=SHA1, seen_at=1.0, labels=labels)


def test_an_unknown_runner_command_is_refused() -> None:
    raw = {"type": "runner_command", "schema_version": SCHEMA_VERSION, "action": "reboot"}
    with pytest.raises(DecodeError, match="unknown runner command 'reboot'"):
        decode(json.dumps(raw).encode())
