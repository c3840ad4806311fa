"""The `together` judge: the paper's LLM grader through Together's chat completions API.

The `together` client's own retries are off (``max_retries=0``); tenacity is the only retry
layer. Rate limits (429), server errors (5xx), timeouts and connection errors are retried
with exponential backoff and jitter, never sooner than a ``Retry-After`` the server sends;
bad credentials, exhausted quota and rejected requests fail at once. A thread pool bounds
the requests in flight and a shared limiter spaces request starts to `requests_per_minute`.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

if TYPE_CHECKING:
    from together.types.chat import ChatCompletionMessageParam

from vqabench.judges.base import (
    Grade,
    Judge,
    JudgeAuthError,
    JudgeError,
    JudgeItem,
    JudgeQuotaError,
    JudgeRequestError,
    JudgeUnavailableError,
    Preference,
    Verdict,
    VerdictCallback,
)
from vqabench.spec import JudgeSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL = "meta-llama/Llama-3-8b-chat-hf"
API_KEY_VARIABLE = "TOGETHER_API_KEY"
#: A Retry-After longer than this is not waited out: the judge stops and says when to rerun.
MAX_RETRY_AFTER_S = 120.0
GRADE_MAX_TOKENS = 32
COMPARE_MAX_TOKENS = 32

#: Bump whenever GRADE_SYSTEM_PROMPT or grade_messages change: it is part of the cache key.
PROMPT_VERSION = "quiz-grade-v1"
GRADE_SYSTEM_PROMPT = (
    "You are a teacher grading a quiz. For each question you are shown the true answer and "
    "a student's answer. Grade the student's answer on factual accuracy only: ignore "
    "differences in wording, spelling, capitalisation and punctuation, and accept extra "
    "words as long as they do not contradict the true answer. Reply with exactly one line, "
    "either GRADE: CORRECT or GRADE: INCORRECT, and nothing else."
)

#: Bump whenever COMPARE_SYSTEM_PROMPT or compare_messages change.
COMPARE_PROMPT_VERSION = "quiz-compare-v1"
COMPARE_SYSTEM_PROMPT = (
    "You are a teacher comparing two students' answers to the same quiz question against "
    "the true answer. Judge factual accuracy only, ignoring wording and punctuation. Reply "
    "with exactly one line: WINNER: A if answer A is more accurate, WINNER: B if answer B "
    "is more accurate, or WINNER: TIE if they are equally accurate."
)

_GRADE_LINE = re.compile(r"\bgrade\b[\W_]*(not[\W_]+|in)?correct\b", re.IGNORECASE)
_BARE_GRADE = re.compile(r"[\W_]*(in)?correct[\W_]*", re.IGNORECASE)
_NEGATIVE_WORD = re.compile(r"\bincorrect\b|\bnot[\W_]+correct\b", re.IGNORECASE)
_WINNER_LINE = re.compile(r"\bwinner\b[\W_]*(a|b|tie)\b", re.IGNORECASE)
_BARE_WINNER = re.compile(r"[\W_]*(a|b|tie)[\W_]*", re.IGNORECASE)
_QUOTA_WORDS = re.compile(r"quota|credit|billing|balance|insufficient|payment|spend", re.IGNORECASE)


def grade_messages(item: JudgeItem) -> list[ChatCompletionMessageParam]:
    """The chat messages that ask for one grade."""
    return [
        {"role": "system", "content": GRADE_SYSTEM_PROMPT},
        {
            "role": "user",
            "content": (f"QUESTION: {item.question}\nTRUE ANSWER: {item.reference}\nSTUDENT ANSWER: {item.prediction}"),
        },
    ]


def compare_messages(question: str, reference: str, answer_a: str, answer_b: str) -> list[ChatCompletionMessageParam]:
    """The chat messages that ask which of two answers is better."""
    return [
        {"role": "system", "content": COMPARE_SYSTEM_PROMPT},
        {
            "role": "user",
            "content": (f"QUESTION: {question}\nTRUE ANSWER: {reference}\nANSWER A: {answer_a}\nANSWER B: {answer_b}"),
        },
    ]


def parse_grade(reply: str | None) -> Grade:
    """Read a grade from a judge's reply; anything doubtful is UNPARSEABLE, never CORRECT.

    Accepted: ``GRADE:`` followed by CORRECT / INCORRECT / NOT CORRECT (any case, markdown
    or punctuation around it), or a reply that is only the word CORRECT or INCORRECT.
    Several GRADE lines that disagree are UNPARSEABLE, and so is a CORRECT grade in a
    reply that also says "incorrect" or "not correct" anywhere. A sentence without a GRADE
    line ("The answer is correct") is UNPARSEABLE: the prompt asks for the line, and
    guessing from prose is how a negation slips through as CORRECT.
    """
    text = (reply or "").strip()
    if not text:
        return Grade.UNPARSEABLE
    grades = {Grade.INCORRECT if m.group(1) else Grade.CORRECT for m in _GRADE_LINE.finditer(text)}
    if not grades:
        bare = _BARE_GRADE.fullmatch(text)
        if bare is None:
            return Grade.UNPARSEABLE
        return Grade.INCORRECT if bare.group(1) else Grade.CORRECT
    if len(grades) > 1:
        return Grade.UNPARSEABLE
    grade = grades.pop()
    if grade is Grade.CORRECT and _NEGATIVE_WORD.search(text):
        return Grade.UNPARSEABLE
    return grade


def parse_preference(reply: str | None) -> Preference:
    """Read ``WINNER: A|B|TIE`` (or a bare A, B or TIE); disagreeing or missing is unparseable."""
    text = (reply or "").strip()
    found = {m.group(1).upper() for m in _WINNER_LINE.finditer(text)}
    if not found:
        bare = _BARE_WINNER.fullmatch(text)
        found = {bare.group(1).upper()} if bare else set()
    if len(found) != 1:
        return "unparseable"
    choice = found.pop()
    return "tie" if choice == "TIE" else choice  # type: ignore[return-value]


class RequestRateLimiter:
    """Spaces request starts evenly to at most `per_minute`, across threads; can be paused."""

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute
        self._next_start = 0.0
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> None:
        """Wait for this request's slot (or until `stop` is set)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self.interval
        if start > now:
            stop.wait(start - now)

    def defer(self, seconds: float) -> None:
        """Start no request for `seconds` from now (a server's Retry-After applies to all)."""
        with self._lock:
            self._next_start = max(self._next_start, time.monotonic() + seconds)


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """The wait a failed response asks for (Retry-After-Ms or Retry-After), in seconds."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _api_errors() -> Any:
    import together

    return together


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt: 408, 409, 429 and 5xx statuses, timeouts, connection errors."""
    together = _api_errors()
    if isinstance(exc, together.APIConnectionError):  # APITimeoutError is a subclass
        return True
    if isinstance(exc, together.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def _failure_text(exc: BaseException | None, timeout_s: float) -> str:
    """A short description of a failed request for an error sentence."""
    if exc is None:
        return "no error recorded"
    together = _api_errors()
    if isinstance(exc, together.APITimeoutError):
        return f"no reply within {timeout_s:g} s"
    if isinstance(exc, together.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"could not connect ({type(cause).__name__})"
    if isinstance(exc, together.APIStatusError):
        body = exc.body
        detail = ""
        if isinstance(body, dict):
            error = body.get("error")
            detail = str(error.get("message", "")) if isinstance(error, dict) else str(error or body.get("message", ""))
        elif body:
            detail = str(body)
        detail = " ".join(detail.split())[:160]
        reason = exc.response.reason_phrase
        return f"HTTP {exc.status_code} {reason}" + (f" ({detail})" if detail else "")
    return f"{type(exc).__name__}: {exc}"


class TogetherJudge(Judge):
    """Asks an LLM on Together (or any server speaking its API) to grade each answer."""

    name = "together"
    prompt_version = PROMPT_VERSION
    compare_version = COMPARE_PROMPT_VERSION

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        concurrency: int = 4,
        requests_per_minute: float = 60,
        max_attempts: int = 6,
        timeout_s: float = 60.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        api_key = api_key or os.environ.get(API_KEY_VARIABLE)
        if not api_key:
            raise JudgeAuthError(
                f"The together judge needs an API key: set {API_KEY_VARIABLE}, "
                "or choose judge 'semantic' to judge offline."
            )
        if concurrency < 1 or requests_per_minute <= 0 or max_attempts < 1 or timeout_s <= 0:
            raise JudgeError(
                f"The together judge needs concurrency, requests_per_minute, max_attempts and "
                f"timeout_s above 0, not {concurrency}, {requests_per_minute}, {max_attempts}, {timeout_s}."
            )
        import together

        self.model = model
        # the client appends /v1/chat/completions itself, so a base URL ending in /v1 is trimmed
        self.base_url = re.sub(r"/v1/?$", "", base_url.rstrip("/")) if base_url else None
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.limiter = RequestRateLimiter(requests_per_minute)
        self._backoff = wait_exponential(multiplier=backoff_initial_s, max=backoff_max_s) + wait_random(
            0, backoff_initial_s
        )
        self._client = together.Together(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=timeout_s)
        self._counter_lock = threading.Lock()
        self.requests_sent = 0  # HTTP requests started, retries included

    @classmethod
    def from_spec(cls, spec: JudgeSpec, api_key: str | None = None) -> TogetherJudge:
        """Build from a vqabench.spec.JudgeSpec."""
        return cls(
            spec.model,
            api_key=api_key,
            base_url=spec.base_url,
            concurrency=spec.concurrency,
            requests_per_minute=spec.requests_per_minute,
            max_attempts=spec.max_attempts,
            timeout_s=spec.timeout_s,
        )

    @property
    def where(self) -> str:
        return self.base_url or "Together's API"

    def grade(self, items: Sequence[JudgeItem], on_verdict: VerdictCallback | None = None) -> list[Verdict]:
        """Grade items concurrently; an empty prediction is INCORRECT without a request.

        The first request goes alone, so a bad key, model or URL costs one request; then up
        to `concurrency` requests are in flight, started no faster than the rate limit.
        """
        verdicts: list[Verdict | None] = [None] * len(items)

        def deliver(index: int, verdict: Verdict) -> None:
            verdicts[index] = verdict
            if on_verdict is not None:
                on_verdict(index, verdict)

        asked = []
        for index, item in enumerate(items):
            if item.prediction.strip():
                asked.append(index)
            else:
                deliver(index, Verdict(Grade.INCORRECT))
        if not asked:
            return [v for v in verdicts if v is not None]
        stop = threading.Event()
        # one request alone first: a bad key, model or URL then costs exactly one request
        first = asked[0]
        reply = self._ask(grade_messages(items[first]), GRADE_MAX_TOKENS, stop)
        deliver(first, Verdict(parse_grade(reply), reply=reply))
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="together-judge")
        try:
            pending: dict[Future[str], int] = {
                pool.submit(self._ask, grade_messages(items[i]), GRADE_MAX_TOKENS, stop): i for i in asked[1:]
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    reply = future.result()
                    deliver(index, Verdict(parse_grade(reply), reply=reply))
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [v for v in verdicts if v is not None]

    def compare(self, question: str, reference: str, answer_a: str, answer_b: str) -> Preference:
        reply = self._ask(
            compare_messages(question, reference, answer_a, answer_b), COMPARE_MAX_TOKENS, threading.Event()
        )
        return parse_preference(reply)

    def _wait(self, retry_state: RetryCallState) -> float:
        """Exponential backoff with jitter, but never shorter than the server's Retry-After."""
        backoff = self._backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return max(backoff, retry_after_seconds(exc) or 0.0)

    def _ask(self, messages: list[ChatCompletionMessageParam], max_tokens: int, stop: threading.Event) -> str:
        """One chat completion with retries; the reply text ("" when the reply has none)."""

        def sleep(seconds: float) -> None:
            stop.wait(seconds)  # a stop request cuts the back-off short

        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts) | stop_when_event_set(stop),
            wait=self._wait,
            retry=retry_if_exception(_is_transient),
            sleep=sleep,
            before_sleep=self._log_retry,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._request_once(messages, max_tokens, stop)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            attempts = exc.last_attempt.attempt_number
            raise JudgeUnavailableError(
                f"The together judge gave up after {attempts} attempt{'s' if attempts != 1 else ''} at "
                f"{self.where}: the last one failed with {_failure_text(last, self.timeout_s)}; "
                f"try again later (answers judged so far are cached) or raise judge.max_attempts."
            ) from last
        raise AssertionError("unreachable: tenacity returns or raises")

    def _request_once(self, messages: list[ChatCompletionMessageParam], max_tokens: int, stop: threading.Event) -> str:
        together = _api_errors()
        self.limiter.acquire(stop)
        if stop.is_set():
            raise JudgeError("Judging was stopped before this request was sent.")
        with self._counter_lock:
            self.requests_sent += 1
        try:
            response = self._client.chat.completions.create(
                model=self.model, messages=messages, temperature=0.0, max_tokens=max_tokens
            )
        except together.APIStatusError as exc:
            fatal = self._fatal_error(exc)
            if fatal is not None:
                stop.set()  # no other request of this batch should be sent
                raise fatal from exc
            wait_s = retry_after_seconds(exc)
            if wait_s:
                self.limiter.defer(wait_s)
            raise
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        content = getattr(message, "content", None)
        return content if isinstance(content, str) else ""

    def _fatal_error(self, exc: Any) -> JudgeError | None:
        """The one-sentence error for a response that retrying cannot fix; None if transient."""
        status = exc.status_code
        what = _failure_text(exc, self.timeout_s)
        body_text = str(exc.body or "")
        if status in (401, 403):
            return JudgeAuthError(
                f"{self.where} rejected the API key with {what}; set {API_KEY_VARIABLE} to a valid "
                f"key (https://api.together.ai/settings/api-keys) or choose judge 'semantic'."
            )
        if status == 402 or (status == 429 and _QUOTA_WORDS.search(body_text)):
            return JudgeQuotaError(
                f"{self.where} refused for lack of credits or quota with {what}; add credits or wait "
                f"for the quota to reset, then rerun: answers judged so far are cached and cost nothing again."
            )
        wait_s = retry_after_seconds(exc)
        if status == 429 and wait_s is not None and wait_s > MAX_RETRY_AFTER_S:
            return JudgeQuotaError(
                f"{self.where} asks to wait {wait_s:.0f} s before the next request, longer than the "
                f"{MAX_RETRY_AFTER_S:.0f} s vqabench waits; rerun later: answers judged so far are cached."
            )
        if not _is_transient(exc):
            return JudgeRequestError(
                f"{self.where} rejected the request with {what}; check judge.model ('{self.model}') and judge.base_url."
            )
        return None

    def _log_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        sleep = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning(
            "together judge: %s; retrying in %.1f s (attempt %d of %d)",
            _failure_text(exc, self.timeout_s) if exc else "failure",
            sleep,
            retry_state.attempt_number + 1,
            self.max_attempts,
        )
