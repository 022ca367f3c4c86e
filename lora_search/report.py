"""A finished sweep as one self-contained HTML page: `<output_dir>/<name>/index.html`.

    lora-search report tiny                  # reports/tiny/index.html; prints its path
    lora-search report path/to/sweep_dir     # any sweep dir with a trials.parquet

Top to bottom: the headline figures; the Pareto frontier (quality vs adapter bytes, coloured by cost); what ASHA
saw (every trial's eval loss per step, pruned trials ending at their rung); hyperparameter effects; variants;
every trial in a sortable table; the verdicts against a nightly baseline (when given); provenance.

Plotly's JavaScript is inlined once in the page head, so the file opens offline and makes no network request.
Reading the sweep dir and writing the page are the only side effects (`load`, `write_report`); everything in
between is a pure function of the loaded results, one per section.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_search import answers, pareto
from lora_search.config import ConfigError, Problem
from lora_search.cost import spend_line
from lora_search.layout import (
    BASE_SCORES_FILE,
    HISTORY_FILE,
    PLAN_FILE,
    PROVENANCE_FILE,
    REPORT_HTML,
    SWEEP_METRICS_FILE,
    TRACKING_FILE,
    TRIALS_FILE,
)

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

STATUS_COLOURS = {
    "completed": "#2a9d8f",
    "pruned": "#e9a03b",
    "failed": "#d62828",
    "diverged": "#9d4edd",
    "infeasible": "#6c757d",
}
STOPPED = ("failed", "diverged", "infeasible")
"""Endings that are not a result: dashed in the ASHA picture, left out of the variant comparison."""
TABLE_COLUMNS = (
    "trial_id",
    "status",
    "reason",
    "step",
    "eval_loss",
    "objective",
    "variant",
    "rank",
    "alpha",
    "targets",
    "lr",
    "adapter_bytes",
    "cost",
    "pareto",
    "servable",
    "mlflow_run_id",
)

# Columns older sweeps' trials.parquet lack, with the value a sweep without them means.
LATER_COLUMNS = {
    "objective": math.nan,
    "cost": 0.0,
    "mlflow_run_id": "",
    "pareto": False,
    "reason": "",
    "servable": "",
    "serving_notes": "",
}


@dataclass(frozen=True)
class SweepResults:
    """Everything a sweep dir holds that the report shows (lora_search.sweep lists the files)."""

    name: str
    trials: pd.DataFrame
    history: pd.DataFrame | None
    metrics: dict[str, Any]
    base: dict[str, Any] | None
    provenance: dict[str, str]
    tracking: dict[str, Any] | None
    plan: dict[str, Any] | None = None
    """What the planner predicted for the cluster the sweep ran on (`plan.for_run`); None for older sweeps."""

    @property
    def quality(self) -> pareto.Objective:
        """The frontier's quality axis, as the sweep chose it: the primary golden metric, else eval loss."""
        if "base_objective" in self.metrics or self.trials["objective"].notna().any():
            higher = bool(self.base.get("higher_is_better", True)) if self.base else True
            return pareto.Objective("objective", higher_is_better=higher)
        return pareto.Objective("eval_loss", higher_is_better=False)

    @property
    def base_quality(self) -> float:
        fallback = (self.base or {}).get("objective") if self.quality.key == "objective" else self.base_eval_loss
        return _float(self.metrics.get(f"base_{self.quality.key}", fallback))

    @property
    def base_eval_loss(self) -> float:
        return _float(self.trials["base_eval_loss"].median()) if len(self.trials) else math.nan

    @property
    def objective_name(self) -> str:
        """The golden `task/metric` column the objective copies: named in sweep_metrics.json; older sweeps did not
        name it, so it is found by its values."""
        if self.metrics.get("quality_key") not in (None, "eval_loss"):
            return str(self.metrics["quality_key"])
        scored = self.trials[self.trials["objective"].notna()]
        golden = [c for c in self.trials.columns if "/" in c and not c.endswith("_stderr")]
        same = [c for c in golden if len(scored) and np.allclose(scored[c].astype(float), scored["objective"])]
        return same[0] if same else "objective"


