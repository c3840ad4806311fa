"""The together judge against a real HTTP server on 127.0.0.1 standing in for Together."""

from __future__ import annotations

import socket
import time

import pytest
from fake_together_server import FakeTogetherServer, Reply, completion, error_body

from vqabench.judges import (
    Grade,
    JudgeAuthError,
    JudgeItem,
    JudgeQuotaError,
    JudgeRequestError,
    JudgeUnavailableError,
    JudgmentCache,
    cached_compare,
    judge_items,
    make_judge,
    score,
)
from vqabench.judges.cache import CachedJudge
from vqabench.judges.together import COMPARE_SYSTEM_PROMPT, GRADE_SYSTEM_PROMPT, TogetherJudge
from vqabench.spec import JudgeSpec

ITEMS = [
    JudgeItem("What shape is in the image?", "circle", "circle"),
    JudgeItem("What color is the shape?", "red", "blue"),
    JudgeItem("Is there a triangle?", "yes", "yes"),
    JudgeItem("What shape is in the image?", "square", "rectangle"),
]


def make(server: FakeTogetherServer, **options) -> TogetherJudge:
    settings = dict(
        api_key="test-key",
        base_url=server.base_url,
        concurrency=1,
        requests_per_minute=60_000,
        max_attempts=3,
        timeout_s=5.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    settings.update(options)
    return TogetherJudge("meta-llama/Llama-3-8b-chat-hf", **settings)


def always(reply: Reply):
    return lambda _request: reply


def test_grades_follow_the_replies_and_the_request_carries_the_prompt():
    with FakeTogetherServer() as server:
        verdicts = make(server).grade(ITEMS)
    assert [v.grade for v in verdicts] == [Grade.CORRECT, Grade.INCORRECT, Grade.CORRECT, Grade.INCORRECT]
    assert verdicts[0].reply == "GRADE: CORRECT"
    request = server.chat_requests[0]
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.body["model"] == "meta-llama/Llama-3-8b-chat-hf"
    assert request.body["temperature"] == 0
    assert request.body["messages"][0]["content"] == GRADE_SYSTEM_PROMPT
    assert "STUDENT ANSWER: circle" in request.body["messages"][1]["content"]


def test_rate_limit_waits_at_least_retry_after_then_succeeds():
    script = [Reply(429, error_body("rate limit reached, slow down"), {"Retry-After": "1"})]
    with FakeTogetherServer(script) as server:
        verdicts = make(server).grade(ITEMS[:1])
    assert [v.grade for v in verdicts] == [Grade.CORRECT]
    first, second = server.chat_requests
    assert second.started - first.finished >= 0.95  # backoff alone would be ~0.02 s


def test_server_error_forever_gives_up_after_max_attempts_and_caches_nothing(tmp_path):
    with (
        FakeTogetherServer(responder=always(Reply(500, error_body("boom")))) as server,
        JudgmentCache(tmp_path / "judgments.db") as cache,
    ):
        with pytest.raises(JudgeUnavailableError) as caught:
            judge_items(make(server, max_attempts=3), ITEMS, cache=cache)
        assert len(cache) == 0
    assert len(server.chat_requests) == 3
    message = str(caught.value)
    assert "gave up after 3 attempts" in message and "HTTP 500" in message and "max_attempts" in message


def test_unauthorized_fails_after_exactly_one_request_even_with_concurrency():
    with (
        FakeTogetherServer(responder=always(Reply(401, error_body("invalid api key")))) as server,
        pytest.raises(JudgeAuthError) as caught,
    ):
        make(server, concurrency=4).grade(ITEMS)
    assert len(server.chat_requests) == 1
    assert "TOGETHER_API_KEY" in str(caught.value) and "401" in str(caught.value)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(402, error_body("Credit limit exceeded")),
        Reply(429, error_body("You exceeded your current quota, please check your billing")),
        Reply(429, error_body("slow down"), {"Retry-After": "3600"}),
    ],
)
def test_quota_errors_fail_at_once(reply):
    with FakeTogetherServer(responder=always(reply)) as server, pytest.raises(JudgeQuotaError) as caught:
        make(server).grade(ITEMS)
    assert len(server.chat_requests) == 1
    assert "cached" in str(caught.value)


