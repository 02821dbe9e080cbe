"""What a new user meets first: the CPU path without triton, clear errors for a checkpoint
without a tokenizer, for a missing path and for SamplingParams of the wrong type or name,
and bench.py on a CPU."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from random import randint, seed

import huggingface_hub
import pytest
import torch
from engine_utils import SMALL_KV

from myvllm import LLM, SamplingParams
from myvllm.sampling_params import UNSUPPORTED_VLLM_FIELDS, _reject_unknown_keywords

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "chat_template.jinja")
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
THROUGHPUT_LINE = re.compile(r"^Total: (\d+)tok, Time: [\d.]+s, Throughput: [\d.]+tok/s$", re.M)


def run_python(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- the CPU path imports no triton ----------------------------------------------------------------

NO_TRITON_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        # `import triton` fails as if the package were not installed.
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())
    from myvllm import LLM, SamplingParams
    import myvllm.serve, myvllm.entrypoints.api_server, myvllm.entrypoints.async_engine

    llm = LLM(sys.argv[1], device="cpu", dtype="float32", cpu_kv_cache_gib=0.05)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=5, ignore_eos=True)
    outs = llm.generate(["the quick brown fox", "the quick brown fox"], [greedy, sampled], use_tqdm=False)
    assert not [m for m in sys.modules if m == "triton" or m.startswith("triton.")]
    print(json.dumps([o.outputs[0].token_ids for o in outs]))
""")


def test_cpu_path_runs_without_triton(tiny_model_dir):
    proc = run_python(["-c", NO_TRITON_SCRIPT, tiny_model_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]
    greedy_ids, sampled_ids = json.loads(proc.stdout.strip().splitlines()[-1])
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=5, ignore_eos=True)
    reference = LLM(tiny_model_dir, **SMALL_KV).generate(["the quick brown fox"] * 2, [GREEDY, sampled],
                                                         use_tqdm=False)
    assert [greedy_ids, sampled_ids] == [o.outputs[0].token_ids for o in reference]


# ---- checkpoints without a tokenizer ---------------------------------------------------------------

@pytest.fixture(scope="module")
def no_tokenizer_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny checkpoint's weights and configs, without any tokenizer file."""
    path = str(tmp_path_factory.mktemp("no-tokenizer"))
    for name in os.listdir(tiny_model_dir):
        if name not in TOKENIZER_FILES:
            shutil.copy(os.path.join(tiny_model_dir, name), path)
    return path


def test_model_dir_without_tokenizer_files_is_named(no_tokenizer_dir):
    with pytest.raises(ValueError, match="has no tokenizer files") as info:
        LLM(no_tokenizer_dir, **SMALL_KV)
    message = str(info.value)
    assert message.startswith(f"model directory {no_tokenizer_dir!r}")
    assert "tokenizer=" in message and "skip_tokenizer_init=True" in message


