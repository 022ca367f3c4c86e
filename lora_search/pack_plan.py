"""What the plan says about packing (`Resources.pack`, `lora_search.pack_host`): per packable (rank, targets) how many
trials one pack fits on a GPU (`memory.pack_bytes`) and how it runs its steps (checkpointed or not, in how many
micro-batches: `memory.pack_fit`), and the measured speed-up a packed sweep's wall time is planned at: the
trial-steps/s ratio of the nearest comparable GPU run of benchmarks/pack.py (`measured_ratio`), never a modelled one:
its captured steps' where the run has them (a host's default on a GPU), and only where its packs trained as their
trials do (`row_ratio`). Where the sweep's solo trials share a GPU (`Resources.gpus_per_worker` < 1), the baseline is
those trials running side by side, not one after another: then only a whole sweep's measurement counts
(benchmarks/pack_sweep.py, `sweep_runs`), because solo trials sharing a GPU overlap their host work in separate
processes, which a pack's one process does not (2026-12-05, H100, SmolLM2-135M's shape: 2.18x pack.py's solo trials
one after another at k = 4, yet the packed sweep took 1.85x the wall time of 4 solo trials sharing the GPU).
`lora_search.plan` prints it.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_search.config import ConfigError, Problem, Sweep
from lora_search.memory import (
    GPUS,
    USABLE_FRACTION,
    Architecture,
    largest_pack,
    pack_bytes,
    pack_fit,
    pack_rows,
    trial_memory,
)
from lora_search.strategies import STRATEGIES
from lora_search.targets import target_key

PACK_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
"""Where the plan reads measured pack speed-ups: the `pack_*.json` that benchmarks/pack.py writes."""

COMPARABLE_FACTOR = 4.0
"""A measured pack speed-up carries over to a sweep only from a base within 4x of its parameters and a trial
micro-batch within 4x of its tokens (rows x sequence length). Packing gains what one trial leaves of the GPU idle,
and that depends on the model's size and a step's tokens: a 135M base's 2.3x at 4k tokens says nothing of a 70B
base, nor of 64k tokens a step. Beyond that the plan says there is no measurement rather than guess."""

NO_MEASUREMENT = "packing: no GPU measurement for this shape (run benchmarks/pack.py)"
NO_SHARED_MEASUREMENT = (
    "packing: no GPU measurement of a packed sweep against solo trials sharing a GPU for this shape (run "
    "benchmarks/pack_sweep.py; benchmarks/pack.py's speed-ups are against solo trials one after another, and solo "
    "trials sharing a GPU run their host work side by side)"
)
SHARING = "sharing"
"""`PackRun.baseline` of a whole sweep's measurement (benchmarks/pack_sweep.py): against solo trials sharing the GPU."""


@dataclass(frozen=True)
class PackShape:
    """One configuration shape of the space that packs (rank x target set) and how many of its trials share a base."""

    rank: int
    targets: str
    base: float
    """Bytes of the frozen base, held once per pack."""
    per_trial: float
    """Bytes each trial adds: its adapter, gradients and AdamW state, and the activations of its own rows in one
    micro-batch (checkpointed where `recompute`, 1/`micro_batches` of its step's rows)."""
    fits: int
    """The most trials whose pack fits the pack's usable memory (`memory.largest_pack`); 0: not one."""
    k: int
    """Trials a pack of this shape holds: `fits` capped by `Resources.pack`."""
    recompute: bool = False
    """The pack of `k` runs with gradient checkpointing (`memory.pack_fit`: where it does not fit without)."""
    micro_batches: int = 1
    """Micro-batches a step of the pack of `k` runs in, the fewest that fit (`memory.pack_fit`); 1: its whole step at
    once."""


@dataclass(frozen=True)
class PackRun:
    """One result file of benchmarks/pack.py: where it ran, on what, and its measured ratio per pack size k."""

    file: str
    device: str
    gpu: bool
    base: str
    base_params: float | None
    """From the file's `base_params`, else the size in the base's name ("8b", "SmolLM2-135M"); None: neither."""
    seq: int
    rows_per_trial: int
    ratios: tuple[tuple[int, float], ...]
    """(k, packed trial-steps per second / solo trial-steps per second), one per row of the file whose packs trained
    as their trials do (`row_ratio`): the captured steps' ratio where the row has one, else the steps' as they come."""
    graphed: tuple[int, ...] = ()
    """The k whose ratio is the captured steps' (`row_ratio`)."""
    micro_batches: int = 1
    """The file's `pack_micro_batches`: its packs ran each step in this many micro-batches (1: whole)."""
    checkpointing: bool = False
    """The file's `pack_checkpointing`: its packs recomputed their layers in the backward."""
    date: str = ""
    """The file's `date` (ISO, as benchmarks/pack.py writes it; "" where absent): of two runs as near, the newer
    measured the trial path as it is now."""
    hosts: int = 1
    """A whole sweep's measurement: the pack hosts that shared the GPU, each of k trials (against hosts x k solo
    trials sharing it); 1 for benchmarks/pack.py's runs."""
    baseline: str = "one after another"
    """What the packs were set against: solo trials "one after another" on a warm base (benchmarks/pack.py,
    trial-steps/s), or the same sweep's solo trials `SHARING` the GPU (benchmarks/pack_sweep.py, wall time)."""


