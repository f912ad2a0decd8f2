"""Dictionary families: everything that differs between architectures, one `Family` entry each in
`FAMILIES`. An entry holds how a row's latents are picked (its encode rule), the per-latent tensors
it stores beyond W_enc/b_enc/W_dec/b_dec and how they start, fold and train, its training loss
terms, its per-step hook, the config keys only it reads, and its SAELens name (or why it has
none). `saekit.sae`, `saekit.trainer`, `saekit.config` and `saekit.formats` only read the table:
adding a family is one entry here, plus its tests.

The families: TopK and its AuxK loss (Gao et al. 2024), BatchTopK (Bussmann et al. 2024),
Matryoshka (BatchTopK codes, nested-prefix loss; Bussmann et al. 2025), JumpReLU (per-latent
thresholds trained with a straight-through estimator; Rajamanoharan et al. 2024), matching
pursuit (`mp`: k residual-guided steps over the tied decoder; Costa et al. 2025) and ReLU
(loaded from other tools, inference only). Codes are sparse (`values [B, k]`, `indices [B, k]`,
zero values are padding).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saekit import distributed as dist
from saekit.errors import SaekitError
from saekit.kernels import backend, cat_padded, selected_preacts, sparse_decode
from saekit.kernels.pursuit import distinct, gram, mp_pursue, mp_values
from saekit.ortho import ortho_loss

JUMPRELU_THRESHOLD_LR = 10.0  # JumpReLU's log-threshold learning rate, relative to lr
UNIT_NORM_TOL = 1e-5  # decoder rows this close to norm 1 count as unit-norm (fp32 renormalisation: ~1e-7)


class SparseCode(NamedTuple):
    values: torch.Tensor  # [B, k'] non-negative; 0 = padding
    indices: torch.Tensor  # [B, k'] int64 latent ids


@dataclass
class StepState:
    """One dictionary's forward pass in a training step: what its losses and hooks read."""

    sae: nn.Module
    cfg: object  # the TrainConfig
    x: torch.Tensor  # [b, d_in] its sources side by side, in training units
    y: torch.Tensor  # [b, d_out] its targets (x itself when they are the sources)
    vals: torch.Tensor
    idx: torch.Tensor
    aux: dict  # what the encode rule left for the losses (JumpReLU's near-threshold pairs)
    denoms: list  # per target: the global batch's total variance
    B: int  # the global batch size
    dead: torch.Tensor
    step: int
    parallel: bool
    x_hat: torch.Tensor | None = None  # set by the reconstruction loss
    fvu: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # metrics of the other losses
    total_steps: int | None = None  # the run's length (None: open-ended)
    loss: torch.Tensor | None = None  # the sum of the family's loss terms
    fired: torch.Tensor | None = None  # [m] the latents that fired in the global batch
    since: torch.Tensor | None = None  # [m] tokens since each fired, after this batch
    checks: list = field(default_factory=list)  # [inputs finite, loss finite], 0-dim bools


# -- encode rules: (sae, x [B, d_in], aux dict | None) -> SparseCode ---------------------------
def _encode_selected(select):
    """An encode rule from a no-grad selection `(sae, xc) -> (pre-activations, ids)`: the selected
    pre-activations get their sparse gradients (`selected_preacts`), then ReLU."""
    def encode(sae, x: torch.Tensor, aux: dict | None) -> SparseCode:
        c = sae.centre()
        vals, idx = select(sae, x - c.detach())
        if torch.is_grad_enabled():
            vals = selected_preacts(x, c, sae.W_enc, sae.b_enc, idx, vals)
        return SparseCode(vals.relu(), idx)
    return encode


def _select_batchtopk(sae, xc: torch.Tensor):
    """k*B per batch in training; at inference every pre-activation above the learned threshold."""
    if sae.training or sae.cfg.threshold is None:
        return sae.select_batch_topk(xc)[:2]
    return sae.select_threshold(xc, sae.cfg.threshold)


