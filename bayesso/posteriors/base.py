"""``Posterior``: a Gaussian over a module's parameters, block-diagonal over modules.

q(θ) = N(μ, Σ). The mean μ IS the module's parameters (flattened row-major, in
``module.parameters()`` order). Per module block m (docs/posteriors.md §1):

    Σ_m⁻¹ = (N/τ) (S_m + λ_m I),    λ_m = τ δ_m / N + γ,

with S the curvature statistic of the MEAN NLL (the engine's summed curvature
divided by the batch size; K-FAC: G ⊗ A), N the dataset size, τ the temperature,
δ_m the prior precision of N(0, I/δ) and γ external damping. For τ = 1 and γ = 0
this is N·S + δ, the Laplace / VI precision. Deterministic modules (e.g. batch
norm in VOGN) have no prior and no noise: they are left out of sampling and of the
covariance, log-determinant, entropy and KL (zero rows in the dense views).

Every block is handled in an eigenbasis of its statistic, S_m = Q diag(s) Qᵀ, so
sampling, solves and log-determinants cost no new factorisation when λ changes; the
decomposition is recomputed when the statistic changes (or only on ``refresh``).

Devices and dtypes: the posterior's tensors live where the module's parameters are, in
float64 for float64 parameters and float32 otherwise; they follow the module (``devices.py``).
"""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bayesso.curvature import Block, Curvature, plan_modules, zero_curvature
from bayesso.curvature.structures import Structure, requested_structures
from bayesso.distributed import ProcessGrid
from bayesso.placement import state_dtype
from bayesso.posteriors.devices import Devices
from bayesso.posteriors.eigenbasis import Eigenbasis
from bayesso.posteriors.hyperparameters import Hyperparameters, same_key
from bayesso.posteriors.measures import PRECISION_FLOOR, GaussianMeasures
from bayesso.posteriors.state import check_posterior_state, load_posterior_state, posterior_state
from bayesso.sharding import shared_eighs

__all__ = ["Posterior"]


