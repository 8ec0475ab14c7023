"""Store a prompt's KV in the embedded default store, close it, reopen it, and get the KV back."""

import time

import numpy as np

import kvfs

# A Llama-3-8B-shaped namespace (32 layers, 8 KV heads, head_dim 128) with float16 KV.
spec = kvfs.KVSpec("example/llama-3-8b-shaped", num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16")
rng = np.random.default_rng(0)
prompt = rng.integers(0, 128_000, size=1000).tolist()
kv = rng.standard_normal(spec.chunk_shape(len(prompt)), dtype=np.float32).astype(np.float16)

with kvfs.open() as store:
    ns = store.namespace(spec)
    t0 = time.perf_counter()
    written = ns.put(prompt, kv)
    print(f"stored {len(prompt)} tokens ({kv.nbytes / 2**20:.0f} MiB of KV) as {written} new chunks "
          f"in {store.redacted_url} in {1e3 * (time.perf_counter() - t0):.1f} ms")

with kvfs.open() as store:  # a fresh open: everything comes back from disk and the catalog
    ns = store.namespace(spec)
    follow_up = prompt[:900] + rng.integers(0, 128_000, size=100).tolist()
    t0 = time.perf_counter()
    n = ns.lookup(follow_up)
    cached = ns.get(follow_up[:n])
    dt = time.perf_counter() - t0
    exact = np.array_equal(cached, kv[:, :, :n])
    print(f"a follow-up prompt of {len(follow_up)} tokens shares {n} with the stored one: "
          f"got their KV back in {1e3 * dt:.1f} ms, byte-exact: {exact}")
    for e in store.ls(spec.path):
        print(f"  {e.kind:9} {e.path}  {e.size / 2**20:.1f} MiB  {e.tokens} tokens")