def encode_mp(sae, x: torch.Tensor, aux: dict | None) -> SparseCode:
    """Matching pursuit over the tied dictionary W_dec (Costa et al. 2025; saekit.kernels.pursuit):
    k steps from r = x - b_dec, or fewer once a residual falls below `mp_threshold`. The selection
    runs without grad; with grad, the values are the pursuit's solve, differentiable in x, b_dec
    and every chosen row."""
    W, xc = sae.W_dec, x.to(sae.W_dec.dtype) - sae.b_dec
    key = (W.data_ptr(), W._version)  # the Gram matrix holds while W is unchanged (evaluation)
    if getattr(sae, "_gram", (None,))[0] != key:
        sae._gram = (key, gram(W.detach()))
    G = sae._gram[1]
    order, coeffs = mp_pursue(xc.detach(), W.detach(), sae.k, sae.cfg.mp_threshold, G)
    if torch.is_grad_enabled():
        return SparseCode(*mp_values(xc, W, order, G))
    return SparseCode(*distinct(coeffs, order))


# -- JumpReLU (Rajamanoharan et al. 2024) --------------------------------------------------------
def _theta(sae) -> torch.Tensor:
    """JumpReLU thresholds [m]: exp(log_threshold) while training (gradients reach it through the
    straight-through estimator), the stored `threshold` otherwise."""
    if sae.training and hasattr(sae, "log_threshold"):
        return sae.log_threshold.exp()
    return sae.threshold


