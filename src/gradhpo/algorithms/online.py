"""HyperDistill: online hypergradients with a distilled second-order term (Algorithms 3, 4).

λ is updated after every inner step ``w_t = Φ(w_{t-1}, λ; D_t)`` of an episode (T steps
from ``w_0 = φ``) with

    g_t = g_FO + θ S_t v_t,   v_t = α_t ∂Φ(w*_t, λ; D*_t)/∂λ,   S_t = (1 - γ^t)/(1 - γ),

where ``w*_t`` is the γ-weighted average of the points ``w_0 .. w_{t-1}`` (Eq. 13) and ``D*_t``
optionally the matching mix of the batches (Eq. 14). ``θ`` rescales the distilled term to
the true second-order term; :meth:`OnlineHypergradientOptimizer.estimate_theta` fits it by a
DrMAD-style backward pass (Algorithm 4). For an isotropic quadratic (``A_t = γI``) the
online ``g_t`` is the exact reverse-mode hypergradient of the first t steps and θ = 1.

References:
  Lee, Lee, Hwang. "Online Hyperparameter Meta-Learning with Hypergradient Distillation."
  ICLR 2022.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradhpo.algorithms._hyperdistill import (
    ThetaFit,
    ema_weights,
    linear_estimation,
    mix_batches,
    num_examples,
)
from gradhpo.core._checks import flag, positive_int, real_in
from gradhpo.core.base import Estimate, OnlineOptimizer, Refit
from gradhpo.core.inner import validation_grads
from gradhpo.core.state import BilevelState
from gradhpo.core.types import Batch, InnerOptimizer, PyTree, UpdateFn
from gradhpo.utils.dependence import output_depends_on
from gradhpo.utils.tree import (
    all_finite,
    leading_axis_length,
    stack_batches,
    tree_add,
    tree_lerp,
    tree_norm,
    tree_scale,
)

__all__ = ["OnlineHypergradientOptimizer", "ThetaFit"]

_THETA_POINTS = ("interpolated", "trajectory")
_THETA_ADJOINTS = ("state", "weights")
#: Metadata keys that exist only with ``distill_batch=True``.
_DISTILL_KEYS = ("distilled_batch", "key")
#: Counter of θ fits (Algorithm 4) that came out non-finite and kept the previous θ.
FAILED_FITS_KEY = "failed_theta_fits"
# Salt that separates Algorithm 4's batch-mixing draws from those of the online steps.
_ESTIMATION_SALT = 0x7E7A


class OnlineHypergradientOptimizer(OnlineOptimizer):
    """HyperDistill (Lee et al., 2022): online hypergradients ``g_t = g_FO + θ S_t v_t``.

    One call of :meth:`step` is step t of the current episode (Algorithm 3)::

        S_t = γ S_{t-1} + 1,  p_t = γ S_{t-1} / S_t        ((γ - γ^t)/(1 - γ^t); (t-1)/t at γ = 1)
        w*_t = p_t w*_{t-1} + (1 - p_t) w_{t-1}              (Eq. 13; w*_1 = w_0)
        D*_t = D_t, or per example D*_{t-1} w.p. p_t, else D_t (Eq. 14, distill_batch=True)
        w_t = Φ(w_{t-1}, λ; D_t),  α_t = ∇_w L_val(w_t, λ),  g_FO = ∂L_val(w_t, λ)/∂λ
        v_t = α_t ∂Φ(w*_t, λ; D*_t)/∂λ,  g_t = g_FO + θ S_t v_t,  λ ← λ - η g_t

    The episode step t, ``S_t``, ``w*_t``, θ (and ``D*_t`` with its PRNG key) are arrays in
    ``state.metadata`` (keys ``"episode_step"``, ``"S_t"``, ``"w_star"``, ``"theta"``,
    ``"distilled_batch"``, ``"key"``), so ``step`` compiles once for every t, θ and γ-limit.
    With a stateful inner optimizer (momentum, Adam), ``∂Φ(w*_t, ...)/∂λ`` holds the
    current inner state ``s_{t-1}`` fixed: at γ = 0 and θ = 1 this is exactly
    :class:`~gradhpo.algorithms.baselines.OneStepOptimizer`.

    Episodes: the distilled point covers T inner steps. It restarts by itself every T
    accepted inner steps (``t - 1 = episode_step mod T``), so a long run without weight
    restarts keeps targeting a horizon of T, and :meth:`new_episode` (weights ``φ``, a fresh
    inner optimizer state, ``episode_step = 0``) restarts it too. :meth:`with_theta` sets θ,
    for instance from :meth:`estimate_theta`; the training loops refit it every
    ``estimation_period`` episodes through the optimizer's ``refit`` record.

    Args:
      inner_optimizer, outer_optimizer, update_fn: see
        :class:`~gradhpo.core.base.BilevelOptimizer`.
      gamma: the decay γ ∈ [0, 1] of the distilled trajectory. γ = 0 is One-Step; γ = 1
        weighs all points equally (``S_t = t``, ``p_t = (t-1)/t``). For SGD of step η on a
        quadratic of curvature k (``A_t = γI`` with γ = 1 - ηk) and B affine in w, ``g_t``
        with θ = 1 is the exact reverse-mode hypergradient of the first t steps.
      estimation_period: re-estimate θ every this many episodes (50 in the paper): the
        training loops call :meth:`refit_theta` at episodes 0, P, 2P, ...
      T: the horizon of the distilled point (it restarts every T inner steps), the
        number of batches :meth:`estimate_theta` takes, and the loops' default episode
        length.
      distill_batch: also distill the batches (Eq. 14). ``init`` then needs
        ``example_batch`` (a batch of the shape every ``train_batch`` will have).
      unit_direction: where λ does not enter ``L_val`` (``g_FO ≡ 0``, decided from the
        traced program), use the paper's unit direction ``g_t = v_t/‖v_t‖`` (π* = 1), so
        that ``lr_hyper`` is the length of every hyper-step and θ plays no part. Off by
        default: ``θ S_t v_t`` keeps the hypergradient's scale, equals One-Step at γ = 0
        and reverse mode on isotropic quadratics. No effect where ``g_FO`` can be nonzero.
      theta_points: the points of Algorithm 4's backward pass. ``"interpolated"`` (the
        paper's): DrMAD's line ``ŵ_{t-1}`` between ``w_0`` and ``w_T`` (optimizer state
        likewise), for both the Jacobians and the EMA point of Eq. 17, memory O(P).
        ``"trajectory"``: the stored forward trajectory for both, memory O(T·P); the
        backward pass is then exact reverse mode (with ``theta_adjoint="state"``). Both
        use one set of points throughout, so θ = 1 whenever ``A_t = γI`` and ``B`` is
        affine in w.
      theta_adjoint: how Algorithm 4's backward pass treats a stateful inner optimizer.
        ``"weights"`` (the default): each step's Jacobian with its optimizer state held
        fixed (with momentum, plain SGD's ``I - lr H``), the same view of Φ that the online
        step's ``v_t`` takes, so that θ fits like with like. ``"state"``: through the full
        ``(w, s)`` step, momentum's memory of earlier steps included (with
        ``theta_points="trajectory"`` the backward pass is then exact reverse mode).
        Identical for a stateless inner optimizer (plain SGD). On the sinusoid of Lee et
        al. (App. G; inner SGD with momentum 0.9) ``"state"`` fits θ ≈ 1.5-3.5, which
        pushes the features past the inner SGD's stability limit in most runs, while
        ``"weights"`` fits θ ≈ 0.6-1.3 and reproduces the paper's meta-test MSE (the
        ``gradhpo bench metalearning`` report).
      theta: a fixed θ instead of Algorithm 4: no refit (the loops then need an
        ``episode_length``), ``metadata["theta"]`` starts at this value.
      theta_clip: ``(low, high)``: clip each fitted θ into this interval.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo import OnlineHypergradientOptimizer
      >>> train = lambda w, lam, b: 0.5 * jnp.sum(w**2) - jnp.sum(lam * w)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum((w - 1.0) ** 2)
      >>> opt = OnlineHypergradientOptimizer(optax.sgd(0.5), gamma=0.5, T=3)
      >>> state = opt.init(jnp.zeros(2), jnp.zeros(2))
      >>> state = opt.with_theta(state, opt.estimate_theta(
      ...     state, jnp.zeros((3, 1)), None, train, val))
      >>> for _ in range(3):
      ...     state = opt.step(state, None, None, train, val, 1.0)
      >>> int(state.metadata["episode_step"]), float(state.metadata["S_t"])
      (3, 1.75)
      >>> state = opt.new_episode(state)
      >>> int(state.metadata["episode_step"]), int(state.step)
      (0, 3)

    References:
      Lee, Lee, Hwang. "Online Hyperparameter Meta-Learning with Hypergradient
      Distillation." ICLR 2022, Algorithms 3 and 4.
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        gamma: float = 0.99,
        estimation_period: int = 50,
        T: int = 20,
        update_fn: UpdateFn | None = None,
        *,
        distill_batch: bool = False,
        unit_direction: bool = False,
        theta_points: str = "interpolated",
        theta_adjoint: str = "weights",
        theta: float | None = None,
        theta_clip: tuple[float, float] | None = None,
    ):
        gamma = real_in("gamma", gamma, 0.0, 1.0)
        if theta_points not in _THETA_POINTS:
            raise ValueError(f"theta_points must be one of {_THETA_POINTS}, got {theta_points!r}")
        if theta_adjoint not in _THETA_ADJOINTS:
            raise ValueError(
                f"theta_adjoint must be one of {_THETA_ADJOINTS}, got {theta_adjoint!r}"
            )
        if theta is not None:
            theta = real_in("theta", theta, 0.0, float("inf"))
            if theta_clip is not None:
                raise ValueError("theta_clip applies to a fitted θ: drop it with a fixed theta")
        if theta_clip is not None:
            try:
                low, high = (float(v) for v in theta_clip)
            except (TypeError, ValueError):
                raise TypeError(
                    f"theta_clip must be a pair (low, high), got {theta_clip!r}"
                ) from None
            if not low <= high:
                raise ValueError(f"theta_clip must have low <= high, got {theta_clip!r}")
            theta_clip = (low, high)
        super().__init__(inner_optimizer, outer_optimizer, update_fn)
        self.gamma = float(gamma)
        self.estimation_period = positive_int("estimation_period", estimation_period)
        self.T = positive_int("T", T)
        self.distill_batch = flag("distill_batch", distill_batch)
        self.unit_direction = flag("unit_direction", unit_direction)
        self.theta_points = theta_points
        self.theta_adjoint = theta_adjoint
        self.theta = None if theta is None else float(theta)
        self.theta_clip = theta_clip
        # Algorithm 3, line 1: the loops refit θ every estimation_period episodes (unless
        # θ is fixed).
        if self.theta is None:
            self.refit = Refit(self.estimation_period, self.T, self.refit_theta, FAILED_FITS_KEY)

    # -- state ------------------------------------------------------------------------------

    def init(
        self,
        params: PyTree,
        hyperparams: PyTree,
        *,
        example_batch: Batch | None = None,
        key: jax.Array | None = None,
    ) -> BilevelState:
        """Create the state at the start of the first episode (t = 0, θ = 1).

        Args:
          params: the initial weights ``w_0 = φ``.
          hyperparams: the initial hyperparameters λ.
          example_batch: with ``distill_batch=True`` (required there, refused otherwise), a
            training batch whose shapes every later ``train_batch`` shares; only its
            shapes and dtypes are used.
          key: with ``distill_batch=True``, the PRNG key of the batch mixing
            (``jax.random.PRNGKey`` or ``jax.random.key``; default ``PRNGKey(0)``).

        Returns:
          A :class:`~gradhpo.core.state.BilevelState`.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import OnlineHypergradientOptimizer
          >>> opt = OnlineHypergradientOptimizer(optax.sgd(0.1), distill_batch=True)
          >>> state = opt.init(jnp.zeros(2), jnp.zeros(2), example_batch=jnp.zeros((8, 3)))
          >>> state.metadata["distilled_batch"].shape, float(state.metadata["theta"])
          ((8, 3), 1.0)
        """
        if not self.distill_batch:
            if example_batch is not None or key is not None:
                raise ValueError(
                    "example_batch and key are used only with distill_batch=True; drop them "
                    "or build the optimizer with distill_batch=True"
                )
            return super().init(params, hyperparams)
        if example_batch is None:
            raise ValueError(
                "distill_batch=True keeps the distilled batch D*_t in the state: pass "
                "init(params, hyperparams, example_batch=batch), a batch shaped like every "
                "train_batch"
            )
        D_star = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x)), example_batch)
        num_examples(D_star, "example_batch")
        key = jax.random.PRNGKey(0) if key is None else jnp.asarray(key)
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        if key.shape != (2,) or key.dtype != jnp.uint32:
            raise ValueError(f"key must be a single PRNG key, got {key.dtype}{key.shape}")
        state = super().init(params, hyperparams)
        return state.update(metadata={**state.metadata, "distilled_batch": D_star, "key": key})

    def _init_metadata(self, params: PyTree, hyperparams: PyTree) -> dict[str, Any]:
        dtype = jnp.result_type(*jax.tree.leaves(params))
        return {
            "S_t": jnp.zeros((), dtype),
            "w_star": params,
            "theta": jnp.full((), 1.0 if self.theta is None else self.theta, dtype),
            FAILED_FITS_KEY: jnp.zeros((), jnp.int32),
        }

    def init_metadata_keys(self, params: PyTree, hyperparams: PyTree) -> set[str]:
        """Every metadata key :meth:`init` creates (the distillation keys included)."""
        keys = super().init_metadata_keys(params, hyperparams)
        return keys | set(_DISTILL_KEYS) if self.distill_batch else keys

    def with_theta(self, state: BilevelState, theta: float | jax.Array) -> BilevelState:
        """The state with θ replaced; a new θ never recompiles ``step`` (jittable).

        Args:
          state: a state of this optimizer.
          theta: the new θ, a scalar (typically from :meth:`estimate_theta`).

        Returns:
          A new :class:`~gradhpo.core.state.BilevelState`.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import OnlineHypergradientOptimizer
          >>> opt = OnlineHypergradientOptimizer(optax.sgd(0.1))
          >>> state = opt.with_theta(opt.init(jnp.zeros(2), jnp.zeros(2)), 0.5)
          >>> float(state.metadata["theta"])
          0.5
        """
        if jnp.shape(theta) != ():
            raise ValueError(f"theta must be a scalar, got shape {jnp.shape(theta)}")
        old = state.metadata["theta"]
        return state.update(metadata={**state.metadata, "theta": jnp.asarray(theta, old.dtype)})

    def refit_theta(self, state, train_batches, val_batch, train_loss_fn, val_loss_fn):
        """Algorithm 3, line 1: θ ← LinearEstimation, set in the state (traceable).

        The function of this optimizer's ``refit`` record: the training loops call it at the
        start of every ``estimation_period``-th episode, after the episode's restart, so
        that Algorithm 4 starts from the episode's ``φ``.

        Args:
          state, train_batches, val_batch, train_loss_fn, val_loss_fn: as for
            :meth:`estimate_theta`.

        Returns:
          ``state`` with θ replaced by the new estimate; where the fit is non-finite, the
          previous θ stays and ``metadata["failed_theta_fits"]`` grows by one (the
          training loops warn).

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> def train(w, lam, b):  # an isotropic quadratic: A = (1 - 0.5) I
          ...     return 0.5 * jnp.sum(w**2) - jnp.sum(lam * w)
          >>> def val(w, lam, b):
          ...     return 0.5 * jnp.sum((w - 1.0) ** 2)
          >>> opt = gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.5), gamma=0.5, T=2)
          >>> state = opt.with_theta(opt.init(jnp.zeros(1), jnp.ones(1)), 0.3)
          >>> state = opt.refit_theta(state, jnp.zeros((2, 1)), None, train, val)
          >>> round(float(state.metadata["theta"]), 6)  # A = γI: θ = 1
          1.0

        References:
          Lee et al., ICLR 2022, Algorithm 3.
        """
        batches = self._theta_batches(train_batches)
        fit, failed = self._fit_theta(state, batches, val_batch, train_loss_fn, val_loss_fn)
        state = self.with_theta(state, fit.theta)
        count = state.metadata[FAILED_FITS_KEY] + failed.astype(jnp.int32)
        return state.update(metadata={**state.metadata, FAILED_FITS_KEY: count})

    # -- Algorithm 3: one online step -------------------------------------------------------

    def _track(self, state: BilevelState, train_batch: Batch) -> dict[str, Any]:
        """Eqs. 13-14 at step t: ``S_t``, ``w*_t`` (and ``D*_t``), restarting every T steps.

        ``t - 1 = episode_step mod T``: at t = 1 the normaliser restarts (``S_0 = 0``, so
        ``p_1 = 0``, ``w*_1 = w_0``, ``D*_1 = D_1``), whatever the state held before.
        """
        md = state.metadata
        restart = md["episode_step"] % self.T == 0
        S_prev = jnp.where(restart, jnp.zeros_like(md["S_t"]), md["S_t"])
        S_t, p_t = ema_weights(self.gamma, S_prev)  # p_t = (γ - γ^t)/(1 - γ^t)
        metadata = {"S_t": S_t, "w_star": tree_lerp(p_t, md["w_star"], state.params)}  # Eq. 13
        if self.distill_batch:
            key, subkey = jax.random.split(md["key"])
            D_star = mix_batches(subkey, p_t, md["distilled_batch"], train_batch)  # Eq. 14
            metadata.update(distilled_batch=D_star, key=key)
        return metadata

    def _estimate_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn):
        w, s, lam = state.params, state.inner_opt_state, state.hyperparams
        metadata = self._track(state, train_batch)
        S_t, w_star = metadata["S_t"], metadata["w_star"]
        D_star = metadata.get("distilled_batch", train_batch)
        new = self.inner(w, s, lam, train_batch, train_loss_fn)  # w_t = Φ(w_{t-1}, λ; D_t)
        val_loss, alpha, g_fo = validation_grads(val_loss_fn, new.params, lam, val_batch)
        # v_t = α_t ∂Φ(w*_t, s_{t-1}, λ; D*_t)/∂λ, the inner state held fixed
        v_t = self.inner.step_and_vjp(w_star, s, lam, D_star, train_loss_fn)[1](alpha)
        if self.unit_direction and not output_depends_on(
            val_loss_fn, 1, new.params, lam, val_batch
        ):
            norm = tree_norm(v_t)  # π* = 1: the unit direction (0 where v_t = 0)
            hypergrad = tree_scale(jnp.where(norm > 0, 1 / jnp.where(norm > 0, norm, 1), 0), v_t)
        else:
            hypergrad = tree_add(g_fo, tree_scale(state.metadata["theta"] * S_t, v_t))  # g_t
        return Estimate(
            hypergrad, new.params, new.inner_opt_state, new.train_loss, val_loss, metadata
        )

    # -- Algorithm 4: θ ---------------------------------------------------------------------

    def fit_theta(
        self, state: BilevelState, train_batches, val_batch, train_loss_fn, val_loss_fn
    ) -> ThetaFit:
        """Algorithm 4 (LinearEstimation) from ``state``, with the fit's samples.

        With λ frozen: T inner steps from ``(state.params, state.inner_opt_state)`` (call it
        at the start of an episode, so that these are ``φ`` and a fresh state), then a
        backward pass that accumulates the second-order term ``g_SO(s)`` over the last s
        steps (DrMAD, see ``theta_points``) and the backward EMA point (Eq. 17,
        ``p_s = (1-γ^{s-1})/(1-γ^s)``), ``v_s = α_T ∂Φ(w*_s, s_{T-1}, λ; D*_s)/∂λ`` with
        the fixed ``α_T``, ``x_s = ‖v_s‖ S_s``, ``y_s = (v_s/‖v_s‖)·g_SO(s)``, and
        ``θ = (x·y)/(x·x)``. ``D*_s`` is ``D_T`` (the batch of the window's last step, as in
        the online step) or, with ``distill_batch``, its backward mix (Eq. 14) drawn from
        a key derived from the state's. One jitted program (both passes ``lax.scan``),
        compiled once per optimizer and batch shape; about 3T VJPs.

        Args:
          state: a state of this optimizer; λ and the weights ``φ`` are read from it.
          train_batches: T batches stacked along a leading axis (a list is stacked).
          val_batch: the validation batch.
          train_loss_fn, val_loss_fn: as for :meth:`step`.

        Returns:
          A :class:`ThetaFit` ``(theta, x, y, hypergrad)``: θ (the state's θ where every
          ``v_s`` is zero and the fit is undefined), the samples ordered by s = 1..T, and
          the backward pass's hypergradient ``g_FO + g_SO(T)``.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.5), gamma=0.5, T=2)
          >>> quadratic = lambda w, lam, b: 0.5 * jnp.sum(w**2) - jnp.sum(lam * w)  # L_train
          >>> distance = lambda w, lam, b: 0.5 * jnp.sum((w - 1.0) ** 2)  # L_val
          >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
          >>> fit = opt.fit_theta(state, jnp.zeros((2, 1)), None, quadratic, distance)
          >>> fit.x, fit.y
          (Array([0.125 , 0.1875], dtype=float32), Array([0.125 , 0.1875], dtype=float32))

        References:
          Lee et al., ICLR 2022, Algorithm 4 and Eq. 17; Fu et al., IJCAI 2016 (DrMAD).
        """
        batches = self._theta_batches(train_batches)
        return self._fit_theta(state, batches, val_batch, train_loss_fn, val_loss_fn)[0]

    def _theta_batches(self, train_batches):
        batches = stack_batches(train_batches)
        n = leading_axis_length(batches, "train_batches")
        if n != self.T:
            raise ValueError(
                f"train_batches must hold T = {self.T} batches (the episode length), got {n}"
            )
        return batches

    def estimate_theta(
        self, state: BilevelState, train_batches, val_batch, train_loss_fn, val_loss_fn
    ) -> jax.Array:
        """θ by Algorithm 4 (LinearEstimation), as a scalar array; see :meth:`fit_theta`.

        Args:
          state, train_batches, val_batch, train_loss_fn, val_loss_fn: as for
            :meth:`fit_theta`.

        Returns:
          θ, a scalar array in the dtype of the weights; set it with :meth:`with_theta`.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.5), T=1)
          >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
          >>> logistic = lambda w, lam, b: jnp.sum(jnp.logaddexp(0.0, -w * lam))  # L_train
          >>> opt.estimate_theta(state, jnp.zeros((1, 1)), None, logistic,
          ...                    lambda w, lam, b: jnp.sum(w**2))  # θ = 1 at T = 1
          Array(1., dtype=float32)

        References:
          Lee et al., ICLR 2022, Algorithm 4.
        """
        return self.fit_theta(state, train_batches, val_batch, train_loss_fn, val_loss_fn).theta

    @partial(jax.jit, static_argnums=(0, 4, 5))
    def _fit_theta(self, state, train_batches, val_batch, train_loss_fn, val_loss_fn):
        self._check_state(state, outer=False)
        key = None
        if self.distill_batch:
            key = jax.random.fold_in(state.metadata["key"], _ESTIMATION_SALT)
        fit = linear_estimation(
            self.inner,
            self.gamma,
            state.params,
            state.inner_opt_state,
            state.hyperparams,
            train_batches,
            val_batch,
            train_loss_fn,
            val_loss_fn,
            stored=self.theta_points == "trajectory",
            key=key,
            through_state=self.theta_adjoint == "state",
        )
        # Every v_s = 0 leaves θ undefined (and irrelevant): keep the state's. A non-finite
        # fit keeps it too, and refit_theta counts it.
        failed = ~all_finite((fit.theta, fit.x, fit.y))
        defined = jnp.dot(fit.x, fit.x) > 0
        fitted = fit.theta
        if self.theta_clip is not None:
            fitted = jnp.clip(fitted, *self.theta_clip)
        theta = jnp.where(defined & ~failed, fitted, state.metadata["theta"])
        return fit._replace(theta=theta.astype(state.metadata["theta"].dtype)), failed
