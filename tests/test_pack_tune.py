"""Packed trials in a real sweep (lora_search/pack_host.py, pack_trial.py): ordinary Tune trials over one pack
host's base.

Run: python -m pytest -q -n 0 tests/test_pack_tune.py   (CPU, a local Ray; about a minute)

One sweep of 4 grid trials, 2 at a time in a pack of 2, ASHA on eval loss with a rung at step 5 of 10: every trial
reports at the rungs, a pruned trial leaves the pack, the later trials join the host without a second base load, and
a finished trial's eval losses are those of the same configuration trained alone with PEFT on the same batches. A
completed packed trial is scored on the golden sets by its host as the solo path scores the same adapter, and a packed
trial's spend is its share of the host's device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lora_search import BaseModel, Budget, Dataset, Evals, Resources, SearchSpace, Sweep, environment, pack_host
from lora_search.config import ConfigError
from lora_search.cost import DEVICE_SHARE, devices_per_trial

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EVALS = Evals(
    tasks=("tiny_mood", "tiny_antonym"), objective="tiny_mood/acc", tasks_dir=str(REPO / "evals" / "tasks"), limit=16
)


def _sweep(model_dir: Path, data: Path, out: Path) -> Sweep:
    return Sweep(
        name="packed",
        base=BaseModel(str(model_dir)),
        dataset=Dataset(str(data), eval_fraction=0.2, max_length=96),
        space=SearchSpace(
            ranks=(4,), targets=("attention",), variants=("lora", "loraplus"), lr=(1e-5, 1e-2), lr_grid_points=2
        ),
        budget=Budget(max_steps=10, eval_every=5, grace_period=5, reduction_factor=2, batch_size=8),
        resources=Resources(pack=2),
        search="grid",
        num_samples=1,
        max_concurrent_trials=2,
        seed=2,
        output_dir=str(out),
        scheduler="asha",
        evals=EVALS,
    )


def test_packed_trials_are_ordinary_tune_trials(tiny_model_dir: Path, tiny_jsonl: Path, tmp_path: Path) -> None:
    import ray

    from lora_search.probe import check_reload
    from lora_search.sweep import run

    sweep = _sweep(tiny_model_dir, tiny_jsonl, tmp_path)
    # The reference: the finished loraplus configuration trained solo, a Tune trial of its own (TRL's Trainer).
    solo = sweep.replace(
        name="solo",
        resources=Resources(),
        space=dataclasses.replace(sweep.space, variants=("loraplus",), lr=(1e-4, 1.0), lr_grid_points=1),  # 1e-2
    )
    try:
        frame = run(sweep)
        solo_frame = run(solo)
    finally:
        ray.shutdown()
    out = tmp_path / sweep.name
    print("\n" + frame[["trial_id", "status", "variant", "lr", "step", "eval_loss", "base_reused", "cost"]].to_string())
    history = pd.read_parquet(out / "history.parquet")

    # Every trial is a packed Tune trial that reported at the rung; ASHA stopped at least one there.
    assert len(frame) == 4 and set(frame["status"]) <= {"completed", "pruned"}
    pruned = frame[frame["status"] == "pruned"]
    assert len(pruned) >= 1 and (pruned["step"] == 5).all()
    for row in frame.itertuples():
        steps = sorted(history[history["trial_id"] == row.trial_id]["step"])
        assert steps == ([5, 10] if row.status == "completed" else [5]), (row.trial_id, steps)
        assert row.fast_path.startswith("packed") and row.adapter_bytes > 0 and row.cost > 0 and row.device_s > 0
        # the adapter as the solo path leaves it: plain PEFT loads it onto the base and gives the trial's logits
        assert check_reload(Path(row.adapter_path)) < 1e-5

    # The host's journal: one base load; every trial attached and left (a pruned one "stopped at step 5"); a trial that
    # attached after another had left found the base loaded.
    events = [json.loads(line) for line in (out / "ray" / "pack_host_0.jsonl").read_text().splitlines()]
    assert not (out / "ray" / "pack_host_1.jsonl").exists()
    assert [e["event"] for e in events].count("load") == 1
    # the load line says where the host's start went: Ray starting its actor, its imports, its base's load; every
    # variant packs, so the driver started the host before Tune's first trials (`pack_host.start_hosts`)
    (load,) = (e for e in events if e["event"] == "load")
    assert all(0 <= load[k] < 300 for k in ("actor_start_s", "imports_s", "load_s")), load
    assert load["started_by"] == "sweep", load
    attached = {e["name"]: i for i, e in enumerate(events) if e["event"] == "attach"}
    left = {e["name"]: (i, e["why"]) for i, e in enumerate(events) if e["event"] == "detach"}
    assert set(attached) == set(left) == set(frame["trial_id"])
    for trial_id in pruned["trial_id"]:
        # its own `finally` says "stopped"; a trial ASHA stops as the sweep ends may have its process ended by Tune
        # before that runs, and the sweep's `PackHost.close` then journals it (seen in a fresh-clone CI run)
        assert left[trial_id][1] in ("stopped at step 5", "sweep ended at step 5"), left[trial_id]
    for trial_id in frame[frame["status"] == "completed"]["trial_id"]:
        assert left[trial_id][1] == "finished", left[trial_id]
    assert max(len(e["attached"]) for e in events) == 2 and events[-1]["attached"] == []
    # between two reports a trial sent its next step's batch before its answer came (`pack_trial`), and the host had
    # it queued: the faster of two trials does so whenever its step waits for the other's batch
    assert events[-1]["sent_ahead"] > 0, events[-1]
    first_out = min(i for i, _ in left.values())
    later = [t for t, i in attached.items() if i > first_out]
    assert later and all(events[attached[t]]["loads"] == 1 for t in later)
    assert frame.set_index("trial_id").loc[later, "base_reused"].all()

    # A packed trial's loss curve (eval loss at each report, base reference included) is the solo trial's.
    (solo_id,) = solo_frame["trial_id"]
    packed_id = frame[(frame["variant"] == "loraplus") & (frame["lr"] > 1e-3)]["trial_id"].item()
    solo_history = pd.read_parquet(tmp_path / "solo" / "history.parquet")
    curves = [
        h[h["trial_id"] == t].sort_values("step")["eval_loss"].tolist()
        for h, t in ((history, packed_id), (solo_history, solo_id))
    ]
    assert len(curves[0]) == 2 and curves[0] == pytest.approx(curves[1], rel=1e-5), curves
    bases = [f.set_index("trial_id").loc[t, "base_eval_loss"] for f, t in ((frame, packed_id), (solo_frame, solo_id))]
    assert bases[0] == pytest.approx(bases[1], rel=1e-5)
    assert curves[1][-1] < bases[1] - 0.05  # it learnt: the curves compared move

    # Golden scores: a completed packed trial has the solo trial's fields, lm-eval's results beside its adapter, and
    # (its adapter the solo one's to 1e-5) the solo trial's scores; a pruned one has none, as a solo one.
    golden = ["tiny_mood/acc", "tiny_antonym/exact_match"]
    rows = frame.set_index("trial_id")
    for row in frame.itertuples():
        results = Path(row.adapter_path) / "lm_eval_results.json"
        if row.status == "pruned":
            assert math.isnan(row.objective) and row.eval_s == 0 and rows.loc[row.trial_id, golden].isna().all()
            assert not results.exists()
            continue
        scored = json.loads(results.read_text())
        assert row.objective == scored["results"]["tiny_mood"]["acc,none"] and row.eval_s > 0
        exact_match = scored["results"]["tiny_antonym"]["exact_match,strip"]
        assert rows.loc[row.trial_id, "tiny_antonym/exact_match"] == exact_match
    solo_rows = solo_frame.set_index("trial_id")
    assert rows.loc[packed_id, golden].tolist() == solo_rows.loc[solo_id, golden].tolist()
    assert rows.loc[packed_id, "objective"] == solo_rows.loc[solo_id, "objective"] and rows["pareto"].any()
    completed = frame[frame["status"] == "completed"]["trial_id"]
    assert sorted(e["name"] for e in events if e["event"] == "golden") == sorted(completed)

    # Spend: a packed trial held its share of the host's device (`cost.DEVICE_SHARE`, in its report), not all of it.
    devices = devices_per_trial(sweep.resources)
    shares = {}
    for row in frame.itertuples():
        report = sorted((out / "ray" / "train" / f"trial_{row.trial_id}").glob("step_*/report.json"))[-1]
        shares[row.trial_id] = json.loads(report.read_text())[DEVICE_SHARE]
        assert 0 < shares[row.trial_id] <= 1
        assert row.spend_device_s == pytest.approx(row.trial_s * devices * shares[row.trial_id], rel=1e-9)
    # trials that stepped together held part of the device in those steps (the host, started before them by the
    # driver, steps the first trial alone until the next attaches, so how much they overlap varies)
    assert sum(share < 1 for share in shares.values()) >= 2, shares
    assert solo_rows.loc[solo_id, "spend_device_s"] == pytest.approx(solo_rows.loc[solo_id, "trial_s"] * devices)


def test_pack_needs_one_device_per_host_and_says_why_variants_train_solo(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError) as e:
        Sweep(
            name="x",
            base=BaseModel(str(tiny_model_dir)),
            dataset=Dataset("d.jsonl"),
            resources=Resources(pack=2, workers=2, gpus_per_worker=2),
        )
    assert "resources.workers" in str(e.value) and "resources.gpus_per_worker" in str(e.value)
    # a host may hold a share of a GPU, beside the sweep's other trials on it
    assert Resources(pack=4, gpus_per_worker=0.25).problems() == []
    # packed trials take their rows at random: a length-grouped sweep that packs is refused with the fix, as is a
    # sampling that does not exist, each named by its field
    grouped = Budget(sampling="group_by_length")
    with pytest.raises(ConfigError) as e:
        Sweep(name="x", base=BaseModel(str(tiny_model_dir)), dataset=Dataset("d.jsonl"), budget=grouped,
              resources=Resources(pack=2))  # fmt: skip
    assert "budget.sampling" in str(e.value) and 'sampling="random", or resources.pack=1' in str(e.value)
    Sweep(name="x", base=BaseModel(str(tiny_model_dir)), dataset=Dataset("d.jsonl"), budget=grouped)  # solo: fine
    with pytest.raises(ConfigError, match="budget.sampling"):
        Sweep(name="x", base=BaseModel(str(tiny_model_dir)), dataset=Dataset("d.jsonl"),
              budget=Budget(sampling="by_length"))  # type: ignore[arg-type]  # fmt: skip
    sweep = Sweep(
        name="x",
        base=BaseModel(str(tiny_model_dir)),
        dataset=Dataset("d.jsonl"),
        space=SearchSpace(ranks=(4,), variants=("lora", "dora", "pissa")),
        resources=Resources(pack=2),
    )
    assert set(pack_host.solo_reasons(sweep)) == {"dora"}  # pissa packs, with its correction
    assert pack_host.packed(sweep, "lora") and not pack_host.packed(sweep, "dora")
    alone = sweep.replace(resources=Resources())
    assert not pack_host.packed(alone, "lora") and not pack_host.solo_reasons(alone)
    assert pack_host.trial_resources(sweep, "lora", {"CPU": 1.0}) == {"CPU": pack_host.PACKED_TRIAL_CPU}
    assert pack_host.trial_resources(sweep, "dora", {"CPU": 1.0}) == {"CPU": 1.0}


def test_a_sweep_counts_only_the_pack_hosts_its_cluster_can_place(tiny_model_dir: Path) -> None:
    """A host reserves its worker's CPUs and each of its trials `PACKED_TRIAL_CPU`: on 2 CPUs, hosts of 1 CPU and 2
    trials each (1.2 CPUs) fit once, not twice (a second would never be placed, and its trials would wait on it for
    ever); GPUs bound the count by the worker's share, CPUs still cap it."""

    def sweep(**resources: float) -> Sweep:
        return Sweep(name="x", base=BaseModel(str(tiny_model_dir)), dataset=Dataset("d.jsonl"),
                     resources=Resources(**resources))  # type: ignore[arg-type]  # fmt: skip

    assert pack_host.hosts(sweep(pack=2, cpus_per_worker=1), {"CPU": 2.0}) == 1
    assert pack_host.hosts(sweep(pack=2, cpus_per_worker=1), {"CPU": 2.4}) == 2  # 2 x 1.2
    assert pack_host.hosts(sweep(pack=4, cpus_per_worker=1), {"CPU": 1.0}) == 1  # never fewer than one
    gpu = {"CPU": 16.0, "GPU": 1.0}
    assert pack_host.hosts(sweep(pack=4, cpus_per_worker=2, gpus_per_worker=0.25), gpu) == 4  # 4 x 2.4 CPUs fit
    assert pack_host.hosts(sweep(pack=4, cpus_per_worker=2, gpus_per_worker=0.25), {**gpu, "CPU": 5.0}) == 2
    assert pack_host.hosts(sweep(pack=4, cpus_per_worker=2, gpus_per_worker=1), {**gpu, "GPU": 2.0}) == 2


