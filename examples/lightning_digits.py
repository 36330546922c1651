"""A small CNN on scikit-learn's digits, trained by PyTorch Lightning with a bayesso optimizer.

    pip install 'bayesso[data,lightning]'
    python examples/lightning_digits.py --optimizer vogn        # or noisy_kfac, or kfac

``configure_optimizers`` returns bayesso's optimizer as it is (with a cosine learning rate
schedule stepped by Lightning): Lightning's automatic optimization calls ``step(closure)``, and
a VI optimizer runs the closure once per weight sample. ``CalibrationCallback`` logs the ECE and
NLL of the posterior predictive on the validation images after every epoch. ``kfac`` trains the
network deterministically by ``SecondOrderOptimizer`` and scores it at its weights. Takes about
10 to 30 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import lightning as L
import torch

from bayesso import BayesianModel, Ensemble
from bayesso.data import load_digits, make_loader
from bayesso.demo import small_cnn, split_validation
from bayesso.lightning import CalibrationCallback
from bayesso.likelihoods import Classification
from bayesso.optim import VOGN, NoisyKFAC, SecondOrderOptimizer
from bayesso.predict.metrics import evaluate

OPTIMIZERS = ("vogn", "noisy_kfac", "kfac")


class DigitsClassifier(L.LightningModule):
    """``net`` trained on the batch-mean NLL, the loss every bayesso optimizer expects from its closure."""

    def __init__(self, net: torch.nn.Module, optimizer: str, dataset_size: int, total_steps: int) -> None:
        super().__init__()
        self.net, self.optimizer_name = net, optimizer
        self.dataset_size, self.total_steps = dataset_size, total_steps
        self.likelihood = Classification()
        self.bayesian: BayesianModel | None = None  # set by configure_optimizers for the VI optimizers

    def training_step(self, batch, index):
        x, y = batch
        loss = self.likelihood.nll(self.net(x), y) / len(y)
        self.log("train_loss", loss)  # the loss at the weight sample of the closure's last call
        return loss

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss_at_mean", self.likelihood.nll(self.net(x), y) / len(y))

    def configure_optimizers(self):
        # Built here, after Lightning moved the network to its device, so the posterior lives there too.
        if self.optimizer_name == "kfac":
            optimizer = SecondOrderOptimizer(self.net, "classification")
        else:
            structure = "diag" if self.optimizer_name == "vogn" else "kron"
            self.bayesian = BayesianModel(self.net, "classification", structure, dataset_size=self.dataset_size)
            optimizer = (VOGN if self.optimizer_name == "vogn" else NoisyKFAC)(self.bayesian)
        steps = self.total_steps  # lr_t = lr · ½(1 + cos(π t / T)), BayesianModel.fit's default schedule
        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="vogn")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16, help="weight samples per prediction")
    args = parser.parse_args()
    # The digits are tensors in memory: loader worker processes would only add start-up time.
    warnings.filterwarnings("ignore", message=r"The '(train|val)_dataloader' does not have many workers")

    torch.manual_seed(0)
    data, x_val, y_val = split_validation(load_digits(seed=0), fraction=0.2, seed=0)
    train = make_loader(data.x_train, data.y_train, args.batch_size, seed=0)
    validation = make_loader(x_val, y_val, 256, shuffle=False)
    net = small_cnn(data.n_classes)
    module = DigitsClassifier(net, args.optimizer, len(data.y_train), args.epochs * len(train))
    deterministic = args.optimizer == "kfac"  # scored at its weights; the VI posterior is found from the optimizer
    calibration = CalibrationCallback(
        BayesianModel(net, "classification") if deterministic else None,
        method="map" if deterministic else "mc",
        n_samples=args.samples,
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),  # Lightning's bar writes a line per refresh elsewhere
        callbacks=[calibration],
    )
    trainer.fit(module, train, validation)

    print(f"{args.optimizer}: validation after each epoch")
    print("| epoch | accuracy | NLL | ECE |\n|---:|---:|---:|---:|")
    for record in calibration.history:
        print(f"| {record['epoch'] + 1} | {record['accuracy']:.3f} | {record['nll']:.3f} | {record['ece']:.3f} |")
    # "map" scores an Ensemble's members at their own weights: here the one network K-FAC trained.
    scored, method = (Ensemble([calibration.model]), "map") if deterministic else (module.bayesian, "mc")
    generator = torch.Generator().manual_seed(0)
    test = evaluate(scored, [(data.x_test, data.y_test)], method, args.samples, generator=generator, progress=False)
    print(f"test: accuracy {test['accuracy']:.3f}, NLL {test['nll']:.3f}, ECE {test['ece']:.3f}")


if __name__ == "__main__":
    main()
