"""Tests for the offline tiny base model and the demo task data.

Run: python -m pytest tests/test_demo_base.py

Builds use a few pretraining steps: the files, tokenizer and caching are the same as a real build's, only the
weights are untrained, so the whole module runs in well under a minute on 2 CPU cores. Whether the real base
and its demo task behave (base near chance, adapters near 100%) takes minutes, and is measured outside the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_search import demo_base
from lora_search.demo_base import (
    ADJECTIVES,
    MOOD_LABELS,
    MOOD_WORDS,
    OPPOSITE,
    build_tiny_base,
    format_completion,
    format_prompt,
    write_demo_data,
)

STEPS = 3  # pretraining steps for test builds; the real default is demo_base.PRETRAIN_STEPS
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("cache"), steps=STEPS)


def _fake_build(dest: Path, seed: int, steps: int) -> None:
    """Stands in for the real build where only the cache mechanics are under test."""
    (dest / "weights").write_text(f"{seed} {steps}")


def test_build_gives_a_loadable_llama(base_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert (base_dir / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok)
    assert 0.5e6 < model.num_parameters() < 5e6
    logits = model(**tok(["The big fox ate bread."], return_tensors="pt")).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    provenance = json.loads((base_dir / "basemodel.json").read_text())
    assert provenance["recipe"]["steps"] == STEPS


def test_second_call_hits_the_cache(base_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mtime = (base_dir / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    again = build_tiny_base(base_dir.parent, steps=STEPS)
    assert again == base_dir
    assert time.monotonic() - start < 2.0
    assert "[demo_base]" not in capsys.readouterr().out  # no build progress printed
    assert (base_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_recipe_change_builds_a_new_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_base, "_build", _fake_build)
    paths = {
        build_tiny_base(tmp_path, seed=0, steps=STEPS),
        build_tiny_base(tmp_path, seed=1, steps=STEPS),
        build_tiny_base(tmp_path, seed=0, steps=STEPS + 1),
    }
    assert len(paths) == 3


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_base, "_build", _fake_build)
    assert build_tiny_base(steps=STEPS).parent == tmp_path


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dies_halfway(dest: Path, seed: int, steps: int) -> None:
        (dest / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(demo_base, "_build", dies_halfway)
    with pytest.raises(RuntimeError, match="killed"):
        build_tiny_base(tmp_path, steps=STEPS)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


def test_stale_temp_dirs_of_killed_builds_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_base, "_build", _fake_build)
    entry = build_tiny_base(tmp_path, steps=STEPS)
    shutil.rmtree(entry)
    stale = tmp_path / f".{entry.name}.tmp-killed"  # what a SIGKILLed build leaves
    stale.mkdir()
    assert build_tiny_base(tmp_path, steps=STEPS) == entry
    assert not stale.exists()


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    # Two processes race for the same entry; the build is slow enough that they overlap.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from lora_search import demo_base\n"
        "def slow_build(dest, seed, steps):\n"
        "    print('BUILDING', flush=True)\n"
        "    time.sleep(1.5)\n"
        "    (dest / 'weights').write_text('x')\n"
        "demo_base._build = slow_build\n"
        "print(demo_base.build_tiny_base(Path(sys.argv[1]), steps=3))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(out.count("BUILDING") for out in outputs) == 1
    assert len({out.splitlines()[-1] for out in outputs}) == 1


def test_tokenizer_round_trips_and_has_chat_template(base_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    for text in ("The big fox ate bread in the park.", "Question: Who?\nTom.\nAnswer: Tom", "naïve café ☃ 42"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text

    # Conversational rows render to exactly the tokens of prompt/completion rows, so TRL trains the same thing.
    instruction, sentence, output = "What is the mood of this sentence?", "The merry fox was glad.", "joy"
    messages = [{"role": "user", "content": f"{instruction}\n{sentence}"}, {"role": "assistant", "content": output}]
    chat = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    prompt_ids = tok(format_prompt(instruction, sentence))["input_ids"]
    full_ids = tok(format_prompt(instruction, sentence) + format_completion(output))["input_ids"]
    assert list(chat["input_ids"]) == [*full_ids, tok.eos_token_id]
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the prompt ends on a token boundary
    assert sum(chat["assistant_masks"]) == len(full_ids) - len(prompt_ids) + 1  # the answer and EOS


def test_answers_are_single_tokens(base_dir: Path) -> None:
    # Equal-length choices keep multiple-choice loglikelihoods comparable, and exact match needs one step.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    for word in (*MOOD_LABELS, *ADJECTIVES):
        assert len(tok(format_completion(word), add_special_tokens=False)["input_ids"]) == 1, word


def test_demo_data_is_deterministic(tmp_path: Path) -> None:
    first, second = write_demo_data(tmp_path / "a"), write_demo_data(tmp_path / "b")
    assert set(first) == {"train", "eval", "golden_mood", "golden_antonym"}
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    assert write_demo_data(tmp_path / "c", seed=1)["train"].read_bytes() != first["train"].read_bytes()


def test_demo_data_rows_and_golden_sets_are_held_out(tmp_path: Path) -> None:
    paths = write_demo_data(tmp_path)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert len(rows["train"]) >= 1900 and len(rows["eval"]) >= 190
    assert len(rows["golden_mood"]) >= 120 and len(rows["golden_antonym"]) >= 120
    mood_word_label = {word: label for label, words in MOOD_WORDS.items() for word in words}

    def sentence(row: dict) -> str:
        return row["messages"][0]["content"].split("\n", 1)[1]

    for row in rows["train"] + rows["eval"]:
        assert set(row) == {"id", "messages"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        output = row["messages"][1]["content"]
        words = sentence(row).replace(",", "").rstrip(".").split()
        if output in MOOD_LABELS:  # exactly one mood word, from the labelled group
            assert [mood_word_label[w] for w in words if w in mood_word_label] == [output]
        else:  # exactly one antonym-pair word, and the output is its pair
            assert [OPPOSITE[w] for w in words if w in OPPOSITE] == [output]
    for row in rows["golden_mood"]:
        assert row["choices"] == list(MOOD_LABELS) and row["prompt"].endswith(f"\n{row['text']}\nAnswer:")
    for row in rows["golden_antonym"]:
        assert row["answer"] in ADJECTIVES and row["prompt"].endswith(f"\n{row['text']}\nAnswer:")
    # Balanced: every label is 1/4 of the mood golden set, so always answering one label scores 25%.
    labels = [row["label"] for row in rows["golden_mood"]]
    assert {labels.count(i) for i in range(len(MOOD_LABELS))} == {len(labels) // len(MOOD_LABELS)}

    seen = {sentence(row) for row in rows["train"] + rows["eval"]}
    golden = {row["text"] for row in rows["golden_mood"] + rows["golden_antonym"]}
    assert not golden & seen
    assert len(golden) == len(rows["golden_mood"]) + len(rows["golden_antonym"])
    assert len({row["id"] for row in rows["train"] + rows["eval"]}) == len(rows["train"]) + len(rows["eval"])
