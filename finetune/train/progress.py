"""What a run has done so far (the per-epoch history, where each stage began, whether the backbone has
moved), saved as a checkpoint at every epoch end and restored from one when a killed run continues."""
from __future__ import annotations

from pathlib import Path

from finetune import tracking
from finetune.train.checkpoint import (Checkpoints, assign_weights, config_hash, optimizer_arrays, restore_optimizer,
                                       weight_arrays)


class Progress:
    def __init__(self, parts, checkpoints: Checkpoints | None = None, config_key: str | None = None):
        self.parts, self.checkpoints, self.config_key = parts, checkpoints, config_key
        self.history: dict[str, list[float]] = {}
        self.stage_starts: list[tuple[str, int]] = []
        self.backbone_changed = False  # once True, checkpoints hold the backbone's weights too
        self.lr_found: float | None = None  # optimizer.lr=auto: the range test's rate, kept in checkpoints

    @classmethod
    def for_run(cls, cfg, parts, output_dir: Path) -> "Progress":
        if not cfg.trainer.get("checkpoint", False):
            return cls(parts)
        return cls(parts, Checkpoints(output_dir), config_hash(cfg))

    @property
    def epochs_done(self) -> int:
        return len(self.history.get("loss", []))

    def begin_stage(self, name: str, first_epoch: int, changes_backbone: bool) -> None:
        self.stage_starts.append((name, first_epoch))
        self.backbone_changed = self.backbone_changed or changes_backbone

    def add(self, history, start: int) -> int:
        """A stage's keras History (fit from epoch `start`) into the run's; returns the epoch after its last."""
        for key, values in history.history.items():
            self.history.setdefault(key, []).extend(float(v) for v in values)
        return start + len(history.epoch)

    def save(self, stage: int, epoch: int, stage_first_epoch: int, current: dict, optimizer,
             schedule: dict | None = None) -> None:
        """`current`: this stage's epoch logs not yet in self.history; optimizer: mid-stage state or None;
        schedule: the stage's schedule state (finetune.train.schedules.ScheduleCallback.state)."""
        if self.checkpoints is None:
            return
        import mlflow

        history = {k: list(v) for k, v in self.history.items()}
        for key, values in current.items():
            history.setdefault(key, []).extend(values)
        state = {"stage": stage, "epoch": epoch, "stage_first_epoch": stage_first_epoch, "history": history,
                 "stage_starts": [list(s) for s in self.stage_starts], "backbone_changed": self.backbone_changed,
                 "run_id": mlflow.active_run().info.run_id if mlflow.active_run() else None,
                 "config_hash": self.config_key, "schedule": schedule, "lr_found": self.lr_found}
        weights = weight_arrays(self.parts.backbone, self.parts.head, self.backbone_changed)
        self.checkpoints.save(state, weights, optimizer_arrays(optimizer) if optimizer is not None else None)

    def discard(self) -> None:
        """The run ended: the saved model supersedes its checkpoint."""
        import shutil

        if self.checkpoints is not None:
            shutil.rmtree(self.checkpoints.folder, ignore_errors=True)

    def restore(self, resume: dict) -> tuple[int, int, dict | None]:
        """History, stage starts and weights back from a loaded checkpoint; MLflow gets any epoch it
        missed. Returns (first epoch of the stage to run, index of that stage, the checkpoint if it was
        taken inside that stage, else None)."""
        state = resume["state"]
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.stage_starts = [(name, int(first)) for name, first in state["stage_starts"]][:state["stage"]]
        self.backbone_changed = bool(state["backbone_changed"])
        self.lr_found = state.get("lr_found")
        assign_weights(resume["weights"], self.parts.backbone, self.parts.head)
        self.log_missing_epochs(int(state["epoch"]))
        where = self.checkpoints.folder if self.checkpoints else "the run folder"
        print(f"   resuming: {state['epoch']} epoch(s) done (stage {state['stage'] + 1}), checkpoint of "
              f"{state.get('saved', '?')} in {where}")
        tracking.set_tag("resumed_from_epoch", str(state["epoch"]))
        inside_stage = resume if resume["optimizer"] is not None else None  # else: taken between stages
        return int(state["stage_first_epoch"]), int(state["stage"]), inside_stage

    def restore_into(self, training_model, resume: dict | None) -> int:
        """Weights and optimizer state of a checkpoint taken inside the stage being started; returns the
        number of the epoch to continue at (the stage's first if there is none)."""
        if resume is None:
            return self.stage_starts[-1][1]
        assign_weights(resume["weights"], self.parts.backbone, self.parts.head)
        restore_optimizer(training_model, resume["optimizer"])
        return int(resume["state"]["epoch"])

    def log_missing_epochs(self, epochs: int) -> None:
        """Epochs the checkpoint holds but MLflow lacks (killed between the two): logged once, same step."""
        import mlflow

        run = mlflow.active_run()
        try:
            history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
        except Exception as error:  # noqa: BLE001 - tracking server away: nothing is re-logged
            print(f"   could not read the run's logged epochs ({type(error).__name__}); none re-logged")
            return
        logged = {m.step for m in history}
        starts = [first for _, first in self.stage_starts]
        for step in range(epochs):
            if step in logged:
                continue
            values = {k: v[step] for k, v in self.history.items() if len(v) > step}
            values["stage"] = float(sum(1 for first in starts if first <= step) - 1)
            tracking.log_metrics(values, step=step)
