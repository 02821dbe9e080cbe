"""`python -m myvllm.serve --model PATH [options]`: the OpenAI-compatible HTTP server.

    python -m myvllm.serve --model ./huggingface/Qwen3-0.6B --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "./huggingface/Qwen3-0.6B", "prompt": "Hello", "max_tokens": 16}'

Every engine argument of `LLM(model, **engine_args)` is a flag with dashes for
underscores (`--max-model-len 2048`, `--enforce-eager`, `--no-enable-prefix-caching`);
flags left out keep the engine's defaults. The server binds 127.0.0.1 unless --host
says otherwise. With --api-key (or MYVLLM_API_KEY in the environment) every /v1
request needs `Authorization: Bearer <key>`.

Slow clients: a request body must arrive within --body-read-timeout seconds (else 408), and an
idle keep-alive connection is closed after --timeout-keep-alive seconds (uvicorn's option);
request headers are bounded by uvicorn's h11 limit (16 KiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from myvllm.config import EngineConfig
from myvllm.entrypoints.parsers.reasoning import REASONING_PARSERS
from myvllm.entrypoints.parsers.tool_calls import TOOL_CALL_PARSERS

logger = logging.getLogger("myvllm.serve")

API_KEY_ENV = "MYVLLM_API_KEY"
_SCALARS = {"str": str, "int": int, "float": float}


def _engine_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add one flag per EngineConfig field (but model); returns the field names."""
    group = parser.add_argument_group("engine arguments (defaults: the engine's)")
    names = []
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        annotation = str(f.type).replace(" ", "")
        base = annotation.removesuffix("|None")
        flag = "--" + f.name.replace("_", "-")
        if base == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"default: {f.default}")
        elif base in _SCALARS:
            group.add_argument(flag, type=_SCALARS[base], default=argparse.SUPPRESS,
                               help=f"default: {f.default}")
        else:
            continue
        names.append(f.name)
    return names


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(prog="myvllm-serve", description="OpenAI-compatible server for my-vllm.")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name requests must use (default: the --model value)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer <key>' on /v1 routes (also ${API_KEY_ENV})")
    parser.add_argument("--max-waiting-requests", type=int, default=256,
                        help="requests that may wait for the engine; more get HTTP 503 (default: 256)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body; larger gets HTTP 413 (default: 1 MiB)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--reasoning-parser", default=None, choices=list(REASONING_PARSERS),
                        help="return the text inside <think>...</think> as reasoning_content (default: none)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="let the model call the tools a chat request lists (tool_choice 'auto'); needs "
                             "--tool-call-parser")
    parser.add_argument("--tool-call-parser", default=None, choices=list(TOOL_CALL_PARSERS),
                        help="how tool calls are written in the model's output (hermes: Qwen3's <tool_call>)")
    parser.add_argument("--default-chat-template-kwargs", type=_json_object, default=None,
                        help='JSON object passed to every chat template, e.g. \'{"enable_thinking": false}\'; '
                             "a request's chat_template_kwargs win")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="let chat requests bring their own chat template (chat_template); it renders on the "
                             "engine thread, so only for trusted clients (default: refused with 400)")
    parser.add_argument("--body-read-timeout", type=float, default=30.0,
                        help="seconds a request body may take to arrive; slower gets HTTP 408 (default: 30)")
    parser.add_argument("--timeout-keep-alive", type=int, default=5,
                        help="seconds an idle keep-alive connection stays open (uvicorn's; default: 5)")
    parser.add_argument("--disable-metrics", action="store_true", help="serve no /metrics")
    return parser, _engine_flags(parser)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(server options, engine arguments given on the command line)."""
    parser, engine_names = build_parser()
    args = parser.parse_args(argv)
    if args.max_waiting_requests < 1:
        parser.error("--max-waiting-requests must be >= 1")
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be >= 1")
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        parser.error("--enable-auto-tool-choice and --tool-call-parser go together")
    if args.body_read_timeout <= 0 or args.timeout_keep_alive < 1:
        parser.error("--body-read-timeout must be > 0 and --timeout-keep-alive >= 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in [0, 65535]")
    engine_args = {name: getattr(args, name) for name in engine_names if hasattr(args, name)}
    return args, engine_args


def main(argv: Sequence[str] | None = None) -> None:
    args, engine_args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from myvllm.entrypoints.api_server import build_app
    from myvllm.entrypoints.async_engine import AsyncLLMEngine

    try:
        engine = AsyncLLMEngine.from_engine_args(args.model, args.max_waiting_requests, **engine_args)
    except (ValueError, TypeError) as e:
        sys.exit(f"myvllm-serve: error: {e}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or args.model
    app = build_app(engine, name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                    reasoning_parser=args.reasoning_parser,
                    default_chat_template_kwargs=args.default_chat_template_kwargs,
                    tool_call_parser=args.tool_call_parser,
                    trust_request_chat_template=args.trust_request_chat_template,
                    body_read_timeout=args.body_read_timeout, enable_metrics=not args.disable_metrics)
    # Everything made so far (the model, the tokenizer, the app) lives as long as the process:
    # frozen, the cyclic collector never walks it again, so a collection set off by the requests'
    # short-lived objects stays short instead of stalling the loop and the engine thread.
    gc.collect()
    gc.freeze()
    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("serving %r at http://%s:%d/v1 (API key %s)", name, host, args.port,
                "required" if api_key else "not required")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                timeout_keep_alive=args.timeout_keep_alive)


if __name__ == "__main__":
    main()