def test_unknown_model_fails_at_once_naming_the_setting():
    with (
        FakeTogetherServer(responder=always(Reply(404, error_body("model not found")))) as server,
        pytest.raises(JudgeRequestError) as caught,
    ):
        make(server).grade(ITEMS)
    assert len(server.chat_requests) == 1
    assert "judge.model" in str(caught.value) and "model not found" in str(caught.value)


def test_cached_judgments_cost_zero_requests(tmp_path):
    path = tmp_path / "judgments.db"
    with FakeTogetherServer() as server:
        with JudgmentCache(path) as cache:
            first = judge_items(make(server), ITEMS, cache=cache)
        assert len(server.chat_requests) == len(ITEMS)
        with JudgmentCache(path) as cache:  # a new process would open the file again
            progress = []
            again = judge_items(
                make(server), ITEMS, cache=cache, on_progress=lambda done, total: progress.append((done, total))
            )
    assert len(server.chat_requests) == len(ITEMS)
    assert again == first
    assert progress[-1] == (len(ITEMS), len(ITEMS))


def test_identical_items_in_one_batch_are_asked_once(tmp_path):
    items = [ITEMS[0]] * 5 + [ITEMS[1]] * 3
    with FakeTogetherServer() as server, JudgmentCache(tmp_path / "j.db") as cache:
        verdicts = judge_items(make(server, concurrency=2), items, cache=cache)
    assert len(server.chat_requests) == 2
    assert [v.grade for v in verdicts] == [Grade.CORRECT] * 5 + [Grade.INCORRECT] * 3


def test_interrupted_judging_resumes_without_paying_again(tmp_path):
    path = tmp_path / "judgments.db"
    outage = [Reply(200, completion("GRADE: CORRECT")), Reply(200, completion("GRADE: INCORRECT"))]
    outage += [Reply(503, error_body("overloaded"))] * 2
    with FakeTogetherServer(outage) as server, JudgmentCache(path) as cache:
        with pytest.raises(JudgeUnavailableError):
            judge_items(make(server, max_attempts=2), ITEMS, cache=cache)
        assert len(cache) == 2
    with FakeTogetherServer() as server, JudgmentCache(path) as cache:
        verdicts = judge_items(make(server), ITEMS, cache=cache)
    asked = [r.body["messages"][1]["content"] for r in server.chat_requests]
    assert len(asked) == 2 and all("STUDENT ANSWER: yes" in a or "rectangle" in a for a in asked)
    assert [v.grade for v in verdicts] == [Grade.CORRECT, Grade.INCORRECT, Grade.CORRECT, Grade.INCORRECT]


def test_malformed_and_empty_replies_count_as_unparseable_without_crashing(tmp_path):
    script = [
        Reply(200, completion("I think the student is right.")),
        Reply(200, completion("")),
        Reply(200, completion(None)),
        Reply(200, "<html>not json</html>"),
        Reply(200, {}),
        Reply(200, completion("GRADE: CORRECT")),
    ]
    items = [JudgeItem(f"question {i}", "red", "red") for i in range(len(script))]
    with FakeTogetherServer(script) as server:
        verdicts = make(server).grade(items)
    summary = score(verdicts)
    assert [v.grade for v in verdicts] == [Grade.UNPARSEABLE] * 5 + [Grade.CORRECT]
    assert (summary.n, summary.unparseable, summary.score) == (6, 5, 1.0)


def test_empty_prediction_is_incorrect_without_a_request():
    with FakeTogetherServer() as server:
        verdicts = make(server).grade([JudgeItem("q", "red", "  ")])
    assert [v.grade for v in verdicts] == [Grade.INCORRECT]
    assert server.chat_requests == []


def test_concurrency_limit_is_respected():
    items = [JudgeItem(f"question {i}", "red", "red") for i in range(10)]
    with FakeTogetherServer(delay_s=0.15) as server:
        verdicts = make(server, concurrency=3).grade(items)
    assert all(v.grade is Grade.CORRECT for v in verdicts)
    assert server.max_in_flight == 3


def test_requests_per_minute_spaces_request_starts():
    items = [JudgeItem(f"question {i}", "red", "red") for i in range(6)]
    with FakeTogetherServer() as server:
        make(server, concurrency=4, requests_per_minute=600).grade(items)  # one per 0.1 s
    starts = sorted(r.started for r in server.chat_requests)
    assert len(starts) == 6 and starts[-1] - starts[0] >= 0.45  # unlimited, they take ~0.01 s


