"""The linear algebra against dense brute force on small shapes."""

import pytest
import torch

from share_convert.math import (
    canonicalize,
    canonicalize_padded,
    principal_basis,
    relative_error,
    residual_spectrum,
)
from share_convert.math.linalg import canonicalize_many, orthonormalized


def dense(B, A):
    return B.double() @ A.double().T


def test_canonicalize_keeps_delta_w():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 5, generator=g), torch.randn(15, 5, generator=g)
    Bc, Ac, s = canonicalize(B, A)
    assert torch.allclose(dense(Bc, Ac), dense(B, A), atol=1e-10)
    assert torch.allclose(Bc.T @ Bc, torch.diag(s), atol=1e-10)
    assert torch.allclose(Ac.T @ Ac, torch.diag(s), atol=1e-10)


def test_canonicalize_is_gauge_invariant():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(20, 4, generator=g).double(), torch.randn(15, 4, generator=g).double()
    R = torch.randn(4, 4, generator=g).double() + 3 * torch.eye(4, dtype=torch.float64)
    Bc1, Ac1, _ = canonicalize(B, A)
    Bc2, Ac2, _ = canonicalize(B @ R, A @ torch.linalg.inv(R).T)
    assert torch.allclose(Bc1, Bc2, atol=1e-9) and torch.allclose(Ac1, Ac2, atol=1e-9)


def test_canonicalize_drops_zero_directions():
    g = torch.Generator().manual_seed(2)
    B = torch.randn(10, 2, generator=g)
    B = torch.cat([B, B[:, :1]], 1)  # rank 2 in a rank-3 adapter
    A = torch.cat([torch.randn(8, 2, generator=g), torch.zeros(8, 1)], 1)
    _, _, s = canonicalize(B, A)
    assert s.numel() == 2


def test_padded_canonicalization_equals_one_pair_at_a_time():
    g = torch.Generator().manual_seed(4)
    ranks = [3, 1, 5, 0]
    B, A = torch.zeros(4, 9, 5, dtype=torch.float64), torch.zeros(4, 7, 5, dtype=torch.float64)
    for j, r in enumerate(ranks):  # each pair zero-padded to width 5
        B[j, :, :r], A[j, :, :r] = torch.randn(9, r, generator=g), torch.randn(7, r, generator=g)
    Bc, Ac, S, rank = canonicalize_padded(B, A)
    assert rank.tolist() == ranks
    for j, r in enumerate(ranks):
        b, a, s = canonicalize(B[j, :, :r], A[j, :, :r])
        assert torch.allclose(Bc[j, :, :r], b, atol=1e-10) and torch.allclose(Ac[j, :, :r], a, atol=1e-10)
        assert torch.allclose(S[j, :r], s, atol=1e-10)
        assert not Bc[j, :, r:].any() and not Ac[j, :, r:].any()


def test_a_pair_is_canonicalized_the_same_whatever_batch_it_is_in():
    """Small modules are canonicalized in large batches: each pair's result, to the bit, is the one
    it gets alone (so the batch size never changes an output)."""
    g = torch.Generator().manual_seed(5)
    B, A = torch.randn(300, 16, 4, generator=g), torch.randn(300, 12, 4, generator=g)
    B[7, :, 3] = B[7, :, 2]  # a rank-deficient pair (the route for ill-conditioned pairs)
    batched = canonicalize_many(B, A)
    for i in (0, 7, 150, 299):
        (alone,) = canonicalize_many(B[i : i + 1], A[i : i + 1])
        assert all(torch.equal(x, y) for x, y in zip(batched[i], alone))


def test_orthonormalized_columns_span_the_same_prefixes_as_householder_qr():
    """Nearly orthonormal columns (Cholesky QR) and far from it (Householder): orthonormal, and each
    column the one QR with a positive diagonal gives (span and order of every prefix kept)."""
    g = torch.Generator().manual_seed(6)
    Q0 = torch.linalg.qr(torch.randn(400, 60, generator=g, dtype=torch.float64)).Q
    near = (Q0 + 1e-3 * torch.randn(400, 60, generator=g, dtype=torch.float64)).float()
    far = (Q0 * torch.logspace(0, -3, 60, dtype=torch.float64)).float()  # condition number 1e3
    for U in (near, far):
        Q = orthonormalized(U)
        Qh, R = torch.linalg.qr(U.double())
        Qh = Qh * torch.sign(torch.diagonal(R))
        assert torch.allclose(Q.T @ Q, torch.eye(60), atol=2e-6)
        assert torch.allclose(Q.double(), Qh, atol=1e-4)


