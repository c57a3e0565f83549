/*
 * libnvml.c - a test double for NVIDIA's NVML library (libnvidia-ml.so.1).
 *
 * Exports a subset of the real NVML C API with the real ABI, struct layouts and
 * nvmlReturn_t codes, so that unmodified clients (e.g. the Rust `nvml-wrapper`
 * crate, which dlopens the library and resolves every symbol it knows with
 * dlsym) can load it.  No GPU is needed: devices are simulated, device memory
 * and compute processes come from the CUDA driver double's shared state file
 * (tests/cuda-double/libcuda.c), everything else from a control file.
 *
 * Build: gcc -O2 -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 \
 *            libnvml.c -lpthread
 *        add -DOLD_DRIVER to leave out nvmlDeviceGetTotalEnergyConsumption,
 *        nvmlDeviceGetProcessUtilization, nvmlDeviceGetCurrentClocksThrottleReasons,
 *        nvmlDeviceGetSupportedClocksThrottleReasons,
 *        nvmlDeviceGetCurrentClocksEventReasons and
 *        nvmlDeviceGetSupportedClocksEventReasons, like an old driver.
 *
 * Environment (read by nvmlInit* when the library goes from uninitialised to
 * initialised; FAKEGPU_NVML_FAIL_INIT by every nvmlInit* call):
 *   FAKEGPU_COUNT   number of devices (default 1, max 64)
 *   FAKEGPU_MEM     bytes of memory per device (default 1073741824);
 *                               decimal or 0x hex, optional K/M/G/T suffix
 *   FAKEGPU_STATE   the CUDA double's shared state file (read-only
 *                               mmap; it may appear later, or be re-created)
 *   FAKEGPU_NVML_CTX_OVERHEAD  bytes added per process and device to
 *                               usedGpuMemory (default 536870912)
 *   FAKEGPU_NVML_CONTROL  path of the control file (optional)
 *   FAKEGPU_NVML_FAIL_INIT  "1": nvmlInit* return
 *                               NVML_ERROR_DRIVER_NOT_LOADED (9)
 *
 * Processes and memory: a process is a running compute process on device d if
 * its live slot in the state file has ctx_mask bit d set (or, for any d, holds
 * used[d] > 0); usedGpuMemory = used[d] + overhead.  Device memory used = sum
 * of those + gpu.<d>.reserved_bytes, at most total; free = total - used (saturating).  Slots
 * of dead pids (or pids whose start time differs) are ignored.
 *
 * Control file: text, one key=value per line, lines starting with '#' are
 * comments; re-parsed whenever its inode, size or mtime changes (one stat()
 * per call).  Keys (<d> = device index) and defaults:
 *   gpu.<d>.utilization 0, gpu.<d>.memory_utilization 0, gpu.<d>.temperature 35,
 *   gpu.<d>.power_mw 70000, gpu.<d>.power_limit_mw 700000,
 *   gpu.<d>.energy_mj 1000000, gpu.<d>.energy_rate_mw 0 (the energy counter then
 *   grows by that many mJ per second from energy_mj, continuously across rate changes),
 *   gpu.<d>.sm_clock_mhz 1980,
 *   gpu.<d>.mem_clock_mhz 2619, gpu.<d>.throttle 0,
 *   gpu.<d>.supported_throttle 0x1ff, gpu.<d>.pcie_tx_kbs 0, gpu.<d>.pcie_rx_kbs 0,
 *   gpu.<d>.ecc_corrected 0, gpu.<d>.ecc_uncorrected 0, gpu.<d>.mig 0,
 *   gpu.<d>.lost 0, gpu.<d>.name "NVIDIA H100 80GB HBM3",
 *   gpu.<d>.uuid "GPU-00000000-1111-2222-3333-4444444444<dd>",
 *   gpu.<d>.reserved_bytes 0, gpu.<d>.unsupported "" (comma list of groups),
 *   gpu.<d>.hang "" (comma list of groups whose calls block until the key no
 *   longer names their group, as calls into a wedged driver do),
 *   gpu.<d>.proc_sm_util.<pid>, gpu.<d>.proc_mem_util.<pid>,
 *   xid.<seq>=<d>:<code>, driver_version "550.54.15", cuda_driver_version 12040.
 * Unsupported groups: utilization memory power power_limit energy temperature
 * clocks clocks_event_reasons (alias throttle) pcie ecc mig processes
 * process_utilization events brand pci.
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
#include <strings.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default"), noinline, used))

/* ------------------------------------------------------------------ NVML ABI */

typedef int nvmlReturn_t;
typedef struct nvml_dev *nvmlDevice_t;
typedef struct nvml_set *nvmlEventSet_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22,
    NVML_ERROR_INSUFFICIENT_RESOURCES = 23,
    NVML_ERROR_FREQ_NOT_SUPPORTED = 24,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_DEPRECATED = 26,
    NVML_ERROR_NOT_READY = 27,
    NVML_ERROR_GPU_NOT_FOUND = 28,
    NVML_ERROR_INVALID_STATE = 29,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;
#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_v2_t; /* also nvmlProcessInfo_t of the _v3 functions */

typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil;
    unsigned int memUtil;
    unsigned int encUtil;
    unsigned int decUtil;
} nvmlProcessUtilizationSample_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

typedef struct { /* what the legacy nvmlEventSetWait fills */
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
} nvmlEventData_v1_t;

_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t layout");
_Static_assert(sizeof(nvmlProcessInfo_v1_t) == 16, "nvmlProcessInfo_v1_t layout");
_Static_assert(sizeof(nvmlProcessInfo_v2_t) == 24, "nvmlProcessInfo_v2_t layout");
_Static_assert(sizeof(nvmlProcessUtilizationSample_t) == 32, "sample layout");
_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t layout");
_Static_assert(sizeof(nvmlEventData_t) == 32, "nvmlEventData_t layout");

