"""Native ops behind :mod:`gradgeom.lora`: typed wrappers and fake (meta) implementations.

``lora_gram`` computes the r×r Gram matrices of many LoRA factors in one launch;
``sym_eigh`` is a batched symmetric eigen-solver (one block per matrix on CUDA: Householder +
bisection for eigenvalues only, Jacobi with eigenvectors) that stays fast for r up to 256.
``lora_cross_gram`` computes the cross products B1ᵢᵀ·B2ᵢ of many pairs of factors (float64).
``lora_fro``, ``lora_svdvals`` and ``lora_principal_angles`` are native composites of these: the
whole Gram route of :mod:`gradgeom.lora` in one call, for a fraction of the host time of the same
ops from Python.
Float64 twins of the kernels with the same signatures live in :mod:`gradgeom.reference`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gradgeom import _native  # noqa: F401  (registers torch.ops.gradgeom)
from gradgeom._native import _C

__all__ = [
    "FRO",
    "GRAM",
    "PRINCIPAL_ANGLES",
    "SVDVALS",
    "SVDVALS_NO_FRO",
    "gram_fro",
    "lora_cross_gram",
    "lora_fro",
    "lora_gram",
    "lora_principal_angles",
    "lora_svdvals",
    "lora_tolerances",
    "psd_cholesky",
    "sym_eigh",
    "unboxed_call",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Op codes of unboxed_call.
FRO, SVDVALS, PRINCIPAL_ANGLES, GRAM, SVDVALS_NO_FRO = 0, 1, 2, 3, 4


def unboxed_call(op: int, first: object, second: object = None, *, flag: bool = False, no_grad: bool = False) -> object:
    """``torch.ops.gradgeom.<op>(Bs, As[, flag])`` with the factor lists read in C++, or None.

    ``torch.ops`` converts every tensor of both lists to an IValue and back (85 µs for the 448
    factors of 224 adapters on a 2-core machine, more than the ops' own host work); this reads
    them in place and calls the same operator through the dispatcher. It returns None, for the
    caller to take the general path, where that could differ: under ``torch.compile``, with a
    torch function mode, a tensor subclass other than Parameter, a factor that requires grad
    while grad mode is on (unless ``no_grad``), an element that is not a tensor, an empty list,
    or an error (the general path raises it with a message that names the offending pair).

    Args:
        op: :data:`FRO` (lora_fro), :data:`SVDVALS` (lora_svdvals, ``flag`` = flag_ill),
            :data:`SVDVALS_NO_FRO` (lora_svdvals with ``with_fro=False``),
            :data:`PRINCIPAL_ANGLES` (lora_principal_angles, ``flag`` = flag_ill) or :data:`GRAM`.
        first: a list or tuple of ``(B, A)`` pairs when ``second`` is None, else the B factors.
        second: the A factors, parallel to ``first``, or None.
        no_grad: run the op under ``torch.no_grad()``.

    Returns:
        What the op returns, or None.
    """
    if torch.compiler.is_compiling():
        return None
    try:
        return _C._lora_call(op, first, second, flag, no_grad)
    except (ValueError, TypeError, RuntimeError):
        return None


def _parallel_lists(op: str, names: tuple[str, str], first: Sequence, second: Sequence, counts: str = "{} and {}") -> tuple[list, list]:
    """Two sequences as lists: each must be a list or tuple (TypeError) and both of one length
    (ValueError, ``counts`` formatting the two lengths); messages name ``op``."""
    for name, seq in zip(names, (first, second)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
    first, second = list(first), list(second)
    if len(first) != len(second):
        raise ValueError(f"{op}: {names[0]} and {names[1]} must have the same length, got "
                         + counts.format(len(first), len(second)))
    return first, second


def _check_tensor(op: str, name: str, i: int, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")


def _check_factor_lists(op: str, Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor]) -> tuple[list, list]:
    """The factor sequences as lists, checked with messages that name ``op`` (the native ops
    check the same, under the name lora_gram)."""
    Bs, As = _parallel_lists(op, ("Bs", "As"), Bs, As, "{} B factors and {} A factors")
    for i, (B, A) in enumerate(zip(Bs, As)):
        for name, t, want in (("Bs", B, "[d, r]"), ("As", A, "[r, k]")):
            _check_tensor(op, name, i, t)
            if t.dim() != 2:
                raise ValueError(f"{op}: {name}[{i}] must be 2-D {want}, got shape {tuple(t.shape)}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; expected float32, float64, float16 or bfloat16")
            if t.device != Bs[0].device:
                raise ValueError(
                    f"{op}: all factors must be on one device: {name}[{i}] is on {t.device} but Bs[0] is on {Bs[0].device}"
                )
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{op}: inner dimension r differs for adapter {i}: Bs[{i}] has shape {tuple(B.shape)} "
                f"(r = {B.shape[1]}) but As[{i}] has shape {tuple(A.shape)} (r = {A.shape[0]})"
            )
    return Bs, As


def lora_gram(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices BᵢᵀBᵢ and Aᵢ·Aᵢᵀ of a ragged list of LoRA adapters, in one pass.

    Args:
        Bs: ``n`` tensors ``[d_i, r_i]`` (float32 / float64 / float16 / bfloat16, any strides).
        As: ``n`` tensors ``[r_i, k_i]``, same device as ``Bs``. ``d_i``, ``k_i``, ``r_i`` may differ
            between adapters; 0-sized dimensions are fine.
        device: where the (empty) result lives when the lists are empty.

    Returns:
        ``(G_B, G_A)``, float64, each ``[n, R, R]`` with ``R = max r_i``; entries beyond ``r_i`` are
        zero. Products are accumulated in fp32 per block of rows (fp64 for fp64 input) and the
        blocks summed in fp64 in a fixed order: identical input gives identical bits. On sm_80+
        GPUs, fp16/bf16 factors with r <= 128 and one unit stride (row-major B and A, as PEFT
        keeps them, or either transposed; fastest with r and k multiples of 8) go through the
        tensor cores: exact products, summed in fp32 per chunk of rows and the chunks added with
        IEEE rounding. Never synchronises with the GPU.
    """
    Bs, As = _check_factor_lists("lora_gram", Bs, As)
    if not Bs:
        empty = torch.zeros((0, 0, 0), dtype=torch.float64, device=device)
        return empty, empty.clone()
    return torch.ops.gradgeom.lora_gram(Bs, As)


def gram_fro(gb: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """‖Bᵢ·Aᵢ‖_F from the Gram matrices of :func:`lora_gram`: √max(Σ G_B∘G_A, 0) per adapter.

    Args:
        gb, ga: float64 ``[n, R, R]`` symmetric matrices of one shape, on one device (any
            strides); only their lower triangles are read.

    Returns:
        float64 ``[n]`` on their device; NaN where the sum is NaN (an Inf or NaN entry). One
        pass over both lower triangles (one block per adapter on CUDA), the products summed in
        a fixed order: identical input gives identical bits. Never synchronises with the GPU.
    """
    for name, t in (("gb", gb), ("ga", ga)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gram_fro: {name} must be a torch.Tensor, got {type(t).__name__}")
    return torch.ops.gradgeom.gram_fro(gb, ga)


def lora_cross_gram(
    B1s: Sequence[torch.Tensor], B2s: Sequence[torch.Tensor], *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Cross Gram matrices B1ᵢᵀ·B2ᵢ of a ragged list of factor pairs, in one native call.

    Args:
        B1s: ``n`` tensors ``[d_i, p_i]`` (float32 / float64 / float16 / bfloat16, any strides).
        B2s: ``n`` tensors ``[d_i, q_i]``, same ``d_i`` as ``B1s[i]``, same device as ``B1s``.
            ``d_i``, ``p_i``, ``q_i`` may differ between pairs and dtypes between tensors; 0-sized
            dimensions are fine.
        device: where the (empty) result lives when the lists are empty.

    Returns:
        float64 ``[n, R, R]`` with ``R = max(p_i, q_i)`` on the factors' device:
        ``out[i, :p_i, :q_i] = B1ᵢᵀ·B2ᵢ``, zeros elsewhere. Both factors are widened to float64
        and products and sums are float64, read in place (no stacked copy): on the CPU in blocks of
        256 rows summed in row order (the same bits for any thread count), on CUDA in row slices
        summed in slice order; the two differ by ~1e-16 relative. Never synchronises with the GPU.
    """
    B1s, B2s = _parallel_lists("lora_cross_gram", ("B1s", "B2s"), B1s, B2s)
    for name, seq in (("B1s", B1s), ("B2s", B2s)):
        for i, t in enumerate(seq):
            _check_tensor("lora_cross_gram", name, i, t)
    if not B1s:
        return torch.zeros((0, 0, 0), dtype=torch.float64, device=device)
    return torch.ops.gradgeom.lora_cross_gram(B1s, B2s)


def lora_fro(
    Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], *, device: torch.device | str | None = None
) -> torch.Tensor:
    """‖Bᵢ·Aᵢ‖_F of a ragged list of LoRA adapters (no scaling), without forming Bᵢ·Aᵢ.

    Args:
        Bs, As, device: as :func:`lora_gram`.

    Returns:
        float64 ``[n]`` on the factors' device: √max(Σ G_B∘G_A, 0) from the Gram matrices of one
        :func:`lora_gram` launch, all in one native call. Never synchronises with the GPU.
    """
    Bs, As = _check_factor_lists("lora_fro", Bs, As)
    if not Bs:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.ops.gradgeom.lora_fro(Bs, As)


def lora_svdvals(
    Bs: Sequence[torch.Tensor],
    As: Sequence[torch.Tensor],
    *,
    flag_ill: bool = True,
    with_fro: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values of every Bᵢ·Aᵢ by the Gram route, in one native call (no scaling).

    The steps of :func:`gradgeom._lora_core.gram_spectrum`, issued from C++ with the same ops in
    the same order (so the same bits): :func:`lora_gram`, pivoted :func:`psd_cholesky` of G_B
    at each adapter's noise floor (:func:`lora_tolerances`), the eigenvalues of Lᵀ·G_A·L
    (LAPACK on the CPU, :func:`sym_eigh` on CUDA), their square roots. Never synchronises with
    the GPU: ragged per-adapter ranks and dtype flags go up in one asynchronous copy.

    Args:
        Bs, As, device: as :func:`lora_gram`; r_i <= 1024.
        flag_ill: compute the ill-conditioning flags (else they are all False).
        with_fro: compute ‖Bᵢ·Aᵢ‖_F (else ``fro`` is an empty ``[0]`` tensor; saves one kernel).

    Returns:
        ``(sv, ill, fro)`` on the factors' device: float64 ``[n, R]`` (``R = max r_i``) the
        singular values, descending, exactly 0 at and beyond min(d_i, k_i, r_i); bool ``[n]``
        adapters whose smallest singular value the Gram route cannot resolve to ~1 %; float64
        ``[n]`` ‖Bᵢ·Aᵢ‖_F as :func:`lora_fro` (``[0]`` when not ``with_fro``). Not
        differentiable (:mod:`gradgeom.lora` takes its exact QR route when autograd needs
        gradients).
    """
    Bs, As = _check_factor_lists("lora_svdvals", Bs, As)
    if not Bs:
        return (torch.zeros((0, 0), dtype=torch.float64, device=device), torch.zeros(0, dtype=torch.bool, device=device),
                torch.zeros(0, dtype=torch.float64, device=device))
    return torch.ops.gradgeom.lora_svdvals(Bs, As, bool(flag_ill), bool(with_fro))


def lora_principal_angles(
    first: Sequence[tuple[torch.Tensor, torch.Tensor]],
    second: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    flag_ill: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Principal angles between the column spaces of Bᵢ·Aᵢ in ``first`` and in ``second`` (pairs
    matched by position, same d), by the Gram route, in one native call.

    The steps of :func:`gradgeom._lora_core.gram_bases` and :func:`gradgeom._lora_core.cosines`
    (with :func:`gradgeom._lora_core.cross_grams`), issued from C++ with the same ops in the same order: one
    :func:`lora_gram` launch over both lists, factored orthonormal bases U = B·T, the cosines
    σ(T₁ᵀ·B₁ᵀB₂·T₂). Never synchronises with the GPU.

    Args:
        first, second: ``n`` pairs ``(B [d_i, r_i], A [r_i, k_i])`` each, all on one device.
        flag_ill: also return the column that flags pairs the Gram route cannot resolve.
        device: where the (empty) result lives when the lists are empty.

    Returns:
        float64 ``[n, R + 4]`` (``R + 5`` with ``flag_ill``; R the largest rank): the angles in
        radians, ascending, 0 beyond the smaller numerical rank; then the Grassmann distance, the
        numerical ranks of both sides, a value that is nonzero (or NaN) where a Gram matrix holds
        Inf/NaN, and (``flag_ill``) 1.0 where either side needs the exact route.
    """
    if len(first) != len(second):
        raise ValueError(f"lora_principal_angles: first and second must have the same length, got {len(first)} and {len(second)}")
    Bs, As = _check_factor_lists("lora_principal_angles", [p[0] for p in first] + [p[0] for p in second],
                                 [p[1] for p in first] + [p[1] for p in second])
    if not Bs:
        return torch.zeros((0, 5 if flag_ill else 4), dtype=torch.float64, device=device)
    return torch.ops.gradgeom.lora_principal_angles(Bs, As, bool(flag_ill))


def lora_tolerances() -> dict[str, float]:
    """The Gram route's tolerances, defined once in C++ (``lora_tolerances.h``): ``chol_fp32``,
    ``chol_fp64`` (pivoted Cholesky cut, relative to max diag G_B) and ``cond_fp32``,
    ``cond_fp64`` (ill-conditioning bound, relative to ‖G_B‖_F·‖G_A‖_F), by the accumulation
    precision of each adapter's Gram matrices (fp64 when both factors are float64)."""
    return dict(zip(("chol_fp32", "chol_fp64", "cond_fp32", "cond_fp64"), torch.ops.gradgeom._lora_tolerances()))


def _check_square_batch(op: str, A: torch.Tensor) -> None:
    """Python-side checks shared by the r×r solvers (the C++ ops check the same)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{op}: A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"{op}: A must be a batch of square matrices [batch, n, n], got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: A must be float32 or float64, got {A.dtype}")


def sym_eigh(A: torch.Tensor, *, vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a batch of real symmetric matrices (fp64).

    Args:
        A: float32 / float64 ``[batch, n, n]``, ``n <= 1024``; only the lower triangle is read.
        vectors: also return the eigenvectors.

    Returns:
        ``(eigenvalues, eigenvectors)``: float64 ``[batch, n]`` ascending, and float64
        ``[batch, n, n]`` with the eigenvectors as columns (``[0]`` when ``vectors=False``).

    ``vectors=False`` reduces A to tridiagonal form with Householder reflections and finds each
    eigenvalue by bisection with Sturm counts. The error is about n·1e-16·‖A‖ in absolute terms,
    as with LAPACK's ``eigvalsh``: small eigenvalues of a positive definite A are not relatively
    accurate. ``vectors=True`` runs cyclic Jacobi: eigenvalues within about 1e-15·‖A‖ and
    relatively accurate for positive definite A. The two agree to the absolute bound, not bit for
    bit. A matrix with a non-finite entry in its lower triangle gets NaN eigenvalues
    (``vectors=False``); identical input gives identical bits. On CUDA one block solves one
    matrix, so the time grows smoothly with n (no cuSOLVER batched cliff at n > 32); on the CPU
    the same algorithms run per matrix.
    """
    _check_square_batch("sym_eigh", A)
    return torch.ops.gradgeom.sym_eigh(A, vectors)


def psd_cholesky(A: torch.Tensor, *, tol: float = 1e-14) -> torch.Tensor:
    """Diagonally pivoted Cholesky factors of symmetric positive semi-definite matrices (float64).

    Args:
        A: float32 / float64 ``[batch, n, n]``, ``n <= 1024``; only the lower triangle is read.
        tol: stop when the largest remaining pivot is ≤ ``tol``·max(diag A).

    Returns:
        float64 ``[batch, n, n]`` F with F·Fᵀ = A up to that tolerance (F is a row-permuted
        lower-triangular matrix; its nonzero columns are A's numerical rank). Unlike
        ``torch.linalg.cholesky`` it never fails on singular input (a zero matrix gives F = 0),
        and pivoting keeps rounding noise in a rank-deficient Gram matrix from being amplified.
        One block per matrix on CUDA: blocked (a panel of columns between trailing updates, the
        packed triangle in shared memory) for n ≤ 128, else unblocked on the packed triangle (in
        shared memory up to n = 223 on an H100).
    """
    _check_square_batch("psd_cholesky", A)
    return torch.ops.gradgeom.psd_cholesky(A, float(tol))


@torch.library.register_fake("gradgeom::psd_cholesky")
def _psd_cholesky_fake(A, tol):
    torch._check(A.dim() == 3, lambda: "psd_cholesky: A must be [batch, n, n]")
    return A.new_empty(A.shape, dtype=torch.float64)


def _fake_pairs(op: str, names: tuple[str, str], first, second, cross: bool):
    """(n, R, device) of two checked parallel lists of 2-D factors, for the fake implementations:
    LoRA factors B ``[d, r]`` / A ``[r, k]`` (R = max r) or, with ``cross``, cross-Gram pairs
    ``[d, p]`` / ``[d, q]`` (R = max(p, q))."""
    a, b = names
    torch._check(len(first) == len(second), lambda: f"{op}: {a} and {b} must have the same length")
    unit = "pair" if cross else "adapter"
    R = 0
    for i, (x, y) in enumerate(zip(first, second)):
        torch._check(x.dim() == 2 and y.dim() == 2, lambda: f"{op}: {a}[{i}] and {b}[{i}] must be 2-D")
        if cross:
            torch._check(x.shape[0] == y.shape[0], lambda: f"{op}: pair {i}: the factors must have the same number of rows d")
        else:
            torch._check(x.shape[1] == y.shape[0], lambda: f"{op}: inner dimension r differs for adapter {i}")
        if x.device != first[0].device or y.device != first[0].device:
            raise ValueError(f"{op}: all factors must be on one device: {unit} {i} is on {x.device}/{y.device} "
                             f"but {a}[0] is on {first[0].device}")
        R = torch.sym_max(R, torch.sym_max(x.shape[1], y.shape[1]) if cross else x.shape[1])
    return len(first), R, (first[0].device if first else torch.device("cpu"))


def _fake_factor_lists(op: str, Bs, As):
    """(n, R = max r_i, device) of checked factor lists, for the fake implementations."""
    return _fake_pairs(op, ("Bs", "As"), Bs, As, cross=False)


@torch.library.register_fake("gradgeom::lora_gram")
def _lora_gram_fake(Bs, As):
    n, R, device = _fake_factor_lists("lora_gram", Bs, As)
    return (
        torch.empty((n, R, R), dtype=torch.float64, device=device),
        torch.empty((n, R, R), dtype=torch.float64, device=device),
    )


@torch.library.register_fake("gradgeom::gram_fro")
def _gram_fro_fake(gb, ga):
    torch._check(gb.dim() == 3 and gb.shape[1] == gb.shape[2], lambda: "gram_fro: gb must be [n, R, R]")
    torch._check(ga.shape == gb.shape, lambda: "gram_fro: ga must have gb's shape")
    torch._check(gb.dtype == torch.float64 and ga.dtype == torch.float64, lambda: "gram_fro: gb and ga must be float64")
    if ga.device != gb.device:
        raise ValueError(f"gram_fro: gb and ga must be on one device, got {gb.device} and {ga.device}")
    return gb.new_empty((gb.shape[0],))


@torch.library.register_fake("gradgeom::lora_cross_gram")
def _lora_cross_gram_fake(B1s, B2s):
    n, R, device = _fake_pairs("lora_cross_gram", ("B1s", "B2s"), B1s, B2s, cross=True)
    return torch.empty((n, R, R), dtype=torch.float64, device=device)


@torch.library.register_fake("gradgeom::lora_fro")
def _lora_fro_fake(Bs, As):
    n, _, device = _fake_factor_lists("lora_fro", Bs, As)
    return torch.empty((n,), dtype=torch.float64, device=device)


@torch.library.register_fake("gradgeom::lora_svdvals")
def _lora_svdvals_fake(Bs, As, flag_ill, with_fro=True):
    n, R, device = _fake_factor_lists("lora_svdvals", Bs, As)
    return (
        torch.empty((n, R), dtype=torch.float64, device=device),
        torch.empty((n,), dtype=torch.bool, device=device),
        torch.empty((n if with_fro else 0,), dtype=torch.float64, device=device),
    )


@torch.library.register_fake("gradgeom::lora_principal_angles")
def _lora_principal_angles_fake(Bs, As, flag_ill):
    torch._check(len(Bs) % 2 == 0, lambda: "lora_principal_angles: Bs must hold an even count of factors")
    n2, R, device = _fake_factor_lists("lora_principal_angles", Bs, As)
    return torch.empty((n2 // 2, R + (5 if flag_ill else 4)), dtype=torch.float64, device=device)


@torch.library.register_fake("gradgeom::sym_eigh")
def _sym_eigh_fake(A, vectors):
    torch._check(A.dim() == 3, lambda: "sym_eigh: A must be [batch, n, n]")
    batch, n = A.shape[0], A.shape[1]
    w = A.new_empty((batch, n), dtype=torch.float64)
    V = A.new_empty((batch, n, n) if vectors else (0,), dtype=torch.float64)
    return w, V
