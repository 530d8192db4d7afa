"""Experiment tracking of ``dbr train``: TensorBoard by default, Trackio or W&B when chosen, a PNG per run.

``report_to`` (train config / ``--report-to``) lists the trackers:

- ``tensorboard`` (default): event files in ``<seed folder>/tensorboard/<stage>/``, written on
  this machine, no account or network; ``tensorboard --logdir W/runs/<run>`` shows every unit.
  Needs the ``tensorboard`` package (a core dependency: torch's ``SummaryWriter`` writes
  through it; if it is missing from a stale environment, training goes on with a warning).
- ``trackio`` / ``wandb``: the optional ``[tracking]`` extra (``pip install 'dbr-builder[tracking]'``);
  never on by default. Trackio logs to a local database unless told to sync to a Space; W&B needs
  a login (or ``WANDB_MODE=offline``).
- ``none``: only the ``log.jsonl`` files the loop always writes.

Every optimizer step's record (loss, learning rate, per-task NLL sums and token counts) is
logged under ``train/``; each stage's validation accuracy under ``val/accuracy`` at its last step.
``plot_run`` draws ``training.png`` (loss per step across the stages, validation accuracy per
stage) from the ``log.jsonl`` files, so a run can be read without any tracker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dbr_builder.core.fsutil import atomic_path
from dbr_builder.errors import ConfigError, UserError
from dbr_builder.log import get_logger

logger = get_logger(__name__)

TRACKERS = ("tensorboard", "trackio", "wandb", "none")
DEFAULT_REPORT_TO = ("tensorboard",)
EXTRA = "pip install 'dbr-builder[tracking]'"


class Tracker:
    """Fan-out to the chosen trackers; a no-op when none is chosen. Use as a context manager."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
        for b in self.backends:
            b.log(clean, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TensorBoard:
    def __init__(self, logdir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the `tensorboard` package

        logdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, sort_keys=True, default=str)
                             + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _Trackio:
    def __init__(self, project: str, name: str, config: dict[str, Any]):
        try:
            import trackio
        except ImportError:
            raise UserError(f"report_to: trackio is not installed; {EXTRA} (or drop it from report_to)") from None
        self.mod = trackio
        self.run = trackio.init(project=project, name=name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mod.log(metrics, step=step)

    def close(self) -> None:
        self.mod.finish()


class _WandB:
    def __init__(self, project: str, name: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError(f"report_to: wandb is not installed; {EXTRA} (or drop it from report_to)") from None
        self.run = wandb.init(project=project, name=name, config=config, reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def check_report_to(report_to: Iterable[str] | str | None) -> list[str]:
    """The chosen trackers, checked (``none`` alone or absent = no tracker)."""
    names = [report_to] if isinstance(report_to, str) else list(DEFAULT_REPORT_TO if report_to is None else report_to)
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ConfigError(f"train.report_to: {', '.join(map(repr, bad))} unknown; use any of {', '.join(TRACKERS)}")
    return [n for n in names if n != "none"]


def make_tracker(report_to: Iterable[str] | str | None, logdir: Path, project: str, name: str,
                 config: dict[str, Any]) -> Tracker:
    """Open the chosen trackers for one training stage (``name`` e.g. ``PACS/sketch/seed0/mtct``)."""
    backends: list[Any] = []
    for n in check_report_to(report_to):
        if n == "tensorboard":
            try:
                backends.append(_TensorBoard(Path(logdir), config))
            except ImportError as e:  # a core dependency; a stale environment must not stop training
                logger.warning(f"report_to: tensorboard needs the `tensorboard` package ({e}); "
                               "logging to log.jsonl only (pip install tensorboard)")
        elif n == "trackio":
            backends.append(_Trackio(project, name, config))
        elif n == "wandb":
            backends.append(_WandB(project, name, config))
    return Tracker(backends)


def step_metrics(rec: dict[str, Any]) -> dict[str, float]:
    """A ``log.jsonl`` record as tracker metrics: ``train/loss``, ``train/lr``, per-task NLL per token."""
    out = {f"train/{k}": v for k, v in rec.items() if k not in ("step",)}
    for task in ("cls", "reason"):
        s, t = rec.get(f"{task}_nll_sum"), rec.get(f"{task}_tokens")
        if s is not None and t:
            out[f"train/{task}_nll_per_token"] = s / t
    return out


# ---------------------------------------------------------------------------------------------
# the PNG


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of one stage's ``log.jsonl`` (a torn last line from a kill is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    # a resumed stage re-logs steps after its checkpoint: keep the last record of each step
    by_step = {int(r["step"]): r for r in out if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot_run(stages: list[tuple[str, list[dict[str, Any]], float | None]], dest: Path, title: str) -> Path:
    """``training.png``: loss per step (stages one after another) and validation accuracy per stage.

    ``stages``: (name, log records, validation accuracy or None), in training order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1.3]})
    offset = 0
    for i, (name, recs, _) in enumerate(stages):
        if recs:
            xs = [offset + int(r["step"]) for r in recs]
            ax1.plot(xs, [r["loss"] for r in recs], color=f"C{i}", label=name, linewidth=1.2)
            offset = xs[-1]
            ax1.axvline(offset, color="0.85", linewidth=0.8, zorder=0)
    from matplotlib.ticker import MaxNLocator

    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("optimizer step (stages in sequence)")
    ax1.set_ylabel("MTCT loss (per image)")
    ax1.set_title("training loss")
    if any(recs for _, recs, _ in stages):
        ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    names = [n for n, _, _ in stages]
    accs = [100.0 * a if a is not None else 0.0 for _, _, a in stages]
    bars = ax2.bar(range(len(names)), accs, color=[f"C{i}" for i in range(len(names))])
    for b, (_, _, a) in zip(bars, stages, strict=True):
        ax2.annotate("n/a" if a is None else f"{100 * a:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                     ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(names)), names)
    ax2.set_ylim(0, 105)
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("validation (training domains)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return dest
