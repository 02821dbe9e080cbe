"""Reliability: bad input, memory pressure, aborts, faults inside a step, remote code.

Bad input: every case of BAD_INPUTS raises a clear error naming the field, the value and
the allowed range, while a request already in the engine keeps running and gets the
same tokens as without the bad call. `pytest -rP -k bad_input_report` prints the table
of docs/reliability.md from running them.

Memory pressure: a KV pool of a few blocks serves many requests (with preemption) with
greedy and seeded outputs equal to those of an ample pool, integrity after every step
and no block leaked. Aborts of running, waiting and preempted requests free what they
hold. An exception or a KeyboardInterrupt inside one step leaves the engine clean and
usable. Checkpoints never run their own code and never load through pickle.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from engine_utils import SMALL_KV, run_checked
from safetensors.torch import load_file, save_file
from tiny_model import hf_greedy

import myvllm.runtime.model_runner as model_runner_module
from myvllm import LLM, SamplingParams
from myvllm.runtime.sequence import SequenceStatus

MAX_LEN = 64
BS = 16
VOCAB = 512  # of the tiny checkpoint
ENGINE_KW = dict(kvcache_block_size=BS, max_model_len=MAX_LEN, **SMALL_KV)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
IN_FLIGHT_PROMPT = [11, 12, 13, 14, 15]


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    """Every test of this module runs torch on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE_KW)


def assert_clean(engine) -> None:
    """No request left anywhere, every block free, integrity holds."""
    assert not engine.has_unfinished_requests()
    assert not engine.requests, f"requests left in the engine: {list(engine.requests)}"
    assert not engine.runner.sampling.seq_generators
    engine.check_integrity()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(c == 0 for c in bm.ref_counts)


def finish_all(engine) -> dict:
    """Step the engine until nothing is left; the outputs of finished requests by id."""
    results = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            results[out.request_id] = out
        engine.check_integrity()
    assert not engine.has_unfinished_requests()
    return results


# ---- bad input -------------------------------------------------------------------------------


class Ctx:
    """What a bad-input case needs: the shared engine, the checkpoint, a scratch directory."""

    def __init__(self, llm: LLM, model_dir: str, scratch: str) -> None:
        self.llm = llm
        self.model_dir = model_dir
        self.scratch = scratch
        self._no_tokenizer: LLM | None = None
        self._many_logprobs: LLM | None = None

    @property
    def no_tokenizer(self) -> LLM:
        if self._no_tokenizer is None:
            self._no_tokenizer = LLM(self.model_dir, skip_tokenizer_init=True, **ENGINE_KW)
        return self._no_tokenizer

    @property
    def many_logprobs(self) -> LLM:
        """An engine whose max_logprobs exceeds the vocabulary."""
        if self._many_logprobs is None:
            self._many_logprobs = LLM(self.model_dir, max_logprobs=1000, **ENGINE_KW)
        return self._many_logprobs

    def copy(self, name: str) -> str:
        dst = os.path.join(self.scratch, name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.model_dir, dst)
        return dst


@dataclass(frozen=True)
class Bad:
    label: str  # the input, as the report shows it
    call: Callable[[Ctx], object]
    exc: type[BaseException]
    words: tuple[str, ...]  # the message names the field, the value and the allowed range
    bug: str | None = None  # known engine bug: the case is expected to fail until it is fixed


def params(**kw) -> Callable[[Ctx], object]:
    return lambda c: c.llm.generate([[1, 2, 3]], SamplingParams(**kw), use_tqdm=False)


def prompts(p, sp: SamplingParams = GREEDY) -> Callable[[Ctx], object]:
    return lambda c: c.llm.generate(p, sp, use_tqdm=False)


def duplicate_request_id(c: Ctx) -> None:
    engine = c.llm.engine
    engine.add_request([1, 2], GREEDY, request_id="mine")
    try:
        engine.add_request([3, 4], GREEDY, request_id="mine")
    finally:
        engine.abort_request("mine")


def engine_args(**kw) -> Callable[[Ctx], object]:
    return lambda c: LLM(c.model_dir, **{**ENGINE_KW, **kw})


def checkpoint(edit: Callable[[str], None]) -> Callable[[Ctx], object]:
    def run(c: Ctx):
        path = c.copy("broken")
        edit(path)
        return LLM(path, **ENGINE_KW)

    return run


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[str], None]:
    def run(path: str) -> None:
        file = os.path.join(path, "model.safetensors")
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})

    return run