#define NVML_EVENT_SINGLE_BIT_ECC 0x1ull
#define NVML_EVENT_DOUBLE_BIT_ECC 0x2ull
#define NVML_EVENT_PSTATE 0x4ull
#define NVML_EVENT_XID 0x8ull
#define NVML_EVENT_CLOCK 0x10ull
#define NVML_BRAND_NVIDIA 14
#define NVML_NO_INSTANCE 0xFFFFFFFFu

/* ------------------------------------------------------------------ CUDA double state file */

#define MAX_DEVICES 64
#define MAX_PROCS 256
#define STATE_HEADER 64
#define SLOT_SIZE 64
#define PROC_OFFSET (STATE_HEADER + SLOT_SIZE * MAX_DEVICES)
#define PROC_SLOT_SIZE (16 + 8 * MAX_DEVICES)
#define STATE_SIZE (PROC_OFFSET + PROC_SLOT_SIZE * MAX_PROCS)

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
struct proc_slot {
    uint32_t pid;
    uint32_t ctx_mask;
    uint64_t start_time;
    uint64_t used[MAX_DEVICES];
};
_Static_assert(sizeof(struct state_header) == STATE_HEADER, "header size");
_Static_assert(sizeof(struct proc_slot) == PROC_SLOT_SIZE, "proc slot size");

/* ------------------------------------------------------------------ globals */

#define DEV_MAGIC 0x4e564d44u /* "DMVN" */
#define SET_MAGIC 0x4e564553u

struct nvml_dev {
    uint32_t magic;
    int index;
};

struct nvml_set {
    uint32_t magic;
    uint64_t reg[MAX_DEVICES]; /* registered event types per device */
    uint64_t *done;            /* xid seqs delivered to this set (unsorted) */
    size_t ndone, capdone;
};

/* One lock for everything (calls are short); nvmlEventSetWait sleeps unlocked. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_init_count;
static int g_dev_count = 1;
static uint64_t g_dev_mem = 1073741824ull;
static uint64_t g_overhead = 536870912ull;
static char g_state_path[4096];
static char g_control_path[4096];
static struct nvml_dev g_devs[MAX_DEVICES];

/* unsupported groups */
enum {
    U_UTILIZATION = 1u << 0,
    U_MEMORY = 1u << 1,
    U_POWER = 1u << 2,
    U_POWER_LIMIT = 1u << 3,
    U_ENERGY = 1u << 4,
    U_TEMPERATURE = 1u << 5,
    U_CLOCKS = 1u << 6,
    U_CLOCKS_EVENT_REASONS = 1u << 7,
    U_PCIE = 1u << 8,
    U_ECC = 1u << 9,
    U_MIG = 1u << 10,
    U_PROCESSES = 1u << 11,
    U_PROCESS_UTILIZATION = 1u << 12,
    U_EVENTS = 1u << 13,
    U_BRAND = 1u << 14,
    U_PCI = 1u << 15,
};
static const struct {
    const char *name;
    uint32_t bit;
} g_groups[] = {
    {"utilization", U_UTILIZATION},
    {"memory", U_MEMORY},
    {"power", U_POWER},
    {"power_limit", U_POWER_LIMIT},
    {"energy", U_ENERGY},
    {"temperature", U_TEMPERATURE},
    {"clocks", U_CLOCKS},
    {"clocks_event_reasons", U_CLOCKS_EVENT_REASONS},
    {"throttle", U_CLOCKS_EVENT_REASONS},
    {"pcie", U_PCIE},
    {"ecc", U_ECC},
    {"mig", U_MIG},
    {"processes", U_PROCESSES},
    {"process_utilization", U_PROCESS_UTILIZATION},
    {"events", U_EVENTS},
    {"brand", U_BRAND},
    {"pci", U_PCI},
};

struct proc_util {
    uint32_t pid;
    uint32_t sm, mem;
};
struct dev_ctl {
    uint64_t util, mem_util, temp, power, power_limit, energy, sm_clock, mem_clock;
    uint64_t throttle, supported_throttle, pcie_tx, pcie_rx, ecc_corr, ecc_uncorr;
    uint64_t mig, lost, reserved, energy_rate;
    uint32_t unsupported;
    uint32_t hang;
    char name[96];
    char uuid[96];
    struct proc_util *pu;
    size_t npu, cappu;
};
struct xid {
    uint64_t seq;
    int dev;
    uint64_t code;
};
static struct {
    struct dev_ctl dev[MAX_DEVICES];
    struct xid *xids;
    size_t nxid, capxid;
    char driver_version[80];
    uint64_t cuda_version;
} g_ctl;
static struct {
    int valid; /* 0: never looked; 1: stamp below describes the parsed file */
    int present;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
} g_ctl_stamp;

/* state file mapping */
static const unsigned char *g_state_map;
static dev_t g_state_dev;
static ino_t g_state_ino;

/* liveness cache per process slot */
static struct {
    uint32_t pid;
    uint64_t start_time;
    int alive;
    uint64_t checked_ns;
} g_alive[MAX_PROCS];
#define ALIVE_CACHE_NS 20000000ull

/* ------------------------------------------------------------------ helpers */

static uint64_t parse_u64(const char *v, uint64_t dflt)
{
    if (!v || !*v)
        return dflt;
    char *end = NULL;
    unsigned long long x = strtoull(v, &end, 0);
    if (end == v)
        return dflt;
    switch (*end) { /* optional binary suffix: K, M, G, T (as in libcuda.c) */
    case 'k': case 'K': x <<= 10; break;
    case 'm': case 'M': x <<= 20; break;
    case 'g': case 'G': x <<= 30; break;
    case 't': case 'T': x <<= 40; break;
    default: break;
    }
    return x;
}

