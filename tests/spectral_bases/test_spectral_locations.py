"""The active set Omega: reproducible across processes, independent of every global RNG."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import selora.spectral_bases.spectrum as spectrum_module
from selora.spectral_bases import SparseSpectrum, coefficient_budget, spectral_locations

FAST = settings(max_examples=30, deadline=None, database=None)
ROOT = Path(__file__).resolve().parents[2]

CASES = [
    ((8, 768), 0.6, 0),
    ((32, 64), 0.9, 0),
    ((32, 64), 0.9, 17),
    ((64, 32), 0.3, 5),
    ((3, 5), 0.0, 2),
]

# Prints Omega for every case, after seeding every global RNG with argv[1].
CHILD = """
import json, random, sys
import numpy as np
import torch
torch.manual_seed(int(sys.argv[1])); np.random.seed(int(sys.argv[1])); random.seed(sys.argv[1])
from selora.spectral_bases import SparseSpectrum, spectral_locations
cases = json.loads(sys.argv[2])
out = []
for (m, n), ratio, seed in cases:
    spectrum = SparseSpectrum((m, n), "fft", sparse_ratio=ratio, seed=seed)
    direct = spectral_locations((m, n), spectrum.n_coeffs, seed)
    out.append([spectrum.indices.tolist(), direct.tolist()])
print(json.dumps(out))
"""


def start_fresh_process(torch_seed: int, hash_seed: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(torch_seed), json.dumps(CASES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def read_locations(process: subprocess.Popen[str]) -> list[list[list[int]]]:
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    parsed: list[list[list[int]]] = json.loads(stdout.strip().splitlines()[-1])
    return parsed


@pytest.fixture
def fresh_locations() -> Iterator[None]:
    """Empty the in-process cache so that locations are really drawn again."""
    spectrum_module._cached_locations.cache_clear()
    yield
    spectrum_module._cached_locations.cache_clear()


def test_identical_in_two_fresh_processes() -> None:
    # both run at once; they differ in every global seed and in the hash seed
    processes = [start_fresh_process(0, "0"), start_fresh_process(12345, "4242")]
    first, second = (read_locations(process) for process in processes)
    assert first == second
    for ((m, n), ratio, seed), (from_module, direct) in zip(CASES, first, strict=True):
        assert from_module == direct
        k = coefficient_budget((m, n), sparse_ratio=ratio)
        assert spectral_locations((m, n), k, seed).tolist() == direct  # and this process


def test_does_not_touch_any_global_rng(fresh_locations: None) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    spectral_locations((48, 96), 1000, seed=11)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    assert random.getstate() == python_state


def test_not_disturbed_by_torch_manual_seed(fresh_locations: None) -> None:
    draws = []
    for torch_seed in (0, 1, 987654321):
        spectrum_module._cached_locations.cache_clear()
        torch.manual_seed(torch_seed)
        np.random.seed(torch_seed)
        draws.append(spectral_locations((40, 50), 300, seed=4))
    assert all(torch.equal(draws[0], other) for other in draws[1:])


def test_spectrum_locations_do_not_depend_on_the_coefficient_draw() -> None:
    torch.manual_seed(0)
    a = SparseSpectrum((16, 40), "dct", sparse_ratio=0.7)
    torch.manual_seed(1)
    b = SparseSpectrum((16, 40), "dct", sparse_ratio=0.7)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.coefficients, b.coefficients)


def test_distinct_for_other_seeds_and_shapes() -> None:
    sets = {tuple(spectral_locations((32, 64), 200, seed=s).tolist()) for s in range(6)}
    assert len(sets) == 6
    flat = spectral_locations((32, 64), 200, seed=0)
    transposed = spectral_locations((64, 32), 200, seed=0)
    assert not torch.equal(flat, transposed)


@FAST
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**63 - 1),
)
def test_k_distinct_sorted_indices_in_range(m: int, n: int, fraction: float, seed: int) -> None:
    k = max(1, min(m * n, round(fraction * m * n)))
    idx = spectral_locations((m, n), k, seed)
    assert idx.dtype == torch.int64
    assert idx.shape == (k,)
    assert int(idx.min()) >= 0 and int(idx.max()) < m * n
    assert bool((idx[1:] > idx[:-1]).all())  # strictly increasing: sorted and distinct
    assert torch.equal(idx, spectral_locations((m, n), k, seed))


def test_all_positions_when_nothing_is_left_out() -> None:
    idx = spectral_locations((6, 7), 42, seed=9)
    assert idx.tolist() == list(range(42))


def test_shared_across_modules_of_the_same_shape() -> None:
    shape = (24, 40)
    modules = [
        SparseSpectrum(shape, name, sparse_ratio=0.8, seed=2, dtype=dtype)
        for name, dtype in [("fft", torch.float32), ("dct", torch.float64), ("coif", None)]
    ]
    modules.append(SparseSpectrum(shape, "haar", n_coeffs=modules[0].n_coeffs, seed=2))
    expected = spectral_locations(shape, modules[0].n_coeffs, seed=2)
    for module in modules:
        assert torch.equal(module.indices, expected)
    other_seed = SparseSpectrum(shape, "fft", sparse_ratio=0.8, seed=3)
    assert not torch.equal(other_seed.indices, expected)
    other_shape = SparseSpectrum((40, 24), "fft", sparse_ratio=0.8, seed=2)
    assert not torch.equal(other_shape.indices, expected)
