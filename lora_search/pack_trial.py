"""A packed trial's life in its Tune trial process: its data, its steps through its device's pack host
(`lora_search.pack_host`), its reports to Tune.

Run by `lora_search.trial.run_trial` for a trial whose variant packs in a sweep of `Resources(pack=N)`, N > 1.

The trial tokenizes its data as the solo path does (TRL's dataset preparation, `fastpath`'s collator, the Trainer's
seeded sampler order), attaches (`PackHost.attach`: its LoraConfig from `variants`, its `pack.Training` from the
budget), then for every step sends its micro-batch (`PackHost.step`) and gets its loss back; at every
`budget.eval_every` steps it asks for its eval loss and its saved adapter (`PackHost.save`) and reports to Tune the
solo path's `StepReport`, with the adapter as its checkpoint (`callbacks.report_result`, as a warm trial does), so
ASHA, the results table, MLflow and the report read it as any trial.

A packed trial that trains its whole budget is scored on the sweep's golden sets (`Sweep.evals`) as a solo trial is at
its last step, by its host (`PackHost.golden`), and reports the solo path's fields (`golden/<task>/<metric>`,
`objective`, `objective_higher_is_better`, `eval_s`, `golden_device_s`) and writes lm-eval's results JSON beside its
adapter.

Spend: each packed trial reports `cost.DEVICE_SHARE`, the fraction of the host's device it held (its share of the
steps it took part in), and its spend is its wall time x that fraction of the device (`cost.trial_spend`), so that the
trials of one pack together spend the device once.

Resuming: every report's checkpoint also holds what the trial goes on from (`layout.TRAINER_DIR`: `PACK_STATE`, its
adapter's `Pack.training_state`, AdamW's moments and step counts, the LR schedule, the step; then
`layout.TRAINER_STATE`). A trial Tune runs again (a retry of its lost process, or a rerun after a killed driver) finds
its newest complete checkpoint as a warm trial does (`checkpoints.candidates`), replays the reports up to it
(`checkpoints.reports_until`), attaches with its weights and training state (`PackHost.attach`'s resume), passes
over the batches it took (`train_batches`' skip) and reports from the next step on: with dropout 0 its curve is the
uninterrupted run's. Dropout draws from the host process's global RNG, shared by every adapter of the pack, and is not
reproduced (`lora_search.pack`). Its sums go on from the checkpoint's report (train_s, device_s, tokens,
eval_device_s, eval_wall_s, the steps' device-seconds behind `cost.DEVICE_SHARE`, the base's eval loss: not measured
again); startup_s, load_s and prepare_s are this attempt's own, as a resumed solo trial's; restarts, steps_redone and
prior_s come from the trial's progress file (`checkpoints.ProgressTracker`), as a solo trial's.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from lora_search import layout
from lora_search.config import Sweep
from lora_search.pack_host import host_for
from lora_search.records import StepReport, TrialParams, diverged

log = logging.getLogger("lora_search.pack_trial")

PACK_STATE = "pack_state.pt"
"""In a packed trial's checkpoint, beside `layout.TRAINER_STATE` in `layout.TRAINER_DIR`: its adapter's
`Pack.training_state` (optimizer, schedule, step), `torch.save`d."""


def tokenized(sweep: Sweep, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(train, eval) as the solo trial's SFTTrainer prepares them: `data.load`, then TRL's own dataset preparation
    (prompt/completion tokens, completion-only labels, truncation to max_length); and eval as `data.load` gave it."""
    from types import SimpleNamespace

    from trl import SFTConfig, SFTTrainer

    from lora_search import data

    train, evaluation = data.load(sweep.dataset, sweep.seed)
    # Only its data fields are read; use_cpu: no device is looked for (the trial process has none).
    args = SFTConfig(
        output_dir="unused", max_length=sweep.dataset.max_length, seed=sweep.seed, report_to="none", use_cpu=True
    )
    trainer = SimpleNamespace(completion_only_loss=True, chat_template=None, _tokenizer=tokenizer)
    prepare = SFTTrainer._prepare_dataset  # a method that reads only these three of its trainer
    return (
        prepare(trainer, train, tokenizer, args, False, None, "train"),
        prepare(trainer, evaluation, tokenizer, args, False, None, "eval"),
        evaluation,
    )