def edit_config(**changes) -> Callable[[str], None]:
    def run(path: str) -> None:
        file = os.path.join(path, "config.json")
        with open(file) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(file, "w") as f:
            json.dump(cfg, f)

    return run


def truncate(path: str) -> None:
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


def garbage(path: str) -> None:
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 64)


def pickle_only(path: str) -> None:
    file = os.path.join(path, "model.safetensors")
    torch.save(load_file(file), os.path.join(path, "pytorch_model.bin"))
    os.remove(file)


def index_names_missing_shard(path: str) -> None:
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}, f)


def drop(name: str) -> Callable[[dict], None]:
    return lambda t: t.pop(name)


def shrink(name: str) -> Callable[[dict], None]:
    def run(t: dict) -> None:
        t[name] = t[name][:-1]

    return run



BAD_INPUTS: list[Bad] = [
    # prompts
    Bad("prompt ''", prompts(""), ValueError, ("prompt 0", "empty", "at least one token")),
    Bad("prompt []", prompts([[]]), ValueError, ("prompt 0", "empty", "at least one token")),
    Bad("prompt of max_model_len (64) tokens", prompts([[1] * MAX_LEN]), ValueError,
        ("64 tokens", "max_model_len=64", "at most 63")),
    Bad("prompt of 100 tokens", prompts([[1] * 100]), ValueError, ("100 tokens", "max_model_len=64", "at most 63")),
    Bad("token id -1", prompts([[1, -1]]), ValueError, ("token 1", "-1", "[0, 511]")),
    Bad("token id 512 (= vocab size)", prompts([[1, 512]]), ValueError, ("token 1", "512", "[0, 511]")),
    Bad("token id 2.5", prompts([[1, 2.5]]), TypeError, ("token 1", "2.5", "must be ints")),
    Bad("token id True", prompts([[1, True]]), TypeError, ("token 1", "True", "must be ints")),
    Bad("token ids '1 2'", prompts([{"prompt_token_ids": "1 2"}]), TypeError, ("prompt_token_ids", "str")),
    Bad("prompts b'bytes'", prompts(b"bytes"), TypeError, ("prompts", "bytes")),
    Bad("prompts [b'bytes']", prompts([b"bytes"]), TypeError, ("prompt 0", "bytes")),
    Bad("prompts [['a', 'b']]", prompts([["a", "b"]]), TypeError, ("prompt 0", "'a'", "must be ints")),
    Bad("prompts None", prompts(None), TypeError, ("prompts", "NoneType")),
    Bad("prompts [None]", prompts([None]), TypeError, ("prompt 0", "NoneType")),
    Bad("2 SamplingParams for 3 prompts", lambda c: c.llm.generate([[1], [2], [3]], [GREEDY, GREEDY], use_tqdm=False),
        ValueError, ("2 SamplingParams", "3 prompts")),
    Bad("sampling_params a dict", lambda c: c.llm.generate([[1]], {"temperature": 0}, use_tqdm=False),
        TypeError, ("sampling_params", "dict")),
    Bad("request_id already in use", duplicate_request_id, ValueError, ("request_id 'mine'", "already in use")),
    Bad("text prompt, skip_tokenizer_init=True",
        lambda c: c.no_tokenizer.generate(["hello"], GREEDY, use_tqdm=False), ValueError,
        ("skip_tokenizer_init=True", "token ids")),
    Bad("stop='x', skip_tokenizer_init=True",
        lambda c: c.no_tokenizer.generate([[1]], SamplingParams(stop="x"), use_tqdm=False), ValueError,
        ("stop strings", "skip_tokenizer_init=True")),
    # sampling parameters
    Bad("max_tokens=0", params(max_tokens=0), ValueError, ("max_tokens=0", ">= 1")),
    Bad("max_tokens=-1", params(max_tokens=-1), ValueError, ("max_tokens=-1", ">= 1")),
    Bad("max_tokens=2.5", params(max_tokens=2.5), TypeError, ("max_tokens", "None or an int", "float 2.5")),
    Bad("min_tokens=5, max_tokens=4", params(min_tokens=5, max_tokens=4), ValueError,
        ("min_tokens=5", "<= max_tokens=4")),
    Bad("min_tokens=-1", params(min_tokens=-1), ValueError, ("min_tokens=-1", ">= 0")),
    Bad("temperature=-0.1", params(temperature=-0.1), ValueError, ("temperature=-0.1", ">= 0")),
    Bad("temperature=nan", params(temperature=math.nan), ValueError, ("temperature=nan", "finite")),
    Bad("temperature=inf", params(temperature=math.inf), ValueError, ("temperature=inf", "finite")),
    Bad("temperature='0.5'", params(temperature="0.5"), TypeError, ("temperature", "a number", "str '0.5'")),
    Bad("top_p=0", params(top_p=0.0), ValueError, ("top_p=0.0", "(0, 1]")),
    Bad("top_p=1.5", params(top_p=1.5), ValueError, ("top_p=1.5", "(0, 1]")),
    Bad("top_p=nan", params(top_p=math.nan), ValueError, ("top_p=nan", "(0, 1]")),
    Bad("top_k=-2", params(top_k=-2), ValueError, ("top_k=-2", "-1 or 0 (disabled)", "[1, 2**63 - 1]")),
    Bad("top_k=1.5", params(top_k=1.5), TypeError, ("top_k", "an int", "float 1.5")),
    Bad("top_k=2**63", params(top_k=2**63), ValueError, ("top_k=9223372036854775808", "-1 or 0 (disabled)")),
    Bad("top_k=True", params(top_k=True), TypeError, ("top_k", "an int", "bool True")),
    Bad("min_p=-0.1", params(min_p=-0.1), ValueError, ("min_p=-0.1", "[0, 1]")),
    Bad("min_p=1.1", params(min_p=1.1), ValueError, ("min_p=1.1", "[0, 1]")),
    Bad("min_p=nan", params(min_p=math.nan), ValueError, ("min_p=nan", "[0, 1]")),
    Bad("stop=3", params(stop=3), TypeError, ("stop", "str or a list of str", "int 3")),
    Bad("stop=['a', 3]", params(stop=["a", 3]), TypeError, ("stop", "str or a list of str", "['a', 3]")),
    Bad("stop=b'x'", params(stop=b"x"), TypeError, ("stop", "str or a list of str", "bytes b'x'")),
    Bad("stop=''", params(stop=""), ValueError, ("stop strings", "empty")),
    Bad("stop_token_ids=[-1]", params(stop_token_ids=[-1]), ValueError, ("stop_token_ids=[-1]", ">= 0")),
    Bad("stop_token_ids=[600], min_tokens=2", params(min_tokens=2, stop_token_ids=[600]), ValueError,
        ("stop_token_ids=[600]", "[0, 511]")),
    Bad("n=0", params(n=0), ValueError, ("n=0", ">= 1")),
    Bad("n=1.5", params(n=1.5), TypeError, ("n", "an int", "float 1.5")),
    Bad("logprobs=-1", params(logprobs=-1), ValueError, ("logprobs=-1", ">= 0")),
    Bad("logprobs=21 (max_logprobs=20)", params(logprobs=21), ValueError, ("logprobs=21", "max_logprobs=20")),
    Bad("logprobs=600 (max_logprobs=1000, vocabulary 512)",
        lambda c: c.many_logprobs.generate([[1, 2, 3]], SamplingParams(logprobs=600, max_tokens=2), use_tqdm=False),
        ValueError, ("logprobs=600", "512")),
    Bad("seed=-1", params(seed=-1), ValueError, ("seed=-1", "out of range", "int")),
    Bad("seed=2**64, temperature=1", params(seed=2**64, temperature=1.0), ValueError,
        ("seed=18446744073709551616", "out of range")),
    Bad("ignore_eos='yes'", params(ignore_eos="yes"), TypeError, ("ignore_eos", "bool", "'yes'")),
    # engine arguments
    Bad("LLM(max_num_sequences=4)", engine_args(max_num_sequences=4), TypeError,
        ("max_num_sequences", "accepted", "max_num_seqs")),
    Bad("gpu_memory_utilization=0", engine_args(gpu_memory_utilization=0), ValueError,
        ("gpu_memory_utilization=0", "(0, 1]")),
    Bad("gpu_memory_utilization=1.5", engine_args(gpu_memory_utilization=1.5), ValueError,
        ("gpu_memory_utilization=1.5", "(0, 1]")),
    Bad("gpu_memory_utilization=nan", engine_args(gpu_memory_utilization=math.nan), ValueError,
        ("gpu_memory_utilization=nan", "(0, 1]")),
    Bad("kvcache_block_size=24", engine_args(kvcache_block_size=24), ValueError,
        ("kvcache_block_size=24", "power of two", "[16, 256]")),
    Bad("kvcache_block_size=8", engine_args(kvcache_block_size=8), ValueError, ("kvcache_block_size=8", "[16, 256]")),
    Bad("kvcache_block_size=512", engine_args(kvcache_block_size=512), ValueError,
        ("kvcache_block_size=512", "[16, 256]")),
    Bad("max_num_seqs=0", engine_args(max_num_seqs=0), ValueError, ("max_num_seqs=0", ">= 1")),
    Bad("max_num_seqs=2.0", engine_args(max_num_seqs=2.0), TypeError, ("max_num_seqs", "int", "2.0")),
    Bad("max_num_batched_tokens=0", engine_args(max_num_batched_tokens=0), ValueError,
        ("max_num_batched_tokens=0", ">= 1")),
    Bad("max_model_len=1", engine_args(max_model_len=1), ValueError, ("max_model_len=1", ">= 2")),
    Bad("num_kv_blocks=3 (max_model_len=64 needs 4)", engine_args(num_kv_blocks=3), ValueError,
        ("3 blocks", "max_model_len=64", "needs 4 blocks")),
    Bad("num_decode_passes=0", engine_args(num_decode_passes=0), ValueError, ("num_decode_passes=0", ">= 1")),
    # model and checkpoint
    Bad("model path missing", lambda c: LLM(os.path.join(c.scratch, "no", "such", "model"), **ENGINE_KW),
        ValueError, ("model=", "no/such/model", "neither a local directory nor a hub id", "no such directory")),
    Bad("config.json missing", checkpoint(lambda p: os.remove(os.path.join(p, "config.json"))), ValueError,
        ("cannot read a model config", "broken")),
    Bad("config.json of LlamaForCausalLM", checkpoint(edit_config(architectures=["LlamaForCausalLM"],
                                                                  model_type="llama")),
        ValueError, ("LlamaForCausalLM", "not supported", "Qwen3ForCausalLM")),
    Bad("config.json with custom code (auto_map)",
        checkpoint(edit_config(model_type="custom_qwen", auto_map={"AutoConfig": "configuration_x.XConfig"})),
        ValueError, ("cannot read a model config", "custom code")),
    Bad("tensor missing", checkpoint(edit_tensors(drop("model.layers.1.self_attn.k_proj.weight"))), ValueError,
        ("lacks", "model.layers.1.self_attn.qkv_proj.weight", "'k'")),
    Bad("extra tensor", checkpoint(edit_tensors(lambda t: t.__setitem__("model.layers.0.extra.weight",
                                                                        torch.zeros(2)))),
        ValueError, ("tensor(s) the model does not", "model.layers.0.extra.weight")),
    Bad("tensor of a wrong shape", checkpoint(edit_tensors(shrink("model.layers.0.mlp.up_proj.weight"))), ValueError,
        ("model.layers.0.mlp.up_proj.weight", "shape")),
    Bad("safetensors file truncated", checkpoint(truncate), ValueError, ("model.safetensors", "truncated or corrupt")),
    Bad("safetensors file of zeros", checkpoint(garbage), ValueError, ("model.safetensors", "truncated or corrupt")),
    Bad("only pytorch_model.bin (pickle)", checkpoint(pickle_only), ValueError,
        ("no *.safetensors files", "only safetensors")),
    Bad("index names a missing shard", checkpoint(index_names_missing_shard), ValueError,
        ("model.safetensors.index.json", "missing file", "model-00002-of-00002.safetensors")),
]


