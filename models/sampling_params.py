"""Per-request sampling parameters, validated once when a request is made."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # biased token ids per request
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range: -100 bans a token, 100 makes it all but certain
# The widest values the wire messages carry (uint32 max_tokens, int32 top_k): a field past
# them could not be sent on to a worker.
MAX_MAX_TOKENS = 2**32 - 1
MAX_TOP_K = 2**31 - 1


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_STRUCTURED_CHARS = 200_000  # a schema, regex, choice list (as JSON) or grammar, as text


class SamplingParamsError(ValueError):
    """A sampling field is out of range; the message names the field and the allowed range."""


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint every sample's output must satisfy (pdserve.models.grammar compiles it).

    kind "json_schema": spec is a JSON schema's text; "json_object": any JSON object (spec "");
    "regex": spec is a regular expression the whole output matches; "choice": spec is a JSON list
    of the strings the output may be; "grammar": spec is a Lark grammar (llguidance's dialect,
    which embeds JSON schemas with %json) or a GBNF one (llama.cpp's).
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise SamplingParamsError(f"structured output kind must be one of {list(STRUCTURED_KINDS)}, "
                                      f"got {str(self.kind)[:32]!r}")
        if not isinstance(self.spec, str) or len(self.spec) > MAX_STRUCTURED_CHARS:
            raise SamplingParamsError(f"a structured output's spec must be text of at most {MAX_STRUCTURED_CHARS} "
                                      "characters")
        if self.kind != "json_object" and not self.spec:
            raise SamplingParamsError(f"structured output {self.kind} needs a spec")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (field names follow the established servers' APIs).

    top_k <= 0 means off; logprobs None means no logprobs, N >= 0 means the chosen token's
    logprob plus the top-N alternatives; prompt_logprobs the same for every prompt token after the
    first (each scored given the tokens before it). logit_bias: (token id, bias) pairs added to
    the logits before penalties, masks and sampling (returned logprobs stay raw). structured: the
    constraint the output must satisfy (tokens outside it are masked). A seed of None
    is replaced by a random one when the request is created, so every request samples
    reproducibly from (seed, sample index, position).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    min_tokens: int = 0
    speculative: bool = True  # False: this request's decode steps take no speculative proposals
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self._check_sizes()  # before copying the lists: a huge one costs nothing to refuse
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias.items() if hasattr(self.logit_bias, "items") else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise SamplingParamsError(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")
        self._check_values()

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0)."""
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first field that is out of range."""
        self._check_sizes()
        self._check_values()

    def _check_sizes(self) -> None:
        """The list fields' lengths, checked before anything walks them (stop and
        stop_token_ids may still be the caller's sequences, e.g. protobuf repeated fields)."""
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(f"stop_token_ids has {len(self.stop_token_ids)} ids; "
                                      f"the limit is {MAX_STOP_TOKEN_IDS}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingParamsError(f"logit_bias has {len(self.logit_bias)} entries; the limit is {MAX_LOGIT_BIAS}")

    def _check_values(self) -> None:
        bad_stop = next((s for s in self.stop if not 0 < len(s) <= MAX_STOP_STRING_CHARS), None)
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.max_tokens <= MAX_MAX_TOKENS, f"max_tokens must be at most {MAX_MAX_TOKENS}, got {self.max_tokens}"),
            (0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (off) or a positive count, got {self.top_k}"),
            (self.top_k <= MAX_TOP_K, f"top_k must be at most {MAX_TOP_K}, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (0.0 < self.repetition_penalty <= 10.0,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.seed is None or 0 <= self.seed < 2**64, f"seed must be in [0, 2^64), got {self.seed}"),
            (1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens], got {self.min_tokens} with max_tokens {self.max_tokens}"),
            (bad_stop is None, f"stop strings must be non-empty and at most {MAX_STOP_STRING_CHARS} characters, "
                               f"got one of {len(bad_stop or '')} characters"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            (all(t >= 0 for t, _ in self.logit_bias), "logit_bias token ids must be >= 0"),
            (all(-MAX_LOGIT_BIAS_VALUE <= b <= MAX_LOGIT_BIAS_VALUE for _, b in self.logit_bias),
             f"logit_bias values must be in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]"),
            (len({t for t, _ in self.logit_bias}) == len(self.logit_bias), "logit_bias lists a token id twice"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)