def test_a_host_detaches_an_adapter_that_stopped_stepping_and_steps_without_a_late_one(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (no Ray): a steps alone, then b joins it (waiting for a, which took part in the step before), then b
    goes silent (its process killed, say): a's next step waits `GATHER_S` for b and runs without it, and after
    `stale_s` the host detaches b."""
    import time

    import torch

    from lora_search.records import TrialParams

    host = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / "journal.jsonl"), stale_s=1.0)
    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-3, dropout=0.0)
    assert host.attach("a", params, room=2) and host.attach("b", params, room=2)
    assert host.attach("c", params, room=2) is None  # the pack is full
    ids = torch.randint(3, 300, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert host.step("a", batch)["pack"] == 1  # the pack's first step runs with whoever came
    # b waits for a, which took part in the previous step: for longer than this loop can miss on a busy machine (a CI
    # run's loop did not see b pending within the default 0.5 s, b stepped alone, and the loop waited for ever)
    monkeypatch.setattr(pack_host, "GATHER_S", 10.0)
    with ThreadPoolExecutor(1) as pool:
        b = pool.submit(host.step, "b", batch)
        deadline = time.monotonic() + 10
        while "b" not in host.pending:
            assert not b.done(), f"b stepped without waiting for a: {b.result()}"
            assert time.monotonic() < deadline, host.status()
            time.sleep(0.01)
        assert host.step("a", batch)["pack"] == 2 and b.result()["pack"] == 2
    monkeypatch.setattr(pack_host, "GATHER_S", 0.5)  # a's wait for late b, below stale_s
    start = time.monotonic()
    assert host.step("a", batch)["pack"] == 1  # b is late: a waited for it, then stepped alone
    assert time.monotonic() - start >= pack_host.GATHER_S * 0.9
    deadline = time.monotonic() + 10
    while "b" in host.status()["names"]:
        assert time.monotonic() < deadline, host.status()
        host.step("a", batch)  # a keeps stepping: it stays
        time.sleep(0.1)
    events = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "detach" and events[-1]["name"] == "b" and events[-1]["why"].startswith("no step")
    assert host.status()["names"] == ["a"] and host.status()["loads"] == 1
    # where the host's time went, in each line after its first step: the wait for late b falls between steps
    # (the reaper may detach b while the loop's last step of a waits on the host's lock: that step then comes after)
    assert 3 <= events[-1]["steps"] <= host.status()["steps"] and events[-1]["step_s"] > 0
    assert events[-1]["between_steps_s"] >= pack_host.GATHER_S * 0.9


def test_a_step_does_not_wait_for_an_adapter_whose_trial_is_reporting(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (no Ray): a and b step together; then b's trial saves its checkpoint (`save`, before it reports to
    Tune) and a's next step runs at once, without the `GATHER_S` wait a merely late b costs it; b's next batch brings
    it back, and a waits for it again."""
    import time

    import torch

    from lora_search.records import TrialParams

    monkeypatch.setattr(pack_host, "GATHER_S", 5.0)  # a wait, where there is one, that no slow runner hides
    host = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / "journal.jsonl"))
    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-3, dropout=0.0)
    assert host.attach("a", params, room=2) and host.attach("b", params, room=2)
    ids = torch.randint(3, 300, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def together() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(host.step, "b", batch)
            deadline = time.monotonic() + 10
            while "b" not in host.pending:
                assert not b.done(), f"b stepped without waiting for a: {b.result()}"
                assert time.monotonic() < deadline, host.status()
                time.sleep(0.01)
            assert host.step("a", batch)["pack"] == 2 and b.result()["pack"] == 2

    assert host.step("a", batch)["pack"] == 1  # the first step runs with whoever came; then b waits for a
    together()
    host.save("b", [ids[:1]])  # b reports now
    start = time.monotonic()
    assert host.step("a", batch)["pack"] == 1 and time.monotonic() - start < 2.5  # no wait for b
    together()  # b's batch brought it back: a waited for it (it is in the step)
    start = time.monotonic()
    assert host.step("a", batch)["pack"] == 1 and time.monotonic() - start >= 4.5  # late, not reporting: the wait
    host.close()


def test_a_batch_sent_ahead_waits_for_its_step_and_trains_as_sent_in_order(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (no Ray): Ray runs a threaded actor's calls in any order, so a trial's batch for its next step may
    come before the one for this step. Each batch trains at its own step (`step`'s `at`): six calls of a and b sent
    last step first train the losses of the same batches sent one step at a time; a step's batch sent twice is
    refused; a call waiting for its step while its adapter is detached raises instead of waiting for ever."""
    import time

    import torch

    from lora_search.records import TrialParams

    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-2, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    batches = {}
    for name in ("a", "b"):
        for at in (1, 2, 3):
            ids = torch.randint(3, 300, (2, 8), generator=generator)
            batches[name, at] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    monkeypatch.setattr(pack_host, "GATHER_S", 30.0)  # every step waits for both: no slow runner splits one

    def host_of(journal: str) -> pack_host.PackHost:
        host = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / journal))
        assert host.attach("a", params, room=2) and host.attach("b", params, room=2)
        host.previous = {"a", "b"}  # as after a step of both: the first step waits for both too
        return host

    ahead = host_of("ahead.jsonl")
    with ThreadPoolExecutor(6) as pool:
        sent = {key: pool.submit(ahead.step, key[0], batches[key], key[1]) for key in sorted(batches, reverse=True)}
        answers = {key: future.result(timeout=120) for key, future in sent.items()}
    in_order = host_of("in_order.jsonl")
    with ThreadPoolExecutor(2) as pool:
        for at in (1, 2, 3):
            sent = {name: pool.submit(in_order.step, name, batches[name, at], at) for name in ("a", "b")}
            for name, future in sent.items():
                expected = future.result(timeout=120)
                assert answers[name, at]["pack"] == expected["pack"] == 2
                assert answers[name, at]["loss"] == expected["loss"], (name, at)
    assert answers["a", 3]["loss"] != answers["a", 1]["loss"]  # the steps trained: the comparison has teeth
    assert ahead.status()["steps"] == 3 and ahead.sent_ahead >= 1

    with pytest.raises(RuntimeError, match="step 3 came twice"):
        ahead.step("a", batches["a", 3], 3)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ahead.step, "a", batches["a", 1], 5)  # step 4 never comes
        deadline = time.monotonic() + 10
        while 5 not in ahead.pending.get("a", {}):
            assert time.monotonic() < deadline and not waiting.done()
            time.sleep(0.01)
        ahead.detach("a", "stopped")
        with pytest.raises(RuntimeError, match="not attached"):
            waiting.result(timeout=30)
    assert "a" not in ahead.pending
    for host in (ahead, in_order):
        host.close()


def test_a_failed_pack_step_answers_every_adapter_in_it_with_why(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (no Ray): a pack step that raises on the host (a device error, an out-of-memory) is every stepping
    adapter's failure, not one caller's: each waiting `step` call raises with the host's reason, each adapter leaves
    the pack (its trial restarts from its checkpoint), a batch already sent ahead for the next step is refused as
    detached, and the journal says so. Before, only the call that ran the step heard it; the others waited for ever."""
    import torch

    from lora_search.records import TrialParams

    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-2, dropout=0.0)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    monkeypatch.setattr(pack_host, "GATHER_S", 30.0)  # the step waits for both adapters' batches
    journal = tmp_path / "journal.jsonl"
    host = pack_host.PackHost(_host_sweep(tiny_model_dir), str(journal))
    assert host.attach("a", params, room=2) and host.attach("b", params, room=2)
    host.previous = {"a", "b"}

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(host.pack, "step", boom)
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(host.step, "a", batch, 1), pool.submit(host.step, "b", batch, 1)]
        ahead = pool.submit(host.step, "a", batch, 2)
        for name, call in zip("ab", calls, strict=True):
            with pytest.raises(RuntimeError, match=f"trial {name}: its pack step 1 failed on the host: OutOfMemory"):
                call.result(timeout=60)
        with pytest.raises(RuntimeError, match="trial a is not attached"):
            ahead.result(timeout=60)
    assert host.pack.names == [] and host.pending == {} and host.outcomes == {}
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    failed = [e for e in events if e["event"] == "step_failed"]
    assert len(failed) == 1 and failed[0]["names"] == ["a", "b"] and "out of memory" in failed[0]["why"]
    assert {e["name"]: e["why"] for e in events if e["event"] == "detach"} == {
        "a": "its pack step 1 failed",
        "b": "its pack step 1 failed",
    }
    host.close()


def test_closing_a_host_says_how_each_adapter_it_still_holds_left(tiny_model_dir: Path, tmp_path: Path) -> None:
    """In-process (no Ray): Tune may end a trial's process after its last report and before its own detach; when the
    sweep ends, `close` detaches what is left, an adapter that took every step as "finished" and any other with the
    step it reached."""
    import torch

    from lora_search.records import TrialParams

    host = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / "journal.jsonl"))
    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-3, dropout=0.0)
    assert host.attach("a", params, room=2) and host.attach("b", params, room=2)
    ids = torch.randint(3, 300, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(10):  # the sweep's max_steps
        host.step("a", batch)
    for _ in range(3):
        host.step("b", batch)
    assert sorted(host.close()) == ["a", "b"] and host.status()["names"] == []
    events = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    # the load says whether the pack checkpoints, in how many micro-batches a step runs, and why: a full pack of this
    # tiny base fits the host's memory as it is
    assert events[0]["event"] == "load" and events[0]["checkpointing"] is False and events[0]["micro_batches"] == 1
    assert events[0]["checkpointing_why"].endswith("in one micro-batch of 8 rows a trial without checkpointing fits")
    assert not host.pack.checkpointing
    # and the base pieces a solo trial of the sweep runs on this device, on the pack's base: on a CPU, no Liger, and
    # right-padded rows without their attention mask
    assert events[0]["fast_path"].startswith("liger off (no CUDA device)"), events[0]["fast_path"]
    assert "no-pad-mask on" in events[0]["fast_path"] and host.pack.drop_mask
    assert {e["name"]: e["why"] for e in events if e["event"] == "detach"} == {
        "a": "finished",
        "b": "sweep ended at step 3",
    }
    assert host.close() == []  # a second close (its actor killed after) finds nothing


def test_a_host_scores_an_adapter_as_the_solo_path_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    """In-process (no Ray): the host's golden scores of a packed adapter are what the solo path's scoring gives for
    the same saved adapter (`evals.rescore`: the base loaded afresh, PEFT's layers, lm-eval), metric for metric; the
    host's plain base shares the pack's weights, is plain again after each adapter, and the pack trains on after."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lora_search import evals
    from lora_search.records import TrialParams
    from lora_search.train import load_base

    sweep = _host_sweep(tiny_model_dir, evals=EVALS)
    host = pack_host.PackHost(sweep, str(tmp_path / "journal.jsonl"))
    for name, variant, lr in (("a", "lora", 3e-2), ("b", "rslora", 1e-2)):
        params = TrialParams(variant=variant, rank=4, alpha=8.0, targets="all-linear", lr=lr, dropout=0.0)
        assert host.attach(name, params, room=2)
    ids = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(3):
        with ThreadPoolExecutor(1) as pool:
            b = pool.submit(host.step, "b", batch)
            host.step("a", batch)
            b.result()
    probe = ids[:1]
    a, b, again = host.golden("a", probe), host.golden("b", probe), host.golden("a", probe)
    # The solo path's scoring of the same saved adapter: a base loaded as a trial loads it, PEFT, evals.score.
    host.pack.save("a", tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = PeftModel.from_pretrained(load_base(sweep.base, quantized=False), str(tmp_path / "a"))
    solo = evals.score(model, tokenizer, EVALS, sweep.seed)
    base = evals.score_base(sweep)
    assert solo is not None and base is not None

    def answers(scored: dict) -> list[str]:  # per golden row: the choice ranked first, or the generated answer
        return [row["answer"] for row in scored["results"]["golden_samples"]]

    assert set(a["metrics"]) >= {"tiny_mood/acc", "tiny_antonym/exact_match"}
    assert a["metrics"] == solo["metrics"] and a["objective"] == solo["objective"]
    assert a["results"]["golden_samples"] == solo["results"]["golden_samples"]
    assert answers(a) != answers(base) and answers(a) != answers(b)  # the rows compared show which adapter scored
    assert again["results"]["golden_samples"] == a["results"]["golden_samples"]  # b's left the plain base as it was
    assert a["higher_is_better"] and a["seconds"] > 0 and a["device_s"] >= a["seconds"]
    # no second base: the scoring model's weights are the pack's tensors; the pack has its adapters and trains on
    embed = host.pack.model.get_input_embeddings().weight
    assert host.scorer.get_input_embeddings().weight.data_ptr() == embed.data_ptr()
    assert not any("lora" in n for n, _ in host.scorer.named_modules())
    assert host.status()["names"] == ["a", "b"] and math.isfinite(host.step("a", batch)["loss"])
    events = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "golden"] == ["a", "b", "a"]


def _host_sweep(model_dir: Path, **fields: Any) -> Sweep:
    """The sweep an in-process host test's PackHost serves: the tiny base, packs of 2, no data read."""
    return Sweep(
        name="x",
        base=BaseModel(str(model_dir)),
        dataset=Dataset("d.jsonl"),
        budget=Budget(max_steps=10, eval_every=5, grace_period=5),
        resources=Resources(pack=2),
        **fields,
    )


@pytest.mark.parametrize(("variant", "lr"), [("loraplus", 1e-2), ("pissa", 5e-2)])
def test_a_packed_trial_resumes_from_its_newest_checkpoint(
    variant: str, lr: float, tiny_model_dir: Path, tiny_jsonl: Path, tmp_path: Path
) -> None:
    """In-process (no Ray: the trial's host is a `PackHost` here, its reports reach no Tune, its checkpoints its run
    dir as a warm trial's): a trial trains its 10 steps; the same trial in a second storage that holds only what its
    process left after the step-5 report (that checkpoint, its progress, its reports log) attaches resumed from step 5,
    takes 5 steps, and its step-10 report is the uninterrupted one's: eval loss, train loss (the same batches),
    tokens, the base's eval loss; and it counts the restart and the steps redone. The killed process's adapter, still
    attached when the rerun comes, leaves first. PiSSA too: its checkpoint's adapter is PEFT's conversion (twice the
    rank) and its state has the A0 and B0 its correction keeps (`pack.trained_weights`)."""
    import shutil
    import time

    from lora_search import layout, pack_trial
    from lora_search.layout import REPORT_FILE, TRAINER_DIR, TRAINER_STATE, checkpoint_name
    from lora_search.records import TrialParams

    sweep = _sweep(tiny_model_dir, tiny_jsonl, tmp_path).replace(evals=None)
    host = pack_host.PackHost(sweep, str(tmp_path / "journal.jsonl"))
    # the base loaded before the trial's own imports: in one process, TRL's lazy names resolved by the trial and the
    # host's loading thread at once can fail ("cannot import name 'SFTConfig'"); a host and its trials are two
    host._ready()

    def find_host(sweep: Sweep, storage: str, name: str, params: Any, resume: Any) -> tuple[Any, Any]:
        return host, host.attach(name, params, sweep.resources.pack, resume)

    config = {"variant": variant, "rank": 4, "alpha": 8.0, "targets": "attention", "lr": lr, "dropout": 0.0}
    storages = {run: tmp_path / run for run in ("whole", "resumed")}
    pack_trial.run_packed_trial(
        {**config, "tune_run_start": time.time()}, sweep, str(storages["whole"]), "t", find_host
    )
    runs = {run: layout.run_dir(storage, "t") for run, storage in storages.items()}
    progress = {run: layout.progress_file(storage, "t") for run, storage in storages.items()}
    five = runs["whole"] / checkpoint_name(5)
    assert (five / TRAINER_DIR / pack_trial.PACK_STATE).is_file() and (five / TRAINER_DIR / TRAINER_STATE).is_file()
    shutil.copytree(five, runs["resumed"] / checkpoint_name(5))
    progress["resumed"].parent.mkdir(parents=True)
    shutil.copy(progress["whole"], progress["resumed"])  # the killed process had reached step 10
    reports = progress["whole"].with_suffix(".reports.jsonl").read_text().splitlines()
    progress["resumed"].with_suffix(".reports.jsonl").write_text(reports[0] + "\n")  # its step-5 report
    steps_before = host.status()["steps"]
    assert host.attach("t", TrialParams.from_config(config), room=2)  # the killed process's, never detached

    pack_trial.run_packed_trial(
        {**config, "tune_run_start": time.time()}, sweep, str(storages["resumed"]), "t", find_host
    )

    events = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    attaches = [e for e in events if e["event"] == "attach"]
    assert "resumed_from" not in attaches[0] and attaches[2]["resumed_from"] == 5
    assert [e["why"] for e in events if e["event"] == "detach"][
        1
    ] == "attached again: its trial started in a new process"
    assert host.status()["steps"] - steps_before == 5 and host.status()["names"] == []
    whole, resumed = (json.loads((runs[r] / checkpoint_name(10) / REPORT_FILE).read_text()) for r in runs)
    for key in ("eval_loss", "train_loss", "base_eval_loss"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-5), (key, resumed[key], whole[key])
    assert resumed["tokens"] == whole["tokens"] and resumed["device_s"] > json.loads(reports[0])["device_s"]
    assert resumed["restarts"] == 1 and resumed["steps_redone"] == 5 and whole["restarts"] == 0
    assert whole["eval_loss"] < json.loads(reports[0])["eval_loss"] - 0.05  # it learnt: the losses compared move


def test_a_host_steps_evaluates_and_probes_under_the_solo_trials_autocast(tiny_model_dir: Path, tmp_path: Path) -> None:
    """In-process: a host whose sweep trains under bf16 autocast (a bf16 base on a GPU: `PackHost.bf16`) runs every
    forward of its pack under it, as a solo trial's Trainer does (here on the CPU's autocast: the base's products come
    out bf16); without it, in the base's own dtype."""
    import torch

    from lora_search.records import TrialParams

    host = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / "journal.jsonl"))
    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-3, dropout=0.0)
    assert host.attach("a", params, room=2)
    ids = torch.randint(3, 300, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    seen: list[torch.dtype] = []
    layer = next(m for m in host.pack.model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        host.bf16 = bf16
        seen.clear()
        host.step("a", batch)
        host.evaluate("a", [batch])
        host.save("a", [ids[:1]])
        assert len(seen) == 3 and set(seen) == {dtype}, (bf16, seen)


def test_a_host_answers_full_before_its_base_has_loaded(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, the base's load held back: a trial asking a host whose places are all claimed hears "full" (None)
    at once, while the trials that claimed them wait for the base and attach once it is there. So a sweep's next host
    starts while the first loads, not after (session 17: 4 hosts one after another, a trial's `load_s` 50 s). A
    failed load reaches every trial waiting for it, and frees their places."""
    import threading
    import time

    from lora_search import train
    from lora_search.records import TrialParams

    gate = threading.Event()
    real = train.load_base

    def held(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "load_base", held)
    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-3, dropout=0.0)
    host = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / "journal.jsonl"))
    answers: dict[str, Any] = {}
    waiting = [threading.Thread(target=lambda n=n: answers.update({n: host.attach(n, params, room=2)})) for n in "ab"]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 10
    while len(host.claimed) < 2:
        assert time.monotonic() < deadline, host.claimed
        time.sleep(0.01)
    assert host.attach("c", params, room=2) is None  # full, and said before the base is there
    assert not host.loaded.is_set() and answers == {}
    gate.set()
    for thread in waiting:
        thread.join(60)
    assert answers["a"]["trainable_params"] > 0 and answers["b"]["trainable_params"] > 0
    assert host.status()["names"] == ["a", "b"] or host.status()["names"] == ["b", "a"]
    events = [json.loads(line)["event"] for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert events == ["load", "attach", "attach"]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no weights here")

    monkeypatch.setattr(train, "load_base", broken)
    failing = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / "failing.jsonl"))
    with pytest.raises(RuntimeError, match="could not load its base: no weights here"):
        failing.attach("a", params, room=1)
    assert failing.claimed == set()
    assert json.loads((tmp_path / "failing.jsonl").read_text())["event"] == "load_failed"
    host.close()


def test_an_empty_host_gives_its_device_back_when_the_sweep_has_solo_trials(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """In-process: on a one-GPU machine a sweep's solo trials (dora here) wait for the device its host holds, so a
    host left without trials leaves after `idle_s` (journal "leave"; a trial that asks it then is told to start a new
    one). A sweep whose every variant packs keeps its host."""
    import time

    from lora_search.records import TrialParams

    params = TrialParams(variant="lora", rank=2, alpha=4.0, targets="attention", lr=1e-3, dropout=0.0)
    mixed = _host_sweep(tiny_model_dir, space=SearchSpace(variants=("lora", "dora")))
    host = pack_host.PackHost(mixed, str(tmp_path / "mixed.jsonl"), idle_s=0.5)
    assert host.attach("a", params, room=2) and host.idle_s == 0.5
    time.sleep(1.5)  # attached: it stays
    assert not host.leaving
    host.detach("a", "finished")
    deadline = time.monotonic() + 10
    while not host.leaving:
        assert time.monotonic() < deadline, "the empty host did not leave"
        time.sleep(0.1)
    events = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["load", "attach", "detach", "leave"]
    assert "device goes back to the solo trials" in events[-1]["why"]
    assert host.attach("b", params, room=2) == {"leaving": True}

    packing_only = pack_host.PackHost(_host_sweep(tiny_model_dir), str(tmp_path / "lora.jsonl"), idle_s=0.5)
    packing_only.status()  # its base loaded
    assert packing_only.idle_s is None
    time.sleep(1.5)
    assert not packing_only.leaving and packing_only.attach("a", params, room=2)


def test_a_sweep_whose_solo_trials_need_the_hosts_device_finishes(
    tiny_model_dir: Path, tiny_jsonl: Path, tmp_path: Path
) -> None:
    """A one-GPU machine, modelled with CPUs: each worker reserves 3/4 of the machine's cores, so a host (which
    reserves a worker's share) and a solo trial cannot hold them at once, as a host and a solo trial cannot hold one
    GPU. The packed lora trial's host must leave once it is empty (`IDLE_S`) for the solo dora trial to start; before
    that, such a sweep waited for ever. Run in a child process, so that a hang fails this test instead of the suite."""
    import contextlib
    import os
    import subprocess
    import sys

    import psutil

    share = 0.75 * os.cpu_count()
    script = f"""
from lora_search import BaseModel, Budget, Dataset, Resources, SearchSpace, Sweep
from lora_search.sweep import run
sweep = Sweep(
    name="mixed",
    base=BaseModel({str(tiny_model_dir)!r}),
    dataset=Dataset({str(tiny_jsonl)!r}, eval_fraction=0.2, max_length=96),
    space=SearchSpace(ranks=(4,), targets=("attention",), variants=("lora", "dora"), lr=(1e-4, 1e-2), lr_grid_points=1),
    budget=Budget(max_steps=4, eval_every=2, grace_period=4, batch_size=8),
    resources=Resources(pack=2, cpus_per_worker={share}),
    search="grid", num_samples=1, max_concurrent_trials=1, seed=2, output_dir={str(tmp_path)!r}, tracking_uri="off",
)
frame = run(sweep)
print("STATUSES", sorted(zip(frame["variant"], frame["status"])))
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "LORA_SEARCH_PACK_IDLE_S": "3"},  # the host leaves 3 s after its trial, not 15
    )
    try:
        out, _ = child.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        for process in psutil.process_iter():  # the child's session: its driver and the local Ray it started
            with contextlib.suppress(OSError, psutil.Error):
                if os.getsid(process.pid) == child.pid:
                    process.kill()
        out, _ = child.communicate()
        pytest.fail("the sweep did not finish: its solo trial waited on the pack host's device\n" + out[-3000:])
    assert child.returncode == 0, out[-3000:]
    assert "STATUSES [('dora', 'completed'), ('lora', 'completed')]" in out, out[-3000:]
    events = [json.loads(line) for line in (tmp_path / "mixed" / "ray" / "pack_host_0.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["load", "attach", "detach"] and "leave" in kinds, kinds
    # dora trains solo: the host a packed trial needs is that trial's to start, or it could hold the device first
    assert {e["started_by"] for e in events if e["event"] == "load"} == {"trial"}, events


@pytest.mark.parametrize("value", ["abc", "-1", "inf", "nan", ""])
def test_a_bad_idle_setting_names_the_variable_its_value_and_the_fix(value: str) -> None:
    with pytest.raises(ValueError, match=f"LORA_SEARCH_PACK_IDLE_S={value!r}: give seconds >= 0, e.g."):
        environment.VARIABLES[environment.PACK_IDLE_S].read(value)
    assert environment.VARIABLES[environment.PACK_IDLE_S].read("2.5") == 2.5
