/*
 * libcuda.c - a test double for the NVIDIA CUDA driver (libcuda.so.1).
 *
 * Exports a subset of the real CUDA driver API with the real C ABI so that
 * unmodified clients (e.g. the Rust `cudarc` crate) can load it with dlopen and
 * so that uprobes can be attached to the real symbol names.  No GPU is needed:
 * devices, contexts, streams, pools and device memory are simulated.
 *
 * Build: gcc -O2 -shared -fPIC -Wl,-soname,libcuda.so.1 -o libcuda.so.1 libcuda.c -lpthread
 *        add -DOMIT_VMM to leave out the virtual memory management symbols
 *        (cuMemCreate, cuMemRelease, cuMemMap, cuMemUnmap, cuMemAddressReserve,
 *        cuMemAddressFree) and cuMemAllocFromPoolAsync, like an older driver.
 *
 * Environment (read once, by the first cuInit):
 *   FAKEGPU_COUNT  number of devices (default 1, max 64)
 *   FAKEGPU_MEM    bytes of memory per device (default 1073741824);
 *                              decimal or 0x hex, optional K/M/G/T (binary) suffix
 *   FAKEGPU_STATE  path of a shared state file; when set, the
 *                              per-device used-bytes counters live in that file
 *                              (mmap'd MAP_SHARED, updated atomically), so that
 *                              several processes share the devices' memory.
 *                              Without it the counters are private to the process.
 *   FAKEGPU_ALLOC_RESULTS FIRST:COUNT: the first COUNT calls of cuMemAlloc_v2 (with a
 *                              current context) return FIRST, FIRST+1, ... and allocate
 *                              nothing, as a library returning codes no driver defines
 *                              would; later calls behave normally.  Call them with a
 *                              u32 result (the workload's `rawalloc` step): a Rust enum
 *                              cannot hold such values.
 *
 * Shared state file layout (version 1, little endian, 139328 bytes; created and
 * zero-extended under flock(LOCK_EX) by the first process that opens it; every
 * counter is a naturally aligned 64-bit integer updated with __atomic ops):
 *
 *   offset  size  field
 *   0       8     magic          ASCII "ISFAKGPU" (no terminator)
 *   8       4     version        u32 = 1
 *   12      4     max_devices    u32 = 64 (device slots in the file)
 *   16      4     device_count   u32, highest FAKEGPU_COUNT seen (atomic max)
 *   20      4     dev_slot_size  u32 = 64
 *   24      4     proc_offset    u32 = 4160 (offset of the process table)
 *   28      4     max_procs      u32 = 256
 *   32      4     proc_slot_size u32 = 528
 *   36      28    reserved       zero
 *   64 + 64*d     device slot d (0 <= d < 64):
 *     +0    8     used_bytes     u64, device memory charged by all live processes
 *     +8    8     total_bytes    u64, FAKEGPU_MEM of the last process to init
 *     +16   48    reserved       zero
 *   4160 + 528*i  process slot i (0 <= i < 256), pid 0 = free:
 *     +0    4     pid            u32
 *     +4    4     ctx_mask       u32, bit d set once the process created
 *                                  (cuCtxCreate_v2) or retained
 *                                  (cuDevicePrimaryCtxRetain) a context on
 *                                  device d (d < 32; sticky until the slot is
 *                                  freed; set with __atomic_fetch_or)
 *     +8    8     start_time     u64, field 22 of /proc/<pid>/stat (guards pid reuse)
 *     +16   8*64  used[d]        u64, bytes this process holds on device d
 *
 * "Charged" allocations: cuMemAlloc_v2, cuMemAllocPitch_v2 (pitch*height),
 * cuMemAllocManaged, cuMemAllocAsync, cuMemAllocFromPoolAsync and cuMemCreate
 * (physical memory).  Address reservations and pinned host memory charge
 * nothing.  Each charge adds to device slot used_bytes (CAS against the limit)
 * and to the process's used[d].  Like a real driver, a process's memory is
 * released when it exits: a library destructor releases it on normal exit;
 * for a killed process, the next cuInit of any process (under flock) "reaps"
 * slots whose pid is dead (or whose start_time differs), subtracting their
 * used[d] from used_bytes and clearing the slot.  A reader (e.g. an NVML
 * double) should report used_bytes minus used[d] of dead slots (or reap them
 * the same way, under flock), and can report per-process usage from the
 * table; ctx_mask tells which devices a process has a context on (what
 * NVML's running-compute-process list shows; tests/nvml-double reads it).  Each process checks allocations against its own
 * FAKEGPU_MEM.  Delete the file to reset everything.
 *
 * Semantics in brief: device allocations charge the device of the calling
 * thread's current context (cuMemAllocAsync: the stream's context if a stream
 * is given; cuMemAllocFromPoolAsync: the pool's device; cuMemCreate:
 * prop->location.id).  Size 0 -> CUDA_ERROR_INVALID_VALUE; not enough free
 * memory -> CUDA_ERROR_OUT_OF_MEMORY (out pointer untouched); no current
 * context -> CUDA_ERROR_INVALID_CONTEXT; cuInit not called ->
 * CUDA_ERROR_NOT_INITIALIZED; freeing an unknown pointer/handle ->
 * CUDA_ERROR_INVALID_VALUE.  Physical memory of cuMemCreate is returned by
 * cuMemRelease (even if still mapped).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define API __attribute__((visibility("default"), noinline, used))

/* First statement of every exported function.  Taking the frame address
 * forces a frame-pointer prologue (push %rbp; mov %rsp,%rbp) at the very top
 * of the function even in leaf functions and defeats shrink-wrapping, so the
 * "push" build really starts every exported symbol with push %rbp (and the
 * other builds keep the same body after their first instruction). */
