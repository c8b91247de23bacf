"""Every CUDA kernel of the SSL losses on small awkward shapes, for compute-sanitizer (the GPU check runs
`-k sanitizer` under memcheck and racecheck), plus the Sinkhorn-Knopp stage kernels of the distributed path run
on one process, which CI checks on the CPU."""
import pytest
import torch

from dinokernels.ops import (dino_loss, dino_loss_centered, ibot_patch_loss, sinkhorn_knopp, sinkhorn_knopp_ref,
                             softmax_center)
from dinokernels.ops.sinkhorn_knopp import _distributed

CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 33), (17, 4099)])
def test_sinkhorn_stage_path_matches_single_call(device, n, k):
    """The distributed path's three stage kernels, with no process group, equal the one-call kernel and the
    float64 reference."""
    z = torch.randn(n, k, device=device) * 3
    staged = _distributed(z, 0.07, 3, None)
    single = sinkhorn_knopp(z, 0.07)
    reference = sinkhorn_knopp_ref(z.double(), 0.07)
    torch.testing.assert_close(staged, single, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(staged.double(), reference, rtol=2e-4, atol=1e-6)


@pytest.mark.cuda
def test_cuda_ssl_small_run_for_sanitizer():
    """Touches every SSL CUDA kernel: soft CE forward/combine/loss/backward in both teacher modes and with
    weights, softmax_center with its column sum, Sinkhorn-Knopp single-call and staged."""
    for dtype in CUDA_DTYPES:
        for s, t, b, k in [(2, 1, 1, 1), (3, 2, 2, 33), (4, 2, 3, 2049), (10, 2, 2, 4099)]:
            student = torch.randn(s, b, k, device="cuda").to(dtype).requires_grad_()
            # Both centred paths see the same (16-bit representable) logits: rounding them to bf16 moves z/τ by
            # up to ~0.1 at τ = 0.04, far beyond the tolerance, so comparing different roundings would be moot.
            logits = torch.randn(t, b, k, device="cuda").to(dtype).float()
            center = torch.randn(k, device="cuda") * 0.1
            probs, column_sum = softmax_center(logits.reshape(t * b, k).to(dtype), center, 0.04, return_sum=True)
            loss = dino_loss(student, probs.reshape(t, b, k))
            loss2, teacher_sum = dino_loss_centered(student, logits, center, 0.04, return_sum=True)
            (loss + loss2).backward()
            assert torch.isfinite(student.grad.float()).all()
            torch.testing.assert_close(teacher_sum, column_sum.float(), rtol=1e-2, atol=1e-2)
            tokens = torch.randn(b * 3, k, device="cuda").to(dtype).requires_grad_()
            ibot_patch_loss(tokens, torch.softmax(torch.randn(b * 3, k, device="cuda"), -1),
                            torch.rand(b * 3, device="cuda")).backward()
            assert torch.isfinite(tokens.grad.float()).all()
            z = torch.randn(b * 3, k, device="cuda").to(dtype)
            assert torch.isfinite(sinkhorn_knopp(z, 0.05)).all()
            assert torch.isfinite(_distributed(z, 0.05, 2, None)).all()
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_vector_paths_for_sanitizer():
    """The 4-wide load paths (K % 4 == 0, aligned) and their scalar fallback on a view one element into its storage,
    with the fused column sum over several row groups."""
    for dtype in CUDA_DTYPES:
        for n, k in [(1, 4), (9, 4104), (70, 1024)]:
            base = torch.randn(n * k + 1, device="cuda").to(dtype)
            for z in (base[:n * k].view(n, k), base[1:].view(n, k)):
                probs, column_sum = softmax_center(z, torch.randn(k, device="cuda"), 0.04, return_sum=True)
                assert torch.isfinite(probs).all() and torch.isfinite(column_sum).all()
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_soft_ce_vector_paths_for_sanitizer():
    """The soft CE forward and backward with 4-wide loads (K % 4 == 0, aligned; with a chunk narrower than the
    last pack in logits mode at T = 6) and their scalar fallback on a student starting one element into its storage."""
    for dtype in CUDA_DTYPES:
        for s, t, b, k in [(2, 1, 1, 4), (3, 2, 2, 4104), (6, 6, 1, 2052)]:
            for offset in (0, 1):
                storage = torch.randn(s * b * k + offset, device="cuda").to(dtype).requires_grad_()
                student = storage[offset:].view(s, b, k)
                probs = torch.softmax(torch.randn(t, b, k, device="cuda"), -1)
                logits = torch.randn(t, b, k, device="cuda").to(dtype)
                loss = dino_loss(student, probs) + dino_loss_centered(student, logits, torch.randn(k, device="cuda"),
                                                                      0.04)
                loss.backward()
                assert torch.isfinite(storage.grad.float()).all()
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_sinkhorn_vector_paths_for_sanitizer():
    """Sinkhorn-Knopp's row kernels with 4-wide loads (K % 4 == 0, aligned), single-call and staged, and their
    element-wise fallback on a view one element into its storage."""
    for dtype in CUDA_DTYPES:
        for n, k in [(1, 4), (5, 4100)]:
            storage = torch.randn(n * k + 1, device="cuda").to(dtype)
            for z in (storage[:n * k].view(n, k), storage[1:].view(n, k)):
                assert torch.isfinite(sinkhorn_knopp(z, 0.05)).all()
                assert torch.isfinite(_distributed(z, 0.05, 2, None)).all()
    torch.cuda.synchronize()