@dataclass(frozen=True)
class PackRatio:
    """The measured speed-up a packed wall time uses: `ratio` of row `k` of `run`."""

    run: PackRun
    k: int
    ratio: float


@dataclass(frozen=True)
class Packing:
    """What `Resources.pack` does to the sweep: how many trials of each packable shape share one base on one GPU,
    which variants train solo and why, and the measured speed-up behind the packed wall time."""

    limit: int
    """`Resources.pack`: the most trials a pack holds (1: packing off)."""
    usable: float
    """Bytes a pack may use: `USABLE_FRACTION` of one whole GPU's memory (a pack host holds one device)."""
    rows: int
    """Rows each trial puts into a pack step (`memory.pack_rows`)."""
    shapes: tuple[PackShape, ...]
    packable: tuple[str, ...]
    """The space's variants that pack (`pack.packs`)."""
    solo: tuple[tuple[str, str], ...]
    """The space's other variants, each with why it trains solo (`pack.SOLO`)."""
    share: float
    """The fraction of trials whose variant packs: variants are drawn uniformly (grid: each equally often)."""
    k: int
    """Trials a pack holds in the wall-time estimate: the smallest `k` over the shapes (any two trials may meet in a
    pack), and no more than the packable trials per concurrent slot."""
    measured: PackRatio | None
    why_not: str
    """Why there is no packed wall time ("" when there is one)."""


_SIZE = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([MB])(?![A-Za-z])", re.IGNORECASE)


def params_in_name(name: str) -> float | None:
    """The parameter count a model's name states: "random_base 8b" 8e9, "SmolLM2-135M-Instruct" 1.35e8; None if none."""
    found = _SIZE.search(name)
    return None if found is None else float(found.group(1)) * {"m": 1e6, "b": 1e9}[found.group(2).lower()]


def pack_runs(directory: str | Path) -> list[PackRun]:
    """Every `pack_*.json` of benchmarks/pack.py in `directory`, in name order (none when it does not exist).

    A run is from a GPU when its device is not "cpu" and it trained under bf16 autocast: benchmarks/pack.py writes
    torch.cuda.get_device_name() and autocast "bf16" on CUDA, the processor ("x86_64") and no autocast on a CPU,
    whose ratios say nothing of a GPU. Raises ConfigError naming every malformed field of every file."""
    runs: list[PackRun] = []
    problems: list[Problem] = []
    for path, record, fix in _records(directory, "pack_*.json", "pack.py", problems):
        found = [
            Problem(f"{path}: {name}", record.get(name), why, fix)
            for name, ok, why in (
                ("device", isinstance(record.get("device"), str), "must be the device's name"),
                ("base", isinstance(record.get("base"), str), "must name the base model"),
                ("seq", _positive_int(record.get("seq")), "must be a positive whole number of tokens"),
                ("rows_per_trial", _positive_int(record.get("rows_per_trial")), "must be a positive whole number"),
                ("rows", isinstance(record.get("rows"), list) and record.get("rows"), "must be a non-empty list"),
            )
            if not ok
        ]
        ratios, graphed = [], []
        for i, row in enumerate(record.get("rows") if isinstance(record.get("rows"), list) else []):
            row = row if isinstance(row, dict) else {}
            k = row.get("k")
            if not _positive_int(k):
                found.append(Problem(f"{path}: rows[{i}].k", k, "must be a positive whole number of trials", fix))
            ratio, captured, wrong = row_ratio(row)
            found += [Problem(f"{path}: rows[{i}].{name}", value, why, fix) for name, value, why in wrong]
            if ratio is not None:
                ratios.append((k, ratio))
                if captured:
                    graphed.append(k)
        micro, recompute = record.get("pack_micro_batches", 1), record.get("pack_checkpointing", False)
        if not _positive_int(micro):
            found.append(Problem(f"{path}: pack_micro_batches", micro, "must be a positive whole number", fix))
        if not isinstance(recompute, bool):
            found.append(Problem(f"{path}: pack_checkpointing", recompute, "must be true or false", fix))
        date = record.get("date", "")
        if date != "" and not _iso_date(date):  # compared as text to find the newest run: it must be ISO
            found.append(Problem(f"{path}: date", date, "must be an ISO date (YYYY-MM-DD)", fix))
        size = record.get("base_params")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int | float) or size <= 0):
            found.append(Problem(f"{path}: base_params", size, "must be a positive number of parameters", fix))
        problems += found
        if found:
            continue
        device = record["device"]
        runs.append(
            PackRun(
                file=path.name,
                device=device,
                gpu=device.strip().lower() not in ("", "cpu") and record.get("autocast") is not None,
                base=record["base"],
                base_params=float(size) if size is not None else params_in_name(record["base"]),
                seq=record["seq"],
                rows_per_trial=record["rows_per_trial"],
                ratios=tuple(ratios),
                graphed=tuple(graphed),
                micro_batches=micro,
                checkpointing=recompute,
                date=date,
            )
        )
    if problems:
        raise ConfigError(problems, header="cannot read the pack benchmarks")
    return runs


