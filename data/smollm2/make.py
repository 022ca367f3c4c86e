"""Dates in English to ISO 8601: the task of sweeps/smollm2.py, its training and eval rows and its two golden sets.

Run: python data/smollm2/make.py      (from any directory; rewrites the files below, byte-identical on every run)

    data/smollm2/train.jsonl            6000 chat rows {"messages": [user, assistant]}: a date -> YYYY-MM-DD
    data/smollm2/eval.jsonl              256 chat rows: the eval loss ASHA prunes on
    data/smollm2/smoke_train.jsonl        64 of the training rows, smoke_eval.jsonl 8 of the eval rows: the CPU
                                         smoke sweep's (a trial tokenizes all its rows and scores every eval row)
    evals/golden/smollm2_dates.jsonl     300 prompts, greedy generation, the date extracted, exact match
    evals/golden/smollm2_dates_choice.jsonl  300 prompts, 4 ISO dates (each + "<|im_end|>") to choose from

Four kinds of date text, a quarter each, from easy to hard for a 135M model:
    written    "March 5, 2021", "5 March 2021", "Mar. 5th, 2021"
    numeric    "the European date 05/03/2021", "the American date 03/05/2021", "5.3.2021"
    spelled    "the fifth of March, twenty twenty-one", "March the fifth, nineteen oh four"
    relative   "three days after March 30, 2021" (across month, year and leap-day boundaries)
Every row carries its `kind`, so scores can be split by it. Each split draws its answers from its own dates
(1900-2099, shuffled once and cut), so no answer is shared between training, eval and golden rows; the script asserts
that no prompt is either.

The golden prompts are the chat template of SmolLM2-Instruct (ChatML with its default system prompt) rendered around
the question, since lm-eval scores the raw prompt while a trial trains through the tokenizer's chat template: both
see the same tokens (tests/test_smollm2.py checks the rendering against the base's own template). The multiple-choice
distractors are the mistakes a model makes: day and month swapped, a day off, the offset not applied or applied the
wrong way, the wrong year.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SEED = 20261204
SIZES = {"train": 6000, "eval": 256, "golden_dates": 300, "golden_choice": 300}
SMOKE_TRAIN, SMOKE_EVAL = 64, 8
KINDS = ("written", "numeric", "spelled", "relative")

END = "<|im_end|>"
"""ChatML's end of turn: a multiple-choice option is the whole answer turn, as a trained adapter writes it."""
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""SmolLM2-Instruct's chat template puts this system turn first when a conversation has none."""

QUESTIONS = (
    "Write {x} as a date in YYYY-MM-DD format.",
    "Convert to ISO 8601 (YYYY-MM-DD): {x}",
    "What is {x} in YYYY-MM-DD form? Reply with the date only.",
)

MONTHS = ("January February March April May June July August September October November December").split()
UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
UNITS += "seventeen eighteen nineteen"
ONES = UNITS.split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINAL_ONES = (
    "_ first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth"
).split()
ORDINAL_TENS = {20: "twentieth", 30: "thirtieth"}
OFFSETS = {1: "one day", 2: "two days", 3: "three days", 5: "five days", 7: "a week", 10: "ten days", 14: "two weeks"}


def chat_prompt(question: str) -> str:
    """The prompt SmolLM2-Instruct's chat template renders for one user turn, up to the assistant's answer."""
    return f"<|im_start|>system\n{SYSTEM}{END}\n<|im_start|>user\n{question}{END}\n<|im_start|>assistant\n"


def words(n: int) -> str:
    """0 <= n < 100 in words: 'seven', 'forty-two'."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def ordinal(n: int) -> str:
    """1 <= n <= 31 as an ordinal word: 'first', 'twenty-third', 'thirtieth'."""
    if n < 20:
        return ORDINAL_ONES[n]
    tens, ones = divmod(n, 10)
    return ORDINAL_TENS[n] if not ones else f"{TENS[tens]}-{ORDINAL_ONES[ones]}"


def suffix(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def year_words(y: int, rng: random.Random) -> str:
    """1900-2099 as spoken: 'nineteen oh four', 'nineteen hundred', 'two thousand and three', 'twenty twenty-one'."""
    century, rest = divmod(y, 100)
    if y >= 2000 and (rest < 10 or rng.random() < 0.3):
        return "two thousand" + (f" and {words(rest)}" if rest else "")
    head = words(century)
    if rest == 0:
        return f"{head} hundred"
    return f"{head} oh {words(rest)}" if rest < 10 else f"{head} {words(rest)}"


def written(d: dt.date, rng: random.Random) -> str:
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return rng.choice(
        (
            f"{month} {d.day}, {d.year}",
            f"{d.day} {month} {d.year}",
            f"{short}. {d.day}{suffix(d.day)}, {d.year}",
            f"the {d.day}{suffix(d.day)} of {month} {d.year}",
        )
    )


def numeric(d: dt.date, rng: random.Random) -> str:
    return rng.choice(
        (
            f"the European date {d.day:02d}/{d.month:02d}/{d.year}",
            f"the American date {d.month:02d}/{d.day:02d}/{d.year}",
            f"{d.day}.{d.month}.{d.year}",
            f"{d.year}/{d.month}/{d.day}",
        )
    )


def spelled(d: dt.date, rng: random.Random) -> str:
    month, day, year = MONTHS[d.month - 1], ordinal(d.day), year_words(d.year, rng)
    return rng.choice((f"the {day} of {month}, {year}", f"{month} the {day}, {year}"))


def relative(d: dt.date, rng: random.Random) -> tuple[str, dt.date]:
    """(text, anchor): an offset from an anchor date that lands on `d`, often across a month's end."""
    days = rng.choice(list(OFFSETS))
    after = rng.random() < 0.6
    anchor = d - dt.timedelta(days=days) if after else d + dt.timedelta(days=days)
    return f"{OFFSETS[days]} {'after' if after else 'before'} {written(anchor, rng)}", anchor