def test_the_suggested_fixes_work(no_tokenizer_dir, tiny_model_dir):
    ids_only = LLM(no_tokenizer_dir, skip_tokenizer_init=True, **SMALL_KV)
    assert len(ids_only.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 5
    with_tokenizer = LLM(no_tokenizer_dir, tokenizer=tiny_model_dir, **SMALL_KV)
    out = with_tokenizer.generate(["the quick brown fox"], GREEDY, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 1 and out.outputs[0].text


def test_tokenizer_dir_without_tokenizer_files_is_named(no_tokenizer_dir, tiny_model_dir):
    with pytest.raises(ValueError, match=f"^tokenizer directory {re.escape(repr(no_tokenizer_dir))} has no"):
        LLM(tiny_model_dir, tokenizer=no_tokenizer_dir, **SMALL_KV)


def test_tokenizer_with_an_empty_vocabulary_is_rejected(no_tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = str(tmp_path / "empty-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|im_end|>").save_pretrained(empty)
    with pytest.raises(ValueError, match="empty vocabulary") as info:
        LLM(no_tokenizer_dir, tokenizer=empty, **SMALL_KV)
    assert repr(empty) in str(info.value) and "skip_tokenizer_init=True" in str(info.value)


# ---- missing paths name the argument, with a hint that fits ----------------------------------------

@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_tokenizer_path_names_the_tokenizer(tiny_model_dir, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="no such directory") as info:
        LLM(tiny_model_dir, tokenizer=missing, **SMALL_KV)
    message = str(info.value)
    assert message.startswith(f"tokenizer={missing!r}")
    assert "model" not in message.replace(missing, "") and "download_model.py" not in message


def test_tokenizer_path_that_is_a_file(tiny_model_dir):
    file = os.path.join(tiny_model_dir, "tokenizer.json")
    with pytest.raises(ValueError, match=f"^tokenizer={re.escape(repr(file))} is a file"):
        LLM(tiny_model_dir, tokenizer=file, **SMALL_KV)


def test_missing_tokenizer_hub_id_suggests_that_id(tiny_model_dir, tmp_path, offline):
    with pytest.raises(ValueError, match=r"python download_model.py --repo tiny-org/absent-tokenizer$") as info:
        LLM(tiny_model_dir, tokenizer="tiny-org/absent-tokenizer", download_dir=str(tmp_path), **SMALL_KV)
    assert str(info.value).startswith("tokenizer='tiny-org/absent-tokenizer'")
    assert "Qwen" not in str(info.value)


def test_missing_published_checkpoint_dir_suggests_its_download(tmp_path):
    with pytest.raises(ValueError) as info:
        LLM(str(tmp_path / "models" / "Qwen3-8B"), **SMALL_KV)
    assert str(info.value).endswith(
        f"no such directory; download it with: python download_model.py --repo Qwen/Qwen3-8B "
        f"--dir {tmp_path / 'models'}")


def test_missing_default_download_dir_suggests_the_plain_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where ./huggingface/ does not exist
    with pytest.raises(ValueError) as info:
        LLM("./huggingface/Qwen3-14B", **SMALL_KV)
    assert str(info.value).endswith(
        "no such directory; download it with: python download_model.py --repo Qwen/Qwen3-14B")


def test_missing_unpublished_name_suggests_no_repo(tmp_path):
    with pytest.raises(ValueError) as info:
        LLM(str(tmp_path / "Qwen3-8B-my-finetune"), **SMALL_KV)
    assert str(info.value).endswith("no such directory")


# ---- SamplingParams: wrong types and names ----------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature="0.5"), "temperature must be a number, got str '0.5'"),
        (dict(temperature=None), "temperature must be a number, got NoneType None"),
        (dict(top_p=True), "top_p must be a number, got bool True"),
        (dict(min_p="0"), "min_p must be a number, got str '0'"),
        (dict(n=2.0), "n must be an int, got float 2.0"),
        (dict(top_k="5"), "top_k must be an int, got str '5'"),
        (dict(seed=1.0), "seed must be None or an int, got float 1.0"),
        (dict(max_tokens=8.0), "max_tokens must be None or an int, got float 8.0"),
        (dict(min_tokens=None), "min_tokens must be an int, got NoneType None"),
        (dict(logprobs=True), "logprobs must be None or an int, got bool True"),
        (dict(logprobs=2.0), "logprobs must be None or an int, got float 2.0"),
        (dict(stop_token_ids=[1, 2.0]), "stop_token_ids must be None or a list of ints, got list [1, 2.0]"),
        (dict(stop_token_ids=7), "stop_token_ids must be None or a list of ints, got int 7"),
        (dict(ignore_eos="no"), "ignore_eos must be a bool, got str 'no'"),
    ],
)
def test_wrong_type_is_a_type_error_naming_field_value_and_type(kwargs, words):
    with pytest.raises(TypeError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == words


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=-0.5), "temperature=-0.5 is out of range: must be a finite number >= 0"),
        (dict(n=0), "n=0 is out of range: must be >= 1"),
        (dict(logprobs=-1), "logprobs=-1 is out of range: must be >= 0"),
        (dict(top_k=-3), "top_k=-3 is out of range: must be -1 or 0 (disabled), else in [1, 2**63 - 1]"),
        (dict(stop_token_ids=[3, -1]), "stop_token_ids=[3, -1] is out of range: token ids must be >= 0"),
    ],
)
def test_right_type_out_of_range_stays_a_value_error(kwargs, words):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == words


@pytest.mark.parametrize("name", ["best_of", "guided_decoding",
                                  "logits_processors", "bad_words", "truncate_prompt_tokens", "output_kind",
                                  "detokenize", "spaces_between_special_tokens", "allowed_token_ids", "logit_bias"])
def test_unsupported_vllm_field_says_so(name):
    with pytest.raises(TypeError, match=f"^{name} is a vLLM SamplingParams field this engine does not support yet"):
        SamplingParams(**{name: None})


