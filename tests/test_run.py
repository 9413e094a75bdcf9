"""`vfiomig run`: unmodified C programs against the model kernel through the preload library.

Each test compiles a small C program with gcc against the Linux 7.2 uAPI headers (ziglang)
and runs it under the shim; the program checks what it sees and prints it, the test checks
the output and the exit status. Without gcc or the headers the tests skip, except under CI,
where that is a failure.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from vfiomig.shim.build import BuildError, compile_program, preload_library, uapi_include_dirs
from vfiomig.tools.options import parse_device_spec
from vfiomig.tools.run import build_kernel, run_program

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "vmm_walk.c"


@pytest.fixture(scope="module")
def preload() -> str:
    try:
        uapi_include_dirs()
        return str(preload_library())
    except BuildError as e:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"vfiomig run cannot be tested in CI: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run_programs")


def build(bindir: Path, name: str, source: str, flags: Sequence[str] = ("-O1",)) -> Path:
    src = bindir / f"{name}.c"
    src.write_text(COMMON + source)
    return compile_program(src, bindir / name, flags=flags)


def vrun(
    preload: str,
    argv: Sequence[str | Path],
    devices: Sequence[str] = (),
    *,
    iommu_hw: str = "smmuv3",
    dma_pages: int = 0,
) -> int:
    kernel, paths = build_kernel(iommu_hw, [parse_device_spec(d) for d in devices])
    return run_program(kernel, paths, [str(a) for a in argv], lib=preload, dma_pages=dma_pages)


# Helpers every test program shares.
COMMON = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(cond, what)                                                              \
    do {                                                                           \
        if (!(cond)) {                                                         \
            fprintf(stderr, "FAIL line %d: %s (errno %d: %s)\n", __LINE__, \
                what, errno, strerror(errno));                         \
            exit(1);                                                       \
        }                                                                      \
    } while (0)
#define PAGE 4096UL

static __attribute__((unused)) uint32_t ioas_alloc(int fd)
{
    struct iommu_ioas_alloc a = {.size = sizeof(a)};
    return ioctl(fd, IOMMU_IOAS_ALLOC, &a) ? 0 : a.out_ioas_id;
}

static __attribute__((unused)) int map_fixed(int fd, uint32_t ioas, void *va, uint64_t len, uint64_t iova)
{
    struct iommu_ioas_map m = {
        .size = sizeof(m),
        .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
             IOMMU_IOAS_MAP_WRITEABLE,
        .ioas_id = ioas, .user_va = (uintptr_t)va, .length = len, .iova = iova,
    };
    return ioctl(fd, IOMMU_IOAS_MAP, &m);
}

static __attribute__((unused)) long unmap(int fd, uint32_t ioas, uint64_t iova, uint64_t len)
{
    struct iommu_ioas_unmap u = {.size = sizeof(u), .ioas_id = ioas, .iova = iova,
                     .length = len};
    return ioctl(fd, IOMMU_IOAS_UNMAP, &u) ? -errno : (long)u.length;
}

static __attribute__((unused)) void *hole(void)
{
    /* a page nothing can be read or written at, which no later mmap can take over */
    return mmap(NULL, PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

/* bind the device to iommufd, attach it to a dirty-tracking HWPT on a new IOAS */
static __attribute__((unused)) void bind_attach(int dev, int iommufd, uint32_t *ioas, uint32_t *hwpt_id)
{
    struct vfio_device_bind_iommufd bind = {.argsz = sizeof(bind), .iommufd = iommufd};
    CHECK(!ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind), "bind");
    *ioas = ioas_alloc(iommufd);
    CHECK(*ioas, "ioas");
    struct iommu_hwpt_alloc hwpt = {.size = sizeof(hwpt),
                    .flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
                    .dev_id = bind.out_devid, .pt_id = *ioas};
    CHECK(!ioctl(iommufd, IOMMU_HWPT_ALLOC, &hwpt), "hwpt");
    struct vfio_device_attach_iommufd_pt at = {.argsz = sizeof(at), .pt_id = hwpt.out_hwpt_id};
    CHECK(!ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at), "attach");
    *hwpt_id = hwpt.out_hwpt_id;
}

/* VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE: the data fd, or -1 */
static __attribute__((unused)) int set_state(int dev, uint32_t state)
{
    uint64_t buf[4] = {0};
    struct vfio_device_feature *f = (void *)buf;
    struct vfio_device_feature_mig_state *ms = (void *)f->data;
    f->argsz = sizeof(buf);
    f->flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    ms->device_state = state;
    CHECK(!ioctl(dev, VFIO_DEVICE_FEATURE, f), "set state");
    return ms->data_fd;
}

static __attribute__((unused)) const char *first_device(void)
{
    static char path[256];
    const char *env = getenv("VFIOMIG_DEVICES");
    snprintf(path, sizeof(path), "%s", env ? env : "");
    path[strcspn(path, ",")] = 0;
    return path;
}
"""


