"""Hub ids resolve through huggingface_hub's cache (offline here), missing ones fail clearly."""

from __future__ import annotations

import os
import shutil

import huggingface_hub
import pytest
from engine_utils import SMALL_KV

from myvllm import LLM, SamplingParams

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: str, repo: str, files_from: str) -> None:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", COMMIT)
    shutil.copytree(files_from, snapshot)
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_resolves_from_the_cache_offline(tiny_model_dir, tmp_path, offline):
    cache = str(tmp_path / "hub")
    make_hub_cache(cache, "tiny-org/tiny-qwen3", tiny_model_dir)
    llm = LLM("tiny-org/tiny-qwen3", download_dir=cache, **SMALL_KV)
    local = LLM(tiny_model_dir, **SMALL_KV)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = llm.generate(["the quick brown fox"], params, use_tqdm=False)[0].outputs[0]
    b = local.generate(["the quick brown fox"], params, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.text == b.text


def test_missing_hub_id_says_how_to_download(tmp_path, offline):
    with pytest.raises(ValueError, match=r"python download_model.py --repo tiny-org/absent"):
        LLM("tiny-org/absent", download_dir=str(tmp_path / "hub"), **SMALL_KV)


def test_path_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="neither a local directory nor a hub id"):
        LLM(str(tmp_path / "a" / "b" / "c"), **SMALL_KV)


def test_download_script_reports_an_unreachable_hub(tmp_path, offline, capsys):
    import download_model

    assert download_model.main(["--repo", "tiny-org/absent", "--dir", str(tmp_path)]) == 1
    assert "could not download tiny-org/absent" in capsys.readouterr().err