#define ENTRY() __asm__ volatile("" : : "r"(__builtin_frame_address(0)))

/* ------------------------------------------------------------------ types */

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct fake_ctx *CUcontext;
typedef struct fake_stream *CUstream;
typedef struct fake_pool *CUmemoryPool;
typedef struct { char bytes[16]; } CUuuid;

typedef struct {
    unsigned int type; /* CUmemLocationType: 1 = device */
    int id;
} CUmemLocation;

typedef struct {
    unsigned int type;                 /* CUmemAllocationType: 1 = pinned */
    unsigned int requestedHandleTypes; /* CUmemAllocationHandleType */
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;

typedef struct {
    unsigned int allocType;
    unsigned int handleTypes;
    CUmemLocation location;
    void *win32SecurityAttributes;
    size_t maxSize;
    unsigned short usage;
    unsigned char reserved[54];
} CUmemPoolProps;

_Static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp layout");
_Static_assert(offsetof(CUmemAllocationProp, location) == 8, "location offset");

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_OPERATING_SYSTEM = 304,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

/* ------------------------------------------------------------------ config / shared state */

#define MAX_DEVICES 64
#define MAX_PROCS 256
#define STATE_HEADER 64
#define SLOT_SIZE 64
#define PROC_OFFSET (STATE_HEADER + SLOT_SIZE * MAX_DEVICES)
#define PROC_SLOT_SIZE (16 + 8 * MAX_DEVICES)
#define STATE_SIZE (PROC_OFFSET + PROC_SLOT_SIZE * MAX_PROCS)
#define GRANULARITY (2ull << 20)
#define PITCH_ALIGN 512ull
#define PTR_ALIGN 512ull

struct state_header {
    char magic[8];
    uint32_t version;
    uint32_t max_devices;
    uint32_t device_count;
    uint32_t slot_size;
    uint32_t proc_offset;
    uint32_t max_procs;
    uint32_t proc_slot_size;
    uint8_t reserved[28];
};
struct state_slot {
    uint64_t used_bytes;
    uint64_t total_bytes;
    uint64_t reserved[6];
};
struct proc_slot {
    uint32_t pid;
    uint32_t ctx_mask; /* bit d: context created/retained on device d (d < 32) */
    uint64_t start_time;
    uint64_t used[MAX_DEVICES];
};
_Static_assert(sizeof(struct state_header) == STATE_HEADER, "header size");
_Static_assert(sizeof(struct state_slot) == SLOT_SIZE, "slot size");
_Static_assert(sizeof(struct proc_slot) == PROC_SLOT_SIZE, "proc slot size");
_Static_assert(STATE_SIZE == 139328, "state file size");

static int g_initialized;
static CUresult g_init_result = CUDA_SUCCESS;
static pthread_once_t g_init_once = PTHREAD_ONCE_INIT;
static int g_device_count = 1;
static uint64_t g_device_mem = 1073741824ull;
static struct state_slot g_private_slots[MAX_DEVICES];
static struct state_slot *g_slots = g_private_slots;
static struct proc_slot *g_procs;  /* process table of the shared file, or NULL */
static struct proc_slot *g_myproc; /* this process's slot, or NULL */
static int g_state_fd = -1;
static uint32_t g_forced_first; /* FAKEGPU_ALLOC_RESULTS */
static uint64_t g_forced_count;
static uint64_t g_forced_next;

static uint64_t env_u64(const char *name, uint64_t dflt)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    char *end = NULL;
    unsigned long long x = strtoull(v, &end, 0);
    if (end == v)
        return dflt;
    switch (*end) { /* optional binary suffix: K, M, G, T */
    case 'k': case 'K': x <<= 10; break;
    case 'm': case 'M': x <<= 20; break;
    case 'g': case 'G': x <<= 30; break;
    case 't': case 'T': x <<= 40; break;
    default: break;
    }
    return x;
}

/* Field 22 (starttime) of /proc/<pid>/stat; 0 if the process does not exist or
 * is a zombie (it has exited; a real driver has released its memory by then). */
static uint64_t proc_start_time(uint32_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return 0;
    /* after ") " comes field 3 (state); skip to field 22 */
    if (p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'))
        return 0;
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

/* Release the charges of dead processes.  Caller holds the file lock. */
static void reap_dead(void)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc_slot *ps = &g_procs[i];
        uint32_t pid = __atomic_load_n(&ps->pid, __ATOMIC_ACQUIRE);
        if (!pid)
            continue;
        int alive = ps->start_time ? proc_start_time(pid) == ps->start_time
                                   : (kill((pid_t)pid, 0) == 0 || errno == EPERM);
        if (alive)
            continue;
        for (int d = 0; d < MAX_DEVICES; d++) {
            uint64_t u = __atomic_exchange_n(&ps->used[d], 0, __ATOMIC_ACQ_REL);
            if (u)
                __atomic_sub_fetch(&g_slots[d].used_bytes, u, __ATOMIC_ACQ_REL);
        }
        __atomic_store_n(&ps->ctx_mask, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&ps->pid, 0, __ATOMIC_RELEASE);
    }
}