@pytest.fixture(scope="module")
def ctx(llm, tiny_model_dir, tmp_path_factory) -> Ctx:
    return Ctx(llm, tiny_model_dir, str(tmp_path_factory.mktemp("bad-input")))


@pytest.fixture(scope="module")
def in_flight_reference(llm) -> list[int]:
    return llm.generate([IN_FLIGHT_PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def trigger(case: Bad, c: Ctx) -> BaseException | None:
    try:
        case.call(c)
    except Exception as e:
        return e
    return None


@pytest.mark.parametrize(
    "case",
    [pytest.param(b, id=b.label, marks=[pytest.mark.xfail(strict=True, reason=b.bug)] if b.bug else [])
     for b in BAD_INPUTS],
)
def test_bad_input(ctx, in_flight_reference, case: Bad):
    engine = ctx.llm.engine
    rid = engine.add_request(IN_FLIGHT_PROMPT, GREEDY)
    engine.step()
    err = trigger(case, ctx)
    results = finish_all(engine)  # the request in flight is unaffected
    assert results[rid].outputs[0].token_ids == in_flight_reference
    assert_clean(engine)
    assert err is not None, f"{case.label}: no error"
    assert isinstance(err, case.exc), f"{case.label}: {type(err).__name__}: {err}"
    message = str(err)
    for word in case.words:
        assert word in message, f"{case.label}: {word!r} not in {message!r}"


def test_bad_input_report(ctx):
    """The table of docs/reliability.md, from running every case (`pytest -rP` shows it)."""
    rows = ["| input | error | message (excerpt) |", "|---|---|---|"]
    for case in BAD_INPUTS:
        err = trigger(case, ctx)
        kind = "no error" if err is None else type(err).__name__
        message = "" if err is None else " ".join(str(err).replace(ctx.scratch, "<tmp>").split())
        if len(message) > 150:
            message = message[:147] + "..."
        if case.bug:
            kind += " (bug: fix pending)"
        rows.append(f"| `{case.label}` | {kind} | {message.replace('|', '/')} |")
    print("\n".join(rows))
    assert len(rows) == len(BAD_INPUTS) + 2


def test_bad_stop_token_ids_do_not_break_other_requests(llm):
    """A request whose stop_token_ids lie outside the vocabulary must be refused when added;
    accepted, it would make every step fail, and the requests beside it would never finish."""
    engine = llm.engine
    good = engine.add_request(IN_FLIGHT_PROMPT, GREEDY)
    try:
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[VOCAB + 88]))
        results = finish_all(engine)
        assert results[good].outputs[0].finish_reason == "length"
    finally:
        for rid in list(engine.requests):
            engine.abort_request(rid)