class Posterior(Devices, Hyperparameters, GaussianMeasures, ABC):
    """Gaussian posterior over the trainable parameters of ``module`` (or of ``modules``).

    Args:
        module: the model; its parameters are the mean.
        prior_precision: δ of the prior N(0, I/δ): a number, or {module name: number}.
        dataset_size: N, the number of training examples (needed for the precision).
        temperature: τ > 0, the weight of the KL (1 is the Bayesian posterior).
        damping: γ >= 0, external damping added to the per-example statistic.
        modules: restrict the posterior to these modules (names or objects) or "last_layer".
    """

    structure: str
    default_inv_interval = 1  # VIOptimizer's decomposition refresh interval when it is given None

    def __init__(
        self,
        module: nn.Module,
        *,
        prior_precision: float | dict[str, float] = 1.0,
        dataset_size: int | None = None,
        temperature: float = 1.0,
        damping: float = 0.0,
        modules: Iterable[str | nn.Module] | str | None = None,
    ) -> None:
        self.module = module
        self.plans = plan_modules(module, modules)
        self.requested = requested_structures(self.plans, self.curvature_structure)  # by block name
        first = self.plans[0].parameters[0]
        self._dtype = state_dtype(first.dtype)
        self._check_plans(self._dtype)
        self.statistic: Curvature = zero_curvature(module, self.plans, self.requested, self._dtype)
        self.initialized = False
        self.deterministic: set[str] = set()
        self._slices: dict[str, slice] = {}
        start = 0
        for plan in self.plans:
            self._slices[plan.name] = slice(start, start + plan.numel)
            start += plan.numel
        self.numel = start
        self._prior = torch.ones(len(self.plans), dtype=self._dtype, device=first.device)
        self.prior_precision = prior_precision
        self.dataset_size = dataset_size
        self.temperature = temperature
        self.damping = damping
        self._bases: dict[str, Eigenbasis] = {}
        self._decomposed: Curvature | None = None  # statistic the bases come from, when kept stale
        self._revision = 0  # bumped whenever the statistic or its decomposition changes
        self._damped_cache: tuple | None = None
        self._flat_damping_cache: tuple | None = None

    @property
    def curvature_structure(self) -> Structure:
        """The ``structure`` argument of a ``CurvatureEngine`` whose blocks this posterior takes."""
        return self.structure

    # ---- statistic and decompositions --------------------------------------------------------
    def _check_plans(self, dtype: torch.dtype) -> None:
        """Refuse unsupported blocks (with state in ``dtype``) before anything is allocated."""

    @abstractmethod
    def _eigenbasis(self, block: Block, eighs: list[tuple[Tensor, Tensor]] | None = None) -> Eigenbasis:
        """The eigenbasis of one block of the statistic; ``eighs``: ``symmetric_eigh`` of ``_factors(block)``,
        computed elsewhere (None: decompose here; never passed for a block without factors)."""

    def _factors(self, block: Block) -> list[Tensor]:
        """The symmetric matrices (..., n, n) whose eigendecompositions the block's eigenbasis is built from, in
        the order ``_eigenbasis`` takes them (none: it needs no decomposition, e.g. a diagonal block)."""
        return []

    def _eigenbases(self, blocks: dict[str, Block], grid: ProcessGrid | None) -> dict[str, Eigenbasis]:
        """Every block's eigenbasis. Under an active ``grid`` each rank decomposes only the blocks it owns and
        receives the others from their owners (``bayesso.sharding``), all or nothing across ranks."""
        if grid is None or not grid.active:
            return {name: self._eigenbasis(block) for name, block in blocks.items()}
        eighs = shared_eighs({name: self._factors(block) for name, block in blocks.items()}, grid)
        return {
            name: self._eigenbasis(block, eighs[name]) if name in eighs else self._eigenbasis(block)
            for name, block in blocks.items()
        }

    def update_statistic(
        self, curvature: Curvature, beta: float = 0.0, refresh: bool = True, grid: ProcessGrid | None = None
    ) -> None:
        """S <- beta * S + (1 - beta) * curvature (per-example scale); the first update copies.

        All or nothing: the new statistic is built beside the old one (cut from any autograd
        graph), checked to be finite and, with ``refresh``, decomposed; only then does it
        replace the old one, so a failure leaves the posterior as it was. With
        ``refresh=False`` sampling and solves keep the previous decomposition until the next
        refresh (K-FAC's inverse interval). Under an active ``grid`` (the same statistic on
        every rank) the decompositions are divided across the ranks (``bayesso.sharding``).
        """
        self.follow_module()
        decomposed_blocks = None  # with refresh=False: the blocks the kept decomposition comes from
        if not refresh:
            decomposed_blocks = dict((self.statistic if self._decomposed is None else self._decomposed).blocks)
        blocks, reshaped = {}, set()
        for plan in self.plans:
            mine, new = self.statistic.blocks[plan.name], curvature.blocks[plan.name]
            if mine.structure != new.structure:
                if new.structure != "diag":
                    raise ValueError(
                        f"block {plan.label()} got structure {new.structure!r}, expected {mine.structure!r}"
                    )
                warnings.warn(
                    f"module {plan.label()} was not called through its own forward, so its curvature is diagonal; "
                    "its posterior block becomes diagonal",
                    stacklevel=2,
                )
                mine = mine.as_diagonal()
                reshaped.add(plan.name)
                if decomposed_blocks is not None:
                    decomposed_blocks[plan.name] = decomposed_blocks[plan.name].as_diagonal()
            if self.initialized and beta != 0.0:
                blocks[plan.name] = mine.ema(new, beta)
            else:
                mine._check_same(new)
                blocks[plan.name] = mine.with_tensors(
                    [t.detach().to(m.dtype, copy=True) for m, t in zip(mine.tensors(), new.tensors())]
                )
        statistic = self.statistic.with_blocks(blocks)
        finite = bool(torch.isfinite(statistic.entry_sum()))  # one host read when every block is finite
        bad = [] if finite else [name for name, block in blocks.items() if not block.is_finite()]
        if bad:
            raise FloatingPointError(
                f"the updated statistic of block(s) {bad} has NaN or infinite entries; the posterior is unchanged"
            )
        if refresh:
            bases = self._eigenbases(blocks, grid)
        else:
            bases = {name: basis for name, basis in self._bases.items() if name not in reshaped}
        self.statistic, self._bases, self.initialized = statistic, bases, True
        self._decomposed = None if refresh else self.statistic.with_blocks(decomposed_blocks)
        self._revision += 1

    def refresh(self, grid: ProcessGrid | None = None) -> None:
        """Recompute every block's decomposition from the current statistic (nothing changes if that fails),
        divided across the ranks of an active ``grid``."""
        self.follow_module()
        bases = self._eigenbases(dict(self.statistic.blocks), grid)
        self._decomposed, self._bases = None, bases
        self._revision += 1

    # ---- all-or-nothing changes ------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything the posterior holds (the mean excepted: it is the module's), for ``restore``.

        Cheap: the statistic and its decompositions are replaced, never modified in place, by
        ``update_statistic``, ``refresh`` and ``load_state_dict``, so references suffice.
        """
        return {key: copy.copy(value) if isinstance(value, (dict, set)) else value for key, value in vars(self).items()}

    def restore(self, snapshot: dict) -> None:
        """Return to a ``snapshot``."""
        vars(self).clear()
        vars(self).update({key: copy.copy(v) if isinstance(v, (dict, set)) else v for key, v in snapshot.items()})

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Context in which a change either completes or, on any exception, is undone."""
        saved = self.snapshot()
        try:
            yield
        except BaseException:
            self.restore(saved)
            raise

    def _basis(self, name: str) -> Eigenbasis:
        self.follow_module()
        if name not in self._bases:
            source = self._decomposed if self._decomposed is not None else self.statistic
            self._bases[name] = self._eigenbasis(source.blocks[name])
        return self._bases[name]

    def _damped(self) -> dict[str, Tensor]:
        """Per-example damped eigenvalues e_m of S_m + λ_m per block (cached while nothing changes)."""
        self.follow_module()
        key = (self._revision, *self._cache_key())
        cached = self._damped_cache
        if cached is not None and not self._prior.requires_grad and same_key(cached[0], key):
            return self._damped_cache[1]
        flat = None
        if all(self._basis(p.name).is_identity for p in self.plans):  # one flat pass, blocks are views of it
            values = torch.cat([self._basis(p.name).statistic for p in self.plans]).clamp_min_(0)
            values = values.add_(self.flat_damping()[0]).clamp_min_(PRECISION_FLOOR)
            std = torch.mul(values, self._scale()).rsqrt_()
            for plan in self.plans:
                if plan.name in self.deterministic:
                    std[self._slices[plan.name]] = 0.0
            flat = (values, std)
            damped = {p.name: values[self._slices[p.name]] for p in self.plans}
        else:
            damping = self.block_damping()
            damped = {
                p.name: self._basis(p.name).eigenvalues(damping[i]).clamp_min(PRECISION_FLOOR)
                for i, p in enumerate(self.plans)
            }
        self._damped_cache = (key, damped, flat)
        return damped

    def _flat_diagonal(self) -> tuple[Tensor, Tensor] | None:
        """(damped eigenvalues, noise std) as flat (P,) vectors when every block is diagonal, else None."""
        self._damped()
        return self._damped_cache[2]

    # ---- the Gaussian --------------------------------------------------------------------------
    @property
    def parameters(self) -> list[nn.Parameter]:
        """The covered parameters, in flat-vector order."""
        return [p for plan in self.plans for p in plan.parameters]

    def mean(self) -> Tensor:
        """μ, the flat vector (P,) of the covered parameters (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters]).to(self.dtype)

    def _views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` (P,) split into views shaped like the parameters."""
        return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in self.parameters]), self.parameters)]

    def set_mean(self, flat: Tensor) -> None:
        """Write a flat vector (P,) into the module's parameters."""
        if flat.shape != (self.numel,):
            raise ValueError(f"the mean must have shape ({self.numel},), got {tuple(flat.shape)}")
        with torch.no_grad():
            torch._foreach_copy_(self.parameters, self._views(flat))

    @contextmanager
    def perturbed(self, noise: Tensor) -> Iterator[None]:
        """Context adding a flat ``noise`` (P,) to the parameters; restores the mean bit-exactly on exit."""
        params = self.parameters
        with torch.no_grad():
            saved = torch._foreach_mul(params, 1)  # copies, in one call
        try:
            with torch.no_grad():
                torch._foreach_add_(params, self._views(noise))
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def block_slices(self) -> list[slice]:
        """Where each block (in ``plans`` order) lies in the flat vector."""
        return [self._slices[plan.name] for plan in self.plans]

    def _random(self) -> list[tuple[int, str]]:
        return [(i, p.name) for i, p in enumerate(self.plans) if p.name not in self.deterministic]

    def sample_noise(self, n: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(θ - μ, ε) for n samples (n, P): θ - μ = Q [(Qᵀ ε) / sqrt((N/τ) e)]; zero for deterministic blocks.

        That is Σ^(1/2) ε with the symmetric root, which does not depend on the choice of Q where S has
        repeated (e.g. zero) eigenvalues, so statistics equal to rounding (one process or a sum over
        ranks) give samples equal to rounding; Q ε alone would rotate with that arbitrary choice.

        A ``generator`` on another device (a CPU one for a CUDA model) draws ε there, which is then
        moved: one generator state gives the same ε on every device.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        where = self.device if generator is None else generator.device
        eps = torch.randn(n, self.numel, dtype=self.dtype, device=where, generator=generator).to(self.device)
        return self.root_noise(eps), eps

    def root_noise(self, eps: Tensor) -> Tensor:
        """Σ^(1/2) ε for ε (..., P) with the symmetric root (zero for deterministic blocks): ``sample_noise``'s map."""
        damped, scale, flat = self._damped(), self._scale(), self._flat_diagonal()
        if flat is not None:
            return eps * flat[1]
        noise = torch.zeros_like(eps)
        for _, name in self._random():
            where = self._slices[name]
            basis = self._basis(name)
            noise[..., where] = basis.from_eigenbasis(
                basis.to_eigenbasis(eps[..., where]) / (scale * damped[name]).sqrt()
            )
        return noise

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """n samples (n, P) of the flat parameter vector."""
        return self.mean() + self.sample_noise(n, generator)[0]

    def precondition(self, v: Tensor) -> Tensor:
        """(S + λ)⁻¹ v per block: the natural-gradient direction (= (N/τ) Σ v), v of shape (..., P)."""
        damped, flat = self._damped(), self._flat_diagonal()
        if flat is not None:
            return v.to(self.dtype) / flat[0]
        out = torch.empty_like(v, dtype=self.dtype)
        damping = self.block_damping()
        for i, plan in enumerate(self.plans):
            where, basis = self._slices[plan.name], self._basis(plan.name)
            out[..., where] = basis.solve(v[..., where].to(self.dtype), damping[i], damped[plan.name])
        return out

    def covariance_root(self, v: Tensor, names: list[str] | None = None) -> Tensor:
        """Lᵀ v for v of shape (..., P), where Σ = L Lᵀ with L = Q diag(((N/τ) e)^(-1/2)) per block.

        So vᵀ Σ w = covariance_root(v) · covariance_root(w) without forming Σ; zero for
        deterministic blocks. The linearized predictive's J Σ Jᵀ is Z Zᵀ with Z = covariance_root(J).
        With ``names``, v holds only those blocks, concatenated in ``plans`` order.
        """
        damped, scale, flat = self._damped(), self._scale(), self._flat_diagonal()
        if flat is not None and names is None:
            return v.to(self.dtype) * flat[1]
        chosen = [p.name for p in self.plans] if names is None else [p.name for p in self.plans if p.name in names]
        out = torch.zeros_like(v, dtype=self.dtype)
        start = 0
        for name in chosen:
            size = self._slices[name].stop - self._slices[name].start
            if name not in self.deterministic:
                where, basis = slice(start, start + size), self._basis(name)
                out[..., where] = basis.to_eigenbasis(v[..., where].to(self.dtype)) / (scale * damped[name]).sqrt()
            start += size
        return out

    def precision_eigenbasis(self, name: str) -> tuple[Eigenbasis, Tensor | None]:
        """Block ``name``'s eigenbasis and its precision eigenvalues (N/τ) e (None if deterministic)."""
        if name in self.deterministic:
            return self._basis(name), None
        return self._basis(name), self._scale() * self._damped()[name]

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Statistic, hyperparameters and structure (the mean lives in the module's state_dict)."""
        self.follow_module()
        return posterior_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Load ``state_dict`` output; everything is checked first, so a mismatch changes nothing."""
        self.follow_module()
        load_posterior_state(self, state)

    def check_state(self, state: dict, where: str = "posterior state") -> None:
        """ValueError naming the first entry of ``state`` that ``load_state_dict`` would refuse."""
        self.follow_module()
        check_posterior_state(self, state, where)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.numel:,}, blocks={len(self.plans)}, N={self._dataset_size}, "
            f"temperature={self._temperature}, damping={self._damping})"
        )