static uint64_t env_u64(const char *name, uint64_t dflt) { return parse_u64(getenv(name), dflt); }

static uint64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void copy_str(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

/* Copies s into buf of the caller's length; INSUFFICIENT_SIZE if it does not fit. */
static nvmlReturn_t put_str(char *buf, unsigned int length, const char *s)
{
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    size_t n = strlen(s);
    if ((size_t)length < n + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, n + 1);
    return NVML_SUCCESS;
}

/* Field 22 (starttime) of /proc/<pid>/stat; 0 if gone or a zombie (as libcuda.c). */
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
    if (p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'))
        return 0;
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

/* ------------------------------------------------------------------ control file */

static void ctl_defaults(void)
{
    for (int d = 0; d < MAX_DEVICES; d++) {
        struct dev_ctl *c = &g_ctl.dev[d];
        struct proc_util *pu = c->pu;
        size_t cap = c->cappu;
        memset(c, 0, sizeof(*c));
        c->pu = pu; /* keep the allocation, drop the entries */
        c->cappu = cap;
        c->temp = 35;
        c->power = 70000;
        c->power_limit = 700000;
        c->energy = 1000000;
        c->sm_clock = 1980;
        c->mem_clock = 2619;
        c->supported_throttle = 0x1ff;
        copy_str(c->name, sizeof(c->name), "NVIDIA H100 80GB HBM3");
        snprintf(c->uuid, sizeof(c->uuid), "GPU-00000000-1111-2222-3333-4444444444%02d", d);
    }
    g_ctl.nxid = 0;
    copy_str(g_ctl.driver_version, sizeof(g_ctl.driver_version), "550.54.15");
    g_ctl.cuda_version = 12040;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        s[--n] = 0;
    return s;
}

static uint32_t parse_groups(char *v)
{
    uint32_t mask = 0;
    char *save = NULL;
    for (char *t = strtok_r(v, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        t = trim(t);
        for (size_t i = 0; i < sizeof(g_groups) / sizeof(g_groups[0]); i++)
            if (strcmp(t, g_groups[i].name) == 0)
                mask |= g_groups[i].bit;
    }
    return mask;
}

static struct proc_util *proc_util_of(struct dev_ctl *c, uint32_t pid)
{
    for (size_t i = 0; i < c->npu; i++)
        if (c->pu[i].pid == pid)
            return &c->pu[i];
    if (c->npu == c->cappu) {
        size_t cap = c->cappu ? c->cappu * 2 : 8;
        struct proc_util *n = realloc(c->pu, cap * sizeof(*n));
        if (!n)
            return NULL;
        c->pu = n;
        c->cappu = cap;
    }
    struct proc_util *p = &c->pu[c->npu++];
    p->pid = pid;
    p->sm = p->mem = 0;
    return p;
}

static void ctl_gpu_key(int d, const char *field, char *v)
{
    struct dev_ctl *c = &g_ctl.dev[d];
    static const struct {
        const char *name;
        size_t off;
    } nums[] = {
        {"utilization", offsetof(struct dev_ctl, util)},
        {"memory_utilization", offsetof(struct dev_ctl, mem_util)},
        {"temperature", offsetof(struct dev_ctl, temp)},
        {"power_mw", offsetof(struct dev_ctl, power)},
        {"power_limit_mw", offsetof(struct dev_ctl, power_limit)},
        {"energy_mj", offsetof(struct dev_ctl, energy)},
        {"energy_rate_mw", offsetof(struct dev_ctl, energy_rate)},
        {"sm_clock_mhz", offsetof(struct dev_ctl, sm_clock)},
        {"mem_clock_mhz", offsetof(struct dev_ctl, mem_clock)},
        {"throttle", offsetof(struct dev_ctl, throttle)},
        {"supported_throttle", offsetof(struct dev_ctl, supported_throttle)},
        {"pcie_tx_kbs", offsetof(struct dev_ctl, pcie_tx)},
        {"pcie_rx_kbs", offsetof(struct dev_ctl, pcie_rx)},
        {"ecc_corrected", offsetof(struct dev_ctl, ecc_corr)},
        {"ecc_uncorrected", offsetof(struct dev_ctl, ecc_uncorr)},
        {"mig", offsetof(struct dev_ctl, mig)},
        {"lost", offsetof(struct dev_ctl, lost)},
        {"reserved_bytes", offsetof(struct dev_ctl, reserved)},
    };
    for (size_t i = 0; i < sizeof(nums) / sizeof(nums[0]); i++) {
        if (strcmp(field, nums[i].name) == 0) {
            uint64_t *p = (uint64_t *)((char *)c + nums[i].off);
            *p = parse_u64(v, *p);
            return;
        }
    }
    if (strcmp(field, "name") == 0) {
        copy_str(c->name, sizeof(c->name), v);
    } else if (strcmp(field, "uuid") == 0) {
        copy_str(c->uuid, sizeof(c->uuid), v);
    } else if (strcmp(field, "unsupported") == 0) {
        c->unsupported = parse_groups(v);
    } else if (strcmp(field, "hang") == 0) {
        c->hang = parse_groups(v);
    } else if (strncmp(field, "proc_sm_util.", 13) == 0 || strncmp(field, "proc_mem_util.", 14) == 0) {
        int sm = field[5] == 's';
        const char *pid_s = field + (sm ? 13 : 14);
        char *end = NULL;
        unsigned long pid = strtoul(pid_s, &end, 10);
        if (end == pid_s || *end || pid == 0)
            return;
        struct proc_util *p = proc_util_of(c, (uint32_t)pid);
        if (!p)
            return;
        if (sm)
            p->sm = (uint32_t)parse_u64(v, 0);
        else
            p->mem = (uint32_t)parse_u64(v, 0);
    }
}

static void ctl_add_xid(uint64_t seq, char *v)
{
    char *end = NULL;
    long d = strtol(v, &end, 10);
    if (end == v || *end != ':' || d < 0 || d >= MAX_DEVICES)
        return;
    uint64_t code = parse_u64(end + 1, 0);
    for (size_t i = 0; i < g_ctl.nxid; i++) {
        if (g_ctl.xids[i].seq == seq) { /* duplicate key: last one wins */
            g_ctl.xids[i].dev = (int)d;
            g_ctl.xids[i].code = code;
            return;
        }
    }
    if (g_ctl.nxid == g_ctl.capxid) {
        size_t cap = g_ctl.capxid ? g_ctl.capxid * 2 : 16;
        struct xid *n = realloc(g_ctl.xids, cap * sizeof(*n));
        if (!n)
            return;
        g_ctl.xids = n;
        g_ctl.capxid = cap;
    }
    g_ctl.xids[g_ctl.nxid++] = (struct xid){seq, (int)d, code};
}

static void ctl_parse(FILE *f)
{
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) >= 0) {
        char *s = trim(line);
        if (!*s || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (!eq)
            continue;
        *eq = 0;
        char *key = trim(s), *val = trim(eq + 1);
        if (strncmp(key, "gpu.", 4) == 0) {
            char *end = NULL;
            long d = strtol(key + 4, &end, 10);
            if (end == key + 4 || *end != '.' || d < 0 || d >= MAX_DEVICES)
                continue;
            ctl_gpu_key((int)d, end + 1, val);
        } else if (strncmp(key, "xid.", 4) == 0) {
            char *end = NULL;
            unsigned long long seq = strtoull(key + 4, &end, 10);
            if (end == key + 4 || *end)
                continue;
            ctl_add_xid(seq, val);
        } else if (strcmp(key, "driver_version") == 0) {
            copy_str(g_ctl.driver_version, sizeof(g_ctl.driver_version), val);
        } else if (strcmp(key, "cuda_driver_version") == 0) {
            g_ctl.cuda_version = parse_u64(val, g_ctl.cuda_version);
        }
    }
    free(line);
}

/* Re-parses the control file if it changed.  Caller holds g_lock. */
static void ctl_refresh(void)
{
    struct stat st;
    int present = g_control_path[0] && stat(g_control_path, &st) == 0;
    if (g_ctl_stamp.valid) {
        if (!present && !g_ctl_stamp.present)
            return;
        if (present && g_ctl_stamp.present && st.st_dev == g_ctl_stamp.dev &&
            st.st_ino == g_ctl_stamp.ino && st.st_size == g_ctl_stamp.size &&
            st.st_mtim.tv_sec == g_ctl_stamp.mtime.tv_sec &&
            st.st_mtim.tv_nsec == g_ctl_stamp.mtime.tv_nsec)
            return;
    }
    ctl_defaults();
    g_ctl_stamp.valid = 1;
    g_ctl_stamp.present = 0;
    if (!present)
        return;
    FILE *f = fopen(g_control_path, "re");
    if (!f)
        return;
    struct stat fst;
    if (fstat(fileno(f), &fst) == 0)
        st = fst; /* stamp of what we actually read */
    ctl_parse(f);
    fclose(f);
    g_ctl_stamp.present = 1;
    g_ctl_stamp.dev = st.st_dev;
    g_ctl_stamp.ino = st.st_ino;
    g_ctl_stamp.size = st.st_size;
    g_ctl_stamp.mtime = st.st_mtim;
}

/* ------------------------------------------------------------------ state file */

/* Maps (or re-maps, if the file was re-created) the state file; returns the
 * process table or NULL.  Caller holds g_lock. */
static const struct proc_slot *state_procs(void)
{
    if (!g_state_path[0])
        return NULL;
    struct stat st;
    if (stat(g_state_path, &st) != 0) {
        if (g_state_map) {
            munmap((void *)g_state_map, STATE_SIZE);
            g_state_map = NULL;
        }
        return NULL;
    }
    if (g_state_map && (st.st_dev != g_state_dev || st.st_ino != g_state_ino)) {
        munmap((void *)g_state_map, STATE_SIZE);
        g_state_map = NULL;
    }
    if (!g_state_map) {
        if (st.st_size < STATE_SIZE)
            return NULL; /* being created */
        int fd = open(g_state_path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return NULL;
        void *m = mmap(NULL, STATE_SIZE, PROT_READ, MAP_SHARED, fd, 0);
        struct stat fst;
        int ok = fstat(fd, &fst) == 0;
        close(fd);
        if (m == MAP_FAILED)
            return NULL;
        g_state_map = m;
        g_state_dev = ok ? fst.st_dev : st.st_dev;
        g_state_ino = ok ? fst.st_ino : st.st_ino;
        memset(g_alive, 0, sizeof(g_alive));
    }
    const struct state_header *h = (const void *)g_state_map;
    if (memcmp(h->magic, "ISFAKGPU", 8) != 0 || h->version != 1 ||
        h->proc_offset != PROC_OFFSET || h->max_procs != MAX_PROCS ||
        h->proc_slot_size != PROC_SLOT_SIZE)
        return NULL;
    return (const struct proc_slot *)(g_state_map + PROC_OFFSET);
}

static int slot_alive(int i, uint32_t pid, uint64_t start_time)
{
    uint64_t now = now_ns(CLOCK_MONOTONIC);
    if (g_alive[i].pid == pid && g_alive[i].start_time == start_time &&
        now - g_alive[i].checked_ns < ALIVE_CACHE_NS)
        return g_alive[i].alive;
    int alive = start_time ? proc_start_time(pid) == start_time
                           : (kill((pid_t)pid, 0) == 0 || errno == EPERM);
    g_alive[i].pid = pid;
    g_alive[i].start_time = start_time;
    g_alive[i].alive = alive;
    g_alive[i].checked_ns = now;
    return alive;
}

struct proc_use {
    uint32_t pid;
    uint64_t bytes; /* used[d] + overhead */
};

/* Live compute processes on device d (up to cap into out, may be NULL); returns
 * the number and adds their bytes to *sum.  Caller holds g_lock. */
static size_t device_procs(int d, struct proc_use *out, size_t cap, uint64_t *sum)
{
    const struct proc_slot *procs = state_procs();
    size_t n = 0;
    if (!procs)
        return 0;
    for (int i = 0; i < MAX_PROCS; i++) {
        const struct proc_slot *ps = &procs[i];
        uint32_t pid = __atomic_load_n(&ps->pid, __ATOMIC_ACQUIRE);
        if (!pid)
            continue;
        uint32_t mask = __atomic_load_n(&ps->ctx_mask, __ATOMIC_ACQUIRE);
        uint64_t used = __atomic_load_n(&ps->used[d], __ATOMIC_RELAXED);
        int on = (d < 32 && (mask >> d) & 1) || used > 0;
        if (!on)
            continue;
        uint64_t start = __atomic_load_n(&ps->start_time, __ATOMIC_RELAXED);
        if (!slot_alive(i, pid, start))
            continue;
        uint64_t bytes = used + g_overhead;
        if (sum)
            *sum += bytes;
        if (out && n < cap)
            out[n] = (struct proc_use){pid, bytes};
        n++;
    }
    return n;
}

/* ------------------------------------------------------------------ call entry */

static inline nvmlReturn_t leave(nvmlReturn_t r)
{
    pthread_mutex_unlock(&g_lock);
    return r;
}

static int handle_index(nvmlDevice_t h)
{
    uintptr_t p = (uintptr_t)h, base = (uintptr_t)&g_devs[0];
    if (p < base || p >= (uintptr_t)&g_devs[g_dev_count] || (p - base) % sizeof(g_devs[0]))
        return -1;
    return h->magic == DEV_MAGIC ? h->index : -1;
}

/* Locks g_lock and checks: initialised, valid handle, not lost, group supported.
 * On success the lock stays held and *idx is the device index. */
static nvmlReturn_t dev_enter(nvmlDevice_t h, uint32_t group, int *idx)
{
    pthread_mutex_lock(&g_lock);
    if (!g_init_count)
        return leave(NVML_ERROR_UNINITIALIZED);
    int d = handle_index(h);
    if (d < 0)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    ctl_refresh();
    /* A hung call sleeps without the lock, so that the other calls go on. */
    while (g_ctl.dev[d].hang & group) {
        pthread_mutex_unlock(&g_lock);
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&g_lock);
        if (!g_init_count)
            return leave(NVML_ERROR_UNINITIALIZED);
        ctl_refresh();
    }
    if (g_ctl.dev[d].lost)
        return leave(NVML_ERROR_GPU_IS_LOST);
    if (g_ctl.dev[d].unsupported & group)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    *idx = d;
    return NVML_SUCCESS;
}

/* Locks g_lock and checks that the library is initialised. */
static nvmlReturn_t sys_enter(void)
{
    pthread_mutex_lock(&g_lock);
    if (!g_init_count)
        return leave(NVML_ERROR_UNINITIALIZED);
    ctl_refresh();
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ init / system */

static nvmlReturn_t do_init(void)
{
    const char *fail = getenv("FAKEGPU_NVML_FAIL_INIT");
    if (fail && *fail && strcmp(fail, "0") != 0)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    pthread_mutex_lock(&g_lock);
    if (g_init_count++ == 0) {
        uint64_t n = env_u64("FAKEGPU_COUNT", 1);
        g_dev_count = (int)(n > MAX_DEVICES ? MAX_DEVICES : n);
        g_dev_mem = env_u64("FAKEGPU_MEM", 1073741824ull);
        g_overhead = env_u64("FAKEGPU_NVML_CTX_OVERHEAD", 536870912ull);
        const char *p = getenv("FAKEGPU_STATE");
        copy_str(g_state_path, sizeof(g_state_path), p ? p : "");
        p = getenv("FAKEGPU_NVML_CONTROL");
        copy_str(g_control_path, sizeof(g_control_path), p ? p : "");
        for (int d = 0; d < MAX_DEVICES; d++)
            g_devs[d] = (struct nvml_dev){DEV_MAGIC, d};
        if (g_state_map) {
            munmap((void *)g_state_map, STATE_SIZE);
            g_state_map = NULL;
        }
        g_ctl_stamp.valid = 0;
        ctl_refresh();
    }
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlInit(void) { return do_init(); }
API nvmlReturn_t nvmlInit_v2(void) { return do_init(); }
API nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return do_init();
}

API nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&g_lock);
    if (!g_init_count)
        return leave(NVML_ERROR_UNINITIALIZED);
    g_init_count--;
    return leave(NVML_SUCCESS);
}

API const char *nvmlErrorString(nvmlReturn_t r)
{
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt request issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "GPU access blocked by the operating system";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "Driver/library version mismatch";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    return leave(put_str(version, length, g_ctl.driver_version));
}

API nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    char buf[96];
    snprintf(buf, sizeof(buf), "12.%s", g_ctl.driver_version);
    return leave(put_str(version, length, buf));
}

