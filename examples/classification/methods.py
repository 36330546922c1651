"""The training methods: a network with its optimizer, one step on a batch and the predictive on a batch.

``adam`` is ``torch.optim.Adam``; ``kfac`` is bayesso's ``SecondOrderOptimizer`` (deterministic K-FAC);
``vogn``, ``noisy_kfac`` and ``ivon`` are bayesso's presets (``bayesso.optim.PRESETS``) on a
``BayesianModel`` of the network, with ``mc_samples.train`` weight samples per step. Every method
steps with the closure bayesso's optimizers expect (the batch mean of the cross-entropy). Under a
``ProcessGrid`` the bayesso optimizers reduce gradients and curvature themselves; Adam's gradients are
averaged over the ranks here. The VI methods predict with ``mc_samples.test`` weight samples
(Monte Carlo, probabilities averaged, the samples shared out over the ranks), or at the posterior mean
when it is 0; Adam and K-FAC with the softmax of the network.
"""

from __future__ import annotations

import torch
from checks import ConfigError
from config import Config, Method, Samples
from networks import Shape, build_network
from torch import Tensor, nn

from bayesso import BayesianModel
from bayesso.distributed import ProcessGrid
from bayesso.optim import PRESETS, SecondOrderOptimizer

__all__ = ["Learner", "build_learner"]


class Learner:
    """A network trained by one method of the config; ``state_dict`` holds what a checkpoint needs."""

    def __init__(
        self, method: Method, samples: Samples, module: nn.Module, dataset_size: int, seed: int, grid: ProcessGrid
    ) -> None:
        self.name, self.module, self.grid, self.test_samples = method.name, module, grid, samples.test
        self.model: BayesianModel | None = None
        options = dict(method.args)
        if method.bayesian:
            posterior = method.posterior
            if isinstance(posterior, dict):  # torch.nn class names become the classes; others are module names
                posterior = {_module_type(key) or key: structure for key, structure in posterior.items()}
            try:
                self.model = BayesianModel(module, "classification", posterior, dataset_size=dataset_size)
            except ValueError as error:  # e.g. a module name the network does not have
                raise ConfigError(f"config key 'method.posterior': {method.name} refused it: {error}") from error
        try:
            if method.name == "adam":
                self.optimizer = torch.optim.Adam(module.parameters(), **options)
            elif method.name == "kfac":
                self.optimizer = SecondOrderOptimizer(module, "classification", seed=seed, grid=grid, **options)
            else:
                preset = PRESETS[method.name]
                self.optimizer = preset(self.model, mc_samples=samples.train, seed=seed, grid=grid, **options)
        except ValueError as error:  # a value the config's checks let through and the optimizer refuses
            raise ConfigError(f"config key 'method.args': {method.name} refused its arguments: {error}") from error
        engine = getattr(self.optimizer, "engine", None)
        if engine is not None:  # batch norm trains in training mode on purpose, as in BayesianModel.fit
            engine.warn_training_batchnorm = False
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step on the batch; returns the batch's mean loss (VI: over the weight samples)."""

        def closure() -> Tensor:
            self.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self.module(x), y)
            loss.backward()
            return loss

        if self.name != "adam":
            return float(self.optimizer.step(closure).detach())
        loss = closure()
        if self.grid.active:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            for grad, mean in zip(grads, self.grid.average(*grads)):
                grad.copy_(mean)
        self.optimizer.step()
        return float(loss.detach())

    def predict(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Class probabilities (B, C) of the predictive at the batch ``x`` (the module's mode is kept)."""
        if self.model is not None and self.test_samples > 0:
            predictive = self.model.predict(x, self.test_samples, method="mc", generator=generator, grid=self.grid)
            return predictive.probs
        training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return torch.softmax(self.module(x), dim=-1)
        finally:
            self.module.train(training)

    def state_dict(self) -> dict:
        """The network's and the optimizer's state (a VI optimizer's holds the posterior and its generators)."""
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.module.load_state_dict(state["module"])


def build_learner(
    config: Config, shape: Shape, classes: int, dataset_size: int, grid: ProcessGrid, device: torch.device
) -> Learner:
    """The config's network (seeded with its seed: the same initial weights on every rank) and method."""
    torch.manual_seed(config.seed)
    module = build_network(config.model.name, shape, classes, **config.model.args).to(device)
    return Learner(config.method, config.mc_samples, module, dataset_size, config.seed, grid)


def _module_type(name: str) -> type[nn.Module] | None:
    """``torch.nn.<name>`` if that is a module class (``"Module"``: every module, the default), else None."""
    found = getattr(nn, name, None)
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None
