"""Adversarial inputs for every public op (issue 16 §6).

Each probe takes an op's valid inputs and breaks one thing: one tensor argument gets NaN, ±inf, values near ±1e38,
subnormals, a zero-size batch, an integer / bool / half dtype, a non-contiguous or stride-0 layout, an extra or
missing dimension, a wrong last dimension, the meta device; or one scalar argument gets 0, a negative, NaN, inf, a
string or a bool. The outcome must be one of

* the right answer: the op returns what its float64 reference (dinokernels.ops.*_ref, written from the SPEC) gives
  on the same input, finite where that is finite; or
* a clear error: ValueError or TypeError whose message names the broken argument.

Anything else — another exception type, a message that does not name the argument, a NaN/inf or different result —
fails the probe. Every probe runs on each backend (kernel, reference, and the fallback with the compiled module
hidden), and test_same_error_on_every_backend asserts that the non-extreme ones end the same way on all of them.
Inputs with no right answer (NaN anywhere, +inf where the op does not define it) need the error.
`test_probe_counts` prints how many probes ran and how each ended (the numbers in docs/reliability.md). Probes that
fail today are listed in OPEN_XFAIL with what is wrong and marked xfail(strict=True), so a fix turns them into
failures (to be un-marked).
"""
import collections
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dinokernels.ops as ops
from dk_test_helpers import BACKENDS, available_backends, backend, running_on  # noqa: F401 (backend: a fixture)

OUTCOMES: Dict[str, str] = {}  # probe id → "right answer" | "clear error"


@dataclass
class OpSpec:
    """An op under test: valid inputs, the call, its float64 reference and what it accepts beyond the obvious."""
    make: Callable[[], Dict[str, Any]]
    call: Callable[..., Any]
    reference: Callable[..., Any]
    compare: Callable[[Any, Any], bool]
    tensor_args: Sequence[str]
    scalar_args: Dict[str, Sequence[Any]] = field(default_factory=dict)
    # (arg, mutation) pairs for which a defined non-error answer exists (e.g. −inf logits: probability 0)
    defined_nonfinite: Sequence[Tuple[str, str]] = ()
    batch_dim: Dict[str, int] = field(default_factory=dict)  # arg → the dim that may be empty (default 0)
    reference_in_float64: bool = True


def _absmax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _close(got: torch.Tensor, want: torch.Tensor, rtol=2e-3) -> bool:
    """got equals the float64 reference `want` to rtol (relative to want's largest entry), and is finite where want
    is; non-finite entries of want must be matched exactly."""
    got, want = torch.as_tensor(got).double().cpu(), torch.as_tensor(want).double().cpu()
    if got.shape != want.shape:
        return False
    finite = torch.isfinite(want)
    if not bool(torch.equal(torch.isfinite(got), finite)) or not bool(torch.equal(got[~finite], want[~finite])):
        return False
    # Results below float32's smallest normal number (1.2e-38) may be flushed to zero by the kernels: an absolute
    # tolerance of that size.
    atol = max(rtol * _absmax(want[finite]), 1.2e-38 if got.numel() else 0.0)
    return bool(torch.allclose(got[finite], want[finite], rtol=rtol, atol=atol))


def _close_tuple(idx=None):
    def compare(got, want):
        if idx is not None:
            got, want = got[idx], want[idx]
        return _close(got, want)
    return compare


def _g(*shape, lo=-1.0, hi=1.0):
    return torch.empty(*shape, dtype=torch.float32).uniform_(lo, hi)


def _probs(*shape):
    return torch.softmax(_g(*shape, lo=-3, hi=3), dim=-1)


def _xyxy(n):
    lo = torch.rand(n, 2) * 0.5
    return torch.cat([lo, lo + 0.1 + torch.rand(n, 2) * 0.4], 1)


def _cxcywh(*lead):
    c = torch.rand(*lead, 2) * 0.6 + 0.2
    s = torch.rand(*lead, 2) * 0.3 + 0.05
    return torch.cat([c, s], -1)


