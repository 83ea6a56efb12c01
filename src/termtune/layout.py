"""Every path in a run directory, named once.

    layout = RunLayout.of(cfg)
    layout.adapter            # <run>/train/adapter
    layout.record("train")    # <run>/provenance/train.json

Stage modules ask this object for paths instead of spelling them, so the layout can be read
(and changed) in one place; docs/run-directory.md shows it as a tree with each file's writer
and readers, and a test checks that page names every path defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from termtune.config import Config


@dataclass(frozen=True)
class RunLayout:
    root: Path
    """The run directory (run.dir)."""
    artifact: Path
    """The Bedrock artifact folder (export.dir, default <run>/artifact)."""

    @classmethod
    def of(cls, cfg: "Config") -> "RunLayout":
        root = Path(cfg.run.dir)
        return cls(root=root, artifact=Path(cfg.export.dir) if cfg.export.dir else root / "artifact")

    # -- run-wide
    @property
    def marker(self) -> Path:
        """Says the folder is a termtune run directory (termtune.ownership): written when termtune takes
        a new or empty folder, or adopts a run an older termtune made."""
        return self.root / "termtune-run.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".termtune.lock"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance"

    def record(self, stage: str) -> Path:
        """A stage's completion record: provenance + the fingerprint of what it read, written last."""
        return self.provenance / f"{stage}.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def library_log(self) -> Path:
        """Third-party warnings and log lines kept off the terminal (termtune.quiet)."""
        return self.root / "library.log"

    def names_in(self, folder: Path) -> set[str]:
        """The names termtune writes directly in `folder`: every path named here whose parent it is.
        Empty for folders a library's save function fills whole (base-model/, train/adapter/, ...)."""
        paths = [getattr(self, name) for name, value in vars(RunLayout).items() if isinstance(value, property)]
        paths += [self.split("train"), self.split("test")]
        return {p.name for p in paths if p.parent == folder}

    # -- data
    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    @property
    def stats(self) -> Path:
        return self.data / "stats.json"

    # -- train
    @property
    def base_model(self) -> Path:
        return self.root / "base-model"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.train / "adapter"

    @property
    def train_metrics(self) -> Path:
        return self.train / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.train / "tensorboard"

    @property
    def train_result(self) -> Path:
        return self.train / "result.json"

    @property
    def job_records(self) -> Path:
        """train.on=sagemaker: the records the training job wrote beside its artifact (metrics, report,
        manifest, log), downloaded from <S3ModelArtifacts>termtune/ once the job completed."""
        return self.train / "job"

    @property
    def sagemaker(self) -> Path:
        return self.root / "sagemaker"

    @property
    def jobs(self) -> Path:
        """Every SageMaker training job this run submitted: the request, the job ARN (written before
        termtune waits), status, output, billable seconds and cost. Kept across re-runs."""
        return self.sagemaker / "jobs.json"

    @property
    def bundle(self) -> Path:
        """The job's input channels as built before upload (termtune.remote.bundle), one folder each."""
        return self.sagemaker / "bundle"

    # -- evaluate
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.eval / "predictions.jsonl"

    # -- export / validate
    @property
    def manifest(self) -> Path:
        return self.artifact / "manifest.json"

    @property
    def validation(self) -> Path:
        return self.root / "validation.json"

    # -- deploy / invoke
    @property
    def deploy(self) -> Path:
        return self.root / "deploy.json"

    @property
    def deploy_id(self) -> Path:
        """The run's short random id, made by the first deploy and never changed: it names the
        run's S3 prefixes and its inline policy on a shared IAM role, so runs never collide."""
        return self.root / "deploy-id"

    @property
    def invoke(self) -> Path:
        return self.root / "invoke.json"

    # -- report (rendered by the runner after every stage)
    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_assets(self) -> Path:
        return self.root / "report_assets"

    @property
    def loss_plot(self) -> Path:
        return self.report_assets / "loss.png"

    @property
    def model_card(self) -> Path:
        return self.root / "model-card.md"
