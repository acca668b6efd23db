"""Parasitic extraction: low-rank adapters pulled out of a full fine-tune while it trains.

At trigger points during full fine-tuning, for every targeted weight matrix, take the update
so far, dW = W_t - W0, its truncated SVD dW ~ U S V^T, and keep the smallest rank r in
[min_rank, max_rank] whose explained variance

    EV(r) = (s_1^2 + ... + s_r^2) / ||dW||_F^2

reaches ``threshold``. B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T make B A the best rank-r
approximation of dW (Eckart-Young), stored as an ordinary LoRA adapter with scale 1 and a rank
per layer. EV is relative to the whole update's energy ||dW||_F^2, computed exactly, not to the
top singular values the truncated SVD returned (which would make every layer "explain" 100%
at max_rank); when max_rank does not reach the threshold, the variance actually explained is
recorded.

The SVD is randomized on matrices whose smaller side exceeds ``exact_below`` (exact otherwise):
subspace iteration with max_rank + oversample columns closed by Rayleigh-Ritz
(``subspace_svd``). The first extraction starts from a Gaussian sketch (the extractor's own
seeded generator) with ``niter`` power iterations; with ``warm_start`` each later one starts
from the previous one's right singular subspace with ``warm_niter`` (two products with dW per
iteration instead of 2 niter + 2). dW moves little between extractions, so the iteration
carries on across the run. Measured on the default study's SST-2 fine-tune (MiniLM, extractions
every 50 steps, against the exact SVD): the first warm extraction's explained variance is
within 0.01 up to rank 32 and 0.025 at rank 64 (the subspace still turns early in training;
``warm_niter: 1`` cuts that to 0.005 for twice the cost), the third's within 0.005, the last
(the adapter the run scores) within 0.002, where a cold sketch stays within 0.009; each warm
extraction makes a third of a cold one's products with dW. Only S is formed at each extraction
(the eigenvalues of a q x q matrix); U and V, when an adapter is asked for.

W0 costs no copy where it can be re-read: on CPU, when the base checkpoint is a safetensors
file holding exactly the loaded weights, W0 is a read-only memory map of that file (the OS
pages it in and out; the process keeps no second copy). Otherwise W0 is copied once onto the
training device, so no extraction moves it back and forth. The record states which, and how
many bytes the snapshot added.

Triggers (``triggers``): ``initial`` (once, at ``initial_step``, by default the end of the
learning-rate warm-up), ``periodic`` (every ``interval`` steps), ``plateau`` (the relative range
of the last ``plateau_window`` training losses falls below ``plateau_tolerance``; then not again
for a window), ``validation`` (the periodic validation score improves on its best so far). The
last step is always extracted (``final``): that extraction is the adapter the run evaluates.

Cost is measured: seconds (device synchronized before each clock read) against the training
loop's seconds, and floating-point operations (counted from the matrix shapes, see
``svd_flops``) against training's, 6 x linear-layer weights x tokens (``training_flops``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorabench import library, measure, quantize
from lorabench.adapters import find_targets, head_tensors

TRIGGERS = ("initial", "periodic", "plateau", "validation")
SNAPSHOTS = ("auto", "mmap", "copy")
BASES = ("fp32", "nf4")
SAFETENSORS_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, torch.bfloat16), "F64": (np.float64, None)}


class ExtractConfigError(ValueError):
    """A bad ``extract`` setting; the message names the key and the fix."""


@dataclass
class ExtractConfig:
    interval: int = 50
    triggers: tuple[str, ...] = ("periodic",)
    threshold: float = 0.9
    min_rank: int = 1
    max_rank: int = 64
    targets: str | list[str] = "all-linear"
    include_embeddings: bool = False
    oversample: int = 16  # with niter 2: EV within 0.01 of the exact SVD's on real MiniLM updates (tests)
    niter: int = 2
    warm_start: bool = True  # later extractions start from the last one's subspace
    warm_niter: int = 0  # power iterations of a warm-started extraction
    exact_below: int = 128
    initial_step: int = 0  # 0: the end of the learning-rate warm-up
    plateau_window: int = 20
    plateau_tolerance: float = 0.05
    snapshot: str = "auto"
    storage: str = "float"  # "int8": also save the adapter as int8 and score that copy
    eval_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    eval_thresholds: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    ev_ranks: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64))  # EV recorded at these ranks per layer
    keep: str = "all"  # the library (lorabench/library.py): all, none, last:K or every:K
    base: str = "fp32"  # nf4: quantization-aware, dW = W_t - dequant(NF4(W0)), and adapters scored on an NF4 base
    compare_bases: bool = False  # at the end, extract once against the other W0 too and score plain/fp32, plain/nf4, nf4-aware/nf4
    library_ranks: tuple[int, ...] = ()  # fixed ranks each library entry can also be loaded at

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ExtractConfig:
        """The ``extract`` hyper-parameter (a mapping; ``svd: {oversample, niter}`` may nest)."""
        if not isinstance(values, dict):
            raise ExtractConfigError(f"extract={values!r} must be a mapping such as {{interval: 50, threshold: 0.9}}")
        flat = {key: value for key, value in values.items() if key != "svd"}
        svd = values.get("svd") or {}
        if not isinstance(svd, dict) or set(svd) - {"oversample", "niter", "exact_below", "warm_start", "warm_niter"}:
            raise ExtractConfigError(f"extract.svd={svd!r}: use a mapping with oversample, niter, exact_below, warm_start, warm_niter")
        flat.update(svd)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ExtractConfigError(f"extract: unknown keys {unknown}; known: {', '.join(sorted(known | {'svd'}))}")
        for key in ("triggers", "eval_ranks", "eval_thresholds", "ev_ranks", "library_ranks"):
            if key in flat:
                if not isinstance(flat[key], (list, tuple)):
                    raise ExtractConfigError(f"extract.{key}={flat[key]!r} must be a list")
                flat[key] = tuple(flat[key])
        cfg = cls(**flat)
        cfg.check()
        return cfg

    def check(self) -> None:
        bad_triggers = sorted(set(self.triggers) - set(TRIGGERS))
        if bad_triggers:
            raise ExtractConfigError(f"extract.triggers: unknown {bad_triggers}; use any of {', '.join(TRIGGERS)}")
        if "periodic" in self.triggers and self.interval < 1:
            raise ExtractConfigError(f"extract.interval={self.interval} must be >= 1 with the periodic trigger")
        if not 0 < self.threshold <= 1 or not all(0 < t <= 1 for t in self.eval_thresholds):
            raise ExtractConfigError("extract.threshold and eval_thresholds must lie in (0, 1]")
        if not 1 <= self.min_rank <= self.max_rank:
            raise ExtractConfigError(f"extract: need 1 <= min_rank ({self.min_rank}) <= max_rank ({self.max_rank})")
        if any(r < 1 for r in (*self.eval_ranks, *self.ev_ranks, *self.library_ranks)):
            raise ExtractConfigError("extract.eval_ranks, ev_ranks and library_ranks must be >= 1")
        try:
            library.parse_keep(self.keep)
        except ValueError as error:
            raise ExtractConfigError(str(error)) from error
        if self.oversample < 0 or self.niter < 0 or self.warm_niter < 0 or self.exact_below < 0 or self.plateau_window < 2 or self.initial_step < 0:
            raise ExtractConfigError("extract: oversample, niter, warm_niter, exact_below, initial_step must be >= 0 and plateau_window >= 2")
        if self.storage not in ("float", "int8"):
            raise ExtractConfigError(f"extract.storage={self.storage!r}: use float or int8")
        if self.base not in BASES:
            raise ExtractConfigError(f"extract.base={self.base!r}: use fp32 (dW = W_t - W0) or nf4 (dW = W_t - dequant(NF4(W0)))")
        if self.base == "nf4" and self.snapshot == "mmap":
            raise ExtractConfigError("extract.base=nf4 with snapshot=mmap: dequant(NF4(W0)) is a copy, never the checkpoint's map; "
                                     "use snapshot: auto or copy")
        if any(rank > self.max_rank for rank in self.library_ranks):
            raise ExtractConfigError(f"extract.library_ranks {list(self.library_ranks)}: each must be <= max_rank ({self.max_rank}), "
                                     "the rank the SVD reaches")
        if self.snapshot not in SNAPSHOTS:
            raise ExtractConfigError(f"extract.snapshot={self.snapshot!r}: use one of {', '.join(SNAPSHOTS)}")


# --- the mathematics -------------------------------------------------------------------------


@dataclass
class Spectrum:
    """The leading singular values of one dW and the energy of the whole of it; the singular
    vectors are formed only when asked, as most extractions need S alone."""

    S: torch.Tensor  # the top max_rank, descending
    energy: float  # ||dW||_F^2
    basis: torch.Tensor | None = None  # d_in x (max_rank + oversample): where the next extraction's iteration starts
    ritz: tuple[torch.Tensor, torch.Tensor] | None = None  # subspace_svd's Q and B B^T: with the basis, U and V follow
    vectors: tuple[torch.Tensor, torch.Tensor] | None = None  # (U, V), once formed

    def singular_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.vectors is None:
            Q, gram = self.ritz
            self.vectors, self.ritz = ritz_vectors(Q, self.basis, gram, len(self.S)), None
        return self.vectors

    @property
    def U(self) -> torch.Tensor:
        return self.singular_vectors()[0]

    @property
    def V(self) -> torch.Tensor:
        return self.singular_vectors()[1]

    def explained(self, rank: int) -> float:
        """EV(rank), relative to the whole update; 1.0 for an update that is exactly zero."""
        if self.energy == 0.0:
            return 1.0
        return min(1.0, float(self.S[:rank].double().pow(2).sum()) / self.energy)

    def rank_for(self, threshold: float, min_rank: int, max_rank: int) -> tuple[int, float]:
        """The smallest rank in [min_rank, max_rank] with EV >= threshold, or the largest
        available when none reaches it; with the EV it explains."""
        available = min(max_rank, len(self.S))
        if self.energy == 0.0:
            return min(min_rank, available), 1.0
        cumulative = torch.cumsum(self.S[:available].double().pow(2), 0) / self.energy
        reached = torch.nonzero(cumulative >= threshold - 1e-6)  # float32 singular values: a threshold met to 6 digits is met
        rank = int(reached[0]) + 1 if len(reached) else available
        rank = max(rank, min(min_rank, available))
        return rank, min(1.0, float(cumulative[rank - 1]))

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with B A the rank-``rank`` truncation: B = U sqrt(S), A = sqrt(S) V^T."""
        root = self.S[:rank].sqrt()
        return self.U[:, :rank] * root, (self.V[:, :rank] * root).T


