"""The openai judge against a real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol."""

from __future__ import annotations

import json
import socket
import time

import pytest
from fake_together_server import FakeTogetherServer, Reply, completion, error_body

from vqabench.judges import (
    Grade,
    JudgeAuthError,
    JudgeError,
    JudgeItem,
    JudgeRequestError,
    JudgeUnavailableError,
    JudgmentCache,
    judge_items,
    make_judge,
    resolve_judge_name,
)
from vqabench.judges.cache import CachedJudge
from vqabench.judges.llm import GRADE_SYSTEM_PROMPT
from vqabench.judges.openai_compatible import PLACEHOLDER_KEY, OpenAICompatibleJudge
from vqabench.spec import JudgeSpec, SpecError, spec_from_dict

SERVED = "Qwen/Qwen2.5-0.5B-Instruct"
ITEMS = [
    JudgeItem("What shape is in the image?", "circle", "circle"),
    JudgeItem("What color is the shape?", "red", "blue"),
]


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "TOGETHER_API_KEY", "VQABENCH_JUDGE_URL", "VQABENCH_JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)


def make(server: FakeTogetherServer, model: str = SERVED, **options) -> OpenAICompatibleJudge:
    settings = dict(
        base_url=server.base_url + "/v1",
        concurrency=1,
        requests_per_minute=60_000,
        max_attempts=3,
        timeout_s=5.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    settings.update(options)
    return OpenAICompatibleJudge(model, **settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_grades_with_the_shared_prompt_and_a_placeholder_key_when_none_is_set():
    with FakeTogetherServer(models=[SERVED]) as server:
        verdicts = make(server, base_url=server.base_url).grade(ITEMS)  # a bare host gets /v1
    assert [v.grade for v in verdicts] == [Grade.CORRECT, Grade.INCORRECT]
    request = server.chat_requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"
    assert request.body["model"] == SERVED and request.body["temperature"] == 0
    assert request.body["messages"][0]["content"] == GRADE_SYSTEM_PROMPT


def test_the_key_comes_from_openai_api_key_or_the_variable_api_key_env_names(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-mine")
    with FakeTogetherServer() as server:
        make(server).grade(ITEMS[:1])
        make(server, api_key_env="MY_JUDGE_KEY").grade(ITEMS[:1])
    assert [r.headers["authorization"] for r in server.chat_requests] == ["Bearer sk-default", "Bearer sk-mine"]
    with (
        FakeTogetherServer(responder=lambda _request: Reply(401, error_body("bad key"))) as server,
        pytest.raises(JudgeAuthError, match=r"rejected the API key with HTTP 401 .*; set OPENAI_API_KEY to a key"),
    ):
        make(server, concurrency=4).grade(ITEMS)
    assert len(server.chat_requests) == 1
    with pytest.raises(JudgeAuthError, match=r"judge\.api_key_env names NOT_SET_ANYWHERE, which is not set"):
        OpenAICompatibleJudge("m", base_url="http://127.0.0.1:1/v1", api_key_env="NOT_SET_ANYWHERE")


def test_rate_limit_waits_at_least_retry_after_then_succeeds():
    script = [Reply(429, error_body("rate limit reached"), {"Retry-After": "1"})]
    with FakeTogetherServer(script) as server:
        verdicts = make(server).grade(ITEMS[:1])
    assert [v.grade for v in verdicts] == [Grade.CORRECT]
    first, second = server.chat_requests
    assert second.started - first.finished >= 0.95  # backoff alone would be ~0.02 s


def test_server_errors_are_retried_until_a_reply_comes():
    script = [Reply(500, error_body("boom")), Reply(503, error_body("loading model"))]
    with FakeTogetherServer(script) as server:
        verdicts = make(server).grade(ITEMS[:1])
    assert [v.grade for v in verdicts] == [Grade.CORRECT]
    assert len(server.chat_requests) == 3


def test_a_slow_reply_times_out_and_is_asked_again():
    with FakeTogetherServer([Reply(200, completion("GRADE: CORRECT"), delay_s=1.0)]) as server:
        started = time.monotonic()
        verdicts = make(server, timeout_s=0.3).grade([JudgeItem("q", "red", "blue")])
        took = time.monotonic() - started
    assert [v.grade for v in verdicts] == [Grade.INCORRECT]  # the second, prompt reply
    assert len(server.chat_requests) == 2 and took < 0.95


def test_garbage_replies_are_unparseable_and_not_cached(tmp_path):
    script = [
        Reply(200, completion("Sure! Here is my assessment of the answer")),
        Reply(200, "<html>bad gateway</html>"),
        Reply(200, {}),
        Reply(200, completion(None)),
    ]
    items = [JudgeItem(f"question {i}", "red", "red") for i in range(len(script))]
    with FakeTogetherServer(script) as server, JudgmentCache(tmp_path / "j.db") as cache:
        verdicts = judge_items(make(server), items, cache=cache)
        assert len(cache) == 0
        again = judge_items(make(server), items, cache=cache)  # the perfect judge answers now
    assert [v.grade for v in verdicts] == [Grade.UNPARSEABLE] * 4
    assert [v.grade for v in again] == [Grade.CORRECT] * 4


def test_a_model_the_server_does_not_serve_is_one_sentence_naming_model_and_server():
    with (
        FakeTogetherServer(models=[SERVED]) as server,
        pytest.raises(JudgeRequestError) as caught,
    ):
        make(server, model="llama3:8b", concurrency=4).grade(ITEMS)
    message = str(caught.value)
    assert len(server.chat_requests) == 1  # fails at once, not after retries
    assert "'llama3:8b'" in message and f"{server.base_url}/v1" in message and "judge.model" in message
    assert "\n" not in message and message.endswith(".") and message.count("; ") == 1


def test_an_unreachable_server_is_one_sentence_after_the_allowed_attempts():
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = OpenAICompatibleJudge(
        "m", base_url=url, max_attempts=2, requests_per_minute=60_000, backoff_initial_s=0.01, backoff_max_s=0.02
    )
    with pytest.raises(JudgeUnavailableError) as caught:
        judge.grade(ITEMS[:1])
    message = str(caught.value)
    assert message.startswith(f"The openai judge could not reach {url} in 2 attempts (could not connect")
    assert "VQABENCH_JUDGE_URL" in message and "\n" not in message


def test_auto_picks_the_server_in_vqabench_judge_url_with_its_model(monkeypatch, tmp_path):
    assert resolve_judge_name("auto") == "semantic"
    with FakeTogetherServer(models=[SERVED]) as server:
        monkeypatch.setenv("VQABENCH_JUDGE_URL", server.base_url + "/v1")
        monkeypatch.setenv("VQABENCH_JUDGE_MODEL", SERVED)
        spec = JudgeSpec(name="auto", requests_per_minute=6000)
        judge = make_judge(spec, cache_path=tmp_path / "judgments.db")
        assert isinstance(judge, CachedJudge) and isinstance(judge.inner, OpenAICompatibleJudge)
        assert (judge.name, judge.model) == ("openai", SERVED)
        judge.grade(ITEMS)
        judge.grade(ITEMS)
        monkeypatch.setenv("TOGETHER_API_KEY", "k")
        assert resolve_judge_name("auto") == "together"  # Together's key comes first
    assert len(server.chat_requests) == 2  # the second batch came from the cache


def test_openai_without_a_server_and_bad_settings_are_one_sentence():
    with pytest.raises(JudgeError, match=r"needs a server: set judge.base_url .* or VQABENCH_JUDGE_URL\.$"):
        make_judge(JudgeSpec(name="openai"))
    with pytest.raises(JudgeError, match="not an http:// or https:// URL"):
        make_judge(JudgeSpec(name="openai", base_url="localhost:8000"))
    base = {"name": "r", "method": "sft"}
    assert spec_from_dict({**base, "judge": {"name": "openai", "base_url": "http://h:1/v1"}}).judge.name == "openai"
    with pytest.raises(SpecError, match=r"^p\.toml: judge 'openai' needs its server: set key 'judge\.base_url'"):
        spec_from_dict({**base, "judge": "openai"}, "p.toml")
    with pytest.raises(SpecError, match=r"key 'judge.base_url' has value 'localhost:11434'"):
        spec_from_dict({**base, "judge": {"name": "openai", "base_url": "localhost:11434"}}, "p.toml")
    with pytest.raises(SpecError, match=r"key 'judge.api_key_env' has value 'MY KEY'"):
        spec_from_dict({**base, "judge": {"name": "auto", "api_key_env": "MY KEY"}}, "p.toml")
    with pytest.raises(SpecError, match="only the openai judge reads its key from it"):
        spec_from_dict({**base, "judge": {"name": "together", "api_key_env": "K"}}, "p.toml")


def test_an_unreachable_judge_after_training_keeps_em_f1_and_the_answers(tmp_path):
    from types import SimpleNamespace

    from vqabench.engine.answers import score_answers
    from vqabench.engine.progress import Throttled

    url = f"http://127.0.0.1:{free_port()}/v1"
    spec = spec_from_dict(
        {"name": "r", "method": "sft", "judge": {"name": "openai", "base_url": url, "max_attempts": 1}}
    )
    pairs = [SimpleNamespace(image_id=i, question="What color?", chosen="red") for i in range(2)]
    predictions = tmp_path / "predictions.jsonl"
    summary = score_answers(spec, pairs, ["red", "blue"], tmp_path, predictions, Throttled(lambda _event: None))
    assert (summary.n, summary.em, summary.judge_score) == (2, 0.5, None)
    assert summary.extra["judge_error"].startswith(f"The openai judge could not reach {url} in 1 attempt (")
    assert [json.loads(line)["prediction"] for line in predictions.read_text().splitlines()] == ["red", "blue"]