def row_ratio(row: dict[str, Any]) -> tuple[float | None, bool, list[tuple[str, Any, str]]]:
    """(the speed-up a row of benchmarks/pack.py measured as a pack host on a GPU runs its steps, whether that is the
    captured steps', what in the row is malformed as (field, value, why)). A host captures its steps by default
    (`lora_search.pack_graphs`), so where the row has its `graphs` entry that ratio counts, else the steps' as they
    come (`ratio`). None where that pack did not train as its trials do (its `loss_match` or `update_match` false:
    session 17 found packs timed while they trained on stale weights): a speed-up of a pack that trains wrong is
    no speed-up."""
    wrong: list[tuple[str, Any, str]] = []

    def positive(x: object) -> bool:
        return not isinstance(x, bool) and isinstance(x, int | float) and 0 < x < math.inf

    def trained(entry: dict[str, Any], at: str) -> bool:
        for name in ("loss_match", "update_match"):
            if name in entry and not isinstance(entry[name], bool):
                wrong.append((f"{at}{name}", entry[name], "must be true or false"))
        return entry.get("loss_match", True) is True and entry.get("update_match", True) is True

    ratio = row.get("ratio")
    if not positive(ratio):
        wrong.append(("ratio", ratio, "must be a positive number"))
    graphs = row.get("graphs")
    if graphs is not None and not (isinstance(graphs, dict) and positive(graphs.get("ratio"))):
        shown = graphs.get("ratio") if isinstance(graphs, dict) else graphs
        wrong.append(("graphs.ratio", shown, "must be a positive number"))
    if wrong:
        return None, False, wrong
    if isinstance(graphs, dict):
        ok = trained(graphs, "graphs.")
        return (float(graphs["ratio"]) if ok else None), ok, wrong
    return (float(ratio) if trained(row, "") else None), False, wrong


def sweep_runs(directory: str | Path) -> list[PackRun]:
    """Every `packed_sweep_*.json` of benchmarks/pack_sweep.py in `directory` (a packed sweep and the same sweep's
    solo trials sharing the GPU, `pack` of them), each as a `PackRun` whose one row is (pack, solo wall time / packed
    wall time) and whose baseline is `SHARING`. A file where one of the two sweeps did not finish (no `ratio`) measured
    nothing and is left out; GPU runs only count, as in `pack_runs`. Raises ConfigError naming every malformed field of
    every file."""
    runs: list[PackRun] = []
    problems: list[Problem] = []
    for path, record, fix in _records(directory, "packed_sweep_*.json", "pack_sweep.py", problems):
        ratio, date, k, size, hosts = (record.get(f) for f in ("ratio", "date", "pack", "base_params", "hosts"))
        date, hosts = date if date is not None else "", hosts if hosts is not None else 1
        found = [
            Problem(f"{path}: {name}", record.get(name), why, fix)
            for name, ok, why in (
                ("device", isinstance(record.get("device"), str), "must be the device's name"),
                ("shape", isinstance(record.get("shape"), str), "must name the base's shape"),
                ("seq", _positive_int(record.get("seq")), "must be a positive whole number of tokens"),
                ("rows_per_step", _positive_int(record.get("rows_per_step")), "must be a positive whole number"),
                ("pack", _positive_int(k) and k >= 2, "must be a whole number of trials, 2 or more"),
                ("hosts", _positive_int(hosts), "must be a positive whole number of pack hosts (absent: 1)"),
                (
                    "ratio",
                    ratio is None
                    or (not isinstance(ratio, bool) and isinstance(ratio, int | float) and 0 < ratio < math.inf),
                    "must be a positive number (absent: one of the two sweeps did not finish)",
                ),
                ("date", date == "" or _iso_date(date), "must be an ISO date (YYYY-MM-DD)"),
                (
                    "base_params",
                    size is None or (not isinstance(size, bool) and isinstance(size, int | float) and size > 0),
                    "must be a positive number of parameters",
                ),
            )
            if not ok
        ]
        problems += found
        if found or ratio is None:
            continue
        device = record["device"]
        runs.append(
            PackRun(
                file=path.name,
                device=device,
                gpu=device.strip().lower() not in ("", "cpu"),
                base=f"random_base {record['shape']}",
                base_params=float(size) if size is not None else params_in_name(record["shape"]),
                seq=record["seq"],
                rows_per_trial=record["rows_per_step"],
                ratios=((k, float(ratio)),),
                date=date,
                hosts=hosts,
                baseline=SHARING,
            )
        )
    if problems:
        raise ConfigError(problems, header="cannot read the packed-sweep benchmarks")
    return runs


