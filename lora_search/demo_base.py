"""The project's own tiny Llama base model and its demo task, both built offline from generated toy English.

Run: python -m lora_search.demo_base   # builds (or finds) the cached base; writes data/tiny/ and evals/golden/tiny_*

Nothing here touches a model hub. `build_tiny_base` generates a toy-English corpus from templates, trains a
byte-level BPE tokenizer on it, pretrains a ~0.9M-parameter `LlamaForCausalLM` for a fixed number of steps
(~70 s on 2 CPU cores) and caches the result under a hash of the recipe.

The demo task (`write_demo_data`) asks two questions the base has never been asked, each about a sentence
holding one describing word, in the prompt format of `format_prompt`:

- mood: which of four groups the sentence's mood word is in (joy/anger/fear/calm); scored as 4-way multiple
  choice by loglikelihood. The base, never asked for a mood, scores about chance (25%).
- antonym: the opposite of the describing word (16 pairs); scored by exact match. The base copies the word
  itself (the nearest question it knows), so it scores about 0%.

The corpus gives an adapter something to build on, as real pretraining text does: it contrasts each word with
its opposite ("One fox was big and one was small."), keeps each mood group's words together in stories, and
teaches the Q/A format with questions that copy a word out of a sentence. Without those, experiments showed a
rank-8 LoRA at lr 1e-3 needs far more than 200 steps; with them it reaches ~100% on both in ~100 steps, while a
rank-2 q/v adapter at lr 1e-4 stays near the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lora_search.layout import DEMO_BASE_RECORD, default_cache_dir

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

# --- the toy world ---------------------------------------------------------------------------------------------

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Eva")
ANIMALS = (
    "cat",
    "dog",
    "fox",
    "owl",
    "bear",
    "wolf",
    "duck",
    "goat",
    "horse",
    "mouse",
    "frog",
    "lion",
    "sheep",
    "crow",
    "deer",
    "pig",
)
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey", "pink", "purple")
FOODS = ("bread", "cheese", "apples", "rice", "soup", "fish", "corn", "honey", "cake", "beans", "carrots", "plums")
PLACES = ("park", "forest", "river", "garden", "market", "house", "field", "lake", "hill", "barn", "school", "beach")
VERBS = ("walked", "stood", "waited", "looked", "turned", "stopped", "sat", "jumped", "ran", "slept", "sang", "played")
# Each word belongs to exactly one pair, so "the opposite" is well defined in both directions.
ANTONYM_PAIRS = (
    ("big", "small"),
    ("hot", "cold"),
    ("fast", "slow"),
    ("tall", "short"),
    ("old", "young"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("full", "empty"),
    ("clean", "dirty"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("thick", "thin"),
    ("heavy", "light"),
    ("sweet", "sour"),
    ("bright", "dark"),
)
OPPOSITE = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}
ADJECTIVES = tuple(OPPOSITE)
# A sentence's mood is decided only by which group its mood word is in. The label words appear in the corpus
# (so they are trained tokens) but never in a document with a mood word.
MOOD_WORDS = {
    "joy": ("happy", "cheerful", "merry", "glad", "jolly"),
    "anger": ("angry", "furious", "cross", "grumpy", "mad"),
    "fear": ("scared", "afraid", "nervous", "frightened", "timid"),
    "calm": ("peaceful", "sleepy", "relaxed", "gentle", "serene"),
}
MOOD_LABELS = tuple(MOOD_WORDS)
_ALL_MOOD_WORDS = tuple(w for words in MOOD_WORDS.values() for w in words)

# Demo inputs: one describing word ({adj}: an antonym-pair word or a mood word), nothing else that describes.
ADJ_TEMPLATES = (
    "The {adj} {animal} ate {food} in the {place}.",
    "{name} found a {adj} {food} near the {place}.",
    "The {colour} {animal} was {adj}.",
    "At the {place}, {name} saw a {adj} {colour} {animal}.",
    "The {food} at the {place} was {adj}.",
    "{name} has a {adj} {animal}.",
)
# Pretraining only. The corpus carries what a LoRA adapter can build on, as real text does for real models:
# antonyms are contrasted (CONTRAST_TEMPLATE) and the mood words of one group share stories. It never asks for
# an opposite, and the label words never share a document with a mood word, so the base cannot answer the
# demo questions.
VERB_TEMPLATES = (
    "The {colour} {animal} {verb} in the {place}.",
    "{name} {verb} at the {place}.",
    "The {adj} {colour} {animal} {verb} in the {place}.",
)
LABEL_TEMPLATES = ("{name} read a book about {label} at the {place}.", "The word of the day was {label}.")
CONTRAST_TEMPLATE = "One {animal} was {adj} and one was {opp}."
STORY_TEMPLATES = ADJ_TEMPLATES + VERB_TEMPLATES + (CONTRAST_TEMPLATE, "{name} gave the {animal} some {food}.")
# Copy-a-word questions the base learns in pretraining: they teach the Q/A format and to find a word by its role.
# Copying the label words as answers matters: only words the base has produced as answers get distinct output
# directions; labels seen only in interchangeable contexts keep near-identical embeddings, and a LoRA adapter
# (which cannot touch the tied embeddings) then cannot tell them apart in 200 steps.
COPY_QUESTIONS = {
    "adj": "What is the describing word?",
    "verb": "What did they do?",
    "label": "What is the topic?",
}
_COPY_TEMPLATES = ADJ_TEMPLATES + VERB_TEMPLATES + LABEL_TEMPLATES
MOOD_INSTRUCTION = "What is the mood of this sentence?"
ANTONYM_INSTRUCTION = "What is the opposite of the describing word?"

_SLOT = re.compile(r"\{(\w+)\}")


def format_prompt(instruction: str, input: str) -> str:
    """Render one instruction row as the prompt the model sees; the target follows as `format_completion(output)`.

    Same shape as the pretraining Q/A text, e.g. "Question: What is the mood of this sentence?\\nThe merry fox
    ate corn in the park.\\nAnswer:". The tokenizer adds BOS in front; the prompt ends on a token boundary (":"),
    so the prompt's tokens are a prefix of the prompt+completion's tokens.
    """
    body = f"{instruction}\n{input}" if input else instruction
    return f"Question: {body}\nAnswer:"


def format_completion(output: str) -> str:
    """The SFT target text for `output`: the word after one space, as lm-eval's default `target_delimiter` puts it.

    EOS follows the target: TRL's SFTTrainer appends it to a text completion itself, a hand-written loop
    appends `tokenizer.eos_token_id`, and generation stops on it.
    """
    return f" {output}"


def _fill(template: str, rng: random.Random, adjs: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Fill a template's slots from the world, {adj} from `adjs`; returns the sentence and the slot values."""
    pools = {
        "name": NAMES,
        "animal": ANIMALS,
        "colour": COLOURS,
        "food": FOODS,
        "place": PLACES,
        "verb": VERBS,
        "adj": adjs,
        "label": MOOD_LABELS,
    }
    names = _SLOT.findall(template)
    slots = {s: rng.choice(pools[s]) for s in names if s != "opp"}
    if "opp" in names:
        slots["adj"] = rng.choice(ADJECTIVES)
        slots["opp"] = OPPOSITE[slots["adj"]]
    text = template.format(**slots)
    # "a old owl" -> "an old owl": keeps the toy English from teaching a wrong article before vowels.
    return re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text), slots


