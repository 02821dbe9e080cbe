"""Forced tool calls: chat `tool_choice` "required" or a named function, through structured outputs.

As in vLLM, a forced call is plain JSON under a JSON-schema constraint, without the hermes
`<tool_call>` tags the model writes on its own:
  - a named function: the reply is that function's arguments, an object valid against its
    `parameters` schema;
  - "required": the reply is an array of one or more `{"name": ..., "parameters": {...}}`
    objects, each one of the tools (an anyOf over them, their `$defs` gathered at the top);
    exactly one with `parallel_tool_calls: false`.
The reply becomes `message.tool_calls` with finish_reason "tool_calls"; streamed, the calls
come whole when the reply ends, as `delta.tool_calls`. A reply cut short (max_tokens) does
not parse and stays plain content, never an error.

With a reasoning parser and thinking on, the constraint starts after the model's `</think>`
(vLLM leaves reasoning unconstrained): the model thinks freely, then must call.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from myvllm.entrypoints.openai_protocol import ChatCompletionRequest, bad_request
from myvllm.entrypoints.parsers.reasoning import END as THINK_END
from myvllm.sampling_params import SamplingParams, StructuredOutputsParams

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tool name -> its parameters schema; 400 naming `tools` for a tool that is not a function."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                              f"'parameters': {{...}}}}}}", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions[fn["name"]] = params or EMPTY_PARAMETERS
    return functions


class ForcedToolChoice:
    """The constraint and the reply parser of one request's forced tool choice."""

    def __init__(self, name: str | None, functions: dict[str, dict[str, Any]], parallel: bool = True) -> None:
        self.name = name  # the named function, or None for "required"
        self.functions = functions
        self.parallel = parallel  # "required": several calls allowed

    def schema(self) -> dict[str, Any]:
        """The JSON schema the reply must follow."""
        if self.name is not None:
            return self.functions[self.name]
        defs: dict[str, Any] = {}
        items = []
        for name, params in self.functions.items():
            params = dict(params)
            for key, value in params.pop("$defs", {}).items():
                if defs.get(key, value) != value:
                    raise bad_request(f"tools: two tools define $defs.{key} differently", "tools")
                defs[key] = value
            items.append({"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                           "parameters": params},
                          "required": ["name", "parameters"]})
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return schema

    def constrain(self, params: SamplingParams, thinking: bool | None) -> SamplingParams:
        """params with the tool call's constraint (after `</think>` when thinking is on)."""
        if params.structured_outputs is not None:
            raise bad_request(f"tool_choice forces a call and {params.structured_outputs.field_name} constrains the "
                              "output too: give one", "tool_choice")
        spec = StructuredOutputsParams(json=self.schema(), field_name="tool_choice",
                                       starts_after=THINK_END if thinking else None)
        return dataclasses.replace(params, structured_outputs=spec)

    def parse(self, content: str | None) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of the reply's content; what does not parse stays content."""
        content = content or None
        try:
            value = json.loads(content or "")
        except ValueError:
            return content, []
        if self.name is not None:
            return (None, [_call(self.name, content)]) if isinstance(value, dict) else (content, [])
        if not isinstance(value, list) or not value or not all(
                isinstance(v, dict) and v.get("name") in self.functions and isinstance(v.get("parameters"), dict)
                for v in value):
            return content, []
        return None, [_call(v["name"], json.dumps(v["parameters"], ensure_ascii=False)) for v in value]

    def stream(self) -> ForcedToolCallStream:
        return ForcedToolCallStream(self)


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ForcedToolCallStream:
    """A streamed choice's content under a forced call: held back until the reply ends, then
    sent as tool calls, or as content if it does not parse (ToolCallStream's interface)."""

    def __init__(self, forced: ForcedToolChoice) -> None:
        self.forced = forced

    def advance(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        if not finished:
            return "", []
        content, calls = self.forced.parse(text)
        return ("" if calls else content or ""), calls


def forced_tool_choice(req: ChatCompletionRequest) -> ForcedToolChoice | None:
    """The request's forced tool choice, None for "auto", "none" or no tools; 400 naming
    `tool_choice` for a choice that is not one of those, names an unknown function, or has
    no tools to choose from."""
    choice = req.tool_choice
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        name = None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
    else:
        raise bad_request(f"tool_choice={choice!r} is not supported: use 'auto', 'none', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if not req.tools:
        raise bad_request(f"tool_choice={choice!r} needs tools", "tool_choice")
    functions = _functions(req.tools)
    if name is not None and name not in functions:
        raise bad_request(f"tool_choice names the function {name!r}, which is not in tools: {sorted(functions)}",
                          "tool_choice")
    return ForcedToolChoice(name, functions, req.parallel_tool_calls is not False)
