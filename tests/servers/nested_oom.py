"""A Python workload that runs out of GPU memory three calls deep, through the CUDA driver (the
test double) with ctypes, as a server allocating its KV cache would:

  nested_oom.py LIBCUDA BYTES

serve() calls build_engine() calls allocate_kv_cache(), whose cuMemAlloc_v2 of BYTES fails;
it prints "oom <CUresult>" and stays in allocate_kv_cache until its stdin closes, so the stack
read after the failure is the one that failed. Prints the line numbers of the three calls
first (a JSON line) so the test knows them.
"""

import ctypes
import inspect
import json
import sys

lib = ctypes.CDLL(sys.argv[1])
size = int(sys.argv[2])


def allocate_kv_cache(nbytes):
    ptr = ctypes.c_uint64()
    rc = lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes))  # ALLOC
    print(f"oom {rc}", flush=True); sys.stdin.read()  # HOLD


def build_engine(nbytes):
    allocate_kv_cache(nbytes)  # CALL_ALLOC


def serve(nbytes):
    build_engine(nbytes)  # CALL_BUILD


def line_of(marker):
    for i, text in enumerate(inspect.getsource(sys.modules[__name__]).splitlines(), 1):
        if text.rstrip().endswith(f"# {marker}"):
            return i
    raise SystemExit(f"no {marker}")


dev, ctx = ctypes.c_int(), ctypes.c_void_p()
for call, rc in [
    ("cuInit", lib.cuInit(0)),
    ("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), 0)),
    ("cuCtxCreate_v2", lib.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev)),
]:
    if rc != 0:
        raise SystemExit(f"{call} failed: CUresult {rc}")
print(json.dumps({m: line_of(m) for m in ["ALLOC", "HOLD", "CALL_ALLOC", "CALL_BUILD", "CALL_SERVE"]}),
      flush=True)
sys.stdin.readline()  # go
serve(size)  # CALL_SERVE