static int open_shared_state(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        fprintf(stderr, "libcuda double: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX) != 0) {
        close(fd);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (st.st_size < STATE_SIZE && ftruncate(fd, STATE_SIZE) != 0)) {
        fprintf(stderr, "libcuda double: cannot size %s: %s\n", path, strerror(errno));
        flock(fd, LOCK_UN);
        close(fd);
        return -1;
    }
    void *map = mmap(NULL, STATE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        fprintf(stderr, "libcuda double: cannot mmap %s: %s\n", path, strerror(errno));
        flock(fd, LOCK_UN);
        close(fd);
        return -1;
    }
    struct state_header *h = map;
    static const char zero[8];
    if (memcmp(h->magic, zero, 8) == 0) {
        h->version = 1;
        h->max_devices = MAX_DEVICES;
        h->slot_size = SLOT_SIZE;
        h->proc_offset = PROC_OFFSET;
        h->max_procs = MAX_PROCS;
        h->proc_slot_size = PROC_SLOT_SIZE;
        memcpy(h->magic, "ISFAKGPU", 8);
    } else if (memcmp(h->magic, "ISFAKGPU", 8) != 0 || h->version != 1 ||
               h->proc_offset != PROC_OFFSET || h->max_procs != MAX_PROCS) {
        fprintf(stderr, "libcuda double: %s is not a version 1 state file\n", path);
        munmap(map, STATE_SIZE);
        flock(fd, LOCK_UN);
        close(fd);
        return -1;
    }
    uint32_t seen = __atomic_load_n(&h->device_count, __ATOMIC_RELAXED);
    while (seen < (uint32_t)g_device_count &&
           !__atomic_compare_exchange_n(&h->device_count, &seen, (uint32_t)g_device_count, 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    g_slots = (struct state_slot *)((char *)map + STATE_HEADER);
    g_procs = (struct proc_slot *)((char *)map + PROC_OFFSET);
    reap_dead();
    uint32_t me = (uint32_t)getpid();
    for (int i = 0; i < MAX_PROCS; i++) {
        if (g_procs[i].pid == 0) {
            g_myproc = &g_procs[i];
            memset(g_myproc->used, 0, sizeof(g_myproc->used));
            __atomic_store_n(&g_myproc->ctx_mask, 0, __ATOMIC_RELAXED);
            g_myproc->start_time = proc_start_time(me);
            __atomic_store_n(&g_myproc->pid, me, __ATOMIC_RELEASE);
            break;
        }
    }
    if (!g_myproc)
        fprintf(stderr, "libcuda double: process table of %s is full; this process's memory "
                        "will not be released at exit\n", path);
    flock(fd, LOCK_UN);
    g_state_fd = fd; /* kept for the exit-time release */
    return 0;
}

/* Like a real driver: release this process's device memory when it exits. */
__attribute__((destructor)) static void release_at_exit(void)
{
    if (!g_myproc || g_myproc->pid != (uint32_t)getpid())
        return;
    if (g_state_fd >= 0)
        flock(g_state_fd, LOCK_EX);
    for (int d = 0; d < MAX_DEVICES; d++) {
        uint64_t u = __atomic_exchange_n(&g_myproc->used[d], 0, __ATOMIC_ACQ_REL);
        if (u)
            __atomic_sub_fetch(&g_slots[d].used_bytes, u, __ATOMIC_ACQ_REL);
    }
    __atomic_store_n(&g_myproc->ctx_mask, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_myproc->pid, 0, __ATOMIC_RELEASE);
    g_myproc = NULL;
    if (g_state_fd >= 0)
        flock(g_state_fd, LOCK_UN);
}

static void do_init(void)
{
    uint64_t n = env_u64("FAKEGPU_COUNT", 1);
    if (n > MAX_DEVICES)
        n = MAX_DEVICES;
    g_device_count = (int)n;
    g_device_mem = env_u64("FAKEGPU_MEM", 1073741824ull);
    const char *forced = getenv("FAKEGPU_ALLOC_RESULTS");
    if (forced && *forced) {
        char *end = NULL;
        unsigned long long first = strtoull(forced, &end, 0);
        if (end && *end == ':') {
            g_forced_first = (uint32_t)first;
            g_forced_count = strtoull(end + 1, NULL, 0);
        }
    }
    const char *path = getenv("FAKEGPU_STATE");
    if (path && *path && open_shared_state(path) != 0) {
        g_init_result = CUDA_ERROR_OPERATING_SYSTEM;
        return;
    }
    for (int i = 0; i < g_device_count; i++)
        __atomic_store_n(&g_slots[i].total_bytes, g_device_mem, __ATOMIC_RELAXED);
    __atomic_store_n(&g_initialized, 1, __ATOMIC_RELEASE);
}

static inline int initialized(void) { return __atomic_load_n(&g_initialized, __ATOMIC_ACQUIRE); }
static inline int valid_device(int dev) { return dev >= 0 && dev < g_device_count; }

static int charge(int dev, uint64_t size)
{
    struct state_slot *s = &g_slots[dev];
    uint64_t used = __atomic_load_n(&s->used_bytes, __ATOMIC_RELAXED);
    do {
        if (size > g_device_mem || used > g_device_mem - size)
            return 0;
    } while (!__atomic_compare_exchange_n(&s->used_bytes, &used, used + size, 1, __ATOMIC_ACQ_REL,
                                          __ATOMIC_RELAXED));
    if (g_myproc)
        __atomic_add_fetch(&g_myproc->used[dev], size, __ATOMIC_RELAXED);
    return 1;
}

/* Record in the shared process table that this process has a context on dev. */
static void mark_ctx(int dev)
{
    if (g_myproc && dev >= 0 && dev < 32)
        __atomic_fetch_or(&g_myproc->ctx_mask, 1u << dev, __ATOMIC_RELEASE);
}

static void uncharge(int dev, uint64_t size)
{
    if (g_myproc)
        __atomic_sub_fetch(&g_myproc->used[dev], size, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&g_slots[dev].used_bytes, size, __ATOMIC_ACQ_REL);
}

/* ------------------------------------------------------------------ contexts, streams, pools */

#define CTX_MAGIC 0x43545846u  /* "FXTC" */
#define STREAM_MAGIC 0x53545246u
#define POOL_MAGIC 0x4c4f4f50u
#define CTX_STACK_MAX 32

struct fake_ctx {
    uint32_t magic;
    int device;
    int primary;
    unsigned int flags;
    int refcount; /* primary contexts: retain count */
};
struct fake_stream {
    uint32_t magic;
    struct fake_ctx *ctx;
    unsigned int flags;
};
struct fake_pool {
    uint32_t magic;
    int device;
    int is_default;
};

static struct fake_ctx g_primary[MAX_DEVICES];
static struct fake_pool g_default_pool[MAX_DEVICES];
static pthread_mutex_t g_ctx_lock = PTHREAD_MUTEX_INITIALIZER;

static __thread struct fake_ctx *t_stack[CTX_STACK_MAX];
static __thread int t_depth;

static inline struct fake_ctx *current_ctx(void)
{
    return t_depth > 0 ? t_stack[t_depth - 1] : NULL;
}
static inline int valid_ctx(const struct fake_ctx *c) { return c && c->magic == CTX_MAGIC; }
static inline int valid_stream(const struct fake_stream *s) { return s && s->magic == STREAM_MAGIC; }
static inline int special_stream(const void *s)
{
    /* NULL (legacy default), CU_STREAM_LEGACY (0x1), CU_STREAM_PER_THREAD (0x2) */
    return (uintptr_t)s <= 2;
}

/* ------------------------------------------------------------------ allocation tables */

enum { K_DEVICE = 1, K_HANDLE = 2, K_RESERVE = 3, K_MAPPING = 4, K_HOST = 5 };

struct entry {
    uint64_t key; /* 0 = empty */
    uint64_t size;
    int32_t device;
    int32_t kind;
};
struct table {
    struct entry *e;
    size_t cap; /* power of two */
    size_t count;
};

static pthread_mutex_t g_mem_lock = PTHREAD_MUTEX_INITIALIZER;
static struct table g_dev_tab, g_host_tab;
static uint64_t g_dev_bump[MAX_DEVICES];
#ifndef OMIT_VMM
static struct table g_handle_tab, g_resv_tab, g_map_tab;
static uint64_t g_resv_bump;
static uint64_t g_next_handle = 1;
#endif

static inline size_t hash_key(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (size_t)k;
}

static struct entry *tab_find(struct table *t, uint64_t key)
{
    if (!t->cap || !key)
        return NULL;
    size_t mask = t->cap - 1;
    for (size_t i = hash_key(key) & mask;; i = (i + 1) & mask) {
        if (t->e[i].key == key)
            return &t->e[i];
        if (t->e[i].key == 0)
            return NULL;
    }
}

static int tab_insert(struct table *t, uint64_t key, uint64_t size, int device, int kind);

static int tab_grow(struct table *t)
{
    struct table n = {0};
    n.cap = t->cap ? t->cap * 2 : 1024;
    n.e = calloc(n.cap, sizeof(struct entry));
    if (!n.e)
        return 0;
    for (size_t i = 0; i < t->cap; i++)
        if (t->e[i].key)
            tab_insert(&n, t->e[i].key, t->e[i].size, t->e[i].device, t->e[i].kind);
    free(t->e);
    *t = n;
    return 1;
}

static int tab_insert(struct table *t, uint64_t key, uint64_t size, int device, int kind)
{
    if ((t->count + 1) * 10 > t->cap * 7 && !tab_grow(t))
        return 0;
    size_t mask = t->cap - 1;
    size_t i = hash_key(key) & mask;
    while (t->e[i].key != 0)
        i = (i + 1) & mask;
    t->e[i] = (struct entry){key, size, device, kind};
    t->count++;
    return 1;
}

/* Linear-probing removal with backward shift (no tombstones). */
static void tab_remove(struct table *t, struct entry *slot)
{
    size_t mask = t->cap - 1;
    size_t i = (size_t)(slot - t->e);
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (t->e[j].key == 0)
            break;
        size_t home = hash_key(t->e[j].key) & mask;
        /* move e[j] into hole i if its home is not cyclically in (i, j] */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            t->e[i] = t->e[j];
            i = j;
        }
    }
    t->e[i].key = 0;
    t->count--;
}