static nvmlReturn_t cuda_version(int *v)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!v)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *v = (int)g_ctl.cuda_version;
    return leave(NVML_SUCCESS);
}
API nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) { return cuda_version(v); }
API nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return cuda_version(v); }

API nvmlReturn_t nvmlSystemGetProcessName(unsigned int pid, char *name, unsigned int length)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!name || !length)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%u/comm", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return leave(NVML_ERROR_NOT_FOUND);
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return leave(NVML_ERROR_NOT_FOUND);
    buf[n] = 0;
    buf[strcspn(buf, "\n")] = 0;
    copy_str(name, length, buf); /* cropped to length, like the real one */
    return leave(NVML_SUCCESS);
}

/* ------------------------------------------------------------------ device handles */

static nvmlReturn_t device_count(unsigned int *count)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!count)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *count = (unsigned int)g_dev_count;
    return leave(NVML_SUCCESS);
}
API nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return device_count(count); }
API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { return device_count(count); }

static nvmlReturn_t handle_by_index(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!device || index >= (unsigned int)g_dev_count)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (g_ctl.dev[index].lost)
        return leave(NVML_ERROR_GPU_IS_LOST);
    *device = &g_devs[index];
    return leave(NVML_SUCCESS);
}
API nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index(index, device);
}
API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index(index, device);
}

