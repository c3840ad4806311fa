"""The LLM judges' one core: the prompt, the reply parser, retries, the rate limiter; transports send.

`LLMJudge` grades and compares through a :class:`ChatTransport`, which only sends one chat
completion and says what a failure means. The transports' clients (`together`, `openai`)
have their own retries off (``max_retries=0``); tenacity is the only retry layer. Rate
limits (429), server errors (5xx), timeouts and connection errors are retried with
exponential backoff and jitter, never sooner than a ``Retry-After`` the server sends; bad
credentials, exhausted quota and rejected requests fail at once. A thread pool bounds the
requests in flight and a shared limiter spaces request starts to `requests_per_minute`.
"""

from __future__ import annotations

import email.utils
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

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

from vqabench.judges.base import (
    Grade,
    Judge,
    JudgeError,
    JudgeItem,
    JudgeQuotaError,
    JudgeUnavailableError,
    Preference,
    Verdict,
    VerdictCallback,
)

log = logging.getLogger(__name__)

#: A chat message as both clients take it: {"role": ..., "content": ...}.
ChatMessage = dict[str, str]

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


def grade_messages(item: JudgeItem) -> list[ChatMessage]:
    """The chat messages that ask for one grade."""
    return [
        {"role": "system", "content": GRADE_SYSTEM_PROMPT},
        {
            "role": "user",
            "content": (f"QUESTION: {item.question}\nTRUE ANSWER: {item.reference}\nSTUDENT ANSWER: {item.prediction}"),
        },
    ]


def compare_messages(question: str, reference: str, answer_a: str, answer_b: str) -> list[ChatMessage]:
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


class ChatTransport(ABC):
    """How one chat completion is sent and what its failures mean; the judging core does the rest.

    Both clients vqabench uses (`together` 2.x and `openai`) are generated by Stainless and raise
    the same exception shapes (`APIStatusError` with `status_code`, `body` and `response`;
    `APITimeoutError` a subclass of `APIConnectionError`), so the mapping is shared here and a
    transport says only which module's classes to use and its own error sentences.
    """

    judge_name: str  # the judge's name in logs and error sentences
    where: str  # the server, for error sentences
    _client: Any  # the client, its own retries off: both clients have the same chat.completions.create

    @property
    @abstractmethod
    def errors(self) -> Any:
        """The client module whose APIStatusError, APIConnectionError and APITimeoutError it raises."""

    def send(self, model: str, messages: list[ChatMessage], max_tokens: int) -> Any:
        """One chat completion request at temperature 0; the client's response object."""
        return self._client.chat.completions.create(
            model=model, messages=messages, temperature=0.0, max_tokens=max_tokens
        )

    @abstractmethod
    def auth_error(self, model: str, what: str) -> JudgeError:
        """The sentence for rejected credentials (401, 403)."""

    @abstractmethod
    def request_error(self, exc: Any, model: str, what: str) -> JudgeError:
        """The sentence for a request the server refuses for good (other 4xx)."""

    def reply_text(self, response: Any) -> str:
        """The first choice's message text; "" when the reply has none."""
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        content = getattr(message, "content", None)
        return content if isinstance(content, str) else ""

    def is_transient(self, exc: BaseException) -> bool:
        """Worth another attempt: 408, 409, 429 and 5xx statuses, timeouts, connection errors."""
        if isinstance(exc, self.errors.APIConnectionError):  # APITimeoutError is a subclass
            return True
        if isinstance(exc, self.errors.APIStatusError):
            return exc.status_code in (408, 409, 429) or exc.status_code >= 500
        return False

    def failure_text(self, exc: BaseException | None, timeout_s: float) -> str:
        """A short description of a failed request for an error sentence."""
        if exc is None:
            return "no error recorded"
        if isinstance(exc, self.errors.APITimeoutError):
            return f"no reply within {timeout_s:g} s"
        if isinstance(exc, self.errors.APIConnectionError):
            cause = exc.__cause__ or exc
            return f"could not connect ({type(cause).__name__})"
        if isinstance(exc, self.errors.APIStatusError):
            detail = error_detail(exc)
            reason = exc.response.reason_phrase
            return f"HTTP {exc.status_code} {reason}" + (f" ({detail})" if detail else "")
        return f"{type(exc).__name__}: {exc}"

    def fatal_error(self, exc: Any, model: str, timeout_s: float) -> JudgeError | None:
        """The one-sentence error for a response that retrying cannot fix; None if transient."""
        status = exc.status_code
        what = self.failure_text(exc, timeout_s)
        body_text = str(exc.body or "")
        if status in (401, 403):
            return self.auth_error(model, what)
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
        if not self.is_transient(exc):
            return self.request_error(exc, model, what)
        return None

    def gave_up_error(self, last: BaseException | None, attempts: int, timeout_s: float) -> JudgeUnavailableError:
        """The sentence once every allowed attempt failed transiently."""
        return JudgeUnavailableError(
            f"The {self.judge_name} judge gave up after {attempts} attempt{'s' if attempts != 1 else ''} at "
            f"{self.where}: the last one failed with {self.failure_text(last, timeout_s)}; "
            f"try again later (answers judged so far are cached) or raise judge.max_attempts."
        )


