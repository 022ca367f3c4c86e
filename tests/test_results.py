"""Trial records from Tune's results: which adapter checkpoint a trial hands on."""

from __future__ import annotations

import json
from pathlib import Path

from lora_search import results
from lora_search.config import BaseModel, Budget, Dataset, Sweep
from lora_search.layout import REPORT_FILE

CONFIG = {"variant": "lora", "rank": 4, "alpha": 8.0, "targets": "attention", "lr": 1e-3, "dropout": 0.0}


def _sweep() -> Sweep:
    return Sweep(
        name="r",
        base=BaseModel("/nowhere"),
        dataset=Dataset("/nowhere.jsonl"),
        budget=Budget(max_steps=20, eval_every=5, grace_period=5),
    )


def _checkpoint(run_dir: Path, step: int, eval_loss: float) -> Path:
    ckpt = run_dir / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 4, "step": step}))
    (ckpt / REPORT_FILE).write_text(json.dumps({"step": step, "eval_loss": eval_loss, "train_s": 2.0 * step}))
    return ckpt


def _result(step: int, eval_loss: float, checkpoint: Path) -> dict:
    return {"step": step, "eval_loss": eval_loss, "checkpoint_path": str(checkpoint), "time_total_s": 30.0}


def test_a_pruned_trial_keeps_the_checkpoint_tune_stopped_on(tmp_path) -> None:
    run_dir = tmp_path / "train" / "trial_a"
    at_5, at_10 = _checkpoint(run_dir, 5, 3.0), _checkpoint(run_dir, 10, 2.5)
    history = [_result(5, 3.0, at_5), _result(10, 2.5, at_10)]

    record = results.record("a", CONFIG, history, None, _sweep(), tmp_path / "adapters")

    assert (record.status, record.step, record.eval_loss) == ("pruned", 10, 2.5)
    assert json.loads((Path(record.adapter_path) / "adapter_config.json").read_text())["step"] == 10
    assert not (Path(record.adapter_path) / REPORT_FILE).exists()  # lora_search's bookkeeping stays out of it


def test_a_trial_whose_stopped_on_checkpoint_was_dropped_records_the_newer_one(tmp_path, capsys) -> None:
    # Tune stopped the trial on step 10's result, but its Ray Train run had registered steps 15 and 20 already and
    # dropped step 10's checkpoint: the record follows the newest, with that checkpoint's own figures.
    run_dir = tmp_path / "train" / "trial_b"
    at_10 = run_dir / "step_000010"  # named by Tune's last result, no longer on disk
    _checkpoint(run_dir, 15, 2.2)
    _checkpoint(run_dir, 20, 1.9)
    history = [_result(5, 3.0, run_dir / "step_000005"), _result(10, 2.5, at_10)]

    record = results.record("b", CONFIG, history, None, _sweep(), tmp_path / "adapters")

    assert record.adapter_path == str(tmp_path / "adapters" / "b")
    assert json.loads((Path(record.adapter_path) / "adapter_config.json").read_text())["step"] == 20
    assert (record.status, record.step, record.eval_loss, record.best_eval_loss) == ("completed", 20, 1.9, 1.9)
    assert record.train_s == 40.0 and record.trial_s == 30.0  # the checkpoint's report; Tune's clock
    assert "checkpoint of step 10 is gone" in capsys.readouterr().out


def test_no_checkpoint_newer_than_the_result_means_no_adapter(tmp_path) -> None:
    run_dir = tmp_path / "train" / "trial_c"
    _checkpoint(run_dir, 5, 3.0)  # older than the result Tune stopped on: not the trial's adapter
    history = [_result(10, 2.5, run_dir / "step_000010")]

    record = results.record("c", CONFIG, history, None, _sweep(), tmp_path / "adapters")

    assert (record.adapter_path, record.step, record.eval_loss) == ("", 10, 2.5)


def test_a_failed_trial_keeps_its_last_checkpoint_and_never_follows_a_later_one(tmp_path) -> None:
    run_dir = tmp_path / "train" / "trial_d"
    at_5 = _checkpoint(run_dir, 5, 3.0)
    history = [_result(5, 3.0, at_5)]
    kept = results.record("d", CONFIG, history, RuntimeError("boom"), _sweep(), tmp_path / "adapters")
    assert (kept.status, kept.reason, Path(kept.adapter_path).name) == ("failed", "boom", "d")

    _checkpoint(run_dir, 10, 2.5)
    gone = [_result(5, 3.0, run_dir / "step_000003")]
    lost = results.record("e", CONFIG, gone, RuntimeError("boom"), _sweep(), tmp_path / "adapters")
    assert (lost.adapter_path, lost.step) == ("", 5)