static void bus_id(int d, char *buf, size_t cap, int legacy)
{
    snprintf(buf, cap, legacy ? "%04X:%02X:00.0" : "%08X:%02X:00.0", 0, 0x18 + d);
}

API nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!uuid || !device)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (int d = 0; d < g_dev_count; d++) {
        if (strcmp(g_ctl.dev[d].uuid, uuid) == 0) {
            if (g_ctl.dev[d].lost)
                return leave(NVML_ERROR_GPU_IS_LOST);
            *device = &g_devs[d];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}

static nvmlReturn_t handle_by_bus_id(const char *id, nvmlDevice_t *device)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!id || !device)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (int d = 0; d < g_dev_count; d++) {
        char a[32], b[32];
        bus_id(d, a, sizeof(a), 0);
        bus_id(d, b, sizeof(b), 1);
        if (strcasecmp(a, id) == 0 || strcasecmp(b, id) == 0) {
            if (g_ctl.dev[d].lost)
                return leave(NVML_ERROR_GPU_IS_LOST);
            *device = &g_devs[d];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}
API nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *id, nvmlDevice_t *device)
{
    return handle_by_bus_id(id, device);
}
API nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *id, nvmlDevice_t *device)
{
    return handle_by_bus_id(id, device);
}

/* ------------------------------------------------------------------ device queries */

