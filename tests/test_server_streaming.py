"""Streamed completions decoded on the event loop equal the whole answers: several choices of one
request that finish at different steps (stop strings, seeded sampling), token ids per chunk."""

from __future__ import annotations

import json

import pytest
from engine_utils import in_process_server

pytest.importorskip("fastapi")

PROMPT = "the quick brown fox jumps over a lazy dog while seven wizards"


def events(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    return [json.loads(line[6:]) for line in lines]


@pytest.mark.parametrize("stop_kind", [None, "char", "pair"])
def test_streamed_choices_equal_the_whole_answers(tiny_model_dir, stop_kind):
    body = {"model": "tiny", "prompt": PROMPT, "n": 4, "max_tokens": 40, "temperature": 1.0, "seed": 11,
            "return_token_ids": True}
    with in_process_server(tiny_model_dir) as client:
        free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        # stops that end choice 0 early (the others may stop elsewhere or not at all)
        stop = {None: None, "char": [free[10]], "pair": [free[12:14], "zz"]}[stop_kind]
        body["stop"] = stop
        whole = client.post("/v1/completions", json=body).json()["choices"]
        chunks = events(client, body)
    texts, ids, finishes = {}, {}, {}
    for e in chunks:
        (choice,) = e["choices"]
        i = choice["index"]
        assert i not in finishes, "a chunk after the choice finished"
        texts[i] = texts.get(i, "") + choice["text"]
        ids[i] = ids.get(i, []) + choice["token_ids"]
        if choice["finish_reason"] is not None:
            finishes[i] = (choice["finish_reason"], choice["stop_reason"])
        for s in stop or ():
            assert s not in texts[i], (i, texts[i])
    assert {c["index"]: c["text"] for c in whole} == texts
    assert {c["index"]: c["token_ids"] for c in whole} == ids
    assert {c["index"]: (c["finish_reason"], c["stop_reason"]) for c in whole} == finishes
    if stop:
        assert any(f == "stop" for f, _ in finishes.values()), "no choice stopped: the test sees nothing"
    assert len({len(t) for t in ids.values()}) > 1 or not stop, "the choices finished together"
