"""Pruning and low-rank math: pure functions on tensors (masks, scores, factorizations), no modules."""
import torch


def keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping exactly numel - round(sparsity * numel) largest scores (ties broken by position)."""
    flat = scores.reshape(-1)
    drop = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if drop:
        keep[torch.argsort(flat, stable=True)[:drop]] = False
    return keep.reshape(scores.shape)


def keep_largest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The same within each output row (Wanda compares weights feeding one output)."""
    drop = int(round(sparsity * scores.shape[1]))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        order = torch.argsort(scores, dim=1, stable=True)[:, :drop]
        keep.scatter_(1, order, False)
    return keep


def n_of_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive weights along the input dimension (N:M sparsity, e.g. 2:4)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not a multiple of m = {m}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, descending=True, stable=True)[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True)
    return keep.reshape(rows, cols)


def wanda_scores(weight: torch.Tensor, input_sq_sums: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al. 2023): input_sq_sums[j] = sum over calibration tokens of x_j^2."""
    return weight.abs() * input_sq_sums.sqrt()[None, :]


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: weight [N, K] ~ up [N, r] @ down [r, K], singular values split evenly between the two."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def whitened_svd_factors(weight: torch.Tensor, second_moment: torch.Tensor, rank: int,
                         damp: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD (SVD-LLM): minimize ||(W - W_r) X|| rather than ||W - W_r||.
    With S S^T = X X^T (Cholesky), take the SVD of W S, truncate, and map back: W_r = U_r Σ_r V_r^T S^-1."""
    moment = second_moment.double()
    moment = moment + damp * moment.diagonal().mean() * torch.eye(moment.shape[0], dtype=torch.float64)
    root = torch.linalg.cholesky(moment)
    u, s, vh = torch.linalg.svd(weight.double() @ root, full_matrices=False)
    scale = s[:rank].sqrt()
    down = torch.linalg.solve_triangular(root, scale[:, None] * vh[:rank], upper=False, left=False)  # · S^-1
    return (u[:, :rank] * scale).float(), down.float()


def energy_rank(weight: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep `energy` of the squared Frobenius norm."""
    s = torch.linalg.svdvals(weight.double())
    cumulative = torch.cumsum(s**2, 0) / (s**2).sum()
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64)).item()) + 1