def load(sweep_dir: Path) -> SweepResults:
    """Read a finished sweep dir. Raises ConfigError when it has no trials.parquet."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    parquet = sweep_dir / TRIALS_FILE
    if not parquet.is_file():
        what = "no such directory" if not sweep_dir.is_dir() else "has no trials.parquet (the sweep has not finished)"
        raise ConfigError(
            [Problem("sweep dir", str(sweep_dir), what, "run the sweep first (lora-search run sweeps/NAME.py)")],
            header="nothing to report",
        )

    def read_json(name: str) -> Any:
        path = sweep_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    history = sweep_dir / HISTORY_FILE
    provenance = read_json(PROVENANCE_FILE) or {}
    trials = pd.read_parquet(parquet)
    return SweepResults(
        name=provenance.get("lora_search.sweep") or sweep_dir.name,
        trials=trials.assign(**{k: v for k, v in LATER_COLUMNS.items() if k not in trials.columns}),
        history=pd.read_parquet(history) if history.is_file() else None,
        metrics=read_json(SWEEP_METRICS_FILE) or {},
        base=read_json(BASE_SCORES_FILE),
        provenance=provenance,
        tracking=read_json(TRACKING_FILE),
        plan=read_json(PLAN_FILE),
    )


def write_report(
    sweep_dir: Path, *, baseline: dict[str, Any] | None = None, extra_provenance: dict[str, str] | None = None
) -> Path:
    """Write `sweep_dir/index.html` atomically and return its path.

    `baseline`: nightly verdicts, `{"verdicts": [{"check", "baseline", "current", "tolerance", "passed",
    "reason"}], "baseline_source": str}`. `extra_provenance`: settings the sweep dir does not record (seed,
    search, budget, ...), shown beside provenance.json's tags. Raises ConfigError when the sweep has no results.
    """
    out = Path(sweep_dir) / REPORT_HTML
    page = render(load(Path(sweep_dir)), baseline=baseline, extra_provenance=extra_provenance)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    answers.write(Path(sweep_dir))  # the golden rows' answers, linked from the page
    return out


def render(
    r: SweepResults, *, baseline: dict[str, Any] | None = None, extra_provenance: dict[str, str] | None = None
) -> str:
    """The whole page as a string."""
    from plotly.offline import get_plotlyjs

    sections = [_headline(r), _plan_section(r), _pareto_section(r), _asha_section(r), _pruning_section(r)]
    sections += [_params_section(r), _variants_section(r)]
    sections.append(_table_section(r.trials))
    sections.append(_baseline_section(baseline) if baseline is not None else "")
    sections.append(_provenance_section(r, extra_provenance or {}))
    title = html.escape(f"LoRA sweep {r.name}")
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head>\n"
        f"<body><h1>{title}</h1>\n<p><a href='{answers.ANSWERS_HTML}'>What each frontier adapter answers</a></p>\n"
        + "\n".join(sections)
        + f"\n<script>{SORT_JS}</script></body></html>\n"
    )


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any, spec: str = ".4g") -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else format(value, spec)
    return "" if value is None else str(value)


def _section(heading: str, body: str, anchor: str) -> str:
    return f"<section id='{anchor}'><h2>{html.escape(heading)}</h2>\n{body}\n</section>"


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _figure(fig: go.Figure, div_id: str, height: int = 480) -> str:
    fig.update_layout(template="plotly_white", height=height, margin={"l": 60, "r": 20, "t": 40, "b": 50})
    config = {"displaylogo": False, "responsive": True}
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=config)


def _row(cells: list[Any], cls: str = "") -> str:
    return f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def _kv(items: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table class='kv'>{rows}</table>"


def _headline(r: SweepResults) -> str:
    t, m, q = r.trials, r.metrics, r.quality
    currency = m.get("currency", "USD")  # sweep_metrics.json does not record Pricing.currency; USD is its default
    counts = t["status"].value_counts()
    items = [("trials", ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUS_COLOURS))]
    label = r.objective_name if q.key == "objective" else "eval loss"
    scored = t[(t["status"] == "completed") & t[q.key].notna()]
    base = r.base_quality
    if len(scored):
        best = scored.sort_values(q.key, ascending=not q.higher_is_better).iloc[0]
        gain = (best[q.key] - base) * (1 if q.higher_is_better else -1)
        verdict = "better than the base" if gain > 0 else "not better than the base"
        items.append(
            (
                f"best {label}",
                f"{_fmt(best[q.key])} ({best['trial_id']}) vs base {_fmt(base)}: {_fmt(gain, '+.4g')} {verdict}",
            )
        )
    else:
        items.append((f"best {label}", f"no completed trial was scored; base {_fmt(base)}"))
    if r.base is None and q.key == "eval_loss":
        items.append(("golden sets", "none (no base_scores.json): quality is eval loss, lower is better"))
    elif r.base is not None and "error" in r.base:
        items.append(("base model", f"not scored on the golden sets: {r.base['error']}"))
    elif r.base is not None and isinstance(r.base.get("reused_from"), dict):
        reused = r.base["reused_from"]
        items.append(
            (
                "base model",
                f"golden scores reused from sweep {reused.get('sweep')} ({reused.get('scored_at')}): the same base, "
                "golden sets, settings and libraries (evals.reuse_base_scores=False scores it again)",
            )
        )
    items.append(
        (
            "Pareto frontier",
            f"{_fmt(m.get('frontier_size', math.nan), '.0f')} trial(s), "
            f"hypervolume {_fmt(m.get('hypervolume', math.nan))}",
        )
    )
    full = _float(m.get("full_budget_cost"))
    saved = _float(m.get("asha_saved_cost"))
    share = f" ({_fmt(100 * saved / full, '.0f')}% of the full-budget {_fmt(full)} {currency})" if full > 0 else ""
    items.append(
        (
            "cost of the configurations",
            f"{_fmt(m.get('sweep_cost', t['cost'].sum()))} {currency} for "
            f"{_fmt(m.get('sweep_device_hours', math.nan), '.3g')} device-hours of training and evaluation at "
            "each trial's steady rate (the frontier's cost axis)",
        )
    )
    if "spend" in m:  # sweeps from before the spend was measured have none
        items.append(("spend (every device-hour held)", spend_line(m, currency)))
    items.append(("ASHA's pruning saved", f"about {_fmt(saved)} {currency}{share}"))
    return _section("Headline", _kv(dict(items)), "headline")


def _plan_section(r: SweepResults) -> str:
    """The planner's prediction for this sweep's cluster against what the sweep measured, with their ratio."""
    p = r.plan
    if p is None:  # a sweep from before plan.json
        return ""
    if "error" in p:
        return _section("Plan vs measured", _note(f"No prediction: {p['error']}."), "plan")
    t, m = r.trials, r.metrics
    currency = p.get("currency", m.get("currency", "USD"))
    steps = float(t["step"].sum())
    # training's share of each trial's configuration device-seconds (the rest is its evaluation)
    share = (t["train_cost"] / t["cost"]).where(t["cost"] > 0, 0.0)
    train_device_s = float((t["device_s"] * share).sum())
    gpus = _float(p.get("gpus_per_trial"))
    step_s = train_device_s / gpus / steps if steps > 0 and gpus > 0 else math.nan
    rows = [
        ("trial-steps (ASHA's expected vs run)", p["trial_steps"], steps, ".0f"),
        (f"seconds per training step (planned at MFU {_fmt(p['mfu'], '.2f')})", p["step_s"], step_s, ".3g"),
        ("device-hours of the configurations", p["device_hours"], m.get("sweep_device_hours"), ".3g"),
        (f"cost of the configurations ({currency})", p["cost"], m.get("sweep_cost"), ".3g"),
        ("wall hours (planned: lower bound)", p["wall_hours"], m.get("wall_hours"), ".3g"),
        ("spend device-hours (planned: lower bound)", p["spend_device_hours"], m.get("spend_device_hours"), ".3g"),
    ]

    def ratio(measured: Any, planned: Any) -> float:
        return _float(measured) / _float(planned) if _float(planned) > 0 else math.nan

    body = "".join(
        _row([what, _fmt(planned, spec), _fmt(measured, spec), _fmt(ratio(measured, planned), ".3g")])
        for what, planned, measured, spec in rows
    )
    reached = _float(p["mfu"]) / ratio(step_s, p["step_s"])
    table = f"<table><tr><th></th><th>planned</th><th>measured</th><th>measured / planned</th></tr>{body}</table>"
    note = _note(
        f"Planned by lora_search.plan for {p['trials']} trial(s), {p['concurrent']} at a time on {p['gpu']} GPUs: "
        "training steps at the assumed MFU, loading, evaluation and golden scoring left out. Measured seconds per "
        f"step above the plan mean the trials ran below that MFU (a small model's steps wait on the host): this "
        f"sweep's training reached about {_fmt(reached, '.2g')}; plan the next one with it (--dry-run --mfu)."
    )
    return _section("Plan vs measured", table + note, "plan")


def _pareto_section(r: SweepResults) -> str:
    import plotly.graph_objects as go

    q = r.quality
    t = r.trials
    done = t[(t["status"] == "completed") & t[q.key].notna()].sort_values("adapter_bytes")
    if not len(done):
        return _section("Pareto frontier", _note("No completed, scored trial: there is no frontier to draw."), "pareto")
    label = r.objective_name if q.key == "objective" else "eval loss"
    hover = done[["trial_id", "variant", "rank", "alpha", "targets", "lr", "cost", "mlflow_run_id", "servable"]]
    on_front = done["pareto"].astype(bool).tolist()
    # an adapter the serving rules were checked on (notes recorded) that no engine loads as saved
    unservable = (done["serving_notes"].astype(str) != "") & (done["servable"].astype(str) == "")
    fig = go.Figure()
    fig.add_scatter(
        name="trials",
        x=done["adapter_bytes"].tolist(),
        y=done[q.key].tolist(),
        mode="markers",
        customdata=hover.astype(str).values.tolist(),
        marker={
            "color": done["cost"].tolist(),
            "colorscale": "Viridis",
            "showscale": True,
            "colorbar": {"title": {"text": f"cost ({r.metrics.get('currency', 'USD')})"}},
            "size": [16 if f else 9 for f in on_front],
            "symbol": ["x" if u else "circle" for u in unservable],
            "line": {"width": [2.5 if f else 0 for f in on_front], "color": "black"},
        },
        hovertemplate="<b>%{customdata[0]}</b> %{customdata[1]} r=%{customdata[2]} alpha=%{customdata[3]}<br>"
        "targets %{customdata[4]}, lr %{customdata[5]}<br>cost %{customdata[6]}<br>MLflow run %{customdata[7]}"
        "<br>served as saved by: %{customdata[8]}<extra></extra>",
    )
    # The 2-D frontier of what this plot shows; the outlined points are the 3-D one (quality, size, cost).
    sign = -1.0 if q.higher_is_better else 1.0
    mask = pareto.non_dominated(np.column_stack([sign * done[q.key].to_numpy(float), done["adapter_bytes"]]))
    front = done[mask]
    fig.add_scatter(
        name="frontier: quality vs size",
        x=front["adapter_bytes"].tolist(),
        y=front[q.key].tolist(),
        mode="lines",
        line={"color": "black", "dash": "dot"},
        hoverinfo="skip",
    )
    if math.isfinite(r.base_quality):
        fig.add_hline(y=r.base_quality, line_dash="dash", line_color="grey", annotation_text="base model")
    fig.update_layout(
        xaxis={"type": "log", "title": "adapter bytes"}, yaxis={"title": label}, legend={"orientation": "h", "y": 1.08}
    )
    better = "higher" if q.higher_is_better else "lower"
    note = _note(
        f"{len(done)} completed trial(s); {better} {label} is better. Outlined: on the Pareto frontier of "
        f"{label}, adapter bytes and cost. Dotted: the frontier of {label} vs adapter bytes alone. x: "
        f"{int(unservable.sum())} adapter(s) no serving engine loads as saved (the table's servable column, "
        "lora_search.serving)."
    )
    return _section("Pareto frontier", note + _figure(fig, "fig-pareto"), "pareto")


def _asha_section(r: SweepResults) -> str:
    import plotly.graph_objects as go

    h, t = r.history, r.trials
    if h is None or not len(h):
        return _section("ASHA: eval loss per step", _note("No history.parquet: no step was recorded."), "asha")
    status = dict(zip(t["trial_id"], t["status"], strict=True))
    fig = go.Figure()
    for trial_id, steps in h.sort_values("step").groupby("trial_id", sort=False):
        s = status.get(trial_id, "failed")
        n = len(steps)
        end = "x" if s == "pruned" else "circle"
        fig.add_scatter(
            name=f"{trial_id} ({s})",
            x=steps["step"].tolist(),
            y=steps["eval_loss"].tolist(),
            mode="lines+markers",
            line={"color": STATUS_COLOURS[s], "dash": "dash" if s in STOPPED else "solid", "width": 1.5},
            marker={"symbol": ["circle"] * (n - 1) + [end], "size": [5] * (n - 1) + [12 if s == "pruned" else 5]},
            hovertemplate=f"{html.escape(str(trial_id))} ({s})<br>step %{{x}}: eval loss %{{y:.4f}}<extra></extra>",
        )
    rungs = sorted(set(t.loc[t["status"] == "pruned", "step"].astype(int)))
    for rung in rungs:
        fig.add_vline(x=rung, line_dash="dot", line_color="grey", annotation_text=f"rung {rung}")
    if math.isfinite(r.base_eval_loss):
        fig.add_hline(y=r.base_eval_loss, line_dash="dash", line_color="black", annotation_text="base model")
    fig.update_layout(xaxis={"title": "optimizer step"}, yaxis={"title": "eval loss"})
    note = _note(
        f"One line per trial; x marks where ASHA pruned a trial (rungs at steps {rungs or 'none'}); "
        "failed, diverged (NaN/inf loss) and infeasible (out of memory) trials are dashed."
    )
    return _section("ASHA: eval loss per step", note + _figure(fig, "fig-asha"), "asha")


def _pruning_section(r: SweepResults) -> str:
    """What pruning saved, and the pruned trials it may have been wrong about (`lora_search.pruning`)."""
    from lora_search import pruning

    t, m = r.trials, r.metrics
    if not (t["status"] == "pruned").any():
        return ""
    completed = t.loc[t["status"] == "completed", "step"]
    max_steps = int(completed.max()) if len(completed) else int(t["step"].max())
    found = pruning.review(t, r.history, max_steps)
    currency = m.get("currency", "USD")
    share = 100 * found.steps_run / found.steps_full if found.steps_full else math.nan
    items = {
        "trial-steps trained": f"{found.steps_run:,} of the {found.steps_full:,} every trial at {max_steps} steps "
        f"would take ({_fmt(share, '.0f')}%)",
        "cost saved": f"about {_fmt(m.get('asha_saved_cost'))} {currency} of {_fmt(m.get('full_budget_cost'))}",
        "pruned trials worth a second look": str(len(found.missed)),
    }
    body = _kv(items)
    if len(found.missed):
        rows = "".join(
            _row(
                [
                    x.trial_id,
                    x.variant,
                    x.rank,
                    x.targets,
                    _fmt(x.adapter_bytes, ",.0f"),
                    x.rung,
                    _fmt(x.eval_loss),
                    _fmt(x.cutoff),
                    _fmt(100 * x.gap, "+.1f") + "%",
                    x.why,
                ]
            )  # fmt: skip
            for x in found.missed.head(20).itertuples()
        )
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "trial",
                "variant",
                "rank",
                "targets",
                "adapter bytes",
                "rung",
                "eval loss",
                "worst that went on",
                "gap",
                "why",
            )  # fmt: skip
        )
        body += f"<table><tr>{head}</tr>{rows}</table>"
    body += _note(
        "ASHA ranks a rung's trials by eval loss alone. Listed: pruned trials within "
        f"{pruning.CLOSE:.0%} of the worst trial that went on from their rung (or below it), and ones smaller or "
        "cheaper per step than every frontier trial. Where to look, not proof of a miss: a larger grace_period or "
        "a frontier-aware scheduler would have kept them longer."
    )
    return _section("Pruning: saved and possibly missed", body, "pruning")


def _codes(values: pd.Series) -> tuple[list[int], list[str]]:
    labels = sorted(values.astype(str).unique())
    return [labels.index(v) for v in values.astype(str)], labels


def _params_section(r: SweepResults) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = r.trials
    ran = t[t["status"].isin(["completed", "pruned"]) & t["eval_loss"].notna()]
    if not len(ran):
        return _section("Hyperparameters", _note("No trial finished training: nothing to compare."), "params")
    variant, variants = _codes(ran["variant"])
    target, targets = _codes(ran["targets"])
    loss = ran["eval_loss"].tolist()
    dims = [
        {"label": "rank", "values": ran["rank"].tolist()},
        {"label": "log10(lr)", "values": np.log10(ran["lr"].to_numpy(float)).tolist()},
        {"label": "alpha", "values": ran["alpha"].tolist()},
        {"label": "variant", "values": variant, "tickvals": list(range(len(variants))), "ticktext": variants},
        {"label": "targets", "values": target, "tickvals": list(range(len(targets))), "ticktext": targets},
        {"label": "final eval loss", "values": loss},
    ]
    par = go.Figure(go.Parcoords(dimensions=dims, line={"color": loss, "colorscale": "Viridis_r", "showscale": True}))
    strips = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=("by rank", "by learning rate"))
    for s, group in ran.groupby("status"):
        style = {"mode": "markers", "name": s, "marker": {"color": STATUS_COLOURS[s], "size": 8}}
        style.update(y=group["eval_loss"].tolist(), text=group["trial_id"].tolist(), legendgroup=s)
        strips.add_scatter(x=group["rank"].astype(str).tolist(), **style, row=1, col=1)
        strips.add_scatter(x=group["lr"].tolist(), **style, showlegend=False, row=1, col=2)
    ranks = [str(v) for v in sorted(ran["rank"].unique())]
    strips.update_xaxes(type="category", categoryorder="array", categoryarray=ranks, title_text="rank", row=1, col=1)
    strips.update_xaxes(type="log", title_text="learning rate", row=1, col=2)
    strips.update_yaxes(title_text="final eval loss", row=1, col=1)
    note = _note(f"{len(ran)} completed or pruned trial(s); a pruned trial's loss is the one at its rung.")
    body = note + _figure(par, "fig-params", 420) + _figure(strips, "fig-params-strip", 360)
    return _section("Hyperparameters", body, "params")


def _variants_section(r: SweepResults) -> str:
    import plotly.graph_objects as go

    t, q = r.trials, r.quality
    ran = t[~t["status"].isin(STOPPED)]
    if not len(ran):
        return _section("Variants", _note("No completed or pruned trial: no variant to compare."), "variants")
    fig = go.Figure()
    rows = []
    for variant, group in ran.groupby("variant"):
        fig.add_box(
            name=str(variant),
            y=group["eval_loss"].tolist(),
            boxpoints="all",
            jitter=0.4,
            pointpos=0,
            text=group["trial_id"].tolist(),
            hovertemplate="%{text}: %{y:.4f}<extra></extra>",
        )
        scored = group[group["objective"].notna()]
        best = scored.sort_values("objective", ascending=not q.higher_is_better).head(1)
        best_obj = f"{_fmt(best['objective'].iloc[0])} ({best['trial_id'].iloc[0]})" if len(best) else "–"
        cells = [variant, len(group), _fmt(group["eval_loss"].min()), best_obj]
        rows.append(_row(cells))
    fig.update_layout(yaxis={"title": "eval loss (completed and pruned)"}, showlegend=False)
    head = "<tr><th>variant</th><th>trials</th><th>best eval loss</th><th>best objective</th></tr>"
    return _section("Variants", _figure(fig, "fig-variants", 380) + f"<table>{head}{''.join(rows)}</table>", "variants")


def _table_section(t: pd.DataFrame) -> str:
    columns = [c for c in TABLE_COLUMNS if c in t.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in t[columns].to_dict("records"):
        cells = []
        for c in columns:
            v = row[c]
            number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            key = "" if number and not math.isfinite(v) else (repr(float(v)) if number else str(v))
            shown = _fmt(v, ".2e" if c in ("lr", "cost") else ".4g")
            cells.append(f"<td class='{c}' data-v='{html.escape(key)}'>{html.escape(shown)}</td>")
        body.append(f"<tr class='{html.escape(str(row['status']))}'>{''.join(cells)}</tr>")
    table = f"<table id='trials' class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    table = f"<div class='scroll'>{table}</div>"
    note = _note(f"{len(t)} trial(s); click a column heading to sort by it (again to reverse).")
    return _section("All trials", note + table, "trials-table")


def _baseline_section(baseline: dict[str, Any]) -> str:
    verdicts = baseline.get("verdicts", [])
    failed = sum(not v.get("passed") for v in verdicts)
    source = html.escape(str(baseline.get("baseline_source", "unknown")))
    summary = f"<p>Baseline: {source}. {len(verdicts) - failed} of {len(verdicts)} check(s) passed.</p>"
    head = "<tr><th>check</th><th>baseline</th><th>current</th><th>tolerance</th><th>verdict</th><th>reason</th></tr>"
    rows = []
    for v in verdicts:
        ok = bool(v.get("passed"))
        cells = [
            v.get("check"),
            _fmt(v.get("baseline")),
            _fmt(v.get("current")),
            _fmt(v.get("tolerance")),
            "pass" if ok else "FAIL",
            v.get("reason", ""),
        ]
        rows.append(_row(cells, "pass" if ok else "fail"))
    return _section("Versus baseline", f"{summary}<table id='baseline'>{head}{''.join(rows)}</table>", "baseline")


def _provenance_section(r: SweepResults, extra: dict[str, str]) -> str:
    tags = {**r.provenance, **{f"tracking.{k}": v for k, v in (r.tracking or {}).items()}, **extra}
    missing = "" if r.provenance else _note("No provenance.json: what produced this sweep is unknown.")
    return f"<footer id='provenance'><h2>Provenance</h2>{missing}{_kv(tags)}</footer>"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; }
table.kv th { background: #f5f5f5; font-weight: 600; }
.scroll { overflow-x: auto; } table.sortable td { white-space: nowrap; }
table.sortable td.reason { white-space: normal; min-width: 16em; max-width: 28em; }
table.sortable th { cursor: pointer; background: #f0f0f0; user-select: none; }
table.sortable th.asc::after { content: " \\25B2"; } table.sortable th.desc::after { content: " \\25BC"; }
tr.failed td, tr.diverged td, tr.infeasible td { color: #a00; } tr.pruned td { color: #666; }
tr.fail td { background: #fde2e2; color: #900; font-weight: 600; } tr.pass td { background: #e6f4ea; }
.note { color: #555; font-size: 14px; } section, footer { margin-bottom: 2em; }
"""

# Sort a table by the clicked column: numbers numerically, text alphabetically, empty cells last.
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], asc = !th.classList.contains("asc");
  th.parentNode.querySelectorAll("th").forEach(h => h.classList.remove("asc", "desc"));
  th.classList.add(asc ? "asc" : "desc");
  const key = tr => tr.cells[col].dataset.v;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === "" || y === "") return (x === "") - (y === "");
    const d = (isNaN(x) || isNaN(y)) ? x.localeCompare(y) : x - y;
    return asc ? d : -d;
  });
  rows.forEach(tr => body.appendChild(tr));
}));
"""