def _pack(mask: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of `values [R, n]` where `mask`, as zero-padded rows `(vals, ids) [R, w]` (w the
    longest row, at least 1); `ids [R, n]` name the columns' latents (default: the column)."""
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=mask.shape[0])
    width = max(int(counts.max()) if len(counts) else 0, 1)
    pos = torch.arange(len(rows), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    vals = torch.zeros(mask.shape[0], width, dtype=values.dtype, device=mask.device)
    idx = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    vals[rows, pos] = values[rows, cols]
    idx[rows, pos] = cols if ids is None else ids[rows, cols]
    return vals, idx


@torch.no_grad()
def select_jump(sae, xc: torch.Tensor, theta: torch.Tensor, eps: float):
    """JumpReLU training selection: the pairs above their latent's theta (`vals, idx [B, w]`,
    zero-padded), the pairs less than eps/2 below it (`idx, live [B, w']`: their threshold
    gradient, see `_JumpBelow`) and per latent the count of pairs within eps/2 of theta on
    either side (`near [m]`, the L0 penalty's gradient), all from fp32 pre-activations.

    One pass over each dense block keeps the candidates, the pairs above theta - eps/2;
    everything else works on them. With a bf16 encoder matmul (CPU), the candidates are the
    pairs above theta - eps/2 - delta in bf16, rescored in fp32, delta = 2^-7 (|x_c| max_i
    |W_enc[i]| + max |b_enc|) + 2^-8 theta bounding the bf16 error (inputs and output rounded,
    fp32 accumulation) for the block's largest |x_c|, so the selection is fp32's."""
    near = torch.zeros(sae.n_latents, dtype=xc.dtype, device=xc.device)
    dt = sae._matmul_dtype()
    rescore = dt != sae.W_enc.dtype and not sae.W_enc.is_cuda
    low = theta - eps / 2
    if rescore:
        w_max = float(sae.W_enc.detach().norm(dim=1).max()) + float(sae.b_enc.detach().abs().max())
        low = low - theta / 256
    above, below = [], []
    for rows, pre in sae._preacts(xc, dt):
        lo = low
        if rescore:  # lowered by the block's error bound, then rounded down into bf16
            lo = lo - (float(xc[rows].norm(dim=1).max()) + 1.0) * w_max / 128
            lo = (lo - lo.abs() / 128).to(dt)
        cand = pre > lo
        live, ids = _pack(cand, cand)
        if rescore:
            pre = backend(xc).gather_dot(ids, sae.W_enc, xc[rows]) + sae.b_enc[ids]  # fp32 [r, w]
        else:
            pre = pre.gather(1, ids)
        pre = pre.masked_fill(~live, float("-inf"))  # padding: never selected
        gap = pre - theta[ids]
        on = gap > 0
        close = gap.abs() < eps / 2
        near.index_add_(0, ids[close], torch.ones_like(ids[close], dtype=near.dtype))
        above.append(_pack(on, pre, ids))
        below.append(_pack(close & ~on, close, ids))
    (vals, idx), (live, idx_below) = cat_padded(above), cat_padded(below)
    return vals, idx, idx_below, live, near


class _Jump(torch.autograd.Function):
    """z = pre * H(pre - theta) on selected pairs (all above theta): the value passes its gradient
    to pre; theta gets the straight-through estimate -(theta/eps) K((pre - theta)/eps) with the
    rectangle kernel K = 1 on (-1/2, 1/2) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, vals, theta_sel, eps):
        ctx.save_for_backward(vals, theta_sel)
        ctx.eps = eps
        return vals.clone()

    @staticmethod
    def backward(ctx, grad):
        vals, theta_sel = ctx.saved_tensors
        close = (vals - theta_sel) < ctx.eps / 2
        return grad, -(theta_sel / ctx.eps) * grad * close, None


class _JumpBelow(torch.autograd.Function):
    """Identity on the reconstruction; in the backward, the pairs just below their threshold
    (value 0, so the sparse decode gives them no gradient) send theta its straight-through
    estimate -(theta/eps) * dL/dz, dL/dz = grad_out . W_dec[i]."""

    @staticmethod
    def forward(ctx, x_hat, theta, idx, live, W_dec, eps):
        ctx.save_for_backward(theta, idx, live, W_dec)
        ctx.eps = eps
        return x_hat.clone()

    @staticmethod
    def backward(ctx, grad):
        theta, idx, live, W_dec = ctx.saved_tensors
        dz = backend(W_dec).gather_dot(idx, W_dec, grad.contiguous()) * live
        grad_theta = torch.zeros_like(theta).index_add_(0, idx.reshape(-1), dz.reshape(-1) * theta[idx].reshape(-1))
        return grad, -grad_theta / ctx.eps, None, None, None, None


class _L0(torch.autograd.Function):
    """The number of active pairs (forward) with the straight-through gradient of H(pre - theta)
    in theta: -(1/eps) times the pairs within eps/2 of theta, per latent (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, theta, active, near, eps):
        ctx.save_for_backward(near)
        ctx.eps = eps
        return active.sum()

    @staticmethod
    def backward(ctx, grad):
        (near,) = ctx.saved_tensors
        return -grad * near / ctx.eps, None, None, None


def jumprelu_l0(sae, vals: torch.Tensor, idx: torch.Tensor, aux: dict) -> torch.Tensor:
    """The batch's count of active (token, latent) pairs, differentiable in log_threshold."""
    active = torch.zeros(sae.n_latents, dtype=vals.dtype, device=vals.device)
    active.index_add_(0, idx.reshape(-1), (vals > 0).reshape(-1).to(vals.dtype))
    return _L0.apply(_theta(sae), active, aux["near"], sae.bandwidth)


def encode_jumprelu(sae, x: torch.Tensor, aux: dict | None) -> SparseCode:
    """JumpReLU: every pre-activation above its latent's threshold. In training (after
    `make_trainable`), theta = exp(log_threshold) receives the straight-through gradients: from
    the selected pairs here, from the pairs just below theta through the decode (`aux["decode"]`)."""
    c = sae.centre()
    xc = x - c.detach()
    if not (sae.training and hasattr(sae, "log_threshold")):
        vals, idx = sae.select_threshold(xc, sae.threshold.detach())
        if torch.is_grad_enabled():
            vals = selected_preacts(x, c, sae.W_enc, sae.b_enc, idx, vals)
        return SparseCode(vals.relu(), idx)
    theta = _theta(sae)
    vals, idx, idx_below, live, near = select_jump(sae, xc, theta.detach(), sae.bandwidth)
    if torch.is_grad_enabled():
        vals = _Jump.apply(selected_preacts(x, c, sae.W_enc, sae.b_enc, idx, vals), theta[idx], sae.bandwidth)
    if aux is not None:
        below = (theta, idx_below, live.to(vals.dtype))
        aux.update(near=near, decode=lambda x_hat: _JumpBelow.apply(x_hat, *below, sae.W_dec, sae.bandwidth))
    return SparseCode(vals, idx)


@torch.no_grad()
def init_thresholds(sae, sample: torch.Tensor, l0: int, rows: int = 4096) -> None:
    """JumpReLU thresholds where each latent fires on `l0 / m` of the sample (at least one token),
    so training starts near L0 = `l0` with every latent alive; at least 1e-3."""
    x = sample[:rows].float() - sae.centre()
    pre = torch.addmm(sae.b_enc, x, sae.W_enc.T)  # [rows, m]
    fires = min(max(round(len(x) * l0 / sae.n_latents), 1), len(x) - 1)
    theta = pre.kthvalue(len(x) - fires, dim=0).values.clamp_min(1e-3)  # `fires` values lie above it
    sae.threshold.copy_(theta)
    if hasattr(sae, "log_threshold"):
        sae.log_threshold.copy_(theta.log())


def _trainable_thresholds(sae) -> None:
    """theta = exp(log_threshold): positive, with multiplicative Adam steps."""
    if not hasattr(sae, "log_threshold"):
        sae.log_threshold = nn.Parameter(sae.threshold.clamp_min(1e-12).log())


@torch.no_grad()
def _fold_thresholds(sae, sigma: float) -> None:
    sae.threshold.mul_(sigma)
    if hasattr(sae, "log_threshold"):
        sae.log_threshold.add_(math.log(sigma))


@torch.no_grad()
def _sync_thresholds(sae, stats: dict | None = None) -> None:
    """Write the trained thresholds into the stored `threshold` (after each optimizer step)."""
    if hasattr(sae, "log_threshold"):
        sae.threshold.copy_(sae.log_threshold.exp())


# -- BatchTopK's inference threshold ---------------------------------------------------------------
def _batch_threshold(ema: torch.Tensor) -> float:
    return float(ema[0] / (1 - 0.999 ** ema[1]))


@torch.no_grad()
def _update_batch_threshold(st: StepState, stats: dict[str, torch.Tensor]) -> None:
    """BatchTopK's inference threshold: a bias-corrected EMA (decay 0.999, in `stats["threshold_ema"]`
    = [ema, n]) of the smallest kept value, from step 1000 on (Bussmann et al.), or from the
    lr-decay phase in shorter runs: the cut drifts while the lr is high, and a lagging average
    would under-fire at inference."""
    total = st.total_steps
    if st.step < min(1000, int(st.cfg.decay_start * total) if total else 1000):
        return
    ema, vals = stats["threshold_ema"], st.vals
    kept = vals[vals > 0]
    if st.parallel:  # the smallest kept value of the global batch
        low = kept.min() if len(kept) else torch.tensor(math.inf, device=vals.device, dtype=vals.dtype)
        low = dist.all_reduce(low.reshape(1), "min")[0]
        if not low.isfinite():
            return
    elif len(kept):
        low = kept.min()
    else:
        return
    ema[0] = 0.999 * ema[0] + 0.001 * low
    ema[1] += 1
    st.sae.cfg.threshold = _batch_threshold(ema)


def _resume_batch_threshold(sae, stats: dict[str, torch.Tensor]) -> None:
    if stats["threshold_ema"][1] > 0:
        sae.cfg.threshold = _batch_threshold(stats["threshold_ema"])


# -- loss terms: (StepState) -> loss or None (absent this step) ---------------------------------
def _fvu(y_hat: torch.Tensor, st: StepState) -> torch.Tensor:
    """The FVU of `y_hat` per target, summed: each target's squared error over its total variance."""
    if len(st.denoms) == 1:
        return F.mse_loss(y_hat, st.y, reduction="sum") / st.denoms[0].clamp_min(1e-12)
    targets = st.sae.cfg.target_names
    return sum(F.mse_loss(y_hat[:, sl], st.y[:, sl], reduction="sum") / d.clamp_min(1e-12)
               for sl, d in zip((st.sae.part_slice(t, True) for t in targets), st.denoms, strict=True))


def loss_fvu(st: StepState) -> torch.Tensor:
    """Reconstruction: FVU per target, summed (Gao et al. 2024; Lindsey et al. 2024 for several)."""
    st.x_hat = st.sae.decode_concat(st.vals, st.idx, st.aux)
    st.fvu = _fvu(st.x_hat, st)
    return st.fvu


def loss_matryoshka(st: StepState) -> torch.Tensor:
    """Matryoshka (Bussmann et al. 2025): the mean over nested prefixes of latents of the FVU using
    only that prefix's latents (same codes, one encode). Each group's latents decode once; the
    prefixes are running sums of those partial decodes."""
    sae = st.sae
    ends = torch.tensor(sae.cfg.matryoshka_groups, device=st.idx.device)
    group = torch.bucketize(st.idx.contiguous(), ends, right=True)  # [b, k] the group of each slot
    x_hat, total = sae.b_dec, 0.0
    for g in range(len(ends)):
        x_hat = x_hat + sparse_decode(st.vals * (group == g), st.idx, sae.W_dec)
        total = total + _fvu(x_hat, st)
    st.x_hat = x_hat
    st.fvu = _fvu(x_hat.detach(), st)  # the full dictionary's, for the metrics
    return total / len(ends)


def loss_ortho(st: StepState) -> torch.Tensor | None:
    """OrtSAE (Korznikov et al. 2025), every `ortho_every` steps with weight n * gamma. A penalty on
    the (replicated) decoder alone: added by one process, whose gradient is summed."""
    cfg = st.cfg
    if cfg.ortho_penalty > 0 and st.step % cfg.ortho_every == 0 and (not st.parallel or dist.is_main()):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
        return cfg.ortho_penalty * cfg.ortho_every * ortho_loss(st.sae.W_dec, g)
    return None


def _auxk(rank: Callable) -> Callable:
    """AuxK (Gao et al. 2024): reconstruct the residual from the top-k_aux dead latents (no b_dec),
    weight auxk_alpha, scaled by min(n_dead / k_aux, 1); none while nothing is dead. `rank(st,
    err) -> (x, c, W, b)` ranks the dead latents by `(x - c) W^T + b`."""
    def loss_auxk(st: StepState) -> torch.Tensor | None:
        cfg, sae, dead = st.cfg, st.sae, st.dead
        if not len(dead) or cfg.auxk_alpha <= 0:
            return None
        err = (st.y - st.x_hat).detach()
        if st.parallel:  # the residual's total variance over the global batch
            denom = dist.all_reduce((err - dist.all_reduce(err.sum(0)) / st.B).pow(2).sum())
        else:
            denom = (err - err.mean(0)).pow(2).sum()
        k_aux = cfg.k_aux or sae.d_in // 2
        x, c, W, b = rank(st, err)
        with torch.no_grad():
            vals, idx = torch.addmm(b, x - c, W.T).topk(min(k_aux, len(dead)), dim=1, sorted=False)
        vals = selected_preacts(x, c, W, b, idx, vals).relu()
        err_hat = sparse_decode(vals, dead[idx], sae.W_dec)
        scale = min(len(dead) / k_aux, 1.0)
        aux = scale * (err_hat - err).pow(2).sum() / denom.clamp_min(1e-12)
        st.extra["aux_loss"] = aux
        return cfg.auxk_alpha * aux
    return loss_auxk


# dead latents ranked by their encoder pre-activations
loss_auxk = _auxk(lambda st, err: (st.x, st.sae.centre().detach(), st.sae.W_enc[st.dead], st.sae.b_enc[st.dead]))
# tied (mp): by their decoder rows' correlations with the residual itself, as one more pursuit step would
loss_auxk_tied = _auxk(lambda st, err: (err, torch.zeros_like(st.sae.b_dec), st.sae.W_dec[st.dead],
                                         err.new_zeros(len(st.dead))))


def loss_l0(st: StepState) -> torch.Tensor | None:
    """JumpReLU's sparsity (Rajamanoharan et al. 2024): l0_coeff times the active latents per token
    (over the global batch), its threshold gradient through the straight-through estimator. On
    the FVU's scale a firing pays off when it removes more than l0_coeff of its token's share of
    the variance. With `target_l0` the coefficient is l0_coeff * (L0 / target_l0 - 1) at the
    batch's L0, the gradient of l0_coeff * target_l0 / 2 * (L0 / target_l0 - 1)^2 (the quadratic
    of dictionary_learning's JumpReLU trainer): it lowers the L0 above the target, raises it below."""
    cfg = st.cfg
    if cfg.l0_coeff <= 0:
        return None
    count = jumprelu_l0(st.sae, st.vals, st.idx, st.aux)
    if cfg.target_l0 is None:
        return cfg.l0_coeff * count / st.B
    l0 = count.detach() / st.B  # this process's share of the global batch's L0
    l0 = dist.all_reduce(l0) if st.parallel else l0
    return cfg.l0_coeff * (l0 / cfg.target_l0 - 1) * count / st.B


# -- SAELens export: (cfg, tensors) -> (its architecture, its cfg keys, its extra weights) ----------
def _saelens_topk(c, t: dict) -> tuple[str, dict, dict]:
    """With unit-norm decoder rows (every SAE saekit trains) `rescale_acts_by_decoder_norm: true`
    changes no output and lets SAELens fold the decoder norms (`fold_W_dec_norm`, as SAEDashboard
    does); with other row norms SAELens would select latents by pre-activation times norm."""
    unit = bool(((t["W_dec"].norm(dim=1) - 1).abs() <= UNIT_NORM_TOL).all())
    return "topk", {"k": c.k, "rescale_acts_by_decoder_norm": unit}, {}


def _saelens_batchtopk(c, t: dict) -> tuple[str, dict, dict]:
    """At inference every pre-activation above one threshold: SAELens's JumpReLU."""
    if c.threshold is None:
        raise SaekitError("a BatchTopK SAE without an inference threshold has no SAELens equivalent (SAELens "
                          "runs BatchTopK SAEs as JumpReLU with the learned threshold); train it longer so the "
                          "threshold is set")
    return "jumprelu", {}, {"threshold": torch.full((c.n_latents,), float(c.threshold))}


def _no_saelens(reason: str) -> Callable:
    def refuse(c, t: dict):
        raise SaekitError(reason)
    return refuse


@dataclass(frozen=True)
class Family:
    """One dictionary family. Hooks left None do nothing."""

    encode: Callable  # (sae, x [B, d_in], aux dict | None) -> SparseCode
    saelens: Callable  # (cfg, tensors) -> (SAELens architecture, cfg keys, extra weights); raises if none
    losses: tuple[Callable, ...] = ()  # (StepState) -> term or None, summed in order; () = inference only
    options: tuple[str, ...] = ()  # TrainConfig keys only this family reads
    k_bounded: bool = True  # k latents per token (<= n_latents); False: k only sets the starting L0
    tied: bool = False  # the encoder is the decoder: an SAE of one hookpoint
    tensors: tuple[str, ...] = ()  # stored per-latent [m] tensors beyond the weights (thresholds)
    init: Callable | None = None  # (sae, sample [N, d_in], k): the tensors' start, after the weights'
    trainable: Callable | None = None  # (sae): add the training-only parameters
    lr_scale: dict = field(default_factory=dict)  # training parameter -> its lr relative to lr
    fold: Callable | None = None  # (sae, sigma): the tensors when the latents are scaled by sigma
    after_step: Callable | None = None  # (StepState, stats) after each optimizer step, no grad
    resume: Callable | None = None  # (sae, stats) after a training state is restored


_BATCH = dict(saelens=_saelens_batchtopk, after_step=_update_batch_threshold, resume=_resume_batch_threshold)
FAMILIES: dict[str, Family] = {
    "topk": Family(_encode_selected(lambda sae, xc: sae.select_topk(xc, sae.k)), _saelens_topk,
                   (loss_fvu, loss_ortho, loss_auxk)),
    "batchtopk": Family(_encode_selected(_select_batchtopk), losses=(loss_fvu, loss_ortho, loss_auxk), **_BATCH),
    "matryoshka": Family(_encode_selected(_select_batchtopk), losses=(loss_matryoshka, loss_ortho, loss_auxk),
                         options=("matryoshka_groups",), **_BATCH),
    "jumprelu": Family(
        encode_jumprelu, lambda c, t: ("jumprelu", {}, {"threshold": t["threshold"]}), (loss_fvu, loss_ortho, loss_l0),
        options=("l0_coeff", "target_l0", "jumprelu_bandwidth"), k_bounded=False, tensors=("threshold",),
        init=init_thresholds, trainable=_trainable_thresholds, lr_scale={"log_threshold": JUMPRELU_THRESHOLD_LR},
        fold=_fold_thresholds, after_step=lambda st, stats: _sync_thresholds(st.sae), resume=_sync_thresholds),
    "mp": Family(encode_mp, _no_saelens(
        "a matching-pursuit SAE has no SAELens equivalent: SAELens's matching_pursuit runs until a token's support "
        "stops changing (its first repeated latent) or its residual is small, saekit's runs k steps and accumulates "
        "repeats, so the codes would differ"), (loss_fvu, loss_ortho, loss_auxk_tied), options=("mp_threshold",),
        tied=True),
    "relu": Family(_encode_selected(lambda sae, xc: sae.select_threshold(xc, 0.0)), lambda c, t: ("standard", {}, {})),
}
TRAINABLE = tuple(n for n, f in FAMILIES.items() if f.losses)


def family(name: str) -> Family:
    """The entry of architecture `name`, or a SaekitError naming the known ones."""
    if name not in FAMILIES:
        raise SaekitError(f"architecture must be one of {tuple(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def users(option: str) -> list[str]:
    """The families that read TrainConfig key `option`."""
    return [n for n, f in FAMILIES.items() if option in f.options]