def near_month_end(rng: random.Random, pool: list[dt.date]) -> dt.date:
    """A date of the pool within three days of a month boundary, when one is found in a few draws."""
    for _ in range(20):
        d = rng.choice(pool)
        if d.day <= 3 or (d + dt.timedelta(days=3)).month != d.month:
            return d
    return rng.choice(pool)


def example(d: dt.date, kind: str, rng: random.Random) -> dict:
    anchor = None
    if kind == "written":
        text = written(d, rng)
    elif kind == "numeric":
        text = numeric(d, rng)
    elif kind == "spelled":
        text = spelled(d, rng)
    else:
        text, anchor = relative(d, rng)
    question = rng.choice(QUESTIONS).format(x=text)
    return {"kind": kind, "question": question, "answer": d.isoformat(), "anchor": anchor}


def distractors(row: dict, rng: random.Random) -> list[str]:
    """Three wrong ISO dates a model plausibly picks, all valid dates and distinct from the answer."""
    d = dt.date.fromisoformat(row["answer"])
    wrong: list[dt.date] = []
    if d.day <= 12 and d.day != d.month:
        wrong.append(dt.date(d.year, d.day, d.month))  # day and month swapped
    if row["anchor"] is not None:
        anchor = row["anchor"]
        wrong += [anchor, anchor - (d - anchor)]  # the offset not applied; applied the other way
    wrong += [d + dt.timedelta(days=rng.choice((-1, 1))), _replace_year(d, d.year + rng.choice((-1, 1)))]
    wrong += [d + dt.timedelta(days=k) for k in (2, -2, 30, -30)]
    out: list[str] = []
    for w in wrong:
        if w != d and w.isoformat() not in out:
            out.append(w.isoformat())
    return out[:3]


def _replace_year(d: dt.date, year: int) -> dt.date:
    return d.replace(year=year) if not (d.month == 2 and d.day == 29) else dt.date(year, 2, 28)


def rows_of(dates: list[dt.date], n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        d = near_month_end(rng, dates) if kind == "relative" and rng.random() < 0.5 else dates[i % len(dates)]
        out.append(example(d, kind, rng))
    rng.shuffle(out)
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(SEED)
    start, end = dt.date(1900, 1, 1), dt.date(2099, 12, 31)
    every = [start + dt.timedelta(days=k) for k in range((end - start).days + 1)]
    rng.shuffle(every)
    # Each split's answers come from its own slice of the shuffled dates (73,049 of them: room for every split).
    pools, at = {}, 0
    for split, n in SIZES.items():
        pools[split] = every[at : at + n]
        at += n
    made = {split: rows_of(pools[split], n, random.Random(f"{SEED}-{split}")) for split, n in SIZES.items()}

    seen: dict[str, str] = {}
    for split, rows in made.items():
        for r in rows:
            owner = seen.setdefault(r["question"], split)
            assert owner == split, f"{r['question']!r} is in {owner} and {split}"
    answers = {split: {r["answer"] for r in rows} for split, rows in made.items()}
    splits = list(answers)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not answers[a] & answers[b], f"{a} and {b} share answers"

    def chat(split: str, rows: list[dict]) -> list[dict]:
        return [
            {
                "id": f"{split}-{i:04d}",
                "kind": r["kind"],
                "messages": [
                    {"role": "user", "content": r["question"]},
                    {"role": "assistant", "content": r["answer"]},
                ],
            }
            for i, r in enumerate(rows)
        ]

    data = ROOT / "data" / "smollm2"
    train = chat("train", made["train"])
    write(data / "train.jsonl", train)
    write(data / "smoke_train.jsonl", train[:SMOKE_TRAIN])
    evaluation = chat("eval", made["eval"])
    write(data / "eval.jsonl", evaluation)
    write(data / "smoke_eval.jsonl", evaluation[:SMOKE_EVAL])

    golden = ROOT / "evals" / "golden"
    write(
        golden / "smollm2_dates.jsonl",
        [
            {"id": f"dates-{i:04d}", "kind": r["kind"], "prompt": chat_prompt(r["question"]), "answer": r["answer"]}
            for i, r in enumerate(made["golden_dates"])
        ],
    )
    choice_rows = []
    pick = random.Random(f"{SEED}-choices")
    for i, r in enumerate(made["golden_choice"]):
        choices = [f"{c}{END}" for c in (r["answer"], *distractors(r, pick))]
        pick.shuffle(choices)
        choice_rows.append(
            {
                "id": f"dates_choice-{i:04d}",
                "kind": r["kind"],
                "prompt": chat_prompt(r["question"]),
                "choices": choices,
                "label": choices.index(f"{r['answer']}{END}"),
            }
        )
    write(golden / "smollm2_dates_choice.jsonl", choice_rows)
    print(f"wrote {', '.join(f'{k} {v}' for k, v in SIZES.items())} rows (+ smoke: {SMOKE_TRAIN}, {SMOKE_EVAL})")


if __name__ == "__main__":
    main()