def test_seed_at_the_int64_limit_with_n_samples(llm):
    """seed + i of the n samples stays a valid generator seed at the top of the int64 range
    (2**64 and above are refused: see BAD_INPUTS)."""
    out = llm.generate([[1, 2, 3]], SamplingParams(n=2, seed=2**63 - 1, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert [len(c.token_ids) for c in out[0].outputs] == [3, 3]
    assert_clean(llm.engine)


def test_explicit_request_id_does_not_collide_with_generate(llm):
    """generate numbers its requests itself; an id a caller chose must not make it fail."""
    engine = llm.engine
    taken = str(int(engine.next_request_id()) + 2)
    engine.add_request(IN_FLIGHT_PROMPT, GREEDY, request_id=taken)
    try:
        outs = llm.generate([[1], [2], [3]], GREEDY, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8, 8]
        assert len({o.request_id for o in outs} | {taken}) == 4
    finally:
        for rid in list(engine.requests):
            engine.abort_request(rid)
        assert_clean(engine)


# ---- max_model_len ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 8])
@pytest.mark.parametrize("prompt_len, max_tokens", [(1, None), (40, 100), (MAX_LEN - 1, 5), (MAX_LEN - 2, None)])
def test_prompt_plus_max_tokens_beyond_max_model_len_stops_with_length(tiny_model_dir, hf_tiny, steps,
                                                                      prompt_len, max_tokens):
    llm = LLM(tiny_model_dir, num_decode_passes=steps, num_kv_blocks=5, **ENGINE_KW)
    prompt = [(7 * i + 3) % VOCAB for i in range(prompt_len)]
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=2)
    out = run_checked(llm, [prompt, prompt[: max(1, prompt_len // 2)]], sp)[0]
    expected = hf_greedy(hf_tiny, prompt, MAX_LEN - prompt_len)[0]
    for c in out.outputs:
        assert c.token_ids == expected and c.finish_reason == "length"
    assert len(prompt) + len(out.outputs[0].token_ids) == MAX_LEN


# ---- memory pressure -------------------------------------------------------------------------


def pressure_workload(num: int = 18, seed: int = 7) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 1..50 tokens (a third share a 20-token prefix) with mixed parameters:
    greedy, greedy to max_model_len, greedy with EOS, seeded sampling with n=2, logprobs."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, VOCAB) for _ in range(20)]
    prompts, sps = [], []
    for i in range(num):
        own = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 50))]
        prompts.append(shared + own[:rng.randint(1, 25)] if i % 3 == 0 else own)
        kind = i % 6
        if kind == 0:
            sps.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True))
        elif kind == 1:
            sps.append(SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
        elif kind == 2:
            sps.append(SamplingParams(temperature=0, max_tokens=rng.randint(5, 40)))
        elif kind == 3:
            sps.append(SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=i, n=2,
                                      max_tokens=rng.randint(1, 30), ignore_eos=True))
        elif kind == 4:
            sps.append(SamplingParams(temperature=0, logprobs=3, max_tokens=rng.randint(1, 20), ignore_eos=True))
        else:
            sps.append(SamplingParams(temperature=1.0, min_p=0.05, seed=1000 + i, max_tokens=rng.randint(2, 30),
                                      min_tokens=2))
    return prompts, sps


