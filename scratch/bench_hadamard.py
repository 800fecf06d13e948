import time, numpy as np, torch, functools
torch.set_num_threads(1)
def H(size, dtype):
    h = np.ones((1, 1), dtype=dtype)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    return h
def had(x, dims, lib="np"):
    rows, n = x.shape
    if lib == "np":
        y = (x.reshape(-1, dims[-1]) @ H(dims[-1], x.dtype)).reshape(rows, n)
        before = rows
        for size in dims[:-1]:
            after = n * rows // (before * size)
            y = np.matmul(H(size, x.dtype), y.reshape(before, size, after)); before *= size
        return y.reshape(rows, n)
    else:
        t = torch.from_numpy(x)
        hs = {s: torch.from_numpy(H(s, x.dtype)) for s in dims}
        y = (t.reshape(-1, dims[-1]) @ hs[dims[-1]]).reshape(rows, n)
        before = rows
        for size in dims[:-1]:
            after = n * rows // (before * size)
            y = torch.matmul(hs[size], y.reshape(before, size, after)); before *= size
        return y.reshape(rows, n).numpy()
rng = np.random.default_rng(0)
x64 = rng.normal(size=(128, 32768)); ref = had(x64, [32,32,32])
for dt in (np.float64, np.float32):
    x = x64.astype(dt)
    for dims in ([32,32,32],[8,8,8,8,8],[128,256],[16,16,128],[8,16,16,16]):
        for lib in ("np", "torch"):
            had(x, dims, lib)
            t = time.perf_counter()
            for _ in range(3): y = had(x, dims, lib)
            dt_s = (time.perf_counter()-t)/3
            print(dt.__name__, dims, lib, f"{dt_s*820/128:.3f}s per 820 rows", f"maxerr {np.abs(y-ref).max():.2e}")
