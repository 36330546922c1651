"""Train a classifier as one JSON config says, in the spirit of PyTorch-SSO's examples; write metrics and a report.

    python examples/classification/train.py --config examples/classification/configs/digits_vogn.json
    python examples/classification/train.py --config configs/cifar10_ivon.json --data-dir ~/data --out runs/c10
    torchrun --standalone --nproc_per_node=4 examples/classification/train.py --config CONFIG.json

The config (``config.py``) names the data set, the network, the method and its arguments, the lr
schedule, the weight samples for training and prediction, checkpointing and the distributed layout; it is
checked whole before anything runs, and a bad key or value stops the run with a message naming both.
Every epoch appends a JSON line to ``OUT/metrics.jsonl`` (train loss, test accuracy, NLL, ECE, lr, wall
time) and the end writes the calibration report (``report.py``). MNIST, Fashion-MNIST and CIFAR-10 are
read through torchvision from ``--data-dir`` and never downloaded (``data_sources.py``).

Under torchrun the processes form a ``bayesso.distributed.ProcessGrid`` of ``world / mc_groups`` data
shards x ``distributed.mc_groups`` MC-sample groups: each shard reads its part of the training set, each
rank of a shard draws its own weight samples, and every rank ends each step with the same weights. Rank 0
writes the outputs; each rank writes its own checkpoint (``NAME.rank{r}.pt``). With ``checkpoint.dir``
(relative to ``--out``) the run is saved every ``checkpoint.interval`` epochs and at its end, and running
the same command again resumes from the newest checkpoint, ending with the weights an uninterrupted run
would have; ``schedule.epochs`` counts from the start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from checks import ConfigError
from config import Config, load_config
from data_sources import DataUnavailableError, load_data, noise_images
from methods import build_learner
from report import METHOD_TITLES, append_metrics, write_metrics, write_report
from schedule import lr_factor, set_lr
from torch.utils.data import DataLoader, Subset

from bayesso.checkpoint import CheckpointFiles
from bayesso.distributed import ProcessGrid, finish, init
from bayesso.predict.metrics import accuracy, ece, nll
from bayesso.progress import progress_bar
from bayesso.random_state import capture_random_state, loader_generators, restore_random_state
from bayesso.saved_state import check_entries

__all__ = ["main", "run"]

OOD_IMAGES = 1000  # noise images for the report's OOD scores (fewer when the test set is smaller)


def run(config: Config, name: str, data_dir: str | Path, out: Path, progress: bool = True) -> dict:
    """Train and evaluate as ``config`` says, writing to ``out`` (rank 0); returns the last epoch's record."""
    try:
        grid = init(mc_groups=config.distributed.mc_groups, timeout=config.distributed.timeout)
    except ValueError as error:  # mc_groups does not divide the number of processes
        raise ConfigError(f"config key 'distributed.mc_groups': {error}") from error
    try:
        return _Run(config, name, data_dir, out, progress, grid).train()
    finally:
        finish()