def outputs_key(outs) -> list:
    return [[(c.index, c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def ample_outputs(llm):
    prompts, sps = pressure_workload()
    return llm.generate(prompts, sps, use_tqdm=False)


@pytest.mark.parametrize(
    "engine_kw",
    [
        dict(num_kv_blocks=4, num_decode_passes=1),
        dict(num_kv_blocks=5, num_decode_passes=8, max_num_batched_tokens=32),
        dict(num_kv_blocks=6, num_decode_passes=8, max_num_seqs=3, enable_prefix_caching=False),
        dict(num_kv_blocks=8, num_decode_passes=4, max_num_batched_tokens=16),
    ],
    ids=["4blocks", "5blocks-chunked", "6blocks-nocache", "8blocks-budget16"],
)
def test_tiny_pool_outputs_equal_ample_pool(tiny_model_dir, ample_outputs, engine_kw):
    llm = LLM(tiny_model_dir, **{**ENGINE_KW, **engine_kw})
    prompts, sps = pressure_workload()
    outs = run_checked(llm, prompts, sps)  # integrity after every step, no block leaked
    assert llm.engine.get_stats()["num_preemptions"] > 0, "the pool was not tight enough to preempt"
    assert outputs_key(outs) == outputs_key(ample_outputs)
    for o, ref in zip(outs, ample_outputs):
        for c, r in zip(o.outputs, ref.outputs):
            if r.cumulative_logprob is not None:
                assert c.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-3)
                assert [sorted(d) for d in c.logprobs] == [sorted(d) for d in r.logprobs]
    assert_clean(llm.engine)


def test_many_requests_through_a_minimal_pool(tiny_model_dir, llm):
    """60 requests through the smallest pool max_model_len allows (4 blocks): all complete."""
    tight = LLM(tiny_model_dir, num_kv_blocks=4, max_num_seqs=16, **ENGINE_KW)
    prompts, sps = pressure_workload(num=60, seed=11)
    outs = run_checked(tight, prompts, sps)
    assert outputs_key(outs) == outputs_key(llm.generate(prompts, sps, use_tqdm=False))
    assert tight.engine.get_stats()["num_preemptions"] > 0
    assert_clean(tight.engine)


# ---- aborts ----------------------------------------------------------------------------------


def test_abort_running_waiting_and_preempted_requests(tiny_model_dir, llm):
    tight = LLM(tiny_model_dir, num_kv_blocks=4, max_num_seqs=4, num_decode_passes=1, **ENGINE_KW)
    engine, bm = tight.engine, tight.engine.block_manager
    rng = random.Random(3)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(20)] for _ in range(7)]
    sps = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 6 + [
        SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=40, ignore_eos=True)]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, sps)]
    aborted: dict[str, str] = {}

    def abort(rid: str, kind: str) -> None:
        state = engine.requests[rid]
        seqs = state.seqs
        held = Counter(b for s in seqs for b in s.block_table)
        own = sum(1 for b, n in held.items() if bm.ref_counts[b] == n)
        free_before = bm.num_free_blocks
        out = engine.abort_request(rid)
        assert out.request_id == rid and out.finished
        assert all(c.finish_reason == "abort" for c in out.outputs)
        assert rid not in engine.requests and engine.abort_request(rid) is None
        assert all(s.status is SequenceStatus.FINISHED and not s.block_table for s in seqs)
        assert not {s.seq_id for s in seqs} & set(engine.runner.sampling.seq_generators)
        assert bm.num_free_blocks == free_before + own
        assert all(s not in engine.scheduler.waiting and s not in engine.scheduler.running for s in seqs)
        engine.check_integrity()
        aborted[kind] = rid

    results = {}
    for _ in range(2000):
        if len(aborted) == 3 or not engine.has_unfinished_requests():
            break
        for out in engine.step():
            results[out.request_id] = out
        engine.check_integrity()
        live = [s for st in engine.requests.values() for s in st.seqs]
        if "waiting" not in aborted:
            waiting = [s for s in live if s.status is SequenceStatus.WAITING and s.num_preemptions == 0]
            if waiting:
                abort(waiting[-1].request_id, "waiting")
                continue
        if "preempted" not in aborted:
            preempted = [s for s in live if s.status is SequenceStatus.WAITING and s.num_preemptions > 0]
            if preempted:
                abort(preempted[0].request_id, "preempted")
                continue
        if "preempted" in aborted and "running" not in aborted:
            running = [s for s in live if s.status is SequenceStatus.RUNNING and s.block_table]
            if running:
                abort(running[0].request_id, "running")
    assert set(aborted) == {"waiting", "preempted", "running"}, f"only found {sorted(aborted)}"
    results.update(finish_all(engine))
    assert_clean(engine)
    rest = [i for i, rid in enumerate(ids) if rid not in aborted.values()]
    assert sorted(results) == sorted(ids[i] for i in rest), "a request was lost"
    expected = llm.generate([prompts[i] for i in rest], [sps[i] for i in rest], use_tqdm=False)
    assert outputs_key([results[ids[i]] for i in rest]) == outputs_key(expected)


