"""Optional TensorBoard tracking of a run: scalars per epoch, figures, the config as hparams.

Needs the ``tensorboard`` extra (``uv sync --extra tensorboard`` or
``pip install 'ppl-vae[tensorboard]'``); events go to ``<run folder>/tensorboard``, so
``tensorboard --logdir runs`` shows every run. The run's own files stay the record; this is a view.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError

FOLDER = "tensorboard"


def require_tensorboard() -> None:
    """Raise a one-line ``UserError`` when the tensorboard package is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: install the extra with "
                        "`uv sync --extra tensorboard` (or pip install 'ppl-vae[tensorboard]'), "
                        "or drop --tensorboard")


class Tracker:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / FOLDER))

    def epoch(self, metrics) -> None:
        """Scalars of one ``EpochMetrics``: train/valid ELBO, seconds, KL weight."""
        step = metrics.epoch
        self.writer.add_scalar("elbo/train", metrics.train_elbo, step)
        self.writer.add_scalar("elbo/valid", metrics.valid_elbo, step)
        self.writer.add_scalar("time/epoch_seconds", metrics.seconds, step)
        self.writer.add_scalar("time/wall_seconds", metrics.wall, step)
        self.writer.add_scalar("beta", metrics.beta, step)
        self.writer.flush()

    def hparams(self, config: dict, metrics: dict) -> None:
        """The config as hyper-parameters (lists and None as text) with the run's final numbers."""
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
              for k, v in config.items()}
        self.writer.add_hparams(hp, {f"hparam/{k}": v for k, v in metrics.items()},
                                run_name=".")
        self.writer.flush()

    def figures(self, paths: Iterable[Path], step: int = 0) -> None:
        """PNG figures as images, tagged by file name."""
        import matplotlib.image
        for path in paths:
            image = matplotlib.image.imread(str(path))  # [H, W, 3 or 4] floats in [0, 1]
            self.writer.add_image(f"figures/{Path(path).stem}", image[..., :3], step,
                                  dataformats="HWC")
        self.writer.flush()

    def scalars(self, values: dict, step: int = 0, prefix: str = "") -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(run_dir: Optional[Path], enabled: bool) -> Optional[Tracker]:
    """A ``Tracker`` when ``enabled`` and there is a run folder, else None."""
    return Tracker(run_dir) if enabled and run_dir is not None else None