/* Fake device addresses: 0x7e0000000000 + (dev << 40) + bump, 512-aligned.  The
 * bump wraps inside the device's 1 TiB window; live addresses are skipped. */
#define DEV_BASE 0x7e0000000000ull
#define DEV_WINDOW (1ull << 40)
#define RESV_BASE 0x7a0000000000ull
#define RESV_WINDOW (1ull << 42)

static inline uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

static uint64_t next_dev_addr(int dev, uint64_t size)
{
    uint64_t step = round_up(size ? size : 1, PTR_ALIGN);
    if (step >= DEV_WINDOW)
        step = PTR_ALIGN;
    for (;;) {
        uint64_t off = g_dev_bump[dev];
        if (off + step > DEV_WINDOW)
            off = 0;
        g_dev_bump[dev] = off + step;
        uint64_t addr = DEV_BASE + ((uint64_t)dev << 40) + off;
        if (!tab_find(&g_dev_tab, addr))
            return addr;
    }
}

/* Common device allocation path: charge + record.  Caller validated args. */
static CUresult dev_alloc(CUdeviceptr *dptr, uint64_t size, int dev)
{
    if (!charge(dev, size))
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_mem_lock);
    uint64_t addr = next_dev_addr(dev, size);
    int ok = tab_insert(&g_dev_tab, addr, size, dev, K_DEVICE);
    pthread_mutex_unlock(&g_mem_lock);
    if (!ok) {
        uncharge(dev, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *dptr = addr;
    return CUDA_SUCCESS;
}

static CUresult dev_free(CUdeviceptr p)
{
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mem_lock);
    struct entry *e = tab_find(&g_dev_tab, p);
    if (!e) {
        pthread_mutex_unlock(&g_mem_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    int dev = e->device;
    uint64_t size = e->size;
    tab_remove(&g_dev_tab, e);
    pthread_mutex_unlock(&g_mem_lock);
    uncharge(dev, size);
    return CUDA_SUCCESS;
}

/* Device of the current context or an error code (negative). */
static inline int current_device(CUresult *err)
{
    if (!initialized()) {
        *err = CUDA_ERROR_NOT_INITIALIZED;
        return -1;
    }
    struct fake_ctx *c = current_ctx();
    if (!valid_ctx(c)) {
        *err = CUDA_ERROR_INVALID_CONTEXT;
        return -1;
    }
    return c->device;
}

/* ------------------------------------------------------------------ init / version / errors */

API CUresult cuInit(unsigned int flags)
{
    ENTRY();
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_once(&g_init_once, do_init);
    return g_init_result;
}

API CUresult cuDriverGetVersion(int *version)
{
    ENTRY();
    if (!version)
        return CUDA_ERROR_INVALID_VALUE;
    *version = 12080;
    return CUDA_SUCCESS;
}

struct err_desc {
    int code;
    const char *name;
    const char *text;
};
static const struct err_desc g_errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {202, "CUDA_ERROR_CONTEXT_ALREADY_CURRENT", "context already current"},
    {205, "CUDA_ERROR_MAP_FAILED", "mapping of buffer object failed"},
    {206, "CUDA_ERROR_UNMAP_FAILED", "unmapping of buffer object failed"},
    {208, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped"},
    {211, "CUDA_ERROR_NOT_MAPPED", "resource not mapped"},
    {304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static const struct err_desc *find_error(int code)
{
    for (size_t i = 0; i < sizeof(g_errors) / sizeof(g_errors[0]); i++)
        if (g_errors[i].code == code)
            return &g_errors[i];
    return NULL;
}

API CUresult cuGetErrorName(CUresult error, const char **pStr)
{
    ENTRY();
    if (!pStr)
        return CUDA_ERROR_INVALID_VALUE;
    const struct err_desc *d = find_error(error);
    if (!d) {
        *pStr = NULL;
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pStr = d->name;
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorString(CUresult error, const char **pStr)
{
    ENTRY();
    if (!pStr)
        return CUDA_ERROR_INVALID_VALUE;
    const struct err_desc *d = find_error(error);
    if (!d) {
        *pStr = NULL;
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pStr = d->text;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ devices */

API CUresult cuDeviceGetCount(int *count)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!count)
        return CUDA_ERROR_INVALID_VALUE;
    *count = g_device_count;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(ordinal))
        return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!name || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "Inferscope Fake GPU %d", dev);
    return CUDA_SUCCESS;
}

static CUresult get_uuid(CUuuid *uuid, CUdevice dev)
{
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!uuid)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    /* GPU-1f5c0000-0000-4000-8000-0000000000NN */
    static const unsigned char base[16] = {0x1f, 0x5c, 0, 0, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 0};
    memcpy(uuid->bytes, base, 16);
    uuid->bytes[15] = (char)dev;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { ENTRY(); return get_uuid(uuid, dev); }
API CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) { ENTRY(); return get_uuid(uuid, dev); }

API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!bytes)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    *bytes = g_device_mem;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int *pi, int attrib, CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pi)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    int v;
    switch (attrib) {
    case 1: v = 1024; break;              /* MAX_THREADS_PER_BLOCK */
    case 2: case 3: v = 1024; break;      /* MAX_BLOCK_DIM_X/Y */
    case 4: v = 64; break;                /* MAX_BLOCK_DIM_Z */
    case 5: v = 2147483647; break;        /* MAX_GRID_DIM_X */
    case 6: case 7: v = 65535; break;     /* MAX_GRID_DIM_Y/Z */
    case 8: v = 49152; break;             /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 9: v = 65536; break;             /* TOTAL_CONSTANT_MEMORY */
    case 10: v = 32; break;               /* WARP_SIZE */
    case 11: v = 2147483647; break;       /* MAX_PITCH */
    case 12: v = 65536; break;            /* MAX_REGISTERS_PER_BLOCK */
    case 13: v = 1980000; break;          /* CLOCK_RATE kHz */
    case 14: v = 512; break;              /* TEXTURE_ALIGNMENT */
    case 15: v = 1; break;                /* GPU_OVERLAP */
    case 16: v = 132; break;              /* MULTIPROCESSOR_COUNT */
    case 19: v = 1; break;                /* CAN_MAP_HOST_MEMORY */
    case 20: v = 0; break;                /* COMPUTE_MODE default */
    case 31: v = 1; break;                /* CONCURRENT_KERNELS */
    case 32: v = 1; break;                /* ECC_ENABLED */
    case 33: v = 0x10 + dev; break;       /* PCI_BUS_ID */
    case 34: v = 0; break;                /* PCI_DEVICE_ID */
    case 36: v = 2619000; break;          /* MEMORY_CLOCK_RATE kHz */
    case 37: v = 5120; break;             /* GLOBAL_MEMORY_BUS_WIDTH */
    case 38: v = 52428800; break;         /* L2_CACHE_SIZE */
    case 39: v = 2048; break;             /* MAX_THREADS_PER_MULTIPROCESSOR */
    case 40: v = 3; break;                /* ASYNC_ENGINE_COUNT */
    case 41: v = 1; break;                /* UNIFIED_ADDRESSING */
    case 50: v = 0; break;                /* PCI_DOMAIN_ID */
    case 75: v = 9; break;                /* COMPUTE_CAPABILITY_MAJOR */
    case 76: v = 0; break;                /* COMPUTE_CAPABILITY_MINOR */
    case 78: v = 1; break;                /* STREAM_PRIORITIES_SUPPORTED */
    case 81: v = 233472; break;           /* MAX_SHARED_MEMORY_PER_MULTIPROCESSOR */
    case 82: v = 65536; break;            /* MAX_REGISTERS_PER_MULTIPROCESSOR */
    case 83: v = 1; break;                /* MANAGED_MEMORY */
    case 89: v = 1; break;                /* CONCURRENT_MANAGED_ACCESS */
    case 95: v = 1; break;                /* COOPERATIVE_LAUNCH */
    case 97: v = 232448; break;           /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    case 102:                             /* VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED */
#ifdef OMIT_VMM
        v = 0;
#else
        v = 1;
#endif
        break;
    case 103: v = 1; break;               /* HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED */
    case 106: v = 32; break;              /* MAX_BLOCKS_PER_MULTIPROCESSOR */
    case 115: v = 1; break;               /* MEMORY_POOLS_SUPPORTED */
    case 119: v = 1; break;               /* MEMPOOL_SUPPORTED_HANDLE_TYPES (posix fd) */
    default:
        if (attrib <= 0 || attrib >= 1000)
            return CUDA_ERROR_INVALID_VALUE;
        v = 0;
        break;
    }
    *pi = v;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ primary contexts */

static struct fake_ctx *primary_of(int dev)
{
    struct fake_ctx *c = &g_primary[dev];
    if (c->magic != CTX_MAGIC) {
        c->device = dev;
        c->primary = 1;
        c->magic = CTX_MAGIC;
    }
    return c;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_ctx_lock);
    struct fake_ctx *c = primary_of(dev);
    c->refcount++;
    pthread_mutex_unlock(&g_ctx_lock);
    mark_ctx(dev);
    *pctx = c;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_ctx_lock);
    struct fake_ctx *c = primary_of(dev);
    if (c->refcount > 0)
        c->refcount--;
    else
        r = CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_unlock(&g_ctx_lock);
    return r;
}

API CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!flags || !active)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_ctx_lock);
    struct fake_ctx *c = primary_of(dev);
    *flags = c->flags;
    *active = c->refcount > 0;
    pthread_mutex_unlock(&g_ctx_lock);
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_ctx_lock);
    primary_of(dev)->flags = flags;
    pthread_mutex_unlock(&g_ctx_lock);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ contexts */

API CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    if (t_depth >= CTX_STACK_MAX)
        return CUDA_ERROR_INVALID_VALUE;
    struct fake_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return CUDA_ERROR_OUT_OF_MEMORY;
    c->magic = CTX_MAGIC;
    c->device = dev;
    c->flags = flags;
    t_stack[t_depth++] = c;
    mark_ctx(dev);
    *pctx = c;
    return CUDA_SUCCESS;
}

API CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_ctx(ctx) || ctx->primary)
        return CUDA_ERROR_INVALID_CONTEXT;
    /* remove from this thread's stack */
    int j = 0;
    for (int i = 0; i < t_depth; i++)
        if (t_stack[i] != ctx)
            t_stack[j++] = t_stack[i];
    t_depth = j;
    /* Other threads may still reference it: mark dead, never free. */
    ctx->magic = 0;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(CUcontext ctx)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!ctx) {
        if (t_depth > 0)
            t_depth--;
        return CUDA_SUCCESS;
    }
    if (!valid_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth == 0)
        t_depth = 1;
    t_stack[t_depth - 1] = ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    *pctx = current_ctx();
    return CUDA_SUCCESS;
}

API CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth >= CTX_STACK_MAX)
        return CUDA_ERROR_INVALID_VALUE;
    t_stack[t_depth++] = ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (t_depth == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    struct fake_ctx *c = t_stack[--t_depth];
    if (pctx)
        *pctx = c;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice *device)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    int dev = current_device(&err);
    if (dev < 0)
        return err;
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    *device = dev;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize(void)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    if (current_device(&err) < 0)
        return err;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetFlags(unsigned int flags)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    if (current_device(&err) < 0)
        return err;
    current_ctx()->flags = flags;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetFlags(unsigned int *flags)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    if (current_device(&err) < 0)
        return err;
    if (!flags)
        return CUDA_ERROR_INVALID_VALUE;
    *flags = current_ctx()->flags;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetApiVersion(CUcontext ctx, unsigned int *version)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!version)
        return CUDA_ERROR_INVALID_VALUE;
    if (!ctx)
        ctx = current_ctx();
    if (!valid_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    *version = 12080;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ streams */

API CUresult cuStreamCreate(CUstream *phStream, unsigned int flags)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    if (current_device(&err) < 0)
        return err;
    if (!phStream)
        return CUDA_ERROR_INVALID_VALUE;
    struct fake_stream *s = calloc(1, sizeof(*s));
    if (!s)
        return CUDA_ERROR_OUT_OF_MEMORY;
    s->magic = STREAM_MAGIC;
    s->ctx = current_ctx();
    s->flags = flags;
    *phStream = s;
    return CUDA_SUCCESS;
}