def _f64(kwargs):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def _deform_inputs():
    shapes = torch.tensor([[4, 4], [2, 3]])
    start = torch.tensor([0, 16])
    return dict(value=_g(1, 22, 2, 4), spatial_shapes=shapes, level_start_index=start,
                sampling_locations=torch.rand(1, 3, 2, 2, 2, 2), attention_weights=torch.rand(1, 3, 2, 2, 2))


def _lsa_total(result, cost):
    if isinstance(result, list):  # batched: one (rows, cols) per problem
        return sum(_lsa_total(r, c) for r, c in zip(result, cost))
    rows, cols = result
    return cost.double()[rows, cols].sum()


def _lsa_reference(cost, **_):
    """scipy's optimal total cost (scipy raises ValueError for NaN, −inf or an infeasible +inf pattern)."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    if cost.dim() == 3:
        return sum(_lsa_reference(c) for c in cost)
    c = cost.double().numpy()
    r, k = scipy_lsa(c)
    return torch.as_tensor(c[r, k].sum())


BAD_TEMPERATURES = [0.0, -0.1, 1e-39, float("nan"), float("inf"), "0.1", None, True]  # 1/1e-39 overflows float32

SPECS: Dict[str, OpSpec] = {
    "koleo_loss": OpSpec(
        make=lambda: dict(x=_g(6, 8)), call=ops.koleo_loss, reference=ops.koleo_loss_ref, compare=_close,
        tensor_args=["x"], scalar_args={"eps": [-1.0, float("nan"), float("inf"), "1e-8"]}),
    "nearest_neighbors": OpSpec(
        make=lambda: dict(x=_g(5, 8), y=_g(7, 8)), call=ops.nearest_neighbors, reference=ops.nearest_neighbors_ref,
        compare=_close_tuple(0), tensor_args=["x", "y"]),
    "softmax_center": OpSpec(
        make=lambda: dict(teacher_logits=_g(6, 16, lo=-5, hi=5), center=_g(16), teacher_temp=0.04),
        call=ops.softmax_center, reference=ops.softmax_center_ref, compare=_close,
        tensor_args=["teacher_logits", "center"], scalar_args={"teacher_temp": BAD_TEMPERATURES},
        defined_nonfinite=[("teacher_logits", "-inf"), ("center", "+inf")]),
    "sinkhorn_knopp": OpSpec(
        make=lambda: dict(teacher_logits=_g(6, 16, lo=-5, hi=5), teacher_temp=0.05, n_iterations=3),
        call=ops.sinkhorn_knopp, reference=ops.sinkhorn_knopp_ref, compare=_close,
        tensor_args=["teacher_logits"], scalar_args={"teacher_temp": BAD_TEMPERATURES,
                                                     "n_iterations": [-1, 2.5, "3", None, float("nan")]},
        defined_nonfinite=[("teacher_logits", "-inf")]),
    "dino_loss": OpSpec(
        make=lambda: dict(student_logits=_g(4, 3, 16, lo=-5, hi=5), teacher_probs=_probs(2, 3, 16),
                          student_temp=0.1),
        call=ops.dino_loss, reference=ops.dino_loss_ref, compare=_close,
        tensor_args=["student_logits", "teacher_probs"], scalar_args={"student_temp": BAD_TEMPERATURES},
        batch_dim={"student_logits": 1, "teacher_probs": 1}),
    "dino_loss_centered": OpSpec(
        make=lambda: dict(student_logits=_g(4, 3, 16, lo=-5, hi=5), teacher_logits=_g(2, 3, 16, lo=-5, hi=5),
                          center=_g(16), teacher_temp=0.04, student_temp=0.1),
        call=ops.dino_loss_centered, reference=ops.dino_loss_centered_ref, compare=_close,
        tensor_args=["student_logits", "teacher_logits", "center"],
        scalar_args={"teacher_temp": BAD_TEMPERATURES, "student_temp": BAD_TEMPERATURES},
        defined_nonfinite=[("teacher_logits", "-inf"), ("center", "+inf")],
        batch_dim={"student_logits": 1, "teacher_logits": 1}),
    "ibot_patch_loss": OpSpec(
        make=lambda: dict(student_patch_logits=_g(5, 16, lo=-5, hi=5), teacher_patch_probs=_probs(5, 16),
                          weights=torch.rand(5) + 0.1, student_temp=0.1),
        call=ops.ibot_patch_loss, reference=ops.ibot_patch_loss_ref, compare=_close,
        tensor_args=["student_patch_logits", "teacher_patch_probs", "weights"],
        scalar_args={"student_temp": BAD_TEMPERATURES}),
    "ms_deform_attn": OpSpec(
        make=_deform_inputs, call=ops.ms_deform_attn, reference=ops.ms_deform_attn_ref, compare=_close,
        tensor_args=["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"],
        # NaN/inf in `value` propagate as in grid_sample: NaN exactly where a non-finite value is sampled
        defined_nonfinite=[("value", "nan"), ("value", "+inf"), ("value", "-inf")],
        batch_dim={"sampling_locations": 1, "attention_weights": 1}),
    "box_iou": OpSpec(
        make=lambda: dict(boxes1=_xyxy(3), boxes2=_xyxy(2)), call=ops.box_iou,
        reference=lambda boxes1, boxes2: ops.box_iou(boxes1.double(), boxes2.double()), compare=_close,
        tensor_args=["boxes1", "boxes2"]),
    "generalized_box_iou": OpSpec(
        make=lambda: dict(boxes1=_xyxy(3), boxes2=_xyxy(2)), call=ops.generalized_box_iou,
        reference=lambda boxes1, boxes2: ops.generalized_box_iou(boxes1.double(), boxes2.double()),
        compare=_close, tensor_args=["boxes1", "boxes2"]),
    "matching_cost": OpSpec(
        make=lambda: dict(pred_logits=_g(1, 4, 6, lo=-4, hi=4), pred_boxes=_cxcywh(1, 4), tgt_boxes=_cxcywh(1, 2),
                          positive_map=torch.rand(1, 2, 6) > 0.5),
        call=ops.matching_cost, reference=ops.matching_cost_ref, compare=_close,
        tensor_args=["pred_logits", "pred_boxes", "tgt_boxes", "positive_map"],
        defined_nonfinite=[("pred_logits", "+inf"), ("pred_logits", "-inf")],  # probability 1 / 0
        scalar_args={"cost_class": [float("nan"), float("inf"), "1"], "alpha": [float("nan"), -0.5, 1.5],
                     "gamma": [float("nan"), -1.0]},
        batch_dim={"pred_logits": 1, "pred_boxes": 1, "tgt_boxes": 1, "positive_map": 1}),
    "linear_sum_assignment": OpSpec(
        make=lambda: dict(cost=_g(4, 5)), call=ops.linear_sum_assignment, reference=_lsa_reference,
        compare=None, tensor_args=["cost"], defined_nonfinite=[("cost", "+inf")]),
}


# ---- mutations of one tensor argument ----

def _set_first(t, value):
    t = t.clone()
    t.view(-1)[0] = value
    return t


def _mutations(spec: OpSpec, arg: str) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    dim = spec.batch_dim.get(arg, 0)
    return {
        "nan": lambda t: _set_first(t.float(), float("nan")) if t.is_floating_point() else None,
        "+inf": lambda t: _set_first(t.float(), float("inf")) if t.is_floating_point() else None,
        "-inf": lambda t: _set_first(t.float(), float("-inf")) if t.is_floating_point() else None,
        "1e38": lambda t: _set_first(t, 1e38) if t.is_floating_point() else None,
        "-1e38": lambda t: _set_first(t, -1e38) if t.is_floating_point() else None,
        "all-1e38": lambda t: torch.full_like(t, 3e38) if t.is_floating_point() else None,
        "subnormal": lambda t: t * 1e-40 if t.is_floating_point() else None,
        "zero-size": lambda t: t.narrow(dim, 0, 0),
        "int64": lambda t: t.round().long() if t.is_floating_point() else t.float(),
        "bool": lambda t: t > 0.5 if t.dtype != torch.bool else t.float(),
        "float16": lambda t: t.half() if t.is_floating_point() else t.int(),
        "complex": lambda t: t.to(torch.complex64) if t.is_floating_point() else None,
        "non-contiguous": lambda t: torch.stack([t, t], -1)[..., 0] if t.dim() else None,
        "stride-0": lambda t: t[:1].expand_as(t) if t.dim() and t.shape[0] else None,
        "extra-dim": lambda t: t.unsqueeze(0),
        "missing-dim": lambda t: t[0] if t.dim() else None,
        "last-dim-minus-1": lambda t: t[..., :-1] if t.dim() and t.shape[-1] > 1 else None,
        "meta-device": lambda t: t.to("meta"),
        "not-a-tensor": lambda t: t.tolist(),
    }


MUTATION_NAMES = list(_mutations(SPECS["koleo_loss"], "x"))
NONFINITE = {"nan", "+inf", "-inf"}

# (The kernels branch of issue 16 §2 is merged; the probes it did not fix are listed below with the rest.)
# Probes that fail today (issue 16, reported to the lead): each reason says what is wrong, for every backend or
# ({backend: reason}) for some. strict=True: a fix turns them into failures, and the mark is removed.
OPEN_XFAIL = {
    # the reference backend is the float64-exact log-domain form itself
    "sinkhorn_knopp-teacher_logits-1e38": {"kernel": "one logit of 1e38: the scaling-vector CPU path and the "
                                                     "float64 log-domain reference give different balanced rows"},
}


def _applies(op: str, arg: str, mutation: str) -> bool:
    """False for mutations that do not exist for an argument (NaN in an integer index tensor, ...)."""
    spec = SPECS[op]
    return _mutations(spec, arg)[mutation](spec.make()[arg]) is not None


def _open_reason(pid: str, backend_name: str):
    reason = OPEN_XFAIL.get(pid)
    return reason.get(backend_name) if isinstance(reason, dict) else reason


def _tensor_probes():
    out = []
    for op, spec in SPECS.items():
        for arg in spec.tensor_args:
            for mutation in MUTATION_NAMES:
                if not _applies(op, arg, mutation):
                    continue
                pid = f"{op}-{arg}-{mutation}"
                for backend_name in BACKENDS:
                    reason = _open_reason(pid, backend_name)
                    marks = [pytest.mark.xfail(strict=True, reason="open (issue 16): " + reason)] if reason else []
                    out.append(pytest.param(backend_name, op, arg, mutation, id=f"{backend_name}-{pid}", marks=marks))
    return out


def _scalar_probes():
    out = []
    for op, spec in SPECS.items():
        for arg, values in spec.scalar_args.items():
            for value in values:
                out.append(pytest.param(op, arg, value, id=f"{op}-{arg}-{value!r}"))
    return out


def _names_arg(exc: BaseException, arg: str) -> bool:
    text = str(exc)
    return arg in text or arg.replace("_", " ") in text


# Mutations that break the agreement between arguments (shapes, devices): the error may name either side.
MISMATCH = {"zero-size", "last-dim-minus-1", "extra-dim", "missing-dim", "meta-device"}


def _outcome(spec: OpSpec, kwargs: Dict[str, Any], arg, must_error: bool) -> str:
    """Runs the probe; returns "clear error" or "right answer", or fails the test saying what went wrong. `arg`: the
    argument (or tuple of arguments) the error must name."""
    args = (arg,) if isinstance(arg, str) else tuple(arg)
    try:
        got = spec.call(**kwargs)
    except (ValueError, TypeError) as e:
        assert any(_names_arg(e, a) for a in args), f"{type(e).__name__} does not name {args}: {e}"
        assert "\n" not in str(e).strip() or len(str(e)) < 2000, "error message is not short"
        return "clear error"
    except Exception as e:  # noqa: BLE001 — any other exception type is a failed probe
        pytest.fail(f"unclear error {type(e).__name__}: {str(e)[:500]}")
    assert not must_error, f"no error for an input without a right answer; got {got!r}"[:800]
    try:
        want = spec.reference(**(_f64(kwargs) if spec.reference_in_float64 else kwargs))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the op accepted an input its reference refuses ({type(e).__name__}: {e}); got {got!r}"[:800])
    if spec.compare is None:  # linear_sum_assignment: total cost equal to scipy's
        if not isinstance(want, torch.Tensor):  # the layout probes' reference is the op itself
            want = _lsa_total(want, kwargs["cost"])
        assert float(_lsa_total(got, kwargs["cost"])) == pytest.approx(float(want), rel=1e-6, abs=1e-6)
    else:
        assert spec.compare(got, want), f"wrong answer: got {got!r}, reference {want!r}"[:1500]
    return "right answer"


def _tensor_probe_inputs(op, arg, mutation):
    torch.manual_seed(0)  # fixed probes, so that the xfail lists are stable (the property tests draw freshly)
    spec = SPECS[op]
    kwargs = spec.make()
    kwargs[arg] = _mutations(spec, arg)[mutation](kwargs[arg])
    return kwargs


@pytest.mark.parametrize("backend,op,arg,mutation", _tensor_probes(), indirect=["backend"])
def test_tensor_probe(backend, op, arg, mutation):  # noqa: F811 (the fixture)
    spec = SPECS[op]
    kwargs = _tensor_probe_inputs(op, arg, mutation)
    must_error = mutation in NONFINITE and (arg, mutation) not in spec.defined_nonfinite
    named = tuple(spec.tensor_args) if mutation in MISMATCH else arg
    if mutation in ("non-contiguous", "stride-0"):  # layout must not change the answer: the same op on a copy
        call = spec.call
        spec = OpSpec(**{**spec.__dict__, "reference_in_float64": False, "reference": lambda **kw: call(
            **{k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})})
    OUTCOMES[f"{backend}-{op}-{arg}-{mutation}"] = _outcome(spec, kwargs, named, must_error)


@pytest.mark.parametrize("op,arg,value", _scalar_probes())
def test_scalar_probe(backend, op, arg, value):  # noqa: F811 (the fixture)
    spec = SPECS[op]
    kwargs = spec.make()
    kwargs[arg] = value
    OUTCOMES[f"{backend}-{op}-{arg}-{value!r}"] = _outcome(spec, kwargs, arg, must_error=True)


# ---- index and layout probes that need the op's semantics ----

def _deform(**changes):
    kwargs = _deform_inputs()
    kwargs.update(changes)
    return kwargs


INDEX_PROBES = {
    "ms_deform_attn-spatial_shapes-negative": ("spatial_shapes", lambda: _deform(
        spatial_shapes=torch.tensor([[4, 4], [-2, -3]]))),
    "ms_deform_attn-spatial_shapes-sum-too-large": ("spatial_shapes", lambda: _deform(
        spatial_shapes=torch.tensor([[4, 4], [4, 4]]))),
    "ms_deform_attn-level_start_index-wrong": ("level_start_index", lambda: _deform(
        level_start_index=torch.tensor([0, 15]))),
    "ms_deform_attn-level_start_index-out-of-range": ("level_start_index", lambda: _deform(
        level_start_index=torch.tensor([0, 1000]))),
    "ms_deform_attn-levels-mismatch": (("sampling_locations", "spatial_shapes"), lambda: _deform(
        sampling_locations=torch.rand(1, 3, 2, 3, 2, 2), attention_weights=torch.rand(1, 3, 2, 3, 2))),
    "linear_sum_assignment-num_rows-too-large": ("num_rows", lambda: dict(cost=_g(2, 3, 3), num_rows=[4, 3])),
    "linear_sum_assignment-num_rows-negative": ("num_rows", lambda: dict(cost=_g(2, 3, 3), num_rows=[-1, 3])),
    "linear_sum_assignment-num_cols-wrong-length": ("num_cols", lambda: dict(cost=_g(2, 3, 3), num_cols=[1, 2, 3])),
    "linear_sum_assignment-all-inf-row": ("cost", lambda: dict(cost=torch.tensor([[math.inf, math.inf],
                                                                                   [1.0, 2.0]]))),
    "matching_cost-tgt_counts-too-large": ("tgt_counts", lambda: dict(
        pred_logits=_g(1, 4, 6), pred_boxes=_cxcywh(1, 4), tgt_boxes=_cxcywh(1, 2),
        positive_map=torch.rand(1, 2, 6) > 0.5, tgt_counts=[5])),
    "matching_cost-tgt_counts-negative": ("tgt_counts", lambda: dict(
        pred_logits=_g(1, 4, 6), pred_boxes=_cxcywh(1, 4), tgt_boxes=_cxcywh(1, 2),
        positive_map=torch.rand(1, 2, 6) > 0.5, tgt_counts=[-1])),
    "matching_cost-positive_map-negative-weights": ("positive_map", lambda: dict(
        pred_logits=_g(1, 4, 6), pred_boxes=_cxcywh(1, 4), tgt_boxes=_cxcywh(1, 2),
        positive_map=-torch.rand(1, 2, 6))),
    "box_iou-inverted-boxes": ("boxes1", lambda: dict(boxes1=torch.tensor([[0.5, 0.5, 0.1, 0.1]]),
                                                      boxes2=_xyxy(2))),
    "koleo_loss-one-row": ("x", lambda: dict(x=_g(1, 8))),
    "dino_loss-more-teacher-than-student-crops": (("teacher_probs", "student_logits"), lambda: dict(
        student_logits=_g(2, 3, 16), teacher_probs=_probs(3, 3, 16))),
    "sinkhorn_knopp-zero-iterations": ("n_iterations", lambda: dict(teacher_logits=_g(6, 16), teacher_temp=0.05,
                                                                    n_iterations=0)),
}

_INDEX_OPS = {"ms_deform_attn": "ms_deform_attn", "linear_sum_assignment": "linear_sum_assignment",
              "matching_cost": "matching_cost", "box_iou": "box_iou", "koleo_loss": "koleo_loss",
              "dino_loss": "dino_loss", "sinkhorn_knopp": "sinkhorn_knopp"}


@pytest.mark.parametrize("pid", list(INDEX_PROBES))
def test_index_probe(backend, pid):  # noqa: F811 (the fixture)
    op = pid.split("-")[0]
    arg, make = INDEX_PROBES[pid]
    spec = SPECS[op]
    kwargs = make()
    # sinkhorn with 0 iterations has a right answer (the plain normalisation); the rest have none
    must_error = pid not in ("sinkhorn_knopp-zero-iterations",)
    OUTCOMES[f"{backend}-{pid}"] = _outcome(spec, kwargs, arg, must_error)


# ---- the same outcome on every backend ----

# Extreme finite values are numerics, not validation: a backend may give the right answer where another reports
# an overflow (each is still held to "right answer or clear error" above).
EXTREME = {"1e38", "-1e38", "all-1e38", "subnormal"}


def _error_of(call, kwargs):
    try:
        call(**kwargs)
    except Exception as e:  # noqa: BLE001 — the type is part of what must agree
        return type(e).__name__, str(e)
    return None


def _identity_probes():
    out = []
    for op, spec in SPECS.items():
        for arg in spec.tensor_args:
            for mutation in MUTATION_NAMES:
                if mutation not in EXTREME and _applies(op, arg, mutation):
                    out.append(pytest.param(op, lambda op=op, arg=arg, mutation=mutation: _tensor_probe_inputs(
                        op, arg, mutation), id=f"{op}-{arg}-{mutation}"))
        for arg, values in spec.scalar_args.items():
            for value in values:
                out.append(pytest.param(op, lambda op=op, arg=arg, value=value: {**SPECS[op].make(), arg: value},
                                        id=f"{op}-{arg}-{value!r}"))
    for pid, (_, make) in INDEX_PROBES.items():
        out.append(pytest.param(pid.split("-")[0], make, id=pid))
    return out


@pytest.mark.parametrize("op,make", _identity_probes())
def test_same_error_on_every_backend(op, make):
    """Issue 16 §3: each probe raises the same exception type with the same message on every backend available
    (kernel, reference, fallback without the compiled module), or succeeds on all of them."""
    outcomes = {}
    for name in available_backends():
        torch.manual_seed(0)
        kwargs = make()
        with running_on(name):
            outcomes[name] = _error_of(SPECS[op].call, kwargs)
    assert len(set(outcomes.values())) == 1, outcomes


def test_hungarian_matcher_bad_outputs():
    """HungarianMatcher's own checks of the model outputs (target validation is tested with the matcher)."""
    from dinokernels.models.grounding_dino.matcher import HungarianMatcher

    matcher = HungarianMatcher()
    targets = [{"boxes": _cxcywh(2), "positive_map": torch.rand(2, 6) > 0.5}]
    good = {"pred_logits": _g(1, 4, 6), "pred_boxes": _cxcywh(1, 4)}
    rows, cols = matcher(good, targets)[0]
    assert len(rows) == len(cols) == 2
    for name, outputs in {"nan-logits": dict(good, pred_logits=_set_first(good["pred_logits"], float("nan"))),
                          "inf-boxes": dict(good, pred_boxes=_set_first(good["pred_boxes"], float("inf"))),
                          "int-logits": dict(good, pred_logits=good["pred_logits"].long()),
                          "batch-mismatch": dict(good, pred_boxes=_cxcywh(2, 4))}.items():
        key = "pred_boxes" if "boxes" in name or name == "batch-mismatch" else "pred_logits"
        with pytest.raises((ValueError, TypeError)) as e:
            matcher(outputs, targets)
        assert key in str(e.value) or "logits" in str(e.value) or "boxes" in str(e.value), (name, str(e.value))
        OUTCOMES[f"HungarianMatcher-{name}"] = "clear error"