def test_abort_half_of_a_request_with_n_samples(tiny_model_dir):
    """Aborting a request whose samples are split between running and waiting frees both."""
    tight = LLM(tiny_model_dir, num_kv_blocks=4, max_num_seqs=1, **ENGINE_KW)
    engine = tight.engine
    rid = engine.add_request([5] * 30, SamplingParams(n=3, temperature=0.7, max_tokens=20, ignore_eos=True))
    engine.step()
    statuses = {s.status for s in engine.requests[rid].seqs}
    assert statuses == {SequenceStatus.RUNNING, SequenceStatus.WAITING}
    out = engine.abort_request(rid)
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert_clean(engine)


# ---- faults inside a step ---------------------------------------------------------------------


class Fault:
    """Wraps a callable so that its n-th call raises exc (once)."""

    def __init__(self, fn: Callable, at_call: int, exc: type[BaseException]) -> None:
        self.fn, self.at_call, self.exc, self.calls, self.fired = fn, at_call, exc, 0, False

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at_call:
            self.fired = True
            raise self.exc("fault injected into one step")
        return self.fn(*args, **kwargs)


def inject(monkeypatch, engine, where: str, at_call: int, exc: type[BaseException]) -> Fault:
    runner = engine.runner
    if where == "build":  # building the step's inputs
        fault = Fault(model_runner_module.build_step_inputs, at_call, exc)
        monkeypatch.setattr(model_runner_module, "build_step_inputs", fault)
    elif where == "forward":  # the model's forward
        fault = Fault(runner.forward, at_call, exc)
        monkeypatch.setattr(runner, "forward", fault)
    elif where == "sampler":  # sampling
        fault = Fault(runner.sampler, at_call, exc)
        monkeypatch.setattr(runner, "sampler", fault)
    else:  # scheduling
        fault = Fault(engine.scheduler.schedule, at_call, exc)
        monkeypatch.setattr(engine.scheduler, "schedule", fault)
    return fault


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["schedule", "build", "forward", "sampler"])
@pytest.mark.parametrize("at_call", [1, 7])
def test_fault_in_a_step_leaves_the_engine_clean(tiny_model_dir, ample_outputs, monkeypatch, exc, where, at_call):
    tight = LLM(tiny_model_dir, num_kv_blocks=5, **ENGINE_KW)
    engine = tight.engine
    prompts, sps = pressure_workload()
    fault = inject(monkeypatch, engine, where, at_call, exc)
    with pytest.raises(exc, match="fault injected"):
        tight.generate(prompts, sps, use_tqdm=False)
    assert fault.fired
    assert_clean(engine)
    monkeypatch.undo()
    outs = run_checked(tight, prompts, sps)
    assert outputs_key(outs) == outputs_key(ample_outputs)
    assert_clean(engine)