API CUresult cuStreamDestroy_v2(CUstream hStream)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_stream(hStream))
        return CUDA_ERROR_INVALID_HANDLE;
    hStream->magic = 0;
    free(hStream);
    return CUDA_SUCCESS;
}

API CUresult cuStreamSynchronize(CUstream hStream)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (special_stream(hStream)) {
        CUresult err = CUDA_SUCCESS;
        if (current_device(&err) < 0)
            return err;
        return CUDA_SUCCESS;
    }
    if (!valid_stream(hStream))
        return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ memory pools */

API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool_out, CUdevice dev)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool_out)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_ctx_lock);
    struct fake_pool *p = &g_default_pool[dev];
    if (p->magic != POOL_MAGIC) {
        p->device = dev;
        p->is_default = 1;
        p->magic = POOL_MAGIC;
    }
    pthread_mutex_unlock(&g_ctx_lock);
    *pool_out = p;
    return CUDA_SUCCESS;
}

API CUresult cuMemPoolCreate(CUmemoryPool *pool, const CUmemPoolProps *props)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool || !props || props->location.type != 1)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(props->location.id))
        return CUDA_ERROR_INVALID_DEVICE;
    struct fake_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return CUDA_ERROR_OUT_OF_MEMORY;
    p->magic = POOL_MAGIC;
    p->device = props->location.id;
    *pool = p;
    return CUDA_SUCCESS;
}

API CUresult cuMemPoolDestroy(CUmemoryPool pool)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool || pool->magic != POOL_MAGIC || pool->is_default)
        return CUDA_ERROR_INVALID_VALUE;
    pool->magic = 0;
    free(pool);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ memory info */

API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    int dev = current_device(&err);
    if (dev < 0)
        return err;
    if (!free_bytes || !total_bytes)
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t used = __atomic_load_n(&g_slots[dev].used_bytes, __ATOMIC_RELAXED);
    *total_bytes = g_device_mem;
    *free_bytes = used >= g_device_mem ? 0 : g_device_mem - used;
    return CUDA_SUCCESS;
}

API CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                           int option)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!granularity || !prop || (option != 0 && option != 1))
        return CUDA_ERROR_INVALID_VALUE;
    if (prop->location.type != 1)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(prop->location.id))
        return CUDA_ERROR_INVALID_DEVICE;
    *granularity = GRANULARITY;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ device memory API */

API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    int dev = current_device(&err);
    if (dev < 0)
        return err;
    if (g_forced_count) {
        uint64_t i = __atomic_fetch_add(&g_forced_next, 1, __ATOMIC_RELAXED);
        if (i < g_forced_count)
            return (CUresult)(g_forced_first + (uint32_t)i);
    }
    if (!dptr || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    return dev_alloc(dptr, bytesize, dev);
}

API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes,
                                size_t Height, unsigned int ElementSizeBytes)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    int dev = current_device(&err);
    if (dev < 0)
        return err;
    if (!dptr || !pPitch || WidthInBytes == 0 || Height == 0 ||
        (ElementSizeBytes != 4 && ElementSizeBytes != 8 && ElementSizeBytes != 16))
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t pitch = round_up(WidthInBytes, PITCH_ALIGN);
    if (Height > UINT64_MAX / pitch)
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = dev_alloc(dptr, pitch * Height, dev);
    if (r == CUDA_SUCCESS)
        *pPitch = pitch;
    return r;
}

API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    int dev = current_device(&err);
    if (dev < 0)
        return err;
    /* CU_MEM_ATTACH_GLOBAL = 1, CU_MEM_ATTACH_HOST = 2 */
    if (!dptr || bytesize == 0 || (flags != 1 && flags != 2))
        return CUDA_ERROR_INVALID_VALUE;
    return dev_alloc(dptr, bytesize, dev);
}

API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    int dev = current_device(&err);
    if (dev < 0)
        return err;
    if (!special_stream(hStream)) {
        if (!valid_stream(hStream))
            return CUDA_ERROR_INVALID_HANDLE;
        if (!valid_ctx(hStream->ctx))
            return CUDA_ERROR_INVALID_CONTEXT;
        dev = hStream->ctx->device;
    }
    if (!dptr || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    return dev_alloc(dptr, bytesize, dev);
}

#ifndef OMIT_VMM
API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                     CUstream hStream)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    if (current_device(&err) < 0)
        return err;
    if (!special_stream(hStream) && !valid_stream(hStream))
        return CUDA_ERROR_INVALID_HANDLE;
    if (!dptr || bytesize == 0 || !pool || pool->magic != POOL_MAGIC)
        return CUDA_ERROR_INVALID_VALUE;
    return dev_alloc(dptr, bytesize, pool->device);
}
#endif

API CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    if (current_device(&err) < 0)
        return err;
    return dev_free(dptr);
}

