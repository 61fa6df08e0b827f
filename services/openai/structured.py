"""Structured outputs on the OpenAI API: the request's constraint, read and compiled before it is sent on.

Accepted, one per request (on chat and completions):
- OpenAI's `response_format`: {"type": "text"} (none), {"type": "json_object"}, or {"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": ...}} (the schema is enforced with or without strict);
- vLLM's `structured_outputs`: {"json": schema} | {"json_object": true} | {"regex": ...} | {"choice": [...]} |
  {"grammar": lark};
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
The constraint is compiled for the model's tokenizer on a preparation thread; one that does not compile
(bad schema, unsupported feature, bad regex or grammar) is a 400 naming the field that set it.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.models.grammar import GrammarCompiler, GrammarError
from pdserve.models.sampling_params import MAX_STRUCTURED_CHARS, StructuredOutput
from pdserve.openai.protocol import invalid

MAX_ERROR_CHARS = 600  # of the grammar engine's message in a 400

_STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "json_object": "json_object", "regex": "regex",
                            "choice": "choice", "grammar": "grammar"}
_GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def read_structured(body: dict[str, Any]) -> tuple[StructuredOutput, str] | None:
    """The request's constraint and the field that set it, or None. 400 for a malformed one or two at once."""
    found = []
    response_format = _from_response_format(body.get("response_format"))
    if response_format is not None:
        found.append((response_format, "response_format"))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise invalid("structured_outputs must be an object", "structured_outputs")
        unknown = sorted(str(k)[:32] for k in outputs if k not in _STRUCTURED_OUTPUTS_KEYS)
        if unknown:
            raise invalid(f"structured_outputs: {unknown} not supported (use one of {list(_STRUCTURED_OUTPUTS_KEYS)})",
                          "structured_outputs")
        for key, kind in _STRUCTURED_OUTPUTS_KEYS.items():
            if outputs.get(key) not in (None, False):
                found.append((_constraint(kind, outputs[key], "structured_outputs"), "structured_outputs"))
    for name, kind in _GUIDED_FIELDS.items():
        if body.get(name) is not None:
            found.append((_constraint(kind, body[name], name), name))
    if len(found) > 1:
        raise invalid(f"only one output constraint per request; got {', '.join(p for _, p in found)}", found[1][1])
    return found[0] if found else None


def _from_response_format(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise invalid("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                          "response_format")
        return _constraint("json_schema", spec["schema"], "response_format")
    raise invalid("response_format.type must be \"text\", \"json_object\" or \"json_schema\"", "response_format")


def _constraint(kind: str, value: Any, param: str) -> StructuredOutput:
    """The StructuredOutput of one field's value (a schema object or text, a regex, a list, a grammar)."""
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind in ("json_schema", "choice"):
        if kind == "json_schema" and isinstance(value, str):
            text = value
        elif (kind == "json_schema" and isinstance(value, dict)) or (kind == "choice" and isinstance(value, list)):
            text = json.dumps(value, ensure_ascii=False)
        else:
            raise invalid(f"{param}: {'a JSON schema object' if kind == 'json_schema' else 'a list of strings'} "
                          "is expected", param)
    elif isinstance(value, str):
        text = value
    else:
        raise invalid(f"{param}: a {kind} must be a string", param)
    if len(text) > MAX_STRUCTURED_CHARS:
        raise invalid(f"{param}: the constraint has {len(text)} characters; at most {MAX_STRUCTURED_CHARS} "
                      "are allowed", param)
    return StructuredOutput(kind, text)


def check_constraint(grammars: GrammarCompiler | None, structured: StructuredOutput, param: str) -> None:
    """Compile the constraint for the model's tokenizer (on a preparation thread: ~1 ms, more for a large
    schema); a 400 naming `param` with the grammar engine's reason when it does not compile."""
    if grammars is None:
        raise invalid("this server cannot constrain outputs: llguidance cannot read the model's tokenizer", param)
    try:
        grammars.check(structured)
    except GrammarError as exc:
        message = str(exc)
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "..."
        raise invalid(f"{param}: the {structured.kind.replace('_', ' ')} cannot be used: {message}", param) from exc