# ------------------------------------------------------------------ the example


def test_vmm_walk_example_under_vfiomig_run(preload: str, bindir: Path) -> None:
    """examples/vmm_walk.c, through the command line, as docs/run.md shows it."""
    exe = compile_program(EXAMPLE, bindir / "vmm_walk")
    vfiomig = [sys.executable, "-m", "vfiomig.cli"]
    cmd = [*vfiomig, "run", "--device", "reference,dma_logging=1", "--dma-pages", "1"]
    out = subprocess.run([*cmd, "--", str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout in (ROOT / "docs" / "run.md").read_text()  # the guide shows this run
    assert out.stdout.splitlines() == [
        "device /dev/vfio/devices/vfio0: bound to iommufd as dev_id 1",
        "ioas 2, hwpt 3 with dirty tracking, device attached",
        "mapped 16 pages of this process at iova 0x100000",
        "dirty tracking enabled",
        # the device writes one page after each call: page 1 after SET_DIRTY_TRACKING (which
        # cleared what came before), page 2 after the first read
        "dirty pages, first read (clears them): 1",
        "dirty pages, second read: 1",
        # pages 0-3: the DMA landed in the program's own buffer
        "pages of the buffer the device wrote: 4",
        "migration state: RUNNING",
        "RUNNING -> STOP_COPY: data fd open, stop-copy size 262336 bytes",
        "read 262336 bytes of device state to EOF",
        "STOP_COPY -> STOP",
        # pages 3-5, written before the device stopped; none after
        "dirty pages after the stop (written before it): 3",
        "unmapped 65536 bytes",
    ]
    # the exit status is the program's; without devices the example fails, and says why
    bad = subprocess.run([*vfiomig, "run", "--", str(exe)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "vmm_walk: /dev/vfio/devices/vfio0: No such file or directory" in bad.stderr


def test_exit_status_and_usage(preload: str, capfd: pytest.CaptureFixture[str]) -> None:
    sh = shutil.which("sh") or "/bin/sh"
    assert vrun(preload, [sh, "-c", "exit 7"]) == 7
    assert vrun(preload, [sh, "-c", "kill -TERM $$"]) == 128 + 15
    assert vrun(preload, ["/nonexistent/program"]) == 127
    assert vrun(preload, [sh, "-c", 'echo "$VFIOMIG_DEVICES $VFIOMIG_GROUPS"'], ["mtty"]) == 0
    assert "/dev/vfio/devices/vfio0 /dev/vfio/0" in capfd.readouterr().out
    from vfiomig.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run"])
    assert e.value.code == 2
    assert "no program given" in capfd.readouterr().err


# ------------------------------------------------------------------ pointers


EFAULT_PROGRAM = r"""
int main(void)
{
    int fd = open("/dev/iommu", O_RDWR), dev = open(first_device(), O_RDWR);
    uint32_t ioas, hwpt, state;
    char *two, *buf, data[64];
    CHECK(fd >= 0 && dev >= 0, "open");
    bind_attach(dev, fd, &ioas, &hwpt);
    void *h = hole();

    /* the ioctl's own arg */
    CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, h) == -1 && errno == EFAULT, "arg in a hole");
    CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, (void *)8) == -1 && errno == EFAULT, "arg near NULL");
    /* a struct that runs off its mapping into a hole: size is read, the rest faults */
    two = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(two + PAGE, PAGE);
    struct iommu_ioas_alloc *edge = (void *)(two + PAGE - 4);
    edge->size = sizeof(struct iommu_ioas_alloc);
    CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, edge) == -1 && errno == EFAULT, "struct off the end");
    /* pointers inside structs */
    struct iommu_ioas_iova_ranges rr = {.size = sizeof(rr), .ioas_id = ioas, .num_iovas = 4,
                        .allowed_iovas = (uintptr_t)h};
    CHECK(ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &rr) == -1 && errno == EFAULT, "allowed_iovas");
    CHECK(map_fixed(fd, ioas, h, PAGE, 0x100000) == -1 && errno == EFAULT, "IOAS_MAP of a hole");
    /* an output struct in read-only memory: read, then the copy back faults */
    struct iommu_ioas_alloc *ro = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ro->size = sizeof(*ro);
    mprotect(ro, PAGE, PROT_READ);
    CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, ro) == -1 && errno == EFAULT, "output to read-only");
    /* a dirty bitmap in a hole: IOMMU's report drops the bits (iova_bitmap.c), VFIO's
     * DMA logging report is EFAULT; DMA logging ranges in a hole are EFAULT */
    buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(!map_fixed(fd, ioas, buf, 4 * PAGE, 0x100000), "map");
    struct iommu_hwpt_get_dirty_bitmap gd = {.size = sizeof(gd), .hwpt_id = hwpt,
        .iova = 0x100000, .length = 4 * PAGE, .page_size = PAGE, .data = (uintptr_t)h};
    CHECK(!ioctl(fd, IOMMU_HWPT_GET_DIRTY_BITMAP, &gd), "dirty bitmap in a hole");
    uint64_t fb[8] = {0};
    struct vfio_device_feature *f = (void *)fb;
    struct vfio_device_feature_dma_logging_control *ctl = (void *)f->data;
    f->argsz = sizeof(fb);
    f->flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
    ctl->page_size = PAGE;
    ctl->num_ranges = 1;
    ctl->ranges = (uintptr_t)h;
    CHECK(ioctl(dev, VFIO_DEVICE_FEATURE, f) == -1 && errno == EFAULT, "logging ranges");
    struct vfio_device_feature_dma_logging_range range = {.iova = 0x100000, .length = 4 * PAGE};
    ctl->ranges = (uintptr_t)&range;
    CHECK(!ioctl(dev, VFIO_DEVICE_FEATURE, f), "logging start");
    struct vfio_device_feature_dma_logging_report *rep = (void *)f->data;
    memset(fb, 0, sizeof(fb));
    f->argsz = sizeof(fb);
    f->flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
    rep->iova = 0x100000;
    rep->length = 4 * PAGE;
    rep->page_size = PAGE;
    rep->bitmap = (uintptr_t)h;
    CHECK(ioctl(dev, VFIO_DEVICE_FEATURE, f) == -1 && errno == EFAULT, "logging bitmap");
    /* read(2) and write(2) buffers */
    int dfd = set_state(dev, VFIO_DEVICE_STATE_STOP_COPY);
    CHECK(dfd >= 0, "data fd");
    CHECK(read(dfd, h, 64) == -1 && errno == EFAULT, "read into a hole");
    CHECK(write(fd, h, 8) == -1 && errno == EINVAL, "iommufd has no write");
    CHECK(read(dfd, data, sizeof(data)) > 0, "read after the fault");
    /* a path in a hole */
    CHECK(open(h, O_RDWR) == -1 && errno == EFAULT, "path");
    (void)state;
    /* nothing was harmed: the model still answers */
    struct iommu_iova_range ranges[4];
    rr.allowed_iovas = (uintptr_t)ranges;
    CHECK(!ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &rr), "ranges after the faults");
    CHECK(unmap(fd, ioas, 0x100000, 4 * PAGE) == 4 * PAGE, "unmap");
    printf("ok\n");
    return 0;
}
"""


def test_unmapped_pointers_are_efault(
    preload: str, bindir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    exe = build(bindir, "efault", EFAULT_PROGRAM)
    assert vrun(preload, [exe], ["reference,dma_logging=1"]) == 0
    out, err = capfd.readouterr()
    assert out == "ok\n", err


# ------------------------------------------------------------------ fork and exec


FORK_PROGRAM = r"""
int main(int argc, char **argv)
{
    int fd, keep, gone, status;
    uint32_t ioas;
    pid_t pid;
    char a[16], b[16];

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4) { /* the exec'd image */
        keep = atoi(argv[2]);
        gone = atoi(argv[3]);
        CHECK(ioas_alloc(keep), "inherited fd after exec");
        CHECK(fcntl(gone, F_GETFD) == -1 && errno == EBADF, "O_CLOEXEC fd after exec");
        printf("exec: the inherited model fd works, the O_CLOEXEC one is gone\n");
        return 0;
    }
    fd = open("/dev/iommu", O_RDWR);
    ioas = ioas_alloc(fd);
    CHECK(ioas, "ioas");

    /* 1. the child maps through its inherited fd: the mapping is in the shared IOAS */
    pid = fork();
    if (pid == 0) {
        char *buf = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(buf, 1, 8 * PAGE);
        CHECK(!map_fixed(fd, ioas, buf, 8 * PAGE, 0x400000), "child map");
        close(fd);
        _exit(0);
    }
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status), "child 1");
    long len = unmap(fd, ioas, 0x400000, 8 * PAGE);
    printf("parent unmapped the child's mapping: %ld bytes\n", len);

    /* 2. the parent closes its fd right after fork: the child's copy stays open */
    pid = fork();
    if (pid == 0) {
        usleep(50000);
        CHECK(ioas_alloc(fd), "child's copy after the parent's close");
        _exit(0);
    }
    close(fd);
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status), "child 2");
    CHECK(ioas_alloc(fd) == 0 && errno == EBADF, "the parent's fd is closed");
    printf("the child used its copy after the parent closed its own\n");

    /* 3. exec keeps a model fd without O_CLOEXEC and drops one with it */
    keep = open("/dev/iommu", O_RDWR);
    gone = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    CHECK(keep >= 0 && gone >= 0, "open");
    pid = fork();
    if (pid == 0) {
        snprintf(a, sizeof(a), "%d", keep);
        snprintf(b, sizeof(b), "%d", gone);
        execl("/proc/self/exe", argv[0], "exec", a, b, (char *)NULL);
        _exit(127);
    }
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status), "exec");
    CHECK(ioas_alloc(gone), "the parent's O_CLOEXEC fd is still open");
    printf("ok\n");
    return 0;
}
"""


def test_fork_children_share_the_model_files(
    preload: str, bindir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    exe = build(bindir, "fork", FORK_PROGRAM)
    assert vrun(preload, [exe]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == [
        "parent unmapped the child's mapping: 32768 bytes",
        "the child used its copy after the parent closed its own",
        "exec: the inherited model fd works, the O_CLOEXEC one is gone",
        "ok",
    ], err


# ------------------------------------------------------------------ threads and signals


THREADS_PROGRAM = r"""
#define ITER 150
static int fd;
static uint32_t ioas;
static volatile sig_atomic_t in_handler_ok, in_handler_bad;

static void on_alarm(int sig)
{
    struct iommu_iova_range r[2];
    struct iommu_ioas_iova_ranges rr = {.size = sizeof(rr), .ioas_id = ioas, .num_iovas = 2,
                        .allowed_iovas = (uintptr_t)r};
    int e = errno;
    if (ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &rr) == 0 && rr.num_iovas >= 1)
        in_handler_ok++;
    else
        in_handler_bad++;
    errno = e;
}

static void *worker(void *arg)
{
    int id = (int)(intptr_t)arg, bad = 0;
    uint64_t iova = 0x1000000UL * (id + 1);
    unsigned char *buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < ITER; i++) {
        bad += map_fixed(fd, ioas, buf, 4 * PAGE, iova) != 0;
        bad += unmap(fd, ioas, iova, 4 * PAGE) != (long)(4 * PAGE);
        int f = open("/dev/iommu", O_RDWR);
        bad += f < 0 || !ioas_alloc(f);
        bad += close(f) != 0;
    }
    return (void *)(intptr_t)bad;
}

int main(void)
{
    pthread_t t[2];
    void *bad[2];
    struct sigaction sa = {.sa_handler = on_alarm}; /* no SA_RESTART */
    struct itimerval it = {{0, 2000}, {0, 2000}};

    fd = open("/dev/iommu", O_RDWR);
    ioas = ioas_alloc(fd);
    CHECK(ioas, "ioas");
    sigaction(SIGALRM, &sa, NULL);
    setitimer(ITIMER_REAL, &it, NULL);
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], &bad[i]);
    memset(&it, 0, sizeof(it));
    setitimer(ITIMER_REAL, &it, NULL);
    printf("thread failures: %ld %ld\n", (long)(intptr_t)bad[0], (long)(intptr_t)bad[1]);
    printf("calls from signal handlers: %s, failed %d\n", in_handler_ok > 0 ? "some" : "none",
           (int)in_handler_bad);
    /* both threads' mappings are gone: unmap-all (0, U64_MAX) finds nothing */
    printf("left mapped: %ld\n", unmap(fd, ioas, 0, UINT64_MAX));
    return 0;
}
"""


def test_threads_and_signal_handlers_call_at_once(
    preload: str, bindir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    exe = build(bindir, "threads", THREADS_PROGRAM)
    assert vrun(preload, [exe]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == [
        "thread failures: 0 0",
        "calls from signal handlers: some, failed 0",
        "left mapped: 0",
    ], err


# ------------------------------------------------------------------ fortified and 64-bit entry points


FORTIFY_PROGRAM = r"""
int main(int argc, char **argv)
{
    volatile int rdwr = O_RDWR; /* not a constant: open() becomes __open64_2 */
    volatile size_t want = 4096;
    volatile nfds_t nfds = 1;
    char chunk[4096];
    uint32_t ioas, hwpt;
    ssize_t n, total = 0;

    int fd = open("/dev/iommu", rdwr);
    int dev = openat(AT_FDCWD, first_device(), rdwr);
    int fd2 = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0 && dev >= 0 && fd2 >= 0, "open");
    CHECK((fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDWR, "fcntl64 F_GETFL");
    CHECK(fcntl(fd2, F_GETFD) == FD_CLOEXEC, "fcntl64 F_GETFD");
    int dupfd = fcntl(fd, F_DUPFD_CLOEXEC, 20);
    CHECK(dupfd >= 20, "F_DUPFD_CLOEXEC");
    bind_attach(dev, dupfd, &ioas, &hwpt); /* the dup is the same iommufd */
    CHECK(mmap(NULL, PAGE, PROT_READ, MAP_SHARED, dev, 0) == MAP_FAILED && errno == ENODEV,
          "mmap64 of a model fd");
    int dfd = set_state(dev, VFIO_DEVICE_STATE_STOP_COPY);
    struct pollfd pfd = {.fd = dfd, .events = POLLIN};
    CHECK(poll(&pfd, nfds, 1000) == 1 && (pfd.revents & POLLIN), "__poll_chk");
    CHECK(lseek(dfd, 0, SEEK_SET) == -1 && errno == ESPIPE, "lseek64 of a stream");
    CHECK(pread(dfd, chunk, want, 0) == -1 && errno == ESPIPE, "__pread64_chk of a stream");
    CHECK(pwrite(dfd, chunk, 8, 0) == -1 && errno == ESPIPE, "pwrite64 of a stream");
    while ((n = read(dfd, chunk, want)) > 0) /* __read_chk */
        total += n;
    CHECK(n == 0, "read to EOF");
    printf("read %zd bytes through __read_chk\n", total);
    CHECK(close(dfd) == 0 && close(dupfd) == 0, "close");
    CHECK(ioas_alloc(fd), "the iommufd outlives its dup");
    printf("ok\n");
    return 0;
}
"""

FORTIFIED_IMPORTS = {
    "open64",
    "__open64_2",
    "__openat64_2",
    "fcntl64",
    "mmap64",
    "__poll_chk",
    "lseek64",
    "__pread64_chk",
    "pwrite64",
    "__read_chk",
}


def test_fortified_and_64bit_variants_route(
    preload: str, bindir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    flags = ("-O2", "-D_FILE_OFFSET_BITS=64", "-D_FORTIFY_SOURCE=2")
    exe = build(bindir, "fortify", FORTIFY_PROGRAM, flags)
    nm = shutil.which("nm")
    if nm is not None and platform.machine() == "x86_64":  # glibc's x86-64 symbol names
        syms = subprocess.run([nm, "-D", "--undefined-only", str(exe)], capture_output=True)
        imported = {s.split("@")[0] for s in re.findall(r"U (\S+)", syms.stdout.decode())}
        assert FORTIFIED_IMPORTS <= imported, FORTIFIED_IMPORTS - imported
    assert vrun(preload, [exe], ["reference"]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == ["read 262336 bytes through __read_chk", "ok"], err


# ------------------------------------------------------------------ the program's own files


OWN_FILES_PROGRAM = r"""
int main(int argc, char **argv)
{
    char path[4096], buf[64];
    int p[2];
    struct stat st;

    snprintf(path, sizeof(path), "%s/own.txt", argv[1]);
    int a = open(path, O_CREAT | O_RDWR | O_TRUNC, 0640);
    int m = open("/dev/iommu", O_RDWR);
    int b = open(path, O_RDONLY);
    CHECK(a >= 0 && m >= 0 && b >= 0 && a != m && b != m && a != b, "distinct fds");
    CHECK(write(a, "hello world", 11) == 11, "write");
    CHECK(fstat(a, &st) == 0 && st.st_size == 11 && (st.st_mode & 0777) == 0640, "mode");
    CHECK(lseek(a, 0, SEEK_SET) == 0 && read(a, buf, 5) == 5 && !memcmp(buf, "hello", 5), "read");
    CHECK(pread(b, buf, 5, 6) == 5 && !memcmp(buf, "world", 5), "pread");
    CHECK(pwrite(a, "HELLO", 5, 0) == 5, "pwrite");
    /* numbers: lowest free, whichever kind of file takes it */
    CHECK(close(a) == 0, "close");
    int c = open("/dev/iommu", O_RDWR);
    CHECK(c == a, "a model file takes the freed number");
    CHECK(close(b) == 0, "close");
    int d = open(path, O_RDONLY);
    CHECK(d == b, "a real file takes the freed number");
    /* dup2 of a real file over a model fd: the model file goes */
    CHECK(dup2(d, c) == c, "dup2 real over model");
    CHECK(read(c, buf, 5) == 5 && !memcmp(buf, "HELLO", 5), "read the real file");
    CHECK(ioctl(c, IOMMU_IOAS_ALLOC, buf) == -1 && errno == ENOTTY, "ioctl on a real file");
    /* dup2 of a model fd over a real one: the same iommufd */
    CHECK(dup2(m, d) == d && close(m) == 0 && ioas_alloc(d), "dup2 model over real");
    /* poll over a pipe and a model fd together */
    CHECK(pipe(p) == 0 && write(p[1], "x", 1) == 1, "pipe");
    struct pollfd pf[2] = {{.fd = p[0], .events = POLLIN}, {.fd = d, .events = POLLIN}};
    CHECK(poll(pf, 2, 1000) == 2 && pf[0].revents == POLLIN && pf[1].revents == POLLIN, "poll");
    CHECK(read(p[0], buf, 1) == 1 && buf[0] == 'x', "pipe read");
    /* mmap of a real file */
    char *map = mmap(NULL, 11, PROT_READ, MAP_SHARED, c, 0);
    CHECK(map != MAP_FAILED && !memcmp(map, "HELLO world", 11), "mmap of a real file");
    /* stdio on real files */
    FILE *fp = fopen(path, "r");
    CHECK(fp && fgets(buf, sizeof(buf), fp) && !strcmp(buf, "HELLO world"), "fopen");
    fclose(fp);
    /* a program that closes every fd it does not know, as daemons do */
    for (int fd = 3; fd < 1024; fd++)
        close(fd);
    CHECK(ioas_alloc(d) == 0 && errno == EBADF, "closed");
    int e = open("/dev/iommu", O_RDWR);
    CHECK(e == 3 && ioas_alloc(e), "the model after closing everything");
    printf("ok\n");
    return 0;
}
"""


def test_the_programs_own_files_work_untouched(
    preload: str, bindir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    exe = build(bindir, "own_files", OWN_FILES_PROGRAM)
    assert vrun(preload, [exe, tmp_path]) == 0
    out, err = capfd.readouterr()
    assert out == "ok\n", err
    assert (tmp_path / "own.txt").read_text() == "HELLO world"


# ------------------------------------------------------------------ the legacy container


LEGACY_PROGRAM = r"""
int main(void)
{
    int container = open("/dev/vfio/vfio", O_RDWR), group = open("/dev/vfio/0", O_RDWR);
    CHECK(container >= 0 && group >= 0, "open");
    CHECK(ioctl(container, VFIO_GET_API_VERSION) == VFIO_API_VERSION, "api");
    CHECK(ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1, "extension by value");
    CHECK(!ioctl(group, VFIO_GROUP_SET_CONTAINER, &container), "an int32 pointer");
    CHECK(!ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU), "set iommu");
    CHECK(ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "vfio9") == -1 && errno == ENODEV, "name");
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "vfio0"); /* a file the ioctl creates */
    CHECK(dev > group && fcntl(dev, F_GETFD) == FD_CLOEXEC, "device fd, O_CLOEXEC");
    struct vfio_device_info info = {.argsz = sizeof(info)};
    CHECK(!ioctl(dev, VFIO_DEVICE_GET_INFO, &info), "device info");
    void *buf = mmap(NULL, 16 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof(map),
        .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uintptr_t)buf, .iova = 0x100000, .size = 16 * PAGE};
    CHECK(!ioctl(container, VFIO_IOMMU_MAP_DMA, &map), "map dma");
    map.vaddr = (uintptr_t)hole();
    map.iova = 0x200000;
    map.size = PAGE;
    CHECK(ioctl(container, VFIO_IOMMU_MAP_DMA, &map) == -1 && errno == EFAULT, "map a hole");
    struct vfio_iommu_type1_dirty_bitmap start = {.argsz = sizeof(start),
        .flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_START};
    CHECK(!ioctl(container, VFIO_IOMMU_DIRTY_PAGES, &start), "dirty start");
    __u64 bits = 0;
    struct {
        struct vfio_iommu_type1_dirty_bitmap h;
        struct vfio_iommu_type1_dirty_bitmap_get get;
    } q = {{.argsz = sizeof(q), .flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP},
           {.iova = 0x100000, .size = 16 * PAGE,
            .bitmap = {.pgsize = PAGE, .size = sizeof(bits), .data = &bits}}};
    CHECK(!ioctl(container, VFIO_IOMMU_DIRTY_PAGES, &q), "dirty bitmap");
    /* type1 reports every pinned page of a group that never pinned selectively */
    printf("type1 dirty pages: %d\n", __builtin_popcountll(bits));
    return 0;
}
"""


def test_legacy_container_values_strings_and_created_fds(
    preload: str, bindir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Value arguments (CHECK_EXTENSION, SET_IOMMU), an int32 pointer (SET_CONTAINER), a
    string (GET_DEVICE_FD, whose new fd lands on the reserved spare) and type1's bitmaps."""
    exe = build(bindir, "legacy", LEGACY_PROGRAM)
    assert vrun(preload, [exe], ["reference"]) == 0
    out, err = capfd.readouterr()
    assert out == "type1 dirty pages: 16\n", err