API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    ENTRY();
    CUresult err = CUDA_SUCCESS;
    if (current_device(&err) < 0)
        return err;
    if (!special_stream(hStream) && !valid_stream(hStream))
        return CUDA_ERROR_INVALID_HANDLE;
    return dev_free(dptr);
}

/* ------------------------------------------------------------------ virtual memory management */

#ifndef OMIT_VMM
API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                         const CUmemAllocationProp *prop, unsigned long long flags)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!handle || !prop || flags != 0 || size == 0 || size % GRANULARITY != 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (prop->type != 1 /* PINNED */ || prop->location.type != 1 /* DEVICE */)
        return CUDA_ERROR_INVALID_VALUE;
    int dev = prop->location.id;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    if (!charge(dev, size))
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_mem_lock);
    uint64_t h = 0xc0de000000000000ull | g_next_handle++;
    int ok = tab_insert(&g_handle_tab, h, size, dev, K_HANDLE);
    pthread_mutex_unlock(&g_mem_lock);
    if (!ok) {
        uncharge(dev, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *handle = h;
    return CUDA_SUCCESS;
}

API CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g_mem_lock);
    struct entry *e = tab_find(&g_handle_tab, handle);
    if (!e) {
        pthread_mutex_unlock(&g_mem_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    int dev = e->device;
    uint64_t size = e->size;
    tab_remove(&g_handle_tab, e);
    pthread_mutex_unlock(&g_mem_lock);
    uncharge(dev, size);
    return CUDA_SUCCESS;
}

API CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                 unsigned long long flags)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!ptr || size == 0 || flags != 0 || size % GRANULARITY != 0 ||
        (alignment & (alignment - 1)) != 0)
        return CUDA_ERROR_INVALID_VALUE;
    (void)addr; /* a hint only */
    uint64_t align = alignment > GRANULARITY ? alignment : GRANULARITY;
    if (size >= RESV_WINDOW || align >= RESV_WINDOW)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_mem_lock);
    uint64_t off = round_up(g_resv_bump, align);
    if (off + size > RESV_WINDOW)
        off = 0; /* wrap; reservations are few and short-lived in tests */
    g_resv_bump = off + size;
    uint64_t va = RESV_BASE + off;
    int ok = !tab_find(&g_resv_tab, va) && tab_insert(&g_resv_tab, va, size, -1, K_RESERVE);
    pthread_mutex_unlock(&g_mem_lock);
    if (!ok)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *ptr = va;
    return CUDA_SUCCESS;
}

API CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mem_lock);
    struct entry *e = tab_find(&g_resv_tab, ptr);
    if (e && e->size == size) {
        tab_remove(&g_resv_tab, e);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mem_lock);
    return r;
}

/* Is [ptr, ptr+size) inside one reservation?  Linear scan; reservations are few. */
static int in_reservation(uint64_t ptr, uint64_t size)
{
    for (size_t i = 0; i < g_resv_tab.cap; i++) {
        const struct entry *e = &g_resv_tab.e[i];
        if (e->key && ptr >= e->key && ptr - e->key <= e->size && size <= e->size - (ptr - e->key))
            return 1;
    }
    return 0;
}

API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                      CUmemGenericAllocationHandle handle, unsigned long long flags)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (size == 0 || flags != 0 || offset != 0 || size % GRANULARITY != 0 || ptr % GRANULARITY != 0)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_mem_lock);
    struct entry *h = tab_find(&g_handle_tab, handle);
    if (!h || size > h->size || !in_reservation(ptr, size))
        r = CUDA_ERROR_INVALID_VALUE;
    else if (tab_find(&g_map_tab, ptr))
        r = 208; /* CUDA_ERROR_ALREADY_MAPPED */
    else if (!tab_insert(&g_map_tab, ptr, size, h->device, K_MAPPING))
        r = CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_unlock(&g_mem_lock);
    return r;
}

API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mem_lock);
    struct entry *e = tab_find(&g_map_tab, ptr);
    if (e && e->size == size) {
        tab_remove(&g_map_tab, e);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mem_lock);
    return r;
}
#endif /* OMIT_VMM */

/* ------------------------------------------------------------------ pinned host memory */

static CUresult host_alloc(void **pp, size_t bytesize)
{
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!pp || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    void *p = NULL;
    if (posix_memalign(&p, 4096, bytesize) != 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_mem_lock);
    int ok = tab_insert(&g_host_tab, (uint64_t)(uintptr_t)p, bytesize, -1, K_HOST);
    pthread_mutex_unlock(&g_mem_lock);
    if (!ok) {
        free(p);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *pp = p;
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocHost_v2(void **pp, size_t bytesize) { ENTRY(); return host_alloc(pp, bytesize); }

API CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags)
{
    ENTRY();
    /* CU_MEMHOSTALLOC_PORTABLE | DEVICEMAP | WRITECOMBINED */
    if (Flags & ~0x7u)
        return CUDA_ERROR_INVALID_VALUE;
    return host_alloc(pp, bytesize);
}

API CUresult cuMemFreeHost(void *p)
{
    ENTRY();
    if (!initialized())
        return CUDA_ERROR_NOT_INITIALIZED;
    pthread_mutex_lock(&g_mem_lock);
    struct entry *e = tab_find(&g_host_tab, (uint64_t)(uintptr_t)p);
    if (!e) {
        pthread_mutex_unlock(&g_mem_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    tab_remove(&g_host_tab, e);
    pthread_mutex_unlock(&g_mem_lock);
    free(p);
    return CUDA_SUCCESS;
}