def _records(
    directory: str | Path, pattern: str, script: str, problems: list[Problem]
) -> Iterator[tuple[Path, dict[str, Any], str]]:
    """Each file of `directory` matching `pattern` (name order) that holds a JSON object: (path, object, the fix a
    problem with it names: rerun benchmarks/`script`). A file that is not one is added to `problems` and skipped."""
    for path in sorted(Path(directory).glob(pattern)):
        fix = f"rerun benchmarks/{script} to rewrite {path.name}, or move it out of {path.parent}"
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(Problem(str(path), None, f"cannot be read as JSON ({e})", fix))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(str(path), type(record).__name__, "is not a JSON object", fix))
            continue
        yield path, record, fix


def _iso_date(x: object) -> bool:
    try:
        return isinstance(x, str) and datetime.date.fromisoformat(x).isoformat() == x
    except ValueError:
        return False


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def measured_ratio(
    runs: Sequence[PackRun],
    *,
    params: float,
    seq: int,
    rows: int,
    k: int,
    gpu: str,
    micro_batches: int = 1,
    checkpointing: bool = False,
) -> PackRatio | None:
    """The measured speed-up of a pack of `k` on a base of `params` parameters, `rows` rows of `seq` tokens a trial,
    its steps in `micro_batches` (checkpointed or not), on `gpu`: among GPU runs within `COMPARABLE_FACTOR` of the
    base's size and of the tokens a trial puts in one forward (a step's tokens over its micro-batches: what decides
    how busy a forward keeps the GPU), the nearest (|log| of the size ratio + |log| of the token ratio; then a run on
    `gpu`; then one that checkpoints as this pack does; then the nearest sequence length; then the newest: by `date`,
    then by file name, so that a rerun on the same day, `..._05b.json`, wins over `..._05.json`), and its row of k >= 2
    nearest `k` (a tie goes to the smaller k, whose speed-up is the smaller: a pack of 3 takes k=2's ratio where k=2
    and k=4 were measured). None: nothing comparable."""
    tokens = seq * rows / micro_batches

    def off(a: float, b: float) -> float:
        return abs(math.log(a / b))

    def run_tokens(run: PackRun) -> float:
        return run.seq * run.rows_per_trial / run.micro_batches

    limit = math.log(COMPARABLE_FACTOR) + 1e-9
    candidates = [
        run
        for run in runs
        if run.gpu
        and run.base_params is not None
        and off(run.base_params, params) <= limit
        and off(run_tokens(run), tokens) <= limit
        and any(rk >= 2 for rk, _ in run.ratios)
    ]
    if not candidates:
        return None
    candidates.sort(key=lambda r: (r.date, r.file), reverse=True)  # newest first: `min` keeps the first of equals
    run = min(
        candidates,
        key=lambda r: (
            off(r.base_params or params, params) + off(run_tokens(r), tokens),
            gpu.lower() not in r.device.lower(),
            r.checkpointing != checkpointing,
            off(r.seq, seq),
        ),
    )
    row_k, ratio = min(((rk, q) for rk, q in run.ratios if rk >= 2), key=lambda row: (abs(row[0] - k), row[0]))
    return PackRatio(run, row_k, ratio)


