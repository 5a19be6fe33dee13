"""A bounded load test of `t2i serve` on loopback: 20 visitors generate at once, twice over; every request
finishes without error, through the queue, and the server's memory is flat afterwards."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

VISITORS = 20
ROUNDS = 2
SETTLE_MB = 40       # the second round may grow the server's memory by at most this


def _generate(url: str, k: int) -> tuple[str, float]:
    from gradio_client import Client
    client = Client(url, download_files=False, verbose=False)           # one visitor: its own session
    t0 = time.perf_counter()
    out = client.submit(f"a red circle {k % 3}", "", k, 2, 3.0, "default", None, 16, 1, False, False, "",
                        api_name="/generate").result(timeout=120)
    return out[-1], time.perf_counter() - t0


def _rss_mb(pid: int) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / 2**20


def test_twenty_concurrent_generates_finish_and_memory_is_flat(served):
    pytest.importorskip("gradio_client")
    pytest.importorskip("psutil")
    url, proc, start_s = served
    for k in range(3):                                                  # warm-up: allocator pools, caches
        assert "image(s)" in _generate(url, k)[0]
    memory = [_rss_mb(proc.pid)]
    walls = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(VISITORS) as pool:
            results = list(pool.map(lambda k: _generate(url, k), range(VISITORS)))
        walls.append(time.perf_counter() - t0)
        messages = [m for m, _ in results]
        assert all("1 image(s), 2 steps" in m for m in messages), [m for m in messages if "image(s)" not in m]
        time.sleep(1.0)
        memory.append(_rss_mb(proc.pid))
    latencies = sorted(s for _, s in results)
    median = latencies[len(latencies) // 2]
    print(f"\nserver ready in {start_s:.1f} s; {ROUNDS} rounds of {VISITORS} concurrent generates: "
          f"{', '.join(f'{w:.1f} s' for w in walls)} wall; last round's latency median {median:.2f} s, "
          f"max {latencies[-1]:.2f} s; server RSS after warm-up and each round: "
          f"{', '.join(f'{m:.0f}' for m in memory)} MiB")
    assert proc.poll() is None
    assert memory[-1] - memory[-2] < SETTLE_MB, memory
    assert start_s < 120
