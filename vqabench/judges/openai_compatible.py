"""The `openai` judge: the same LLM grader on any OpenAI-compatible chat-completions server.

vLLM (`vllm serve MODEL`), llama.cpp's server and Ollama speak this protocol; so does OpenAI.
Only the transport lives here (the `openai` client, the key and the error sentences); the
prompt, retries, rate limit, cache and reply parsing are the core in :mod:`vqabench.judges.llm`.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from vqabench.judges.base import JudgeAuthError, JudgeError, JudgeRequestError, JudgeUnavailableError
from vqabench.judges.llm import ChatTransport, LLMJudge, error_detail
from vqabench.spec import JudgeSpec

API_KEY_VARIABLE = "OPENAI_API_KEY"
URL_VARIABLE = "VQABENCH_JUDGE_URL"
MODEL_VARIABLE = "VQABENCH_JUDGE_MODEL"
#: Sent when no key is set: local servers (vLLM, llama.cpp, Ollama) accept any key, the client needs one.
PLACEHOLDER_KEY = "vqabench-no-key"


def api_base(url: str) -> str:
    """The client's base URL: `url` without a trailing slash, and with /v1 when it names only a host."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


class OpenAICompatibleTransport(ChatTransport):
    """Chat completions through the `openai` client, at `base_url` (which ends where /chat/completions starts)."""

    judge_name = "openai"

    def __init__(self, api_key: str, base_url: str, timeout_s: float, key_variable: str) -> None:
        import openai

        if urlsplit(base_url).scheme not in ("http", "https"):
            raise JudgeError(
                f"The openai judge's server {base_url!r} is not an http:// or https:// URL; "
                f"give one such as http://localhost:8000/v1."
            )
        self.base_url = api_base(base_url)
        self.where = self.base_url
        self.key_variable = key_variable
        self._client = openai.OpenAI(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=timeout_s)

    @property
    def errors(self) -> Any:
        import openai

        return openai

    def auth_error(self, model: str, what: str) -> JudgeError:
        return JudgeAuthError(
            f"The OpenAI-compatible server at {self.base_url} rejected the API key with {what}; set "
            f"{self.key_variable} to a key it accepts "
            f"(a local server takes any) or choose judge 'semantic'."
        )

    def request_error(self, exc: Any, model: str, what: str) -> JudgeError:
        if exc.status_code == 404:
            detail = error_detail(exc) or "Not Found"
            return JudgeRequestError(
                f"The OpenAI-compatible server at {self.base_url} does not serve model '{model}' (HTTP 404: "
                f"{detail}); set judge.model to a model it serves (GET {self.base_url}/models lists them) "
                f"and check that judge.base_url ends in /v1."
            )
        return JudgeRequestError(
            f"The OpenAI-compatible server at {self.base_url} rejected the request for model '{model}' with "
            f"{what}; check judge.model and judge.base_url."
        )

    def gave_up_error(self, last: BaseException | None, attempts: int, timeout_s: float) -> JudgeUnavailableError:
        if isinstance(last, self.errors.APIConnectionError) and not isinstance(last, self.errors.APITimeoutError):
            return JudgeUnavailableError(
                f"The openai judge could not reach {self.base_url} in {attempts} "
                f"attempt{'s' if attempts != 1 else ''} ({self.failure_text(last, timeout_s)}); start the "
                f"server there (docs/judges.md) or set judge.base_url or {URL_VARIABLE} to where it listens."
            )
        return super().gave_up_error(last, attempts, timeout_s)


class OpenAICompatibleJudge(LLMJudge):
    """Asks an LLM on an OpenAI-compatible server (vLLM, llama.cpp, Ollama, OpenAI) to grade each answer."""

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        concurrency: int = 4,
        requests_per_minute: float = 60,
        max_attempts: int = 6,
        timeout_s: float = 60.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        key_variable = api_key_env or API_KEY_VARIABLE
        if api_key is None:
            api_key = os.environ.get(key_variable)
            if api_key_env and not api_key:
                raise JudgeAuthError(
                    f"judge.api_key_env names {api_key_env}, which is not set; set it to the server's key "
                    f"or remove judge.api_key_env (a local server takes any key)."
                )
        self.check_limits(self.name, concurrency, requests_per_minute, max_attempts, timeout_s)
        transport = OpenAICompatibleTransport(api_key or PLACEHOLDER_KEY, base_url, timeout_s, key_variable)
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
    def from_spec(cls, spec: JudgeSpec, *, from_environment: bool = False) -> OpenAICompatibleJudge:
        """Build from a JudgeSpec: the server is judge.base_url, or else $VQABENCH_JUDGE_URL.

        A server named by the environment (always so for judge "auto", `from_environment`) takes
        its model from $VQABENCH_JUDGE_MODEL when that is set, else from judge.model.
        """
        url_from_environment = from_environment or not spec.base_url
        base_url = os.environ.get(URL_VARIABLE) if url_from_environment else spec.base_url
        if not base_url:
            raise JudgeError(
                f"The openai judge needs a server: set judge.base_url (e.g. http://localhost:8000/v1) "
                f"or {URL_VARIABLE}."
            )
        model = (os.environ.get(MODEL_VARIABLE) if url_from_environment else None) or spec.model
        return cls(
            model,
            base_url=base_url,
            api_key_env=spec.api_key_env,
            concurrency=spec.concurrency,
            requests_per_minute=spec.requests_per_minute,
            max_attempts=spec.max_attempts,
            timeout_s=spec.timeout_s,
        )
