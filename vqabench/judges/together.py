"""The `together` judge: the paper's LLM grader through Together's chat completions API.

Only the transport lives here (the `together` client, its key and its error sentences); the
prompt, retries, rate limit and reply parsing are the LLM judges' shared core in
:mod:`vqabench.judges.llm`, re-exported here under their old names.
"""

from __future__ import annotations

import os
import re
from typing import Any

from vqabench.judges.base import JudgeAuthError, JudgeError, JudgeRequestError
from vqabench.judges.llm import (
    COMPARE_MAX_TOKENS,
    COMPARE_PROMPT_VERSION,
    COMPARE_SYSTEM_PROMPT,
    GRADE_MAX_TOKENS,
    GRADE_SYSTEM_PROMPT,
    MAX_RETRY_AFTER_S,
    PROMPT_VERSION,
    ChatTransport,
    LLMJudge,
    RequestRateLimiter,
    compare_messages,
    grade_messages,
    parse_grade,
    parse_preference,
    retry_after_seconds,
)
from vqabench.spec import JudgeSpec

__all__ = [
    "API_KEY_VARIABLE",
    "COMPARE_MAX_TOKENS",
    "COMPARE_PROMPT_VERSION",
    "COMPARE_SYSTEM_PROMPT",
    "DEFAULT_MODEL",
    "GRADE_MAX_TOKENS",
    "GRADE_SYSTEM_PROMPT",
    "MAX_RETRY_AFTER_S",
    "PROMPT_VERSION",
    "RequestRateLimiter",
    "TogetherJudge",
    "TogetherTransport",
    "compare_messages",
    "grade_messages",
    "parse_grade",
    "parse_preference",
    "retry_after_seconds",
]

DEFAULT_MODEL = "meta-llama/Llama-3-8b-chat-hf"
API_KEY_VARIABLE = "TOGETHER_API_KEY"


class TogetherTransport(ChatTransport):
    """Chat completions through the `together` client (Together's API, or a server speaking it)."""

    judge_name = "together"

    def __init__(self, api_key: str, base_url: str | None, timeout_s: float) -> None:
        import together

        # the client appends /v1/chat/completions itself, so a base URL ending in /v1 is trimmed
        self.base_url = re.sub(r"/v1/?$", "", base_url.rstrip("/")) if base_url else None
        self.where = self.base_url or "Together's API"
        self._client = together.Together(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=timeout_s)

    @property
    def errors(self) -> Any:
        import together

        return together

    def auth_error(self, model: str, what: str) -> JudgeError:
        return JudgeAuthError(
            f"{self.where} rejected the API key with {what}; set {API_KEY_VARIABLE} to a valid "
            f"key (https://api.together.ai/settings/api-keys) or choose judge 'semantic'."
        )

    def request_error(self, exc: Any, model: str, what: str) -> JudgeError:
        return JudgeRequestError(
            f"{self.where} rejected the request with {what}; check judge.model ('{model}') and judge.base_url."
        )


class TogetherJudge(LLMJudge):
    """Asks an LLM on Together (or any server speaking its API) to grade each answer."""

    name = "together"

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
        self.check_limits(self.name, concurrency, requests_per_minute, max_attempts, timeout_s)
        transport = TogetherTransport(api_key, base_url, timeout_s)
        self.base_url = transport.base_url
        super().__init__(
            transport,
            model,
            concurrency=concurrency,
            requests_per_minute=requests_per_minute,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )

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