def test_relative_error_matches_dense():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(12, 3, generator=g), torch.randn(9, 3, generator=g)
    Bh, Ah = torch.randn(12, 2, generator=g), torch.randn(9, 2, generator=g)
    expected = torch.linalg.norm(dense(B, A) - dense(Bh, Ah)) / torch.linalg.norm(dense(B, A))
    assert abs(relative_error(B, A, Bh, Ah) - float(expected)) < 1e-10


def test_a_basis_of_a_stack_of_few_rows_and_many_columns_is_its_top_singular_directions():
    """Many tasks of a narrow module (n rows ≤ m columns, k covering the rows): the exact route."""
    g = torch.Generator().manual_seed(8)
    stack = torch.randn(40, 6, generator=g) @ torch.randn(6, 900, generator=g) + 1e-2 * torch.randn(
        40, 900, generator=g
    )
    U, s, proj = principal_basis(stack, 40)
    U_svd, s_svd, _ = torch.linalg.svd(stack.double(), full_matrices=False)
    assert torch.allclose(s, s_svd, rtol=1e-9)
    assert torch.allclose(U.double().abs(), U_svd.abs(), atol=1e-5)  # the same directions, up to sign
    assert torch.allclose(U.T @ U, torch.eye(40), atol=1e-6)
    assert torch.allclose(proj, U.double().T @ stack.double())


def test_randomized_basis_matches_exact_on_a_low_rank_stack():
    g = torch.Generator().manual_seed(4)
    stack = torch.randn(300, 6, generator=g) @ torch.randn(6, 700, generator=g)
    U_exact, s_exact, _ = principal_basis(stack, 6, exact_below=10_000)
    U_rand, s_rand, _ = principal_basis(stack, 6, exact_below=0)
    assert torch.allclose(s_exact, s_rand, rtol=1e-4)
    assert torch.allclose(U_exact @ U_exact.T, U_rand @ U_rand.T, atol=1e-4)


def test_basis_is_clamped_to_numerical_rank():
    g = torch.Generator().manual_seed(5)
    stack = torch.randn(50, 3, generator=g) @ torch.randn(3, 40, generator=g)
    U, s, _ = principal_basis(stack, 30)
    assert U.shape == (50, 3) and s.numel() == 3


def test_basis_sign_convention_is_fixed():
    g = torch.Generator().manual_seed(6)
    stack = torch.randn(30, 10, generator=g)
    U1, _, _ = principal_basis(stack, 4)
    U2, _, _ = principal_basis(-stack, 4)
    assert torch.equal(U1, U2)
    idx = U1.abs().argmax(0)
    assert (U1[idx, torch.arange(4)] > 0).all()


@pytest.mark.parametrize("k", [1, 3, 6, 30], ids=["narrower", "rank-1", "wider", "whole-space"])
def test_residual_spectrum_matches_dense_svd(k: int):
    # k < r takes the narrow factor of E_BᵀE_B; k = n leaves a singular S − G_B (the basis holds the task)
    g = torch.Generator().manual_seed(7)
    n, d, r = 30, 25, 4
    pairs = [canonicalize(torch.randn(n, r, generator=g), torch.randn(d, r, generator=g)) for _ in range(3)]
    beta = torch.linalg.qr(torch.randn(n, k, generator=g).double()).Q
    alpha = torch.linalg.qr(torch.randn(d, min(k, d), generator=g).double()).Q
    s = torch.stack([p[2] for p in pairs])
    got = residual_spectrum(
        s, torch.stack([beta.T @ B for B, _, _ in pairs]), torch.stack([alpha.T @ A for _, A, _ in pairs])
    )
    for (Bc, Ac, _), row in zip(pairs, got):
        W = dense(Bc, Ac)
        R = W - beta @ beta.T @ W @ alpha @ alpha.T
        expected = torch.linalg.svdvals(R)[: 2 * r] ** 2
        assert torch.allclose(row, expected, atol=1e-8 * float(W.pow(2).sum()))


def test_projection_returned_with_the_basis_is_its_coordinates():
    g = torch.Generator().manual_seed(8)
    stack = torch.randn(200, 8, generator=g) @ torch.randn(8, 900, generator=g)
    for exact_below in (0, 10_000):
        U, _, proj = principal_basis(stack, 8, exact_below=exact_below)
        assert torch.allclose(proj, U.double().T @ stack.double(), atol=1e-3 * float(proj.abs().max()))