def _copy_qa(rng: random.Random) -> tuple[str, str]:
    """One copy-a-word question about a fresh sentence: (prompt, answer word)."""
    sentence, slots = _fill(rng.choice(_COPY_TEMPLATES), rng, ADJECTIVES + _ALL_MOOD_WORDS)
    slot = rng.choice(sorted(set(slots) & set(COPY_QUESTIONS)))
    return format_prompt(COPY_QUESTIONS[slot], sentence), slots[slot]


def _story(rng: random.Random) -> str:
    """One pretraining document: a copy-a-word Q/A as text, a list of contrasts, or a short story."""
    kind = rng.random()
    if kind < 0.3:
        prompt, answer = _copy_qa(rng)
        return prompt + format_completion(answer)
    if kind < 0.45:  # contrasts often enough that the base links each word to its pair within a short build
        return " ".join(_fill(CONTRAST_TEMPLATE, rng, ADJECTIVES)[0] for _ in range(rng.randint(3, 6)))
    # Half the stories describe things with the words of one mood group only, so words of a group keep
    # company the way real synonyms do; the others use the antonym-pair words and may mention a label word.
    if kind < 0.725:
        adjs, templates = MOOD_WORDS[rng.choice(MOOD_LABELS)], STORY_TEMPLATES
    else:
        adjs, templates = ADJECTIVES, STORY_TEMPLATES + LABEL_TEMPLATES
    # The character's slots are drawn once and reused by every sentence; the others vary per sentence.
    fixed = {"name": rng.choice(NAMES), "animal": rng.choice(ANIMALS), "colour": rng.choice(COLOURS)}
    return " ".join(
        _fill(rng.choice(templates).format_map(_Keep(fixed)), rng, adjs)[0] for _ in range(rng.randint(3, 6))
    )