def spectrum(delta: torch.Tensor, max_rank: int, oversample: int, niter: int, exact_below: int,
             generator: torch.Generator | None = None, start: torch.Tensor | None = None, warm_niter: int = 0) -> Spectrum:
    """Top-``max_rank`` SVD of ``delta`` (float32): exact when the matrix is small or the sketch
    would be nearly as wide as it; else by subspace iteration (``subspace_svd``), from ``start``
    (the previous extraction's ``Spectrum.basis``) with ``warm_niter`` power iterations, or from
    a Gaussian sketch with ``niter``. The spectrum keeps the basis to start the next one from."""
    delta = delta.float()
    smaller = min(delta.shape)
    energy = float(torch.linalg.vector_norm(delta, dim=1).double().pow(2).sum())  # rows in float32, their sum in float64: as exact, 5x cheaper
    width = min(max_rank + oversample, smaller)
    if smaller <= exact_below or width >= smaller:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        keep = min(max_rank, len(S))
        return Spectrum(S[:keep].contiguous(), energy, vectors=(U[:, :keep].contiguous(), Vh[:keep].T.contiguous()))
    if start is None or start.shape != (delta.shape[1], width):
        start = torch.randn(delta.shape[1], width, generator=generator, device=delta.device, dtype=delta.dtype)
        iterations = niter + 1
    else:
        iterations = warm_niter + 1
    Q, projection, gram, S = subspace_svd(delta, start, iterations)
    # B's rows, scaled to unit norm, span the subspace the iteration goes on from: Rayleigh-Ritz
    # needs no orthonormal start, and with a warm Q they are nearly orthogonal already. Stored
    # row-major, as a checkpoint restores it: BLAS sums M @ basis in another order for a
    # transposed operand, so a resumed run would part from the live one in the last bits.
    basis = (projection / row_norms(gram)[:, None]).mT.contiguous()
    return Spectrum(S[:max_rank], energy, basis=basis, ritz=(Q, gram))


def orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``matrix``'s columns by Cholesky QR (Q = Y R^-1, R from the Gram
    matrix formed in float64), cheaper than Householder QR on these tall, thin matrices. Its
    loss of orthogonality grows with Y's condition number (R's diagonal tells), so past 1e3,
    as for an update of lower rank than the sketch, Householder QR takes over."""
    wide = matrix.double()
    factor, info = torch.linalg.cholesky_ex(wide.mT @ wide)
    diagonal = factor.diagonal()
    if int(info) == 0 and float(diagonal.min()) > 1e-3 * float(diagonal.max()):
        return torch.linalg.solve_triangular(factor.mT.to(matrix.dtype), matrix, upper=True, left=False)
    return torch.linalg.qr(matrix).Q


def subspace_svd(matrix: torch.Tensor, start: torch.Tensor, iterations: int):
    """(Q, B, B B^T, S) of rank q = ``start``'s columns, by subspace iteration closed by
    Rayleigh-Ritz (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1): ``iterations - 1``
    power iterations V <- orth((orth(M V)^T M)^T), then Q = orth(M V), the projection B = Q^T M
    (q x n) and S^2 the eigenvalues of B B^T (q x q), the squared singular values of B;
    ``ritz_vectors`` forms U and V from its eigenvectors when asked. Two products with M per
    iteration, each with row-major operands: Q^T M is the same numbers as M^T Q at two thirds
    of its time. From a Gaussian ``start`` and niter + 1 iterations it is the randomized SVD
    (the same subspace as Halko's niter power iterations); from the previous extraction's
    subspace, one iteration carries the iteration on as the weights move, so its accuracy
    builds up over a run where a cold sketch's would not."""
    basis = start
    for _ in range(iterations - 1):
        basis = orthonormal((orthonormal(matrix @ basis).mT @ matrix).mT)
    Q = orthonormal(matrix @ basis)
    projection = Q.mT @ matrix
    gram = projection @ projection.mT
    return Q, projection, gram, torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def row_norms(gram: torch.Tensor) -> torch.Tensor:
    """The norms of B's rows from B B^T, kept off zero so that a row of zeros divides into zeros."""
    return gram.diagonal().sqrt().clamp_min(torch.finfo(gram.dtype).tiny)


def ritz_vectors(Q: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular vectors (U, V) of ``subspace_svd``'s result, from Q, B B^T and
    the basis B^T scaled to unit columns (``spectrum``): B B^T = W S^2 W^T, U = Q W, V = B^T W / S."""
    eigenvalues, W = torch.linalg.eigh(gram)
    S, W = eigenvalues.flip(0).clamp_min(0).sqrt(), W.flip(1)
    right = basis @ (row_norms(gram)[:, None] * W)  # B^T W: columns orthogonal, of norms S
    if S[-1] > 1e-6 * S[0]:
        V = right / S
    else:  # directions the update lacks: any orthonormal completion, its columns' signs kept
        V, R = torch.linalg.qr(right)
        V = V * torch.where(R.diagonal() < 0, -1.0, 1.0).to(V.dtype)
    return (Q @ W[:, :rank]).contiguous(), V[:, :rank].contiguous()


def svd_flops(d_out: int, d_in: int, max_rank: int, oversample: int, niter: int, exact_below: int, warm: bool = False,
              warm_niter: int = 0) -> int:
    """Floating-point operations of one extraction of a d_out x d_in matrix, counted from the
    algorithm: the difference and its norm (3 m n); then either ``subspace_svd`` with q =
    max_rank + oversample columns and i iterations (niter + 1 from a sketch, warm_niter + 1
    ``warm`` from the last basis): per power iteration two products with dW (2 m n q each)
    and two Cholesky QRs (Gram 2 rows q^2, solve rows q^2, Cholesky q^3 / 3), then the
    last iteration's product pair, one Cholesky QR, B B^T (2 n q^2), its eigenvalues (4 q^3 / 3,
    the tridiagonal reduction) and the next basis (n q; U and V are formed only for the adapters
    scored at the end); or an exact SVD (4 m n^2 + 22 n^3, n the smaller side; Golub and
    Van Loan)."""
    m, n = d_out, d_in
    width = min(max_rank + oversample, m, n)
    base = 3 * m * n
    if min(m, n) <= exact_below or width >= min(m, n):
        small, large = min(m, n), max(m, n)
        return base + 4 * large * small**2 + 22 * small**3
    iterations = (warm_niter if warm else niter) + 1
    def cholesky_qr(rows: int) -> int:
        return 3 * rows * width**2 + width**3 // 3
    products = 4 * m * n * width * iterations
    power = (iterations - 1) * (cholesky_qr(m) + cholesky_qr(n))
    last = cholesky_qr(m) + 2 * n * width**2 + 4 * width**3 // 3 + n * width
    return base + products + power + last


# --- W0 without a copy where possible ------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a read-only memory map: nothing is read until used."""
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in SAFETENSORS_DTYPES:
            continue
        numpy_dtype, torch_view = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // np.dtype(numpy_dtype).itemsize
        array = np.memmap(path, dtype=numpy_dtype, mode="r", offset=8 + header_size + start, shape=(count,))
        array.flags.writeable = False
        with warnings.catch_warnings():  # torch warns that a read-only array could be written through; W0 never is
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(array).reshape(info["shape"])
        tensors[name] = tensor.view(torch_view) if torch_view is not None else tensor
    return tensors


def _match(parameter_name: str, stored: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The checkpoint tensor of a model parameter: same name, or the name without leading
    modules (``bert.encoder...`` in the model, ``encoder...`` in a bare encoder checkpoint)."""
    parts = parameter_name.split(".")
    for start in range(len(parts)):
        tensor = stored.get(".".join(parts[start:]))
        if tensor is not None:
            return tensor
    return None


@dataclass
class Snapshot:
    """W0 of every extracted matrix, and what keeping it cost."""

    weights: dict[str, torch.Tensor]
    kind: str  # "mmap" or "copy"
    copied_bytes: int
    mapped_bytes: int
    seconds: float


def take_snapshot(matrices: dict[str, nn.Parameter], checkpoint: str | Path | None, how: str, device: torch.device) -> Snapshot:
    """W0 for ``matrices`` (name -> parameter at step 0): memory-mapped from ``checkpoint``
    when ``how`` allows it, the run is on CPU and every mapped tensor equals the loaded one;
    else copied once onto ``device``."""
    started = time.perf_counter()
    if how in ("auto", "mmap") and device.type == "cpu" and checkpoint is not None:
        stored: dict[str, torch.Tensor] = {}
        for path in _safetensors_files(Path(checkpoint)):
            stored.update(mapped_tensors(path))
        mapped = {name: _match(name, stored) for name in matrices}
        if all(tensor is not None and tensor.shape == matrices[name].shape and torch.equal(tensor.to(matrices[name].dtype), matrices[name].detach())
               for name, tensor in mapped.items()):
            return Snapshot(mapped, "mmap", 0, sum(t.numel() * t.element_size() for t in mapped.values()), time.perf_counter() - started)
    if how == "mmap":
        raise ExtractConfigError(f"extract.snapshot=mmap: the base checkpoint {checkpoint} is not a safetensors file holding "
                                 "exactly the loaded weights on CPU; use snapshot: auto or copy")
    copies = {name: parameter.detach().to(device, copy=True) for name, parameter in matrices.items()}
    return Snapshot(copies, "copy", sum(t.numel() * t.element_size() for t in copies.values()), 0, time.perf_counter() - started)


def nf4_snapshot(matrices: dict[str, nn.Parameter], device: torch.device) -> Snapshot:
    """dequant(NF4(W0)) of ``matrices``: the W0 of quantization-aware extraction, so that an NF4
    base plus the adapter approximates W_t, quantization error included. Always a copy."""
    started = time.perf_counter()
    copies = {name: quantize.nf4_roundtrip(parameter.detach()).to(device) for name, parameter in matrices.items()}
    return Snapshot(copies, "nf4", sum(t.numel() * t.element_size() for t in copies.values()), 0, time.perf_counter() - started)


def extraction_matrices(model: nn.Module, cfg: ExtractConfig) -> dict[str, nn.Parameter]:
    """Weight matrices to extract, by parameter name: the targeted linear layers' (task and LM
    heads never), plus the embedding tables with ``include_embeddings``."""
    matrices = {f"{name}.weight": layer.weight for name, layer in find_targets(model, cfg.targets).items()}
    if cfg.include_embeddings:
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                matrices[f"{name}.weight"] = module.weight
    return matrices


# --- during training ---------------------------------------------------------------------------


class Extractor:
    """Called by the training loop after every optimizer step; decides, extracts, records."""

    def __init__(self, model: nn.Module, cfg: ExtractConfig, checkpoint: str | Path | None, device: torch.device, warmup_steps: int,
                 seed: int = 0, higher_is_better: bool = True):
        self.cfg = cfg
        self.device = device
        self.matrices = extraction_matrices(model, cfg)
        if cfg.base == "nf4" or cfg.compare_bases:
            quantize.require_bitsandbytes("extract.base=nf4 or compare_bases")  # before training, not after it
        if cfg.base == "nf4" and cfg.include_embeddings:
            raise ExtractConfigError("extract.base=nf4 with include_embeddings: an NF4 base keeps its embedding tables in full precision; "
                                     "leave include_embeddings off")
        self.model = model  # its task heads, copied into each library entry
        self.library = None if cfg.keep == "none" else library.Library(cfg.keep, cfg.threshold, cfg.min_rank, cfg.max_rank,
                                                                         cfg.library_ranks, higher_is_better)
        self.snapshot = take_snapshot(self.matrices, checkpoint, cfg.snapshot, device) if cfg.base == "fp32" \
            else nf4_snapshot(self.matrices, device)
        # Quantization-aware extraction compared with plain extraction keeps W0 itself as well.
        self.original = None
        if cfg.base == "nf4" and cfg.compare_bases:
            original = take_snapshot(self.matrices, checkpoint, cfg.snapshot, device)
            self.original = original.weights
            self.snapshot.copied_bytes += original.copied_bytes
            self.snapshot.mapped_bytes += original.mapped_bytes
        self.initial_step = cfg.initial_step or max(1, warmup_steps)
        self.losses: list[float] = []
        self.best_validation: float | None = None
        self.plateau_quiet_until = 0
        self.extractions: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.flops = 0
        self.library_seconds = 0.0  # forming U and V for the library's adapters, apart from the SVDs' seconds
        self.library_flops = 0
        self.last: dict[str, Spectrum] = {}
        self.bases: dict[str, torch.Tensor] = {}  # where each matrix's next warm-started iteration starts
        self.differences: dict[torch.Size, torch.Tensor] = {}  # dW's buffer, one per matrix shape
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def triggers(self, step: int, loss: float | None, validation: float | None, higher_is_better: bool) -> list[str]:
        """The triggers that fire at ``step``. The plateau trigger reads the losses given so far
        (None: no loss at this step, as between a Trainer's logs), the validation trigger the scores."""
        fired = []
        cfg = self.cfg
        if "initial" in cfg.triggers and step == self.initial_step:
            fired.append("initial")
        if "periodic" in cfg.triggers and step % cfg.interval == 0:
            fired.append("periodic")
        if loss is not None:
            self.losses.append(loss)
            if "plateau" in cfg.triggers and step >= self.plateau_quiet_until and len(self.losses) >= cfg.plateau_window:
                window = self.losses[-cfg.plateau_window :]
                scale = abs(sum(window) / len(window)) or 1.0
                if (max(window) - min(window)) / scale < cfg.plateau_tolerance:
                    fired.append("plateau")
                    self.plateau_quiet_until = step + cfg.plateau_window
        return fired + self.validation_trigger(validation, higher_is_better)

    def validation_trigger(self, validation: float | None, higher_is_better: bool) -> list[str]:
        """``["validation"]`` when ``validation`` improves on the best score so far (not the first score)."""
        if validation is None:
            return []
        improved = self.best_validation is None or (validation > self.best_validation if higher_is_better else validation < self.best_validation)
        if not improved:
            return []
        first = self.best_validation is None
        self.best_validation = validation
        return ["validation"] if "validation" in self.cfg.triggers and not first else []

    def after_step(self, step: int, max_steps: int, loss: float | None, validation: float | None = None, higher_is_better: bool = True) -> bool:
        """Extract when a trigger fires or at the last step; True when it did."""
        fired = self.triggers(step, loss, validation, higher_is_better)
        if step == max_steps:
            fired.append("final")
        if fired:
            self.extract(step, fired, loss, validation)
        return bool(fired)

    def after_validation(self, step: int, validation: float, higher_is_better: bool = True) -> bool:
        """A validation score that comes after its step was handled (a Trainer evaluates after
        ``on_step_end``): extract when it fires the validation trigger; when the step extracted
        already, its extraction (and library entry) takes the score and the trigger instead. True
        when it extracted."""
        fired = self.validation_trigger(validation, higher_is_better)
        if self.extractions and self.extractions[-1]["step"] == step:
            self.extractions[-1]["validation"] = validation
            self.extractions[-1]["triggers"] += fired
            if self.library is not None and self.library.entries and self.library.entries[-1].step == step:
                self.library.entries[-1].validation = validation
                self.library.entries[-1].triggers += fired
            return False
        if fired:
            self.extract(step, fired, None, validation)
        return bool(fired)

    @torch.no_grad()
    def extract(self, step: int, triggers: list[str], loss: float | None = None, validation: float | None = None) -> dict[str, Any]:
        cfg = self.cfg
        measure.synchronize(self.device)
        started = time.perf_counter()
        layers, flops = {}, 0
        for name, parameter in self.matrices.items():
            delta = self.difference(name, parameter)
            start = self.bases.get(name) if cfg.warm_start else None
            found = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, cfg.exact_below, self.generator, start, cfg.warm_niter)
            self.last[name] = found
            if found.basis is not None:
                self.bases[name] = found.basis
            flops += svd_flops(*delta.shape, cfg.max_rank, cfg.oversample, cfg.niter, cfg.exact_below, start is not None, cfg.warm_niter)
            layers[name] = found
        measure.synchronize(self.device)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.flops += flops
        entry = {"step": step, "triggers": triggers, "loss": loss, "validation": validation, "seconds": seconds, "flops": flops, "layers": {}}
        if self.library is not None:
            # Forming U and V is this extraction's only extra work for the library; timed and counted apart.
            head = head_tensors(self.model)
            widths = {name: 0 if found.ritz is None and found.basis is None else found.basis.shape[1] for name, found in layers.items()}
            kept = self.library.add(step, triggers, loss if loss is not None else float("nan"), validation, layers, head, seconds, widths)
            entry["library"] = {"factor_seconds": kept.factor_seconds, "factor_flops": kept.factor_flops, "entries": len(self.library.entries),
                                "bytes": self.library.nbytes()}
            self.library_seconds += kept.factor_seconds
            self.library_flops += kept.factor_flops
        for name, found in layers.items():
            rank, explained = found.rank_for(cfg.threshold, cfg.min_rank, cfg.max_rank)
            entry["layers"][name] = {
                "rank": rank,
                "explained": explained,
                "norm": math.sqrt(found.energy),
                "explained_at": {str(r): found.explained(r) for r in cfg.ev_ranks if r <= len(found.S)},
            }
        self.extractions.append(entry)
        return entry

    @torch.no_grad()
    def against_other_base(self) -> tuple[dict[str, Spectrum], float]:
        """The last step's spectra against the other W0 (``compare_bases``): W0 itself when the run
        extracts against dequant(NF4(W0)), and the other way round; cold sketches. With the seconds."""
        measure.synchronize(self.device)
        started = time.perf_counter()
        other = {}
        for name, parameter in self.matrices.items():
            if self.cfg.base == "fp32":
                w0 = quantize.nf4_roundtrip(self.snapshot.weights[name].to(parameter.device, torch.float32))
            else:
                w0 = self.original[name].to(parameter.device, torch.float32)
            other[name] = spectrum(parameter.detach().float() - w0, self.cfg.max_rank, self.cfg.oversample, self.cfg.niter,
                                   self.cfg.exact_below, self.generator)
        measure.synchronize(self.device)
        return other, time.perf_counter() - started

    @property
    def total_seconds(self) -> float:
        """What extraction took from training: the SVDs and the library's U and V."""
        return self.seconds + self.library_seconds

    def difference(self, name: str, parameter: nn.Parameter) -> torch.Tensor:
        """dW = W - W0 in float32, written into a buffer kept for the matrix's shape: one
        allocation per shape for the whole run, where a fresh dW per matrix and extraction
        made the allocator map and fault in new pages every time. ``spectrum`` keeps nothing
        of it, so the next matrix of the shape reuses it."""
        buffer = self.differences.get(parameter.shape)
        if buffer is None:
            buffer = self.differences[parameter.shape] = torch.empty(parameter.shape, device=parameter.device, dtype=torch.float32)
        return torch.sub(parameter.detach().float(), self.snapshot.weights[name].to(parameter.device, torch.float32), out=buffer)

    # What a checkpoint keeps (lorabench/checkpoint.py): JSON-able findings and counters, the
    # sketch generator's state and the bases the next extraction starts from. The spectra
    # themselves need no saving: the last step always extracts.
    STATE_FIELDS = ("extractions", "losses", "best_validation", "plateau_quiet_until", "seconds", "flops", "library_seconds", "library_flops")
    BASIS_PREFIX = "extract.basis."

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(the JSON-able state, its tensors: the generator's state and the warm-start bases)."""
        tensors = {"rng.extract": self.generator.get_state()}
        tensors.update({self.BASIS_PREFIX + name: basis for name, basis in self.bases.items()})
        state = {field: getattr(self, field) for field in self.STATE_FIELDS}
        if self.library is not None:
            state["library"], library_tensors = self.library.state()
            tensors.update(library_tensors)
        return state, tensors

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Resume from :meth:`state` as a checkpoint stored it."""
        for field in self.STATE_FIELDS:
            setattr(self, field, state[field])
        if self.library is not None:
            self.library.load_state(state["library"], tensors)
        self.generator.set_state(tensors["rng.extract"])
        self.bases = {name.removeprefix(self.BASIS_PREFIX): basis.to(self.device)
                      for name, basis in tensors.items() if name.startswith(self.BASIS_PREFIX)}

    def summary(self, train_seconds: float, train_flops: float) -> dict[str, Any]:
        """The record's ``extraction`` section, less the evaluations of the adapters."""
        return {
            "config": {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self.cfg).items()},
            "snapshot": {"kind": self.snapshot.kind, "copied_mb": self.snapshot.copied_bytes / 2**20,
                         "mapped_mb": self.snapshot.mapped_bytes / 2**20, "seconds": self.snapshot.seconds},
            "extractions": self.extractions,
            # The SVDs and, with the library on, forming each kept adapter's U and V: the percentages count both.
            "overhead": {
                "seconds": self.seconds + self.library_seconds,
                "svd_seconds": self.seconds,
                "library_seconds": self.library_seconds,
                "train_seconds": train_seconds,
                "percent_time": 100 * (self.seconds + self.library_seconds) / train_seconds if train_seconds else None,
                "flops": self.flops + self.library_flops,
                "svd_flops": self.flops,
                "library_flops": self.library_flops,
                "train_flops": train_flops,
                "percent_flops": 100 * (self.flops + self.library_flops) / train_flops if train_flops else None,
            },
        }


def training_flops(model: nn.Module, tokens: int) -> float:
    """6 x N x tokens (Kaplan et al. 2020): forward (2) and backward (4) FLOPs per weight and
    token, with N the weights of the linear layers (the LM head included, tied or not), the
    ones every token multiplies; embedding tables are looked up, not multiplied, and attention
    scores are left out (a few percent at these lengths), so the overhead is if anything overstated."""
    weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    return 6.0 * weights * tokens


def adapter_plan(spectra: dict[str, Spectrum], cfg: ExtractConfig) -> list[tuple[str, float, dict[str, int]]]:
    """The adapters to evaluate: (``rank`` or ``threshold``, its value, rank per layer); a rank
    is capped by what each layer's spectrum holds."""
    plans = []
    for rank in cfg.eval_ranks:
        plans.append(("rank", rank, {name: max(1, min(rank, len(found.S))) for name, found in spectra.items()}))
    for threshold in cfg.eval_thresholds:
        plans.append(("threshold", threshold, {name: found.rank_for(threshold, cfg.min_rank, cfg.max_rank)[0] for name, found in spectra.items()}))
    return plans


def layer_name(parameter_name: str) -> str:
    return parameter_name.removesuffix(".weight")


def attach_extracted(model: nn.Module, spectra: dict[str, Spectrum], ranks: dict[str, int], dtype: torch.dtype = torch.float32):
    """Attach the extracted factors to ``model`` (a base model) as a LoRA adapter with scale 1
    and one rank per layer (``library.attach_factors``)."""
    return library.attach_factors(model, {name: found.factors(ranks[name]) for name, found in spectra.items()}, ranks, dtype)


def svd_check(weights: str | Path, model: str, source: str = "auto", cfg: ExtractConfig | None = None) -> list[dict[str, Any]]:
    """The randomized SVD against the exact one on a real update: ``weights`` is what a ``full``
    run saved (``seed0.safetensors``), W0 the named model's checkpoint. Per matrix, the rank the
    threshold picks and the variance each SVD says it explains there."""
    from safetensors.torch import load_file

    cfg = cfg or ExtractConfig()
    folder = models_folder(model, source)
    base: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(folder):
        base.update(mapped_tensors(path))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, tuned in load_file(str(weights)).items():
        w0 = _match(name, base)
        if tuned.ndim != 2 or w0 is None or w0.shape != tuned.shape or "embeddings" in name:
            continue
        delta = tuned.float() - w0.float()
        fast = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, 0, generator)
        exact = spectrum(delta, cfg.max_rank, cfg.oversample, cfg.niter, max(delta.shape))
        rank, explained = fast.rank_for(cfg.threshold, cfg.min_rank, cfg.max_rank)
        rows.append({"matrix": name, "rank": rank, "randomized": explained, "exact": exact.explained(rank)})
    return rows