def packing(
    sweep: Sweep,
    arch: Architecture,
    *,
    gpu: str,
    trials: int,
    concurrent: int,
    benchmarks: str | Path,
) -> Packing:
    """How the sweep's trials pack on `gpu` (see `Packing`): per packable (rank, target set), the most trials whose
    pack fits (`memory.largest_pack`, the most demanding packable variant), capped by `Resources.pack`, and whether
    that pack checkpoints and in how many micro-batches its steps run (`memory.pack_fit`); the variants that train
    solo, with why; and the measured speed-up (`measured_ratio` over `pack_runs(benchmarks)`) at the pack size the
    sweep makes. A pack trains on one device, so trials of several workers do not pack. Where solo trials share a GPU
    (0 < `gpus_per_worker` < 1), only a whole sweep's measurement against them counts (`sweep_runs`; module doc)."""
    from lora_search import pack  # imports torch: only when a plan is made

    r = sweep.resources
    variants = sweep.space.variants
    why = {v: pack.packs(v) for v in variants}
    packable = tuple(v for v in variants if why[v] is True)
    solo = tuple((v, str(reason)) for v, reason in why.items() if reason is not True)
    held = min(r.gpus_per_worker, 1.0) or 1.0  # a host holds one GPU, or a worker's share of it
    usable = USABLE_FRACTION * GPUS[gpu].memory_gib * 2**30 * held
    one_device = r.workers == 1 and not STRATEGIES[r.strategy].shards_base
    shapes = []
    for rank in sweep.space.ranks if packable and one_device else ():
        for target in sweep.space.targets:
            fits = min(largest_pack(sweep, arch, v, rank, target, usable) for v in packable)
            k_shape = min(fits, r.pack)
            # how the pack of k_shape runs (`memory.pack_fit`): checkpointed, in micro-batches, where a variant needs it
            fit = [f for v in packable if k_shape and (f := pack_fit(sweep, arch, v, rank, target, k_shape, usable))]
            recompute = any(f.checkpointing for f in fit)
            micro = max((f.micro_batches for f in fit), default=1)
            one = max(pack_bytes(sweep, arch, v, rank, target, 1, recompute, micro) for v in packable)
            weights = trial_memory(sweep, arch, packable[0], rank, target).weights
            per_trial = one - weights
            shapes.append(PackShape(rank, target_key(target), weights, per_trial, fits, k_shape, recompute, micro))
    share = len(packable) / len(variants)
    packed_trials = trials * share
    k = min([s.k for s in shapes if s.k >= 1] or [1])
    k = max(1, min(k, math.ceil(packed_trials / concurrent - 1e-9)))
    measured, why_not = None, ""
    if not one_device:
        why_not = (
            f"trials of {r.workers} worker(s) with strategy {r.strategy!r} do not pack: a pack holds the whole base on "
            "one device (resources.workers=1, strategy='ddp')"
        )
    elif not packable:
        why_not = f"no variant of the space packs (packing variants: {', '.join(sorted(pack.PACKED))})"
    elif r.pack == 1:
        why_not = "packing is off (resources.pack=1): Resources(pack=N) packs up to N trials, as many as 'fits' allows"
    elif k < 2:
        tight = [f"r={s.rank} {s.targets}" for s in shapes if s.k < 2]
        why_not = (
            f"no pack of 2 fits for {', '.join(tight)}: no packed estimate (the sweep's packs hold any of its shapes)"
            if tight
            else f"{packed_trials:.3g} packable trials over {concurrent} concurrent slots: one per slot, no packs"
        )
    else:
        shared = 0 < r.gpus_per_worker < 1  # solo trials side by side on a GPU: pack.py's ratios are not against them
        measured = measured_ratio(
            sweep_runs(benchmarks) if shared else pack_runs(benchmarks),
            params=arch.params,
            seq=sweep.dataset.max_length,
            rows=pack_rows(sweep),
            k=k,
            gpu=gpu,
            # how the sweep's most demanding shape runs its pack (the packs hold any of its shapes)
            micro_batches=max((s.micro_batches for s in shapes if s.k >= 2), default=1),
            checkpointing=any(s.recompute for s in shapes if s.k >= 2),
        )
        why_not = "" if measured else NO_SHARED_MEASUREMENT if shared else NO_MEASUREMENT
    return Packing(
        limit=r.pack,
        usable=usable,
        rows=pack_rows(sweep),
        shapes=tuple(shapes),
        packable=packable,
        solo=solo,
        share=share,
        k=k,
        measured=measured,
        why_not=why_not,
    )
