"""Idle processes with many mappings, as JVMs, browsers and Python with many extensions have.

Usage: many_maps.py MAPPINGS PROCESSES. Maps MAPPINGS one-page anonymous regions with
alternating protections (so the kernel cannot merge them), forks PROCESSES children that
inherit them and wait, prints "ready", and kills its process group when stdin closes.
"""

import mmap
import os
import signal
import sys


def main() -> None:
    mappings, processes = int(sys.argv[1]), int(sys.argv[2])
    regions = []
    for i in range(mappings):
        prot = mmap.PROT_READ if i % 2 else mmap.PROT_READ | mmap.PROT_WRITE
        regions.append(mmap.mmap(-1, mmap.PAGESIZE, prot=prot))
    os.setpgid(0, 0)
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            signal.pause()
            os._exit(0)
        children.append(pid)
    print("ready", flush=True)
    sys.stdin.read()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