class _Keep(dict[str, str]):
    """`str.format_map` helper that leaves unknown slots as "{slot}" so a second fill can draw them."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


# --- the demo task data ----------------------------------------------------------------------------------------

# Rows per key (mood label / adjective): 4 labels x (40+25+250) and 32 adjectives x (5+3+31).
_MOOD_COUNTS = {"golden": 40, "eval": 25, "train": 250}
_ANTONYM_COUNTS = {"golden": 5, "eval": 3, "train": 31}


def _unique_inputs(rng: random.Random, n: int, seen: set[str], adjs: tuple[str, ...]) -> list[str]:
    """Draw `n` sentences never drawn before (across all splits and both skills), so splits cannot overlap."""
    out: list[str] = []
    while len(out) < n:
        text, _ = _fill(rng.choice(ADJ_TEMPLATES), rng, adjs)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _chat_row(instruction: str, text: str, output: str) -> dict[str, object]:
    """One training row in chat form; `text` is kept (not written) for the golden-overlap check."""
    return {
        "text": text,
        "messages": [{"role": "user", "content": f"{instruction}\n{text}"}, {"role": "assistant", "content": output}],
    }


def write_demo_data(out_dir: Path, seed: int = 0, golden_dir: Path | None = None) -> dict[str, Path]:
    """Write the demo task's JSONL files into `out_dir`, byte-identical for the same seed; returns name -> path.

    Run: python -m lora_search.demo_base   (writes data/tiny/)

    Files: train.jsonl (1992 rows) and eval.jsonl (196 rows) as chat rows {"id", "messages": [user, assistant]}
    (the tokenizer's chat template renders them as `format_prompt` + `format_completion`), both skills mixed.
    Golden sets, into `golden_dir` (default `out_dir`): tiny_mood.jsonl (160 rows: {"id", "text", "prompt",
    "choices", "label"}) and tiny_antonym.jsonl (160 rows: {"id", "text", "prompt", "answer"}) for lm-eval, where
    `prompt` is `format_prompt` of the skill's instruction and `text`.
    Raises RuntimeError if a golden input also occurs in train or eval.
    """
    rng = random.Random(f"demo-{seed}")
    seen: set[str] = set()
    rows: dict[str, list[dict[str, object]]] = {"train": [], "eval": []}
    golden_mood: list[dict[str, object]] = []
    golden_antonym: list[dict[str, object]] = []
    for label in MOOD_LABELS:
        texts = _unique_inputs(rng, sum(_MOOD_COUNTS.values()), seen, MOOD_WORDS[label])
        golden, rest = texts[: _MOOD_COUNTS["golden"]], texts[_MOOD_COUNTS["golden"] :]
        golden_mood += [
            {
                "text": t,
                "prompt": format_prompt(MOOD_INSTRUCTION, t),
                "choices": list(MOOD_LABELS),
                "label": MOOD_LABELS.index(label),
            }
            for t in golden
        ]
        rows["eval"] += [_chat_row(MOOD_INSTRUCTION, t, label) for t in rest[: _MOOD_COUNTS["eval"]]]
        rows["train"] += [_chat_row(MOOD_INSTRUCTION, t, label) for t in rest[_MOOD_COUNTS["eval"] :]]
    for adj in ADJECTIVES:
        texts = _unique_inputs(rng, sum(_ANTONYM_COUNTS.values()), seen, (adj,))
        golden, rest = texts[: _ANTONYM_COUNTS["golden"]], texts[_ANTONYM_COUNTS["golden"] :]
        golden_antonym += [
            {"text": t, "prompt": format_prompt(ANTONYM_INSTRUCTION, t), "answer": OPPOSITE[adj]} for t in golden
        ]
        rows["eval"] += [_chat_row(ANTONYM_INSTRUCTION, t, OPPOSITE[adj]) for t in rest[: _ANTONYM_COUNTS["eval"]]]
        rows["train"] += [_chat_row(ANTONYM_INSTRUCTION, t, OPPOSITE[adj]) for t in rest[_ANTONYM_COUNTS["eval"] :]]

    # `seen` already makes every input unique; this re-checks the promise the golden sets rely on, whatever
    # future edits do to the drawing above.
    trained_on = {str(r["text"]) for split in rows.values() for r in split}
    leaked = sorted({str(g["text"]) for g in golden_mood + golden_antonym} & trained_on)
    if leaked:
        raise RuntimeError(f"{len(leaked)} golden inputs also occur in train/eval, e.g. {leaked[0]!r}")

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, split_rows in (
        ("train", rows["train"]),
        ("eval", rows["eval"]),
        ("golden_mood", golden_mood),
        ("golden_antonym", golden_antonym),
    ):
        rng.shuffle(split_rows)  # mix skills and keys, so the first N rows (lm-eval --limit) are a fair sample
        path = (
            (golden_dir or out_dir) / f"tiny_{name.removeprefix('golden_')}.jsonl"
            if name.startswith("golden_")
            else out_dir / f"{name}.jsonl"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for i, row in enumerate(split_rows):
                row = {k: v for k, v in row.items() if not (name in ("train", "eval") and k == "text")}
                f.write(json.dumps({"id": f"{name}-{i:04d}", **row}) + "\n")
        paths[name] = path
    return paths


# --- the tokenizer ---------------------------------------------------------------------------------------------

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Renders a conversation in exactly the `format_prompt` + `format_completion` + EOS format, so TRL conversational
# rows and prompt/completion rows give the same tokens. {% generation %} marks the tokens that TRL's
# `assistant_only_loss` trains on.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'Question: ' + message['content'] + '\nAnswer:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('role ' + message['role'] + ' unsupported; use system, user, assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _train_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it as a transformers tokenizer that prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, BOS, EOS],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # BOS like Llama's tokenizer: plain `tok(text)` and the chat template both start with it.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )


# --- the base model --------------------------------------------------------------------------------------------

# ~0.9M parameters: 4 layers x (4*128^2 attention + 3*128*352 MLP) = 0.80M, plus a tied ~670x128 embedding.
# Small because of the CPU budget: a 256-wide model takes ~2.5x longer per step, and learns to look words up
# in its context more slowly per step too, so it cannot pretrain in 90 s. PEFT's "all-linear" skips the tied
# lm_head, so adapters train q/k/v/o/gate/up/down only.
MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
VOCAB_SIZE = 1024  # an upper bound: the corpus has ~200 words and BPE runs out of merges near 670 tokens
TOKENIZER_DOCS = 20_000  # documents the BPE is trained on; every word occurs hundreds of times in them
# Each step adds two losses, each averaged over its own tokens: next-token loss on packed stories and
# answer-only loss on copy-a-word questions. Mixed into one LM loss, the few answer tokens are drowned out and
# the model does not learn to look words up in its context within a minute; with their own loss it does in
# ~150 steps. 400 steps x (16x128 + 32x~25 tokens) = ~1M tokens, ~70 s on 2 Zen 5 cores; at 250 steps the
# contrasts are not yet learned and antonym adapters stall near 20%.
PRETRAIN_STEPS = 400
LM_BATCH, BLOCK_SIZE, QA_BATCH = 16, 128, 32
LR, WARMUP_STEPS = 3e-3, 20  # cosine from LR down to LR/10 after a linear warmup
# Keeps copy answers from saturating (loss -> 0.01, logit margins > 15); an adapter has to move those logits,
# and from a saturated base the demo rules learn several times slower at lr 1e-3.
QA_LABEL_SMOOTHING = 0.1


def _corpus_version() -> str:
    """A digest of this module's source: the word lists, templates, generators and training loop all live here.

    Computed rather than a hand-bumped number, so no edit to the build can be served a stale cache; the price
    is one rebuild (~1 min) after a cosmetic edit too.
    """
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _recipe(seed: int, steps: int) -> dict[str, object]:
    """Everything that determines the built weights; its hash names the cache entry."""
    return {
        "corpus_version": _corpus_version(),
        "model": MODEL_CONFIG,
        "vocab_size": VOCAB_SIZE,
        "seed": seed,
        "steps": steps,
        "tokenizer_docs": TOKENIZER_DOCS,
        "lm_batch": LM_BATCH,
        "block_size": BLOCK_SIZE,
        "qa_batch": QA_BATCH,
        "lr": LR,
        "warmup_steps": WARMUP_STEPS,
        "qa_label_smoothing": QA_LABEL_SMOOTHING,
    }


def _padded(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad token and label lists into (input_ids, attention_mask, labels) tensors."""
    import torch

    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    return ids, ids != pad_id, torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])