def test_interrupted_generate_keeps_the_other_requests_of_the_engine(tiny_model_dir, llm, monkeypatch):
    """generate cleans up its own requests only: one added through the engine API runs on."""
    tight = LLM(tiny_model_dir, num_kv_blocks=5, **ENGINE_KW)
    engine = tight.engine
    other_sp = SamplingParams(temperature=0.8, seed=9, max_tokens=30, ignore_eos=True)
    other = engine.add_request(IN_FLIGHT_PROMPT, other_sp)
    engine.step()
    inject(monkeypatch, engine, "forward", 4, KeyboardInterrupt)
    prompts, sps = pressure_workload(num=6)
    with pytest.raises(KeyboardInterrupt):
        tight.generate(prompts, sps, use_tqdm=False)
    assert list(engine.requests) == [other]
    monkeypatch.undo()
    result = finish_all(engine)[other]
    expected = llm.generate([IN_FLIGHT_PROMPT], other_sp, use_tqdm=False)[0]
    assert outputs_key([result]) == outputs_key([expected])
    assert_clean(engine)


@pytest.mark.parametrize("where", ["build", "forward", "sampler"])
def test_failed_step_is_retried_by_the_next_step(tiny_model_dir, ample_outputs, monkeypatch, where):
    """Through the engine API, a step that raised can simply be stepped again: nothing is
    lost, nothing is applied twice."""
    tight = LLM(tiny_model_dir, num_kv_blocks=5, **ENGINE_KW)
    engine = tight.engine
    prompts, sps = pressure_workload()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, sps)]
    faults = [inject(monkeypatch, engine, where, at, RuntimeError) for at in (2, 9, 30)]
    results, failures = {}, 0
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        try:
            outs = engine.step()
        except RuntimeError:
            failures += 1
            outs = []
        for out in outs:
            results[out.request_id] = out
        engine.check_integrity()
    assert failures == 3 and all(f.fired for f in faults)
    assert outputs_key([results[i] for i in ids]) == outputs_key(ample_outputs)
    assert_clean(engine)