class _Run:
    """One run's data, learner, checkpoint files and position (epoch, optimizer step, history)."""

    def __init__(self, config: Config, name: str, data_dir, out: Path, progress: bool, grid: ProcessGrid) -> None:
        self.config, self.name, self.out, self.grid = config, name, out, grid
        self.shown = progress and grid.rank == 0
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("config key 'device': \"cuda\" but no CUDA device is available here")
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        data = load_data(config.data.name, data_dir, config.data.augment)
        train = Subset(data.train, grid.shard(len(data.train)).tolist()) if grid.active else data.train
        generator = torch.Generator().manual_seed(config.seed + grid.data_rank)
        workers = config.data.workers
        pin = self.device.type == "cuda"  # page-locked batches: the copies to the GPU overlap with compute
        self.loader = DataLoader(train, config.data.batch_size, shuffle=True, generator=generator, drop_last=True,
                                 num_workers=workers, pin_memory=pin)  # fmt: skip
        if len(self.loader) == 0:
            raise ConfigError(f"config key 'data.batch_size': more than the {len(train)} training examples of a "
                              f"data shard, got {config.data.batch_size}")  # fmt: skip
        self.test_loader = DataLoader(data.test, config.data.test_batch_size, num_workers=workers, pin_memory=pin)
        self.ood = noise_images(data.shape, min(OOD_IMAGES, len(data.test)), config.seed)
        self.learner = build_learner(config, data.shape, data.classes, len(data.train), grid, self.device)
        self.files = None
        if config.checkpoint.dir is not None:
            folder = out / config.checkpoint.dir
            folder.mkdir(parents=True, exist_ok=True)
            self.files = CheckpointFiles(folder / f"{name}.pt", grid)
        self.epoch, self.step, self.history = 0, 0, []

    def train(self) -> dict:
        config, learner = self.config, self.learner
        if self.files is not None and config.checkpoint.resume:
            self._resume(self.files.latest())
        if self.grid.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(config.raw, indent=2) + "\n")
            write_metrics(self.out / "metrics.jsonl", self.history)
        start = time.perf_counter() - (self.history[-1]["wall_time"] if self.history else 0.0)
        probs = targets = None
        for epoch in range(self.epoch, config.schedule.epochs):
            loss = self._train_epoch(epoch)
            probs, targets = self._predict_test()
            record = {"epoch": epoch + 1, "train_loss": loss, "test_accuracy": accuracy(probs, targets),
                      "test_nll": nll(probs, targets), "test_ece": ece(probs, targets),
                      "lr": learner.optimizer.param_groups[0]["lr"],
                      "wall_time": time.perf_counter() - start}  # fmt: skip
            self.history.append(record)
            self.epoch = epoch + 1
            if self.grid.rank == 0:
                append_metrics(self.out / "metrics.jsonl", record)
                if self.shown:
                    print(f"epoch {record['epoch']}/{config.schedule.epochs}: train loss {loss:.4f}, test accuracy "
                          f"{record['test_accuracy']:.4f}, NLL {record['test_nll']:.4f}, ECE {record['test_ece']:.4f} "
                          f"({record['wall_time']:.1f} s)")  # fmt: skip
            last = self.epoch == config.schedule.epochs
            if self.files is not None and (self.epoch % config.checkpoint.interval == 0 or last):
                self._save()
        if probs is None:  # resumed from the end of the run: score the restored weights
            probs, targets = self._predict_test()
        ood_probs = self._predict(self.ood.split(config.data.test_batch_size))
        if self.grid.rank == 0:
            paths = write_report(self.out, self.name, config, self.history, probs, targets, ood_probs)
            if self.shown:
                print(f"{self.name}: wrote {', '.join(str(path) for path in paths)}")
        return self.history[-1]

    def _train_epoch(self, epoch: int) -> float:
        """One pass over the training shard; returns the mean training loss over all ranks' batches."""
        learner, config = self.learner, self.config
        learner.module.train()
        total, count = 0.0, 0
        title = f"{METHOD_TITLES[config.method.name]} {epoch + 1}/{config.schedule.epochs}"
        with progress_bar(len(self.loader), title, self.shown) as bar:
            for x, y in self.loader:
                set_lr(learner.optimizer, learner.base_lrs, lr_factor(config.schedule, self.step, len(self.loader)))
                loss = learner.step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                self.step += 1
                total, count = total + loss, count + 1
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update()
        return float(self.grid.average(torch.tensor(total / count, dtype=torch.float64))[0])

    def _predict(self, batches) -> torch.Tensor:
        """The predictive's class probabilities for a sequence of input batches, on the CPU."""
        generator = torch.Generator().manual_seed(self.config.seed)  # the same weight samples every evaluation
        return torch.cat([self.learner.predict(x.to(self.device, non_blocking=True), generator).cpu() for x in batches])

    def _predict_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictive on the test set, and the test labels (one pass over the test loader)."""
        targets = []

        def inputs():
            for x, y in self.test_loader:
                targets.append(y)
                yield x

        probs = self._predict(inputs())
        return probs, torch.cat(targets)

    def _save(self) -> None:
        progress = {"epoch": self.epoch, "step": self.step, "history": self.history}
        self.files.write({"method": self.config.method.name, "world_size": self.grid.world_size, "progress": progress,
                          "random": capture_random_state(loader_generators(self.loader)),
                          **self.learner.state_dict()})  # fmt: skip

    def _resume(self, content: dict | None) -> None:
        """Continue from a checkpoint written at the end of an epoch (None: start afresh)."""
        if content is None:
            return
        where = self.files.path
        if content["method"] != self.config.method.name or content["world_size"] != self.grid.world_size:
            raise ConfigError(
                f"{where} is a checkpoint of a {content['method']} run on {content['world_size']} process(es), this "
                f"run is {self.config.method.name} on {self.grid.world_size}: set checkpoint.resume to false or "
                "change checkpoint.dir"
            )
        position = content["progress"]
        if position["epoch"] > self.config.schedule.epochs:
            raise ConfigError(
                f"{where} is at epoch {position['epoch']}, past schedule.epochs {self.config.schedule.epochs}: "
                "raise the epochs or set checkpoint.resume to false"
            )
        check_entries(content["module"], self.learner.module.state_dict(), f"{where}: the network")
        self.learner.load_state_dict(content)
        restore_random_state(content["random"], loader_generators(self.loader))
        self.epoch, self.step, self.history = position["epoch"], position["step"], list(position["history"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the JSON config file")
    parser.add_argument("--data-dir", default="data", help="folder holding torchvision's data files (default: data)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<config name>)")
    parser.add_argument("--epochs", type=int, help="replace the config's schedule.epochs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no line per epoch")
    args = parser.parse_args(argv)
    name = Path(args.config).stem
    try:
        config = load_config(args.config, epochs=args.epochs)
        run(config, name, args.data_dir, args.out or Path("runs") / name, progress=not args.quiet)
    except (ConfigError, DataUnavailableError) as error:
        sys.exit(f"train.py: {error}")


if __name__ == "__main__":
    main()
