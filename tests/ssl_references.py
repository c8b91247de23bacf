"""Float64 oracles for the self-supervised losses, written here from the formulas of SPEC §2.1 (DINO v1), §3.2-§3.4
(DINOv2 teacher, iBOT) and §3.5 (KoLeo). They compute the stated math directly and independently of the package
(nothing here calls dinokernels), so a test comparing the package with them checks the package against the spec.
Inputs of any float dtype are evaluated in float64; student gradients flow, targets are detached."""
import numpy as np
import torch

STUDENT_TEMP = 0.1
CENTER_MOMENTUM = 0.9


# ---------------------------------------------------------------------------------------------------------------
# DINO v1 (SPEC §2.1, §2.4)
# ---------------------------------------------------------------------------------------------------------------

def cross_view_cross_entropy(student_logits, targets, student_temp=STUDENT_TEMP):
    """student_logits (V, B, K), targets (T, B, K) with T ≤ V → scalar:
    the mean over the pairs (t, v) with v ≠ t of mean_b Σ_k −p_t,b,k · log_softmax(z_v,b / τ_s)_k.
    Targets are used as given (never renormalised), so unnormalised targets follow the formula too."""
    log_q = torch.log_softmax(student_logits.double() / student_temp, dim=-1)
    p = targets.detach().double()
    n_teacher, n_student, batch = p.shape[0], log_q.shape[0], p.shape[1]
    pair_ce = -torch.einsum("tbk,vbk->tv", p, log_q) / batch  # (T, V)
    different_view = ~torch.eye(n_teacher, n_student, dtype=torch.bool)
    return pair_ce[different_view].sum() / different_view.sum()


def centered_targets(teacher_logits, center, teacher_temp):
    """softmax((z − c)/τ_t) over the last axis, float64; center broadcasts over the leading axes."""
    z = teacher_logits.detach().double()
    return torch.softmax((z - center.double().reshape(-1)) / teacher_temp, dim=-1)


def center_after(center, teacher_rows, momentum=CENTER_MOMENTUM):
    """c·m + (1 − m)·mean of the raw teacher rows (N, K), float64, shaped like `center`."""
    batch_mean = teacher_rows.detach().double().reshape(-1, teacher_rows.shape[-1]).mean(dim=0)
    return (center.double() * momentum + batch_mean.reshape(center.shape) * (1 - momentum)).detach()


def teacher_temperatures(warmup_temp, temp, warmup_epochs, nepochs):
    """τ_t per epoch, float64 (nepochs,): np.linspace(warmup_temp, temp, warmup_epochs) (both ends included),
    then temp for the remaining epochs."""
    temps = np.full(nepochs, float(temp))
    temps[:warmup_epochs] = np.linspace(warmup_temp, temp, warmup_epochs)
    return temps


class DinoV1Reference:
    """DINO v1's loss step (SPEC §2.1): student rows crop-major (V·B, K), teacher rows (T·B, K). The targets use
    the center as it was before this batch; the center moves afterwards (c ← 0.9c + 0.1·mean of the raw teacher
    rows). `temperatures`: one τ_t or a per-epoch sequence, indexed by `epoch`."""

    def __init__(self, out_dim, ncrops, temperatures, n_global=2, student_temp=STUDENT_TEMP,
                 center_momentum=CENTER_MOMENTUM, center=None):
        self.ncrops, self.n_global = ncrops, n_global
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.temperatures = np.atleast_1d(np.asarray(temperatures, dtype=np.float64))
        self.center = (torch.zeros(1, out_dim, dtype=torch.float64) if center is None
                       else center.detach().double().reshape(1, out_dim).clone())

    def __call__(self, student_rows, teacher_rows, epoch=0):
        k = student_rows.shape[-1]
        targets = centered_targets(teacher_rows, self.center, float(self.temperatures[epoch]))
        loss = cross_view_cross_entropy(student_rows.reshape(self.ncrops, -1, k),
                                        targets.reshape(self.n_global, -1, k), self.student_temp)
        self.center = center_after(self.center, teacher_rows, self.center_momentum)
        return loss


# ---------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp targets (SPEC §3.3), plain form (no max subtraction: overflows where exp does)
# ---------------------------------------------------------------------------------------------------------------