def test_unknown_name_lists_the_accepted_fields():
    with pytest.raises(TypeError) as info:
        SamplingParams(temprature=0.5)
    message = str(info.value)
    assert message.startswith("temprature is not a SamplingParams field; accepted fields: ")
    accepted = message.split("accepted fields: ")[1].split(", ")
    assert accepted == [f.name for f in dataclasses.fields(SamplingParams) if f.init]


def test_a_new_field_wins_over_the_unsupported_list():
    @_reject_unknown_keywords
    @dataclasses.dataclass
    class WithBestOf:
        best_of: int = 1

    assert "best_of" in UNSUPPORTED_VLLM_FIELDS
    assert WithBestOf(best_of=2).best_of == 2
    with pytest.raises(TypeError, match="accepted fields: best_of$"):
        WithBestOf(top_q=1)


def test_dataclass_tools_keep_working():
    params = SamplingParams(temperature=0.5, stop="x", stop_token_ids=(3, 4), max_tokens=7)
    changed = dataclasses.replace(params, top_p=0.5)
    assert (changed.top_p, changed.temperature, changed.stop_list, changed.stop_token_ids) == (0.5, 0.5, ["x"], [3, 4])
    with pytest.raises(TypeError, match="top_p must be a number"):
        dataclasses.replace(params, top_p="0.5")
    for clone in (copy.copy(params), copy.deepcopy(params)):
        assert clone == params and clone.stop_list == ["x"]
    assert SamplingParams() == SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=16)
    assert SamplingParams(1, 0.25).temperature == 0.25


# ---- bench.py ---------------------------------------------------------------------------------------

def test_bench_help_gives_every_flag_a_text_and_a_default():
    import bench

    parser = bench.build_parser()
    formatter = parser.formatter_class(prog="bench.py")
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._get_help_string(action)
        assert text and "default" in text, action.option_strings


def test_bench_keeps_the_seed_workload_on_a_gpu():
    import bench

    args = bench.build_parser().parse_args([])
    bench.default_workload(args, torch.device("cuda"))
    assert (args.num_seqs, args.max_input_len, args.max_output_len) == (256, 1024, 1024)
    prompts, params = bench.workload(8, 1024, 1024, 0, vocab_size=151936)
    seed(0)  # the seed workload's definition, as the module docstring gives it
    expected = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(8)]
    assert prompts == expected and [p.max_tokens for p in params] == [randint(100, 1024) for _ in range(8)]


def test_bench_draws_ids_within_a_small_vocabulary():
    import bench

    prompts, _ = bench.workload(16, 200, 200, 0, vocab_size=300)
    ids = [t for p in prompts for t in p]
    assert max(ids) == 299 and min(ids) == 0


def test_bench_on_cpu_defaults_to_a_small_workload(caplog):
    import bench

    args = bench.build_parser().parse_args([])
    with caplog.at_level("WARNING", logger="bench"):
        bench.default_workload(args, torch.device("cpu"))
    assert (args.num_seqs, args.max_input_len, args.max_output_len) == (4, 128, 64)
    assert "CPU" in caplog.text
    explicit = bench.build_parser().parse_args(["--num-seqs", "3"])
    bench.default_workload(explicit, torch.device("cpu"))
    assert explicit.num_seqs == 3


def test_bench_runs_on_cpu_with_the_tiny_model(tiny_model_dir, tmp_path):
    record = str(tmp_path / "bench.json")
    proc = run_python(["bench.py", "--model", tiny_model_dir, "--device", "cpu", "--num-seqs", "3",
                       "--max-input-len", "40", "--max-output-len", "6", "--block-size", "16", "--json", record])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(t) for t in THROUGHPUT_LINE.findall(proc.stdout)] == [3 * 6]
    assert "small one" not in proc.stderr  # sizes given: no warning
    with open(record) as f:
        data = json.load(f)
    assert data["output_tokens"] == 18 and data["config"]["num_seqs"] == 3


def test_bench_cpu_default_run_warns_and_finishes(tiny_model_dir):
    proc = run_python(["bench.py", "--model", tiny_model_dir, "--device", "cpu", "--block-size", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs on a CPU" in proc.stderr
    assert [int(t) for t in THROUGHPUT_LINE.findall(proc.stdout)] == [4 * 64]


def test_bench_help_runs():
    proc = run_python(["bench.py", "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prompts in the workload (default: 256 on a GPU, 4 on a CPU)" in " ".join(proc.stdout.split())