def test_interrupt_while_queueing_leaves_nothing_behind(tiny_model_dir, monkeypatch):
    """A KeyboardInterrupt may arrive while generate is still adding its requests."""
    tight = LLM(tiny_model_dir, num_kv_blocks=5, **ENGINE_KW)
    engine = tight.engine
    monkeypatch.setattr(engine, "add_request", Fault(engine.add_request, 2, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tight.generate([[1, 2], [3, 4], [5, 6]], GREEDY, use_tqdm=False)
    assert_clean(engine)


# ---- no remote code, no pickle -----------------------------------------------------------------


MARKER_CODE = "import pathlib\npathlib.Path(__file__).with_name('MARKER').write_text('imported')\n{body}"


def plant_custom_code(path: str, model_type: str) -> str:
    """config.json and tokenizer_config.json point at python files that leave a marker when imported."""
    for module, body in [("configuration_evil", "from transformers import PretrainedConfig\n"
                                                "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"),
                         ("modeling_evil", ""), ("tokenization_evil", "")]:
        with open(os.path.join(path, f"{module}.py"), "w") as f:
            f.write(MARKER_CODE.format(body=body))
    edit_config(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                 "AutoModelForCausalLM": "modeling_evil.EvilModel"})(path)
    file = os.path.join(path, "tokenizer_config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    with open(file, "w") as f:
        json.dump(cfg, f)
    return os.path.join(path, "MARKER")


def test_custom_code_of_a_known_architecture_is_ignored(tiny_model_dir, tmp_path):
    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    marker = plant_custom_code(str(path), "qwen3")
    llm = LLM(str(path), **ENGINE_KW)
    out = llm.generate(["the quick brown fox"], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8
    assert not os.path.exists(marker), "code from the checkpoint directory was imported"


def test_custom_code_of_an_unknown_architecture_is_refused(tiny_model_dir, tmp_path):
    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    marker = plant_custom_code(str(path), "evil")
    with pytest.raises(ValueError, match="custom code"):
        LLM(str(path), **ENGINE_KW)
    assert not os.path.exists(marker), "code from the checkpoint directory was imported"


class _Planted:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_files_beside_safetensors_are_never_unpickled(tiny_model_dir, tmp_path):
    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    marker = os.path.join(path, "MARKER")
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        with open(os.path.join(path, name), "wb") as f:
            pickle.dump(_Planted(marker), f)
    llm = LLM(str(path), **ENGINE_KW)
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(path), **ENGINE_KW)
    assert not os.path.exists(marker), "a pickle file was loaded"