# ---- property-based: random extreme scales and shapes, always the right answer or a clear error ----

_EXTREME = st.sampled_from([1e-38, 1e-30, 1e-6, 1.0, 1e6, 1e18, 1e30, 1e38])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(2, 9), cols=st.integers(2, 9), scale=_EXTREME, seed=st.integers(0, 2**31 - 1))
def test_koleo_and_neighbours_any_scale(rows, cols, scale, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    # Rows that normalise to (nearly) the same direction make KoLeo's log(distance + 1e-8) depend on float32
    # rounding at the 1e-8 level: no float32 answer is "right" there.
    assume(float(torch.pdist(unit).min()) > 1e-3)
    assume(bool(torch.isfinite(x).all()))  # randn · 1e38 can round to inf in float32
    assert _close(ops.koleo_loss(x), ops.koleo_loss_ref(x.double()), rtol=1e-3)
    if scale > 1e18:  # beyond, the similarities overflow float32: a clear error
        with pytest.raises(ValueError, match="'x' gives non-finite similarities"):
            ops.nearest_neighbors(x)
        return
    sim, _ = ops.nearest_neighbors(x)
    want, _ = ops.nearest_neighbors_ref(x.double())
    assert _close(sim, want, rtol=1e-3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), m=st.integers(1, 6), scale=_EXTREME, seed=st.integers(0, 2**31 - 1),
       forbid=st.floats(0, 0.5))