def train_batches(dataset: Any, rows: int, seed: int, collate: Any, skip: int = 0) -> Any:
    """Endless micro-batches of `rows` rows in the Trainer's order: each epoch a permutation drawn from a generator
    seeded with seed + epoch (accelerate's seedable sampler); the last batch of an epoch may be short. `skip`: the
    batches a resumed trial took before its checkpoint, passed over without collating them (the next is the batch an
    uninterrupted run takes next)."""
    import torch

    per_epoch = math.ceil(len(dataset) / rows)
    epoch, first = divmod(skip, per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(first * rows, len(order), rows):
            yield _plain(collate([dataset[j] for j in order[i : i + rows]]))
        epoch, first = epoch + 1, 0


def eval_batches(dataset: Any, rows: int, collate: Any) -> list[dict[str, Any]]:
    """The eval set in order, `rows` a batch, as the Trainer's eval loop takes it."""
    n = len(dataset)
    return [_plain(collate([dataset[j] for j in range(i, min(i + rows, n))])) for i in range(0, n, rows)]


def eval_loss(losses: list[float], batches: list[dict[str, Any]]) -> float:
    """The Trainer's eval loss: each batch's loss weighted by its rows."""
    rows = [b["input_ids"].shape[0] for b in batches]
    return sum(loss * n for loss, n in zip(losses, rows, strict=True)) / sum(rows)


def _plain(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def run_packed_trial(
    config: dict[str, Any], sweep: Sweep, storage_path: str, trial_id: str, find_host: Any = host_for
) -> None:
    """A packed trial's whole life, in its Tune trial process (see the module docstring). An error it raised is kept
    in its run dir (`layout.FAILED_FILE`), as a warm trial's is, so that Tune's retry raises it again at once.
    `find_host`: `pack_host.host_for`'s signature; a test hands it a `PackHost` in its own process (no Ray)."""
    from lora_search import checkpoints

    run_dir = layout.run_dir(storage_path, trial_id)
    earlier = checkpoints.kept_error(run_dir)
    if earlier is not None:  # Tune's retry of a trial whose training raised: the same error, not a second training
        raise earlier
    try:
        _train_packed(config, sweep, storage_path, trial_id, find_host)
    except Exception as e:
        checkpoints.keep_error(run_dir, e)
        raise


def _train_packed(config: dict[str, Any], sweep: Sweep, storage_path: str, trial_id: str, find_host: Any) -> None:
    import shutil
    import uuid

    from transformers import AutoTokenizer

    from lora_search import checkpoints
    from lora_search.callbacks import progress_fields, replay_reports, report_result
    from lora_search.checkpoints import json_safe
    from lora_search.cost import DEVICE_SHARE
    from lora_search.fastpath import collator_class
    from lora_search.layout import LM_EVAL_RESULTS, REPORT_FILE, checkpoint_name
    from lora_search.probe import probe_batch
    from lora_search.records import GOLDEN_PREFIX
    from lora_search.variants import adapter_bytes

    trial_start = time.perf_counter()
    startup_s = max(0.0, time.time() - float(config.get("tune_run_start", time.time())))
    params = TrialParams.from_config(config)
    budget = sweep.budget
    run_dir = layout.run_dir(storage_path, trial_id)
    # Resumed: from the newest complete checkpoint, as a warm trial resumes (`checkpoints.candidates`).
    found = checkpoints.candidates(run_dir, None)
    earlier = checkpoints.checkpoint_report(found[0]) if found else {}
    start = int(earlier.get("step", 0))
    tracker = checkpoints.ProgressTracker(
        layout.progress_file(storage_path, trial_id), uuid.uuid4().hex, float(config.get("tune_run_start", time.time()))
    )
    progress = tracker.start(start)
    reports_log = tracker.path.with_suffix(".reports.jsonl")
    if found:
        replay_reports(reports_log, start, str(found[0]), progress, run_dir, warm=True)
        if start >= budget.max_steps:
            return
    tokenizer = AutoTokenizer.from_pretrained(
        sweep.base.name_or_path, revision=sweep.base.revision, trust_remote_code=sweep.base.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds, eval_ds, eval_rows = tokenized(sweep, tokenizer)
    collate = collator_class()(pad_token_id=tokenizer.pad_token_id)
    rows = budget.batch_size * budget.grad_accum
    batches = train_batches(train_ds, rows, sweep.seed, collate, skip=start)
    evals = eval_batches(eval_ds, budget.batch_size * 2, collate)
    probe = probe_batch(tokenizer, eval_rows)
    prepare_s = time.perf_counter() - trial_start
    load_start = time.perf_counter()
    host, info = find_host(sweep, storage_path, trial_id, params, _resume(found[0]) if found else None)
    load_s = time.perf_counter() - load_start
    why, step = "left", start
    try:
        if found:  # the base's eval loss and the sums so far are the checkpoint's: they go on from there
            base_eval_loss = float(earlier["base_eval_loss"])
        else:
            base_eval_loss = eval_loss(host.evaluate(trial_id, evals)["losses"], evals)
        earlier_train_s = float(earlier.get("train_s", 0.0))
        device_s = float(earlier.get("device_s", 0.0))
        steps_s = device_s / float(earlier[DEVICE_SHARE]) if found else 0.0
        eval_device_s = float(earlier.get("eval_device_s", 0.0))
        eval_wall_s = float(earlier.get("eval_wall_s", 0.0))
        tokens, window = int(earlier.get("tokens", 0)), []
        train_start = time.perf_counter()
        # A host actor (`pack_host.Blocking`) takes the next step's batch before this one's answer comes, so it
        # finds that batch queued when this step ends; not across a report (the eval and the saved adapter are of
        # this step's weights). An in-process host (the tests') answers each step as it is called.
        ahead = hasattr(host, "send_step")
        send = host.send_step if ahead else lambda name, batch, at: functools.partial(host.step, name, batch, at)
        sent = None
        for step in range(start + 1, budget.max_steps + 1):
            answer = sent if sent is not None else send(trial_id, next(batches), step)
            sent = None
            if ahead and step % budget.eval_every and step < budget.max_steps:
                sent = send(trial_id, next(batches), step + 1)
            out = answer()
            tracker.step(step)
            device_s += out["device_s"]
            steps_s += out["step_s"]
            tokens += out["tokens"]
            window.append(out["loss"])
            if not math.isfinite(out["loss"]):
                raise diverged("train_loss", out["loss"], step)
            if step % budget.eval_every and step < budget.max_steps:
                continue
            eval_start = time.perf_counter()
            scored = host.evaluate(trial_id, evals)
            loss = eval_loss(scored["losses"], evals)
            if not math.isfinite(loss):
                raise diverged("eval_loss", loss, step)
            saved = host.save(trial_id, probe)
            eval_device_s += scored["device_s"]
            eval_wall_s += time.perf_counter() - eval_start
            train_s = earlier_train_s + time.perf_counter() - train_start
            report = StepReport(
                step=step,
                eval_loss=loss,
                base_eval_loss=base_eval_loss,
                train_loss=sum(window) / len(window),
                trainable_params=info["trainable_params"],
                train_s=train_s,
                startup_s=startup_s,
                load_s=load_s,
                base_reused=info["base_reused"],
                prepare_s=prepare_s,
                device_s=device_s,
                tokens=tokens,
                tokens_per_s=tokens / train_s if train_s > 0 else 0.0,
                steady_tokens_per_s=tokens / train_s if train_s > 0 else math.nan,
                steady_train_device_s=device_s,
                eval_device_s=eval_device_s,
                eval_wall_s=eval_wall_s,
                peak_mem_bytes=saved["peak"],
                peak_mem_kind=saved["peak_kind"],
                device_name=info["device"],
                strategy="ddp",
                fast_path=f"packed: up to {sweep.resources.pack} adapters over one base (lora_search.pack)",
                **progress_fields(progress),
            ).metrics()
            # Its share of the steps it took part in: the fraction of the host's device it held (`cost.trial_spend`).
            report[DEVICE_SHARE] = device_s / steps_s if steps_s > 0 else 1.0
            window = []
            out_dir = run_dir / f".pack_{checkpoint_name(step)}"
            _write_checkpoint(out_dir, saved, probe)
            report["adapter_bytes"] = adapter_bytes(out_dir)
            if step >= budget.max_steps and sweep.evals is not None:  # as `callbacks.Reporter` scores a solo trial
                scored = host.golden(trial_id, probe[0])
                (out_dir / LM_EVAL_RESULTS).write_text(json.dumps(scored["results"], indent=1))
                report.update({f"{GOLDEN_PREFIX}{k}": v for k, v in scored["metrics"].items()})
                report["objective"] = scored["objective"]
                report["objective_higher_is_better"] = scored["higher_is_better"]
                report["eval_s"] = scored["seconds"]
                report["golden_device_s"] = scored["device_s"]
            (out_dir / REPORT_FILE).write_text(json.dumps(json_safe(report)))
            with reports_log.open(
                "a"
            ) as f:  # before the report: every checkpoint a restart may resume from has its line
                f.write(json.dumps(json_safe(report)) + "\n")
            log.info("%s step %d eval_loss %.4f (packed)", trial_id, step, loss)
            if step >= budget.max_steps:  # Tune may end this process once the last report is in
                why = "finished"
                host.detach(trial_id, why)
            try:
                report_result(report, out_dir, checkpoint_name(step), run_dir, warm=True)
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        why = "finished"
    except SystemExit:  # Tune stopped the trial at a report: ASHA, or its last step (the scheduler's max_t)
        why = "finished" if step >= budget.max_steps else f"stopped at step {step}"
        raise
    except BaseException as e:
        why = f"failed at step {step}: {type(e).__name__}"
        raise
    finally:
        try:
            host.detach(trial_id, why)
        except Exception as e:  # the host detaches it after STALE_S anyway
            log.warning("%s: detaching from its pack host failed: %s", trial_id, e)


def _write_checkpoint(out_dir: Path, saved: dict[str, Any], probe: list[Any]) -> None:
    """The checkpoint of one report, from what `PackHost.save` gave: the PEFT adapter dir, its probe logits and, in
    `layout.TRAINER_DIR`, what the trial resumes from (`PACK_STATE`, then `layout.TRAINER_STATE` last: with it there,
    `checkpoints.is_complete` counts the checkpoint)."""
    import torch
    from safetensors.torch import save_file

    from lora_search.layout import PROBE_FILE, TRAINER_DIR, TRAINER_STATE

    (out_dir / TRAINER_DIR).mkdir(parents=True, exist_ok=True)
    for file, content in saved["files"].items():
        (out_dir / file).write_bytes(content)
    tensors = {f"input_ids_{i}": ids[0].contiguous() for i, ids in enumerate(probe)}
    save_file({**tensors, "logits": saved["logits"]}, str(out_dir / PROBE_FILE))
    torch.save(saved["training"], out_dir / TRAINER_DIR / PACK_STATE)
    step = int(saved["training"]["step"])
    (out_dir / TRAINER_DIR / TRAINER_STATE).write_text(json.dumps({"global_step": step, "packed": True}))


def _resume(checkpoint: Path) -> dict[str, Any]:
    """What `PackHost.attach` resumes an adapter from: its weights (the checkpoint's PEFT adapter, a PiSSA one's own
    half of it: `pack.trained_weights`) and its training state (`PACK_STATE`)."""
    import torch
    from safetensors.torch import load_file

    from lora_search.layout import PEFT_WEIGHTS, TRAINER_DIR
    from lora_search.pack import trained_weights

    training = torch.load(checkpoint / TRAINER_DIR / PACK_STATE, weights_only=True)
    weights = trained_weights(load_file(str(checkpoint / PEFT_WEIGHTS)), training)  # PiSSA's: saved converted
    return {"weights": weights, "training": training}