/* Shorthand for the common "one output value" shape. */
#define DEV_BEGIN(handle, group, out)                                                     \
    int d;                                                                                \
    nvmlReturn_t r_ = dev_enter((handle), (group), &d);                                     \
    if (r_)                                                                               \
        return r_;                                                                        \
    if (!(out))                                                                           \
        return leave(NVML_ERROR_INVALID_ARGUMENT);                                        \
    struct dev_ctl *c = &g_ctl.dev[d];                                                    \
    (void)c

API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    DEV_BEGIN(device, 0, name);
    return leave(put_str(name, length, c->name));
}

API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    DEV_BEGIN(device, 0, uuid);
    return leave(put_str(uuid, length, c->uuid));
}

API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    DEV_BEGIN(device, 0, index);
    *index = (unsigned int)d;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    DEV_BEGIN(device, 0, minor);
    *minor = (unsigned int)d;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetBrand(nvmlDevice_t device, int *type)
{
    DEV_BEGIN(device, U_BRAND, type);
    *type = NVML_BRAND_NVIDIA;
    return leave(NVML_SUCCESS);
}

static nvmlReturn_t pci_info(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    DEV_BEGIN(device, U_PCI, pci);
    memset(pci, 0, sizeof(*pci));
    bus_id(d, pci->busIdLegacy, sizeof(pci->busIdLegacy), 1);
    bus_id(d, pci->busId, sizeof(pci->busId), 0);
    pci->domain = 0;
    pci->bus = 0x18 + (unsigned int)d;
    pci->device = 0;
    pci->pciDeviceId = 0x233010DEu;    /* H100 SXM5 80GB */
    pci->pciSubSystemId = 0x16C110DEu;
    return leave(NVML_SUCCESS);
}
API nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci) { return pci_info(device, pci); }
API nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci) { return pci_info(device, pci); }
API nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) { return pci_info(device, pci); }

API nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *u)
{
    DEV_BEGIN(device, U_UTILIZATION, u);
    u->gpu = (unsigned int)c->util;
    u->memory = (unsigned int)c->mem_util;
    return leave(NVML_SUCCESS);
}

/* total/used/free of device d.  Caller holds g_lock. */
static void memory_of(int d, uint64_t *total, uint64_t *used, uint64_t *free_)
{
    uint64_t sum = g_ctl.dev[d].reserved;
    device_procs(d, NULL, 0, &sum);
    *total = g_dev_mem;
    /* The CUDA double limits allocations only; a real device's contexts live inside its
     * memory, so used never passes total. */
    *used = sum > g_dev_mem ? g_dev_mem : sum;
    *free_ = sum >= g_dev_mem ? 0 : g_dev_mem - sum;
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *m)
{
    DEV_BEGIN(device, U_MEMORY, m);
    uint64_t total, used, fr;
    memory_of(d, &total, &used, &fr);
    m->total = total;
    m->used = used;
    m->free = fr;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *m)
{
    DEV_BEGIN(device, U_MEMORY, m);
    if (m->version != nvmlMemory_v2)
        return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    uint64_t total, used, fr;
    memory_of(d, &total, &used, &fr);
    m->total = total;
    m->reserved = 0;
    m->used = used;
    m->free = fr;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    DEV_BEGIN(device, U_POWER, power);
    *power = (unsigned int)c->power;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    DEV_BEGIN(device, U_POWER_LIMIT, limit);
    *limit = (unsigned int)c->power_limit;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    DEV_BEGIN(device, U_POWER_LIMIT, limit);
    *limit = (unsigned int)c->power_limit;
    return leave(NVML_SUCCESS);
}