def _lm_batches(tok: PreTrainedTokenizerFast, rng: random.Random, steps: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Fresh stories, whole ones (BOS ... EOS) packed greedily into rows of <= BLOCK_SIZE tokens, then batched.

    Documents are never split, so each row starts with BOS at position 0, as SFT prompts do.
    """
    n_rows = steps * LM_BATCH
    rows: list[list[int]] = []
    row: list[int] = []
    while len(rows) < n_rows:
        for ids in tok([_story(rng) for _ in range(1000)])["input_ids"]:
            ids = [*ids, tok.eos_token_id][:BLOCK_SIZE]
            if len(row) + len(ids) > BLOCK_SIZE:
                rows.append(row)
                row = []
            row += ids
    return [
        _padded(rows[i : i + LM_BATCH], rows[i : i + LM_BATCH], tok.pad_token_id) for i in range(0, n_rows, LM_BATCH)
    ]


def _qa_batches(tok: PreTrainedTokenizerFast, rng: random.Random, steps: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Batches of copy-a-word questions, labelled on the answer and EOS only, as SFT trains."""
    batches = []
    for _ in range(steps):
        pairs = [_copy_qa(rng) for _ in range(QA_BATCH)]
        prompts = tok([prompt for prompt, _ in pairs])["input_ids"]
        answers = tok([format_completion(answer) for _, answer in pairs], add_special_tokens=False)["input_ids"]
        seqs = [p + a + [tok.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
        labels = [[-100] * len(p) + a + [tok.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
        batches.append(_padded(seqs, labels, tok.pad_token_id))
    return batches


def _pretrain(
    model: LlamaForCausalLM, lm: list[tuple[Tensor, Tensor, Tensor]], qa: list[tuple[Tensor, Tensor, Tensor]]
) -> tuple[float, float]:
    """Train `model` one AdamW step per (lm, qa) batch pair (warmup, cosine to 10%); returns the last losses."""
    import torch

    steps = len(lm)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    start, totals, logged = time.monotonic(), [0.0, 0.0], (0.0, 0.0)
    for step, ((ids, mask, labels), (qa_ids, qa_mask, qa_labels)) in enumerate(zip(lm, qa, strict=True)):
        lm_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        qa_logits = model(input_ids=qa_ids, attention_mask=qa_mask).logits[:, :-1]
        qa_loss = torch.nn.functional.cross_entropy(
            qa_logits.flatten(0, 1), qa_labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=QA_LABEL_SMOOTHING
        )
        (lm_loss + qa_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        totals = [totals[0] + lm_loss.item(), totals[1] + qa_loss.item()]
        if (step + 1) % 25 == 0 or step + 1 == steps:
            n = step % 25 + 1
            logged, totals = (totals[0] / n, totals[1] / n), [0.0, 0.0]
            print(
                f"[demo_base] step {step + 1}/{steps} lm loss {logged[0]:.3f} qa loss {logged[1]:.3f} "
                f"({time.monotonic() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    return logged


def _build(dest: Path, seed: int, steps: int) -> None:
    """Generate the corpus, train tokenizer and model, and save both into `dest` (an empty directory)."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.monotonic()
    rng = random.Random(f"corpus-{seed}")
    tok = _train_tokenizer(
        [_story(rng) for _ in range(TOKENIZER_DOCS)], VOCAB_SIZE, int(MODEL_CONFIG["max_position_embeddings"])
    )
    lm, qa = _lm_batches(tok, rng, steps), _qa_batches(tok, rng, steps)
    n_tokens = sum(int(mask.sum()) for _, mask, _ in lm + qa)
    print(
        f"[demo_base] tokenizer {len(tok)} tokens, {n_tokens} training tokens ({time.monotonic() - start:.0f}s)",
        flush=True,
    )

    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **MODEL_CONFIG,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the budget above is for 2 cores; more barely help
    try:
        with torch.random.fork_rng(devices=[]):  # seed our own build without reseeding the caller's RNG
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            lm_loss, qa_loss = _pretrain(model, lm, qa)
    finally:
        torch.set_num_threads(threads)

    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    provenance = {
        "recipe": _recipe(seed, steps),
        "lm_loss": round(lm_loss, 4),
        "qa_loss": round(qa_loss, 4),
        "params": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.monotonic() - start, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (dest / DEMO_BASE_RECORD).write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"[demo_base] built in {provenance['build_seconds']}s", flush=True)


def build_tiny_base(cache_dir: Path | None = None, seed: int = 0, *, steps: int = PRETRAIN_STEPS) -> Path:
    """Return a directory with the pretrained tiny Llama and its tokenizer, building it on first use.

    Run: python -m lora_search.demo_base

    The directory loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`. It is
    named after a hash of the recipe (model config, corpus version, seed, steps), so a changed recipe builds a
    new entry and an unchanged one returns at once. A build writes into a temp directory that is renamed into
    place only when complete, under a file lock, so concurrent callers build once and a killed build leaves
    nothing that looks finished. `steps` exists so tests can build a short, untrained-quality version quickly.
    """
    from filelock import FileLock

    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(json.dumps(_recipe(seed, steps), sort_keys=True).encode()).hexdigest()[:12]
    final = cache_dir / f"tiny-llama-{digest}"
    if final.is_dir():  # only a completed build is ever renamed to this name
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f"tiny-llama-{digest}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final
        # Leftovers of killed builds: nobody else can be writing them while we hold the lock.
        for stale in cache_dir.glob(f".tiny-llama-{digest}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-llama-{digest}.tmp-", dir=cache_dir))
        try:
            _build(tmp, seed, steps)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


if __name__ == "__main__":
    print(build_tiny_base())
    for name, path in write_demo_data(Path("data/tiny"), golden_dir=Path("evals/golden")).items():
        print(f"{name}: {path}")