def test_linear_sum_assignment_any_scale(n, m, scale, seed, forbid):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, m, generator=gen, dtype=torch.float64) * scale
    cost[torch.rand(n, m, generator=gen) < forbid] = math.inf
    try:
        rows, cols = ops.linear_sum_assignment(cost)
    except ValueError as e:
        assert "cost" in str(e)
        with pytest.raises(ValueError):
            _lsa_reference(cost)
        return
    assert float(_lsa_total((rows, cols), cost)) == pytest.approx(float(_lsa_reference(cost)), rel=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 5), m=st.integers(1, 5), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
       seed=st.integers(0, 2**31 - 1))
def test_box_ops_any_scale(n, m, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    def boxes(k):  # (x0, y0, x1, y1) with x0 < x1, y0 < y1, as float32 after scaling
        lo = torch.rand(k, 2, generator=gen, dtype=torch.float64)
        return (torch.cat([lo, lo + 0.05 + torch.rand(k, 2, generator=gen, dtype=torch.float64)], 1) * scale)

    b1, b2 = boxes(n), boxes(m)
    iou = ops.box_iou(b1.float(), b2.float())
    giou = ops.generalized_box_iou(b1.float(), b2.float())
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    assert ((iou >= 0) & (iou <= 1 + 1e-6)).all() and ((giou >= -1 - 1e-6) & (giou <= 1 + 1e-6)).all()


@pytest.fixture(scope="module", autouse=True)
def _print_probe_counts():
    """After this file's tests: how many probes passed, and how (docs/reliability.md quotes the numbers)."""
    yield
    counts = collections.Counter(OUTCOMES.values())
    by_op = collections.Counter(pid.split("-")[1] for pid in OUTCOMES if pid.split("-")[0] in BACKENDS)
    print(f"\nrobustness probes passed: {len(OUTCOMES)} ({dict(counts)}); per op: {dict(by_op)}")