#ifndef OLD_DRIVER
/* The energy counter per device: energy_mj, then growing at energy_rate_mw. A change of the
 * rate folds what was consumed so far into the base, so the counter never steps back; a
 * change of energy_mj restarts it there. Under g_lock. */
static struct {
    int set;
    uint64_t key, rate, base, since_ns;
} g_energy[MAX_DEVICES];

API nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    DEV_BEGIN(device, U_ENERGY, energy);
    uint64_t now = now_ns(CLOCK_MONOTONIC);
    __typeof__(g_energy[0]) *e = &g_energy[d];
    if (!e->set || e->key != c->energy) {
        e->set = 1;
        e->key = c->energy;
        e->base = c->energy;
        e->rate = c->energy_rate;
        e->since_ns = now;
    } else if (e->rate != c->energy_rate) {
        e->base += (uint64_t)((unsigned __int128)e->rate * (now - e->since_ns) / 1000000000u);
        e->rate = c->energy_rate;
        e->since_ns = now;
    }
    *energy = e->base + (uint64_t)((unsigned __int128)e->rate * (now - e->since_ns) / 1000000000u);
    return leave(NVML_SUCCESS);
}
#endif

API nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp)
{
    DEV_BEGIN(device, U_TEMPERATURE, temp);
    if (sensor != 0) /* NVML_TEMPERATURE_GPU */
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *temp = (unsigned int)c->temp;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, int type, unsigned int *clock)
{
    DEV_BEGIN(device, U_CLOCKS, clock);
    switch (type) {
    case 0: /* NVML_CLOCK_GRAPHICS */
    case 1: /* NVML_CLOCK_SM */
        *clock = (unsigned int)c->sm_clock;
        break;
    case 2: /* NVML_CLOCK_MEM */
        *clock = (unsigned int)c->mem_clock;
        break;
    case 3: /* NVML_CLOCK_VIDEO */
        *clock = 1755;
        break;
    default:
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    }
    return leave(NVML_SUCCESS);
}

#ifndef OLD_DRIVER
static nvmlReturn_t reasons(nvmlDevice_t device, unsigned long long *out, int supported)
{
    DEV_BEGIN(device, U_CLOCKS_EVENT_REASONS, out);
    *out = supported ? c->supported_throttle : c->throttle;
    return leave(NVML_SUCCESS);
}
API nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *r)
{
    return reasons(device, r, 0);
}
API nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *r)
{
    return reasons(device, r, 0);
}
API nvmlReturn_t nvmlDeviceGetSupportedClocksThrottleReasons(nvmlDevice_t device, unsigned long long *r)
{
    return reasons(device, r, 1);
}
API nvmlReturn_t nvmlDeviceGetSupportedClocksEventReasons(nvmlDevice_t device, unsigned long long *r)
{
    return reasons(device, r, 1);
}
#endif

API nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t device, int counter, unsigned int *value)
{
    DEV_BEGIN(device, U_PCIE, value);
    if (counter == 0) /* NVML_PCIE_UTIL_TX_BYTES */
        *value = (unsigned int)c->pcie_tx;
    else if (counter == 1) /* NVML_PCIE_UTIL_RX_BYTES */
        *value = (unsigned int)c->pcie_rx;
    else
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, int error_type, int counter_type,
                                             unsigned long long *count)
{
    DEV_BEGIN(device, U_ECC, count);
    /* error_type: 0 corrected, 1 uncorrected; counter_type: 0 volatile, 1 aggregate
     * (both counters report the same value). */
    if ((error_type != 0 && error_type != 1) || (counter_type != 0 && counter_type != 1))
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *count = error_type ? c->ecc_uncorr : c->ecc_corr;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending)
{
    DEV_BEGIN(device, U_MIG, current);
    if (!pending)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *current = *pending = c->mig ? 1 : 0;
    return leave(NVML_SUCCESS);
}

/* Running compute processes: the shared shape of the v1/v2/v3 functions. */
static nvmlReturn_t compute_procs(nvmlDevice_t device, unsigned int *count, void *infos, int v1)
{
    DEV_BEGIN(device, U_PROCESSES, count);
    struct proc_use procs[MAX_PROCS];
    size_t n = device_procs(d, procs, MAX_PROCS, NULL);
    if (n > MAX_PROCS)
        n = MAX_PROCS;
    if (n == 0) {
        *count = 0;
        return leave(NVML_SUCCESS);
    }
    if (!infos || *count < n) {
        *count = (unsigned int)n;
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    for (size_t i = 0; i < n; i++) {
        if (v1) {
            nvmlProcessInfo_v1_t *p = &((nvmlProcessInfo_v1_t *)infos)[i];
            p->pid = procs[i].pid;
            p->usedGpuMemory = procs[i].bytes;
        } else {
            nvmlProcessInfo_v2_t *p = &((nvmlProcessInfo_v2_t *)infos)[i];
            p->pid = procs[i].pid;
            p->usedGpuMemory = procs[i].bytes;
            p->gpuInstanceId = NVML_NO_INSTANCE;
            p->computeInstanceId = NVML_NO_INSTANCE;
        }
    }
    *count = (unsigned int)n;
    return leave(NVML_SUCCESS);
}
API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *count,
                                                      nvmlProcessInfo_v1_t *infos)
{
    return compute_procs(device, count, infos, 1);
}
API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                                         nvmlProcessInfo_v2_t *infos)
{
    return compute_procs(device, count, infos, 0);
}
API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                         nvmlProcessInfo_v2_t *infos)
{
    return compute_procs(device, count, infos, 0);
}