def error_detail(exc: Any) -> str:
    """The server's own error message from a status error's body, on one line, at most 160 characters."""
    body = exc.body
    detail = ""
    if isinstance(body, dict):
        error = body.get("error")
        detail = str(error.get("message", "")) if isinstance(error, dict) else str(error or body.get("message", ""))
    elif body:
        detail = str(body)
    return " ".join(detail.split())[:160]


class LLMJudge(Judge):
    """Asks an LLM, through a transport, to grade each answer or compare two."""

    prompt_version = PROMPT_VERSION
    compare_version = COMPARE_PROMPT_VERSION

    def __init__(
        self,
        transport: ChatTransport,
        model: str,
        *,
        concurrency: int = 4,
        requests_per_minute: float = 60,
        max_attempts: int = 6,
        timeout_s: float = 60.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.transport = transport
        self.model = model
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.limiter = RequestRateLimiter(requests_per_minute)
        self._backoff = wait_exponential(multiplier=backoff_initial_s, max=backoff_max_s) + wait_random(
            0, backoff_initial_s
        )
        self._counter_lock = threading.Lock()
        self.requests_sent = 0  # HTTP requests started, retries included

    @staticmethod
    def check_limits(
        name: str, concurrency: int, requests_per_minute: float, max_attempts: int, timeout_s: float
    ) -> None:
        """One sentence when a knob that must be above 0 is not."""
        if concurrency < 1 or requests_per_minute <= 0 or max_attempts < 1 or timeout_s <= 0:
            raise JudgeError(
                f"The {name} judge needs concurrency, requests_per_minute, max_attempts and "
                f"timeout_s above 0, not {concurrency}, {requests_per_minute}, {max_attempts}, {timeout_s}."
            )

    @property
    def where(self) -> str:
        return self.transport.where

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
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"{self.name}-judge")
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

    def _ask(self, messages: list[ChatMessage], max_tokens: int, stop: threading.Event) -> str:
        """One chat completion with retries; the reply text ("" when the reply has none)."""

        def sleep(seconds: float) -> None:
            stop.wait(seconds)  # a stop request cuts the back-off short

        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts) | stop_when_event_set(stop),
            wait=self._wait,
            retry=retry_if_exception(self.transport.is_transient),
            sleep=sleep,
            before_sleep=self._log_retry,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._request_once(messages, max_tokens, stop)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise self.transport.gave_up_error(last, exc.last_attempt.attempt_number, self.timeout_s) from last
        raise AssertionError("unreachable: tenacity returns or raises")

    def _request_once(self, messages: list[ChatMessage], max_tokens: int, stop: threading.Event) -> str:
        self.limiter.acquire(stop)
        if stop.is_set():
            raise JudgeError("Judging was stopped before this request was sent.")
        with self._counter_lock:
            self.requests_sent += 1
        try:
            response = self.transport.send(self.model, messages, max_tokens)
        except self.transport.errors.APIStatusError as exc:
            fatal = self.transport.fatal_error(exc, self.model, self.timeout_s)
            if fatal is not None:
                stop.set()  # no other request of this batch should be sent
                raise fatal from exc
            wait_s = retry_after_seconds(exc)
            if wait_s:
                self.limiter.defer(wait_s)
            raise
        return self.transport.reply_text(response)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        sleep = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning(
            "%s judge: %s; retrying in %.1f s (attempt %d of %d)",
            self.name,
            self.transport.failure_text(exc, self.timeout_s) if exc else "failure",
            sleep,
            retry_state.attempt_number + 1,
            self.max_attempts,
        )
