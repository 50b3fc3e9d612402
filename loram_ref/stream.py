"""Products with a weight read in row blocks: the primitive of every method that only multiplies
by W (the randomized SVDs, the certified Krylov solver) and of the blocked norms and residuals.

A block is copied into a reused buffer of the compute dtype (up-cast where W is bf16/fp16),
so W is never copied whole, and the blocks are shared over torch's intra-op threads, each
running single-threaded kernels on blocks in its own core's cache (:class:`RowStream`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch

__all__ = ["CPU_BLOCK_ELEMENTS", "CPU_COLUMN_CHUNKS", "CUDA_BLOCK_ELEMENTS", "RowStream", "compute_dtype",
           "streamed_products"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a decomposition of a ``dtype`` matrix runs in: float64 for float64, else
    float32 (PEFT up-casts bf16/fp16 weights to fp32 before every decomposition,
    docs/initializers.md §2 step 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Entries of one fp32 row block of a streamed pass on CPU: 1 Mi entries (4 MiB) stay in cache
#: while the block's GEMM reads them; blocks of another compute dtype hold the same bytes
#: (512 Ki fp64 entries: fp64 products at 4096 x 4096 took 15-25 % longer in 8 MiB blocks).
#: On CUDA, blocks of 64 Mi entries: a GPU wants few, large kernels.
CPU_BLOCK_ELEMENTS = 1 << 20
CUDA_BLOCK_ELEMENTS = 1 << 26

#: Column chunks of the transposed product ``Wᵀ·Y`` on CPU: one batched GEMM over 4 column
#: chunks of a block runs ``Wᵀ·Y`` at nearly the rate of ``W·X`` (MKL's single ``Yᵀ·W``
#: GEMM is ~1.4x slower at rank 16, measured at 28672 x 8192 on 2 cores).
CPU_COLUMN_CHUNKS = 4


@contextlib.contextmanager
def _single_threaded_ops():
    """Torch's intra-op threads set to 1 for the span of a streamed product (restored after),
    so each of the stream's workers runs its kernels on its own core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RowStream:
    """Products with a matrix ``a`` read in row blocks, each block once per product.

    Each block is copied into a reused buffer of the compute dtype (:func:`compute_dtype`),
    up-cast where ``a`` is bf16/fp16, so ``a`` is never copied whole: the extra memory of a
    product is one block per worker plus its O((m+n)·q) operands and result. The copy also
    stages an fp32 block: it streams the block from memory at the read bandwidth into the
    core's cache, where the GEMM then reads it (a GEMM reading its block from memory took
    15 % longer: LoRA-SB's 22 passes over a 28672 x 8192 fp32 update, 2.3 s against 2.0 s).
    The products are those of the up-cast matrix in exact arithmetic (a bf16 → fp32 cast is
    exact); only the order of the fp32 sums differs from one GEMM over the whole matrix.

    On CPU the blocks are shared out over as many Python threads as torch has intra-op
    threads, each running single-threaded kernels (torch releases the GIL inside them) on
    its own blocks, which stay in its core's cache between the up-cast and the GEMM. One
    OpenMP team per kernel instead would pay a wake-up per block (~100 µs under
    ``OMP_WAIT_POLICY=PASSIVE``, the harness's workers' setting: 0.7 s of a 28672 x 8192
    rank-16 randomized SVD at 4 MiB blocks) and, spinning, competes with the thread that
    launches the next kernel. The transposed product sums one partial result per worker, so
    its last bits depend on the thread count (deterministic for a given count).
    """

    def __init__(self, a: torch.Tensor, block_elements: int | None = None, dtype: torch.dtype | None = None):
        if a.dim() != 2:
            raise ValueError(f"RowStream needs a 2-D matrix, got shape {tuple(a.shape)}")
        self.a = a
        self.dtype = dtype or compute_dtype(a.dtype)  # a wider dtype than a's own: blocks up-cast exactly
        cpu = a.device.type == "cpu"
        if block_elements is None:
            itemsize = torch.finfo(self.dtype).bits // 8
            block_elements = CPU_BLOCK_ELEMENTS * 4 // itemsize if cpu else CUDA_BLOCK_ELEMENTS  # fp32's bytes
        self.rows = max(1, min(a.shape[0], int(block_elements) // max(1, a.shape[1])))
        if self.rows >= a.shape[0] and a.dtype != self.dtype:
            self.a = a.to(self.dtype)  # one block: up-cast once, not at every product
        self.chunks = next(c for c in (CPU_COLUMN_CHUNKS, 2, 1) if a.shape[1] % c == 0) if cpu else 1
        starts = range(0, a.shape[0], self.rows)
        self.workers = max(1, min(torch.get_num_threads(), len(starts))) if cpu else 1

    @property
    def whole(self) -> bool:
        """One block already in the compute dtype: the products are single GEMMs on ``a``."""
        return self.rows >= self.a.shape[0] and self.a.dtype == self.dtype

    def _share(self, first: int, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, block)`` pairs: every ``step``-th row block from the ``first``-th, copied
        (up-cast where ``a`` is bf16/fp16) into one buffer of this share's own."""
        buffer = torch.empty(self.rows, self.a.shape[1], dtype=self.dtype, device=self.a.device)
        for start in range(first * self.rows, self.a.shape[0], step * self.rows):
            block = self.a[start : start + self.rows]
            yield start, buffer[: block.shape[0]].copy_(block)

    def run(self, body: Callable[[int, Iterator[tuple[int, torch.Tensor]]], None]) -> None:
        """``body(k, share)`` for each worker's share of the blocks; on CPU with more than
        one worker, each on its own thread with single-threaded kernels."""
        shares = [self._share(k, self.workers) for k in range(self.workers)]
        if self.workers == 1:
            body(0, shares[0])
            return
        errors: list[BaseException] = []

        def guarded(k: int) -> None:
            try:
                body(k, shares[k])
            except BaseException as exc:  # re-raised in the calling thread
                errors.append(exc)

        with _single_threaded_ops():
            threads = [threading.Thread(target=guarded, args=(k,), daemon=True) for k in range(1, self.workers)]
            for thread in threads:
                thread.start()
            guarded(0)
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Every ``(start, block)`` in order, in the calling thread (one up-cast buffer)."""
        return self._share(0, 1)

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """``a @ x`` (m x q) in the compute dtype."""
        if self.whole:
            return self.a @ x
        out = torch.empty(self.a.shape[0], x.shape[1], dtype=self.dtype, device=self.a.device)

        def body(_: int, share: Iterator[tuple[int, torch.Tensor]]) -> None:
            for start, block in share:
                torch.mm(block, x, out=out[start : start + block.shape[0]])

        self.run(body)
        return out

    def times_transposed(self, y: torch.Tensor) -> torch.Tensor:
        """``aᵀ @ y`` (n x q) in the compute dtype, summed over the row blocks."""
        if self.whole:
            return self.a.mT @ y
        n, q, chunks = self.a.shape[1], y.shape[1], self.chunks
        partial = torch.zeros(self.workers, chunks, q, n // chunks, dtype=self.dtype, device=self.a.device)

        def body(k: int, share: Iterator[tuple[int, torch.Tensor]]) -> None:
            acc = partial[k]
            for start, block in share:
                rows = block.shape[0]
                left = y[start : start + rows].mT.unsqueeze(0).expand(chunks, q, rows)
                acc.baddbmm_(left, block.view(rows, chunks, n // chunks).transpose(0, 1))  # Yᵀ_b·W_b per chunk

        self.run(body)
        return partial.sum(0).permute(1, 0, 2).reshape(q, n).mT


def streamed_products(a: torch.Tensor, block_elements: int | None = None, dtype: torch.dtype | None = None):
    """``(x ↦ a·x, y ↦ aᵀ·y, compute dtype)`` streamed over the rows of ``a``'s storage: a
    transposed view (``gradᵀ``) streams the rows of the matrix it views, with the two
    products swapped, so no layout is ever copied (any other strided ``a`` is made
    contiguous first). ``dtype``: the compute dtype (None: :func:`compute_dtype`)."""
    if not a.is_contiguous() and a.mT.is_contiguous():
        stream = RowStream(a.mT, block_elements, dtype)
        return stream.times_transposed, stream.times, stream.dtype
    stream = RowStream(a.contiguous(), block_elements, dtype)
    return stream.times, stream.times_transposed, stream.dtype
