"""Attention backends at diffusion shapes, and `auto` against the best of them (target:
within 5% at every shape). CUDA only."""
import pytest
import torch

import limner
from limner.attention import attention, preferred_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU")

# name -> (q shape [B, H, Lq, Dh], key length, key mask?)
SHAPES = {
    "sd15-64x64-self": ((2, 8, 4096, 40), 4096, False),   # SD 1.5 at 512 px, CFG batch
    "sd15-32x32-self": ((2, 8, 1024, 80), 1024, False),
    "sd15-64x64-cross": ((2, 8, 4096, 40), 77, True),     # text cross-attention with padding
    "dit-xl2-256": ((8, 16, 256, 72), 256, False),        # DiT-XL/2 at 256 px
    "limner-shapes-32": ((12, 4, 256, 32), 256, False),    # configs/shapes: 32x32 at level 1
}
BACKENDS = ("sdpa", "xformers", "triton", "math", "auto")


def _inputs(name):
    (b, h, lq, dh), lk, masked = SHAPES[name]
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(b, h, lq, dh, device="cuda", dtype=torch.float16, generator=gen)
    k, v = (torch.randn(b, h, lk, dh, device="cuda", dtype=torch.float16, generator=gen) for _ in range(2))
    mask = None
    if masked:
        mask = (
            torch.arange(lk, device="cuda")[None, None, None, :]
            < torch.tensor([20, 77], device="cuda")[:b, None, None, None]
        )
    return q, k, v, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(benchmark, shape, backend, sync, tmp_path, monkeypatch):
    if backend == "xformers":
        pytest.importorskip("xformers.ops")
    monkeypatch.setenv("LIMNER_CACHE_DIR", str(tmp_path))  # auto measures afresh, here, not from a cache
    q, k, v, mask = _inputs(shape)
    with torch.no_grad():
        chosen = preferred_backend(q, k, v, mask) if backend == "auto" else backend
        if backend != "auto" and backend != "math":
            want = attention(q, k, v, mask, backend="math")
            assert (attention(q, k, v, mask, backend=backend) - want).abs().max() < 2e-2

        def run():
            attention(q, k, v, mask, backend=backend)
            sync()

        run()
        benchmark(run)
    benchmark.extra_info.update(group="attention", shape=shape, backend=backend, chosen=chosen,
                                dims=list(q.shape) + [k.shape[2]])


@pytest.fixture(autouse=True)
def _fresh_tables():
    """Each auto benchmark measures with its own table (the module keeps one per GPU)."""
    import limner.attention as attn
    attn._tables.clear()
    yield
    attn._tables.clear()
    limner.registry.set_registry(None)
