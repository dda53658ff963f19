"""Register a new spectral basis (the 2-D inverse DST-II) and train an adapter with it.

Run it with ``python docs/examples/custom_basis.py``; ``tests/demo/test_docs_examples.py``
runs it too, so the tutorial in ``docs/tutorial-custom-basis.md`` cannot rot.
Add ``--minilm`` to fine-tune all-MiniLM-L6-v2 on the demo task with the new
basis as well (a couple of minutes on a laptop CPU).
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
from torch import Tensor, nn

import selora
from selora import InverseTransform, SpectralAdapter, register_basis


# --8<-- [start:basis]
@functools.lru_cache(maxsize=32)
def dst2_matrix(n: int) -> Tensor:
    """Orthonormal DST-II matrix D (n x n), float64: the forward transform is x -> D x."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)  # frequency index
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)  # sample index
    d = math.sqrt(2.0 / n) * torch.sin(math.pi * (k + 1) * (2 * j + 1) / (2 * n))
    d[-1] /= math.sqrt(2.0)  # the last row has half the energy of the others
    return d


@register_basis("dst")
class SineTransform(InverseTransform):
    """Orthonormal 2-D inverse DST-II: M = D_m^T F D_n.

    Oracle: ``scipy.fft.idstn(F, type=2, norm="ortho")``.
    """

    orthonormal = True  # D is orthogonal, so the map preserves the Frobenius norm

    def inverse(self, spectrum: Tensor) -> Tensor:
        """Return D_m^T F D_n over the last two dimensions (float32 or float64)."""
        m, n = spectrum.shape[-2], spectrum.shape[-1]
        d_m = dst2_matrix(m).to(spectrum)  # same dtype and device as the input
        d_n = dst2_matrix(n).to(spectrum)
        return d_m.T @ spectrum @ d_n  # batched over any leading dimensions


# --8<-- [end:basis]


def check_against_oracle() -> None:
    """The contract every basis keeps: oracle agreement, linearity, shape, dtype, norm."""
    # --8<-- [start:check]
    import scipy.fft

    basis = selora.get_basis("dst")
    spectrum = torch.randn(6, 10, dtype=torch.float64)
    out = basis(spectrum)
    oracle = scipy.fft.idstn(spectrum.numpy(), type=2, norm="ortho")
    assert torch.allclose(out, torch.from_numpy(oracle), atol=1e-12)
    assert out.shape == spectrum.shape and out.dtype == spectrum.dtype
    assert torch.allclose(out.norm(), spectrum.norm())  # orthonormal
    assert basis(torch.randn(6, 10, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert "dst" in selora.list_bases()
    # --8<-- [end:check]


def train_toy(steps: int = 200, seed: int = 0) -> tuple[float, float]:
    """Fit a frozen two-layer network to a teacher with a low-rank weight change.

    Returns:
        The mean squared error before and after training.
    """
    # --8<-- [start:train]
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32))
    teacher = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32))
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():  # the teacher differs by a rank-4 change of its first layer
        teacher[0].weight += 0.3 * torch.randn(128, 4) @ torch.randn(4, 64) / 8

    adapter = SpectralAdapter(
        basis="dst", base="lora", r=8, sparse_ratio=0.5, target_modules=("0", "2"), seed=seed
    )
    selora.inject(student, adapter)  # wraps the two Linear layers, freezes the rest
    selora.print_trainable_parameters(student)

    x = torch.randn(256, 64)
    y = teacher(x).detach()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    before = nn.functional.mse_loss(student(x), y).item()
    for _ in range(steps):
        loss = nn.functional.mse_loss(student(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = nn.functional.mse_loss(student(x), y).item()
    print(f"MSE before {before:.5f}, after {after:.5f}")

    student.eval()
    with torch.no_grad():  # merging folds the update into the frozen weights
        adapted = student(x)
        selora.merge(student)
        assert torch.allclose(student(x), adapted, atol=1e-5)
    # --8<-- [end:train]
    return before, after


def finetune_minilm(max_train: int | None = None, epochs: int = 2) -> None:
    """Fine-tune all-MiniLM-L6-v2 on the demo task with the new basis, next to plain LoRA."""
    # --8<-- [start:minilm]
    from selora.demo import Method, SentimentTask, TrainConfig, format_table, run_grid, summarize

    task = SentimentTask(max_train=max_train)
    methods = [Method(basis=None), Method(basis="dst", sparse_ratio=0.6)]
    results = run_grid(task, methods, seeds=[0], config=TrainConfig(epochs=epochs))
    print(format_table(summarize(results)))
    # --8<-- [end:minilm]


def main() -> None:
    """Run the checks and the toy training (and the MiniLM fine-tune with ``--minilm``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minilm", action="store_true", help="also fine-tune all-MiniLM-L6-v2")
    parser.add_argument("--max-train", type=int, default=None, help="rows for --minilm")
    args = parser.parse_args()
    check_against_oracle()
    before, after = train_toy()
    assert after < 0.25 * before, (before, after)
    if args.minilm:
        finetune_minilm(args.max_train)


if __name__ == "__main__":
    main()