/* No graphics or MPS processes are simulated. */
static nvmlReturn_t no_procs(nvmlDevice_t device, unsigned int *count)
{
    DEV_BEGIN(device, U_PROCESSES, count);
    *count = 0;
    return leave(NVML_SUCCESS);
}
API nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                          nvmlProcessInfo_v2_t *infos)
{
    (void)infos;
    return no_procs(device, count);
}
API nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                            nvmlProcessInfo_v2_t *infos)
{
    (void)infos;
    return no_procs(device, count);
}

#ifndef OLD_DRIVER
API nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                                 nvmlProcessUtilizationSample_t *utilization,
                                                 unsigned int *count,
                                                 unsigned long long last_seen)
{
    DEV_BEGIN(device, U_PROCESS_UTILIZATION, count);
    uint64_t ts = now_ns(CLOCK_REALTIME) / 1000;
    size_t n = ts > last_seen ? c->npu : 0;
    if (n == 0) {
        *count = 0;
        return leave(NVML_ERROR_NOT_FOUND); /* like the real one: no samples */
    }
    if (!utilization || *count < n) {
        *count = (unsigned int)n;
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    for (size_t i = 0; i < n; i++)
        utilization[i] = (nvmlProcessUtilizationSample_t){
            .pid = c->pu[i].pid, .timeStamp = ts, .smUtil = c->pu[i].sm, .memUtil = c->pu[i].mem};
    *count = (unsigned int)n;
    return leave(NVML_SUCCESS);
}
#endif

/* ------------------------------------------------------------------ events */

static uint64_t supported_events(const struct dev_ctl *c)
{
    uint64_t m = NVML_EVENT_PSTATE | NVML_EVENT_XID | NVML_EVENT_CLOCK;
    if (!(c->unsupported & U_ECC))
        m |= NVML_EVENT_SINGLE_BIT_ECC | NVML_EVENT_DOUBLE_BIT_ECC;
    return m;
}

API nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types)
{
    DEV_BEGIN(device, U_EVENTS, types);
    *types = supported_events(c);
    return leave(NVML_SUCCESS);
}

static int valid_set(const struct nvml_set *s) { return s && s->magic == SET_MAGIC; }

API nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!set)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    struct nvml_set *s = calloc(1, sizeof(*s));
    if (!s)
        return leave(NVML_ERROR_MEMORY);
    s->magic = SET_MAGIC;
    *set = s;
    return leave(NVML_SUCCESS);
}

API nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set)
{
    int d;
    nvmlReturn_t r = dev_enter(device, U_EVENTS, &d);
    if (r)
        return r;
    if (!valid_set(set))
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (types & ~supported_events(&g_ctl.dev[d]))
        return leave(NVML_ERROR_NOT_SUPPORTED);
    set->reg[d] |= types;
    return leave(NVML_SUCCESS);
}

static int set_done(const struct nvml_set *s, uint64_t seq)
{
    for (size_t i = 0; i < s->ndone; i++)
        if (s->done[i] == seq)
            return 1;
    return 0;
}

/* Finds the lowest undelivered xid for the set and marks it delivered.  Caller
 * holds g_lock. */
static int next_xid(struct nvml_set *s, struct xid *out)
{
    const struct xid *best = NULL;
    for (size_t i = 0; i < g_ctl.nxid; i++) {
        const struct xid *x = &g_ctl.xids[i];
        if (x->dev >= g_dev_count || !(s->reg[x->dev] & NVML_EVENT_XID))
            continue;
        if (best && x->seq >= best->seq)
            continue;
        if (set_done(s, x->seq))
            continue;
        best = x;
    }
    if (!best)
        return 0;
    if (s->ndone == s->capdone) {
        size_t cap = s->capdone ? s->capdone * 2 : 16;
        uint64_t *n = realloc(s->done, cap * sizeof(*n));
        if (!n)
            return 0;
        s->done = n;
        s->capdone = cap;
    }
    s->done[s->ndone++] = best->seq;
    *out = *best;
    return 1;
}

static nvmlReturn_t event_wait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms)
{
    uint64_t deadline = now_ns(CLOCK_MONOTONIC) + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        nvmlReturn_t r = sys_enter();
        if (r)
            return r;
        if (!valid_set(set) || !data)
            return leave(NVML_ERROR_INVALID_ARGUMENT);
        for (int d = 0; d < g_dev_count; d++)
            if (set->reg[d] && g_ctl.dev[d].lost)
                return leave(NVML_ERROR_GPU_IS_LOST);
        struct xid x;
        if (next_xid(set, &x)) {
            data->device = &g_devs[x.dev];
            data->eventType = NVML_EVENT_XID;
            data->eventData = x.code;
            data->gpuInstanceId = NVML_NO_INSTANCE;
            data->computeInstanceId = NVML_NO_INSTANCE;
            return leave(NVML_SUCCESS);
        }
        pthread_mutex_unlock(&g_lock);
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        if (now >= deadline)
            return NVML_ERROR_TIMEOUT;
        uint64_t left = deadline - now;
        if (left > 10000000ull)
            left = 10000000ull;
        struct timespec ts = {0, (long)left};
        nanosleep(&ts, NULL);
    }
}

API nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    return event_wait(set, data, timeoutms);
}

API nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_v1_t *data, unsigned int timeoutms)
{
    if (!data)
        return event_wait(set, NULL, timeoutms);
    nvmlEventData_t full;
    nvmlReturn_t r = event_wait(set, &full, timeoutms);
    if (r == NVML_SUCCESS) {
        data->device = full.device;
        data->eventType = full.eventType;
        data->eventData = full.eventData;
    }
    return r;
}

API nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    nvmlReturn_t r = sys_enter();
    if (r)
        return r;
    if (!valid_set(set))
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    set->magic = 0;
    free(set->done);
    free(set);
    return leave(NVML_SUCCESS);
}