def test_timeout_is_retried():
    with FakeTogetherServer([Reply(200, completion("GRADE: CORRECT"), delay_s=1.0)]) as server:
        started = time.monotonic()
        verdicts = make(server, timeout_s=0.3).grade([JudgeItem("q", "red", "blue")])
        took = time.monotonic() - started
    assert [v.grade for v in verdicts] == [Grade.INCORRECT]  # the second, prompt reply
    assert len(server.chat_requests) == 2 and took < 0.95


def test_refused_connection_gives_up_with_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = TogetherJudge(
        "m",
        api_key="k",
        base_url=f"http://127.0.0.1:{port}",
        max_attempts=2,
        requests_per_minute=60_000,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        timeout_s=2.0,
    )
    with pytest.raises(JudgeUnavailableError) as caught:
        judge.grade(ITEMS[:1])
    assert "gave up after 2 attempts" in str(caught.value) and "could not connect" in str(caught.value)


def test_base_url_ending_in_v1_reaches_the_same_endpoint():
    with FakeTogetherServer() as server:
        judge = TogetherJudge("m", api_key="k", base_url=server.base_url + "/v1/")
        assert [v.grade for v in judge.grade(ITEMS[:1])] == [Grade.CORRECT]
    assert server.chat_requests[0].path == "/v1/chat/completions"


def test_missing_api_key_is_one_clear_sentence(monkeypatch):
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    with pytest.raises(JudgeAuthError, match="set TOGETHER_API_KEY"):
        TogetherJudge("m")


def test_auto_judge_uses_together_when_a_key_is_set(monkeypatch, tmp_path):
    monkeypatch.setenv("TOGETHER_API_KEY", "from-env")
    with FakeTogetherServer() as server:
        spec = JudgeSpec(name="auto", base_url=server.base_url, requests_per_minute=6000)
        judge = make_judge(spec, cache_path=tmp_path / "judgments.db")
        assert isinstance(judge, CachedJudge) and isinstance(judge.inner, TogetherJudge)
        assert judge.name == "together" and judge.model == spec.model
        judge.grade(ITEMS[:1])
        judge.grade(ITEMS[:1])
    assert len(server.chat_requests) == 1
    assert server.chat_requests[0].headers["authorization"] == "Bearer from-env"


def test_pairwise_comparison_is_parsed_and_cached(tmp_path):
    with FakeTogetherServer() as server, JudgmentCache(tmp_path / "j.db") as cache:
        compare = cached_compare(make(server), cache)
        assert compare("What color?", "red", "red", "blue") == "A"
        assert compare("What color?", "red", "blue", "red") == "B"
        assert compare("What color?", "red", "red", "blue") == "A"
    assert len(server.chat_requests) == 2
    assert server.chat_requests[0].body["messages"][0]["content"] == COMPARE_SYSTEM_PROMPT


def test_judging_stopped_by_the_user_keeps_what_was_judged(tmp_path):
    items = [JudgeItem(f"question {i}", "red", "red") for i in range(8)]

    def stop_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with FakeTogetherServer(delay_s=0.05) as server, JudgmentCache(tmp_path / "j.db") as cache:
        with pytest.raises(KeyboardInterrupt):
            judge_items(make(server, concurrency=2), items, cache=cache, on_progress=stop_after_three)
        kept = len(cache)
        asked_before = len(server.chat_requests)
        judge_items(make(server, concurrency=2), items, cache=cache)
    assert kept == 3
    assert len(server.chat_requests) - asked_before == len(items) - kept


def test_an_unparseable_reply_is_not_cached_and_is_asked_again(tmp_path):
    path = tmp_path / "judgments.db"
    junk = Reply(200, completion("I'm sorry, the service is busy right n"))  # a transient, truncated reply
    with FakeTogetherServer([junk]) as server:
        with JudgmentCache(path) as cache:
            [first] = judge_items(make(server), ITEMS[:1], cache=cache)
            assert first.grade is Grade.UNPARSEABLE and len(cache) == 0
        with JudgmentCache(path) as cache:
            [again] = judge_items(make(server), ITEMS[:1], cache=cache)
            assert again.grade is Grade.CORRECT and len(cache) == 1
        with JudgmentCache(path) as cache:
            judge_items(make(server), ITEMS[:1], cache=cache)
    assert len(server.chat_requests) == 2  # the junk reply, the real verdict; then the cache answers
