"""LLM-judge scoring for open-ended subsets (alpacaeval, commoneval, wildvoice) and judged reference QA (sd-qa).

VoiceBench asks gpt-4o-mini for a 1-5 rating, three samples at temperature 0.5 / top_p 0.95, and averages them.
Any OpenAI-compatible server can play the judge (a local vLLM serving some instruct model), so the client here is
plain urllib against POST /v1/chat/completions: no SDK dependency, nothing imported unless a judge is configured.
Numbers from a local judge are not comparable with gpt-4o-mini numbers, which is why every client carries a
`judge_id` that reports print next to the scores.

The prompts below are our own wording of the same rubric (relevance, accuracy, conciseness for speech output).
Scores are returned in [0, 1] as rating / 5, i.e. VoiceBench's "x20" mapping onto 0-100 after the usual x100.
"""

from __future__ import annotations

import json
import re
import statistics
import urllib.error
import urllib.request
from typing import Any, Protocol

from cmkd.errors import UserError
from cmkd.eval.scorers import ScoreResult

JUDGE_SYSTEM_PROMPT = "You are a careful, impartial assistant that grades answers to users' questions."

OPEN_ENDED_PROMPT = """Rate how well an AI voice assistant answered a spoken request.
The assistant's reply will be read aloud, so it should answer directly and stay brief.

Request (as transcribed):
{instruction}

Assistant's reply:
{response}

Use this scale:
1 = off-topic, wrong, or no real answer.
2 = on-topic but mostly wrong, or far too vague to help.
3 = partly correct or helpful, with clear errors or gaps.
4 = correct and helpful, with minor issues such as extra length.
5 = correct, complete, relevant and concise.

Reply with the number only, for example: 4"""

REFERENCE_QA_PROMPT = """Decide whether a candidate answer to a question agrees with the reference answer.

Question: {question}
Reference answer: {reference}
Candidate answer: {response}

Reply "Yes" if the candidate gives the reference answer (other wording is fine), otherwise "No". One word only."""


class JudgeClient(Protocol):
    """Anything that can sample chat completions from a judge model."""

    @property
    def judge_id(self) -> str:
        """Names the judge (endpoint and model) so reports say which judge produced a number."""
        ...

    def check_reachable(self) -> None:
        """Raise UserError naming the endpoint if the judge cannot be used."""
        ...

    def complete(
        self, system: str, user: str, *, n: int, temperature: float, top_p: float, max_tokens: int
    ) -> list[str]:
        """Return `n` sampled replies to one system + user conversation."""
        ...


class OpenAICompatibleJudge:
    """A judge behind an OpenAI-compatible HTTP API (vLLM, llama.cpp server, OpenAI itself), via urllib."""

    def __init__(self, url: str, model: str, timeout: float = 60.0, api_key: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"judge url {url!r}: must start with http:// or https://")
        if not model:
            raise UserError("judge model: empty; give the model name the server serves")
        base = url.rstrip("/")
        # Accept both "http://host:8000" and "http://host:8000/v1" as the base.
        self.base_url = base if base.endswith("/v1") else f"{base}/v1"
        self.model = model
        self.timeout = timeout
        self.api_key = api_key

    @property
    def judge_id(self) -> str:
        return f"{self.model}@{self.base_url}"

    def _request(self, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:
            raise UserError(f"judge {url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"judge {url}: unreachable ({reason})") from exc
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise UserError(f"judge {url}: reply is not JSON") from exc
        if not isinstance(parsed, dict):
            raise UserError(f"judge {url}: reply is not a JSON object")
        return parsed

    def check_reachable(self) -> None:
        self._request("/models", None)

    def complete(
        self, system: str, user: str, *, n: int, temperature: float, top_p: float, max_tokens: int
    ) -> list[str]:
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        reply = self._request("/chat/completions", payload)
        try:
            return [str(choice["message"]["content"] or "") for choice in reply["choices"]]
        except (KeyError, TypeError) as exc:
            raise UserError(
                f"judge {self.base_url}/chat/completions: reply has no choices[].message.content"
            ) from exc


def judge_skip_reason(judge: JudgeClient | None) -> str | None:
    """Why judge-scored subsets must be skipped, or None when the judge is usable.

    Skipping with a reason (instead of failing the whole eval or scoring 0) keeps the offline subsets usable on
    a machine without a judge, and the reason goes into the report next to the missing columns.
    """
    if judge is None:
        return (
            "open-ended subsets skipped: no judge configured "
            "(give the URL and model name of an OpenAI-compatible server to score them)"
        )
    try:
        judge.check_reachable()
    except UserError as exc:
        return f"open-ended subsets skipped: {exc}"
    return None


def parse_rating(reply: str) -> float | None:
    """A 1-5 rating from one judge reply: the whole reply as a number, else "[[n]]", else a lone digit 1-5."""
    text = reply.strip()
    try:
        value = float(text)
    except ValueError:
        bracketed = re.search(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text)
        lone = re.fullmatch(r"\D*?\b([1-5])\b\D*", text)
        match = bracketed or lone
        if match is None:
            return None
        value = float(match.group(1))
    return value if 1.0 <= value <= 5.0 else None


def judge_open_ended(
    judge: JudgeClient,
    instruction: str,
    response: str,
    *,
    n: int = 3,
    temperature: float = 0.5,
    top_p: float = 0.95,
    max_tokens: int = 1024,
) -> ScoreResult:
    """Mean 1-5 judge rating over `n` samples, as a score in [0, 1] (rating / 5).

    Unparseable samples are dropped from the mean and named in the detail; if none parses the item is unparsed
    and scores 0, so a broken judge shows up in the parse-failure rate.
    """
    prompt = OPEN_ENDED_PROMPT.format(instruction=instruction, response=response)
    replies = judge.complete(
        JUDGE_SYSTEM_PROMPT, prompt, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens
    )
    ratings = [rating for rating in (parse_rating(reply) for reply in replies) if rating is not None]
    dropped = len(replies) - len(ratings)
    if not ratings:
        return ScoreResult(
            0.0, False, f"no parseable rating in {len(replies)} judge replies ({judge.judge_id})"
        )
    mean_rating = statistics.fmean(ratings)
    detail = f"ratings {ratings} mean {mean_rating:.2f} ({judge.judge_id})"
    if dropped:
        detail += f"; {dropped} unparseable replies dropped"
    return ScoreResult(mean_rating / 5.0, True, detail)


def judge_reference_qa(
    judge: JudgeClient,
    question: str,
    reference: str,
    response: str,
    *,
    n: int = 3,
    temperature: float = 0.5,
    top_p: float = 0.95,
    max_tokens: int = 16,
) -> ScoreResult:
    """Majority vote of `n` Yes/No judge verdicts on whether the response gives the reference answer."""
    prompt = REFERENCE_QA_PROMPT.format(question=question, reference=reference, response=response)
    replies = judge.complete(
        JUDGE_SYSTEM_PROMPT, prompt, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens
    )
    verdicts = [
        m.group(1).lower() for m in (re.match(r"\W*(yes|no)\b", r, re.IGNORECASE) for r in replies) if m
    ]
    if not verdicts:
        return ScoreResult(0.0, False, f"no Yes/No in {len(replies)} judge replies ({judge.judge_id})")
    yes = verdicts.count("yes")
    return ScoreResult(float(yes > len(verdicts) / 2), True, f"{yes}/{len(verdicts)} yes ({judge.judge_id})")
