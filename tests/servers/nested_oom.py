"""A Python workload that runs out of GPU memory three calls deep, through the CUDA driver (the
test double) with ctypes, as a server allocating its KV cache would:

  nested_oom.py LIBCUDA BYTES [move-on]

serve() calls build_engine() calls allocate_kv_cache(), whose cuMemAlloc_v2 of BYTES fails.
By default allocate_kv_cache prints "oom <CUresult>" and stays there until stdin closes, so a
stack read after the failure is still the one that failed. With `move-on` the workload first
allocates 1 MiB (so the agent knows it before it fails), and after the failure returns at once,
as a server handling the error would, to wait in recover(), which prints "oom <CUresult>": only
a stack read at the failing call itself shows allocate_kv_cache. Prints the line numbers of the
calls first (a JSON line) so the test knows them.
"""

import ctypes
import inspect
import json
import sys

lib = ctypes.CDLL(sys.argv[1])
size = int(sys.argv[2])
move_on = sys.argv[3:] == ["move-on"]


def allocate_kv_cache(nbytes):
    ptr = ctypes.c_uint64()
    rc = lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes))  # ALLOC
    if not move_on:
        print(f"oom {rc}", flush=True); sys.stdin.read()  # HOLD
    return rc


def build_engine(nbytes):
    return allocate_kv_cache(nbytes)  # CALL_ALLOC


def recover(rc):
    print(f"oom {rc}", flush=True)
    sys.stdin.read()  # RECOVER


def serve(nbytes):
    rc = build_engine(nbytes)  # CALL_BUILD
    if move_on:
        recover(rc)


def line_of(marker):
    for i, text in enumerate(inspect.getsource(sys.modules[__name__]).splitlines(), 1):
        if text.rstrip().endswith(f"# {marker}"):
            return i
    raise SystemExit(f"no {marker}")


dev, ctx, warm = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
calls = [
    ("cuInit", lambda: lib.cuInit(0)),
    ("cuDeviceGet", lambda: lib.cuDeviceGet(ctypes.byref(dev), 0)),
    ("cuCtxCreate_v2", lambda: lib.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev)),
]
if move_on:
    calls.append(("cuMemAlloc_v2", lambda: lib.cuMemAlloc_v2(ctypes.byref(warm), ctypes.c_size_t(1 << 20))))
for call, run in calls:
    rc = run()
    if rc != 0:
        raise SystemExit(f"{call} failed: CUresult {rc}")
markers = ["ALLOC", "HOLD", "CALL_ALLOC", "CALL_BUILD", "CALL_SERVE", "RECOVER"]
print(json.dumps({m: line_of(m) for m in markers}), flush=True)
sys.stdin.readline()  # go
serve(size)  # CALL_SERVE