def models_folder(model: str, source: str) -> Path:
    from lorabench import models

    folder = models.checkpoint_folder(model, source)
    if folder is None:
        raise FileNotFoundError(f"model {model!r} has no local checkpoint folder to read W0 from")
    return folder


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lorabench.extract", description="Check the randomized SVD against the "
                                     "exact one on a full run's real update (W_t from its saved weights, W0 from the base model).")
    parser.add_argument("weights", help="the full run's saved weights, e.g. results/runs/sst2/full/default/seed0.safetensors")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--oversample", type=int, default=ExtractConfig.oversample)
    parser.add_argument("--niter", type=int, default=ExtractConfig.niter)
    parser.add_argument("--max-rank", type=int, default=ExtractConfig.max_rank)
    parser.add_argument("--threshold", type=float, default=ExtractConfig.threshold)
    args = parser.parse_args(argv)
    cfg = ExtractConfig(oversample=args.oversample, niter=args.niter, max_rank=args.max_rank, threshold=args.threshold)
    rows = svd_check(args.weights, args.model, cfg=cfg)
    gaps = [abs(row["randomized"] - row["exact"]) for row in rows]
    for row in rows:
        print(f"{row['matrix']:60s} rank {row['rank']:3d}  EV randomized {row['randomized']:.4f}  exact {row['exact']:.4f}")
    print(f"{len(rows)} matrices, oversample {cfg.oversample}, niter {cfg.niter}: largest EV gap {max(gaps, default=0):.4f}")


if __name__ == "__main__":
    main()
