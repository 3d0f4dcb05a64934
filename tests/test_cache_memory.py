"""A streamed cache build, and training from the cache with `--stream`, run at bounded memory: their peak RSS is
flat in the number of samples, where the eager build's grows with its decoded images (benchmarks/bench_cache_memory.py;
figures in docs/cache.md)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N = 100
BOUND_MIB = 8.0  # what a streamed build may gain over 3N more samples: their ids (~200 B each, 60 KiB) plus allocator
# noise, which is of the order of one batch of decoded images (8 x 768 KiB = 6 MiB)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cache_memory", ROOT / "benchmarks" / "bench_cache_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_streamed_build_and_training_peak_rss_are_flat_in_n():
    """N and 4N samples of 512x512 images (768 KiB decoded each), each run in a fresh subprocess (its VmHWM):
    the streamed build's peak, and that of stage 1 trained from the cache with `--stream` over N and 4N samples,
    grow by less than BOUND_MIB (training also counts the cache pages it has read, about 10 KB a sample); the eager
    build's, which holds every decoded image, by more than twice that, so the measurement sees a run that holds its
    samples. Measured: streamed build 523.5 -> 527.9 MiB, streamed training 512.0 -> 515.3 MiB, eager build 854.6 ->
    906.2 MiB."""
    rows = _bench().measure(N, 4, 512, train=True)
    stream, eager, train = rows["build --stream"], rows["build"], rows["train --stream"]
    assert stream[4 * N] - stream[N] < BOUND_MIB, rows
    assert train[4 * N] - train[N] < BOUND_MIB, rows
    assert eager[4 * N] - eager[N] > 2 * BOUND_MIB, rows
    assert stream[4 * N] < eager[4 * N], rows