def sinkhorn_targets(teacher_logits, teacher_temp, n_iterations=3):
    """Single process, float64: P = exp(z/τ) (N, K) scaled to total 1, then n_iterations × (each prototype column
    to mass 1/K, each sample row to mass 1/N); returns N·P, whose rows sum to 1."""
    plan = torch.exp(teacher_logits.detach().double() / teacher_temp)
    n, k = plan.shape
    plan = plan / plan.sum()
    for _ in range(n_iterations):
        plan = plan / plan.sum(dim=0, keepdim=True) / k
        plan = plan / plan.sum(dim=1, keepdim=True) / n
    return plan * n


# ---------------------------------------------------------------------------------------------------------------
# iBOT (SPEC §3.4)
# ---------------------------------------------------------------------------------------------------------------

def token_cross_entropy(student_tokens, targets, student_temp=STUDENT_TEMP):
    """(n, K) student logits and (n, K) targets → (n,): Σ_k −t_k·log_softmax(s/τ_s)_k, float64."""
    log_q = torch.log_softmax(student_tokens.double() / student_temp, dim=-1)
    return -(targets.detach().double() * log_q).sum(dim=-1)


def masked_token_weights(masks):
    """masks (I, P) bool → (Σ masks,) float64: 1/max(n_i, 1) for every masked token, in row-major mask order,
    with n_i the masked count of the token's own image."""
    per_image = masks.sum(dim=1).clamp(min=1).double()
    image_of_token = masks.nonzero()[:, 0]
    return 1.0 / per_image[image_of_token]


def ibot_masked_loss(student_tokens, targets, masks, n_masked=None, weights=None, student_temp=STUDENT_TEMP):
    """(1/I) Σ_j w_j·CE_j over the first n_masked token rows (all rows when None), I = number of images (masked
    or not); w defaults to masked_token_weights(masks)."""
    n = student_tokens.shape[0] if n_masked is None else int(n_masked)
    w = masked_token_weights(masks) if weights is None else weights.detach().double()
    ce = token_cross_entropy(student_tokens[:n], targets[:n], student_temp)
    return (w * ce).sum() / masks.shape[0]


def ibot_dense_loss(student_tokens, targets, masks, student_temp=STUDENT_TEMP):
    """student_tokens and targets (I, P, K), masks (I, P): mean over images of Σ_masked CE / max(n_i, 1)."""
    i, p, k = student_tokens.shape
    ce = token_cross_entropy(student_tokens.reshape(i * p, k), targets.reshape(i * p, k), student_temp).view(i, p)
    per_image = (ce * masks.double()).sum(dim=1) / masks.sum(dim=1).clamp(min=1).double()
    return per_image.mean()


def patch_center_after(center, teacher_tokens, momentum=CENTER_MOMENTUM):
    """iBOT center update: raw teacher tokens (n, K) (one entry) or (b, n, K): mean over the n tokens of each
    entry, then the mean over entries; c ← c·m + (1 − m)·that. Shaped like `center` (1, 1, K)."""
    z = teacher_tokens.detach().double()
    z = z.reshape(1, *z.shape) if z.dim() == 2 else z
    batch_mean = z.mean(dim=1).mean(dim=0)
    return (center.double() * momentum + batch_mean.reshape(center.shape) * (1 - momentum)).detach()


# ---------------------------------------------------------------------------------------------------------------
# KoLeo (SPEC §3.5 and its eps register)
# ---------------------------------------------------------------------------------------------------------------

def koleo_reference(x, eps=1e-8):
    """x (n, d) → scalar, float64: x̂ = x / max(‖x‖, eps); neighbour I(i) = argmax_j x̂_i·x̂_j with the diagonal of
    the similarity matrix set to −1; d_i = ‖x̂_i − x̂_I(i) + 1e-8·1‖ (the 1e-8 is added to the difference and does
    not follow eps); −mean_i log(d_i + eps). The gradient flows through d only."""
    x = x.double()
    unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    with torch.no_grad():
        sims = unit @ unit.T
        sims.diagonal().fill_(-1.0)
        nearest = sims.argmax(dim=1)
    dist = torch.linalg.vector_norm(unit - unit[nearest] + 1e-8, dim=-1)
    return -torch.log(dist + eps).mean()
