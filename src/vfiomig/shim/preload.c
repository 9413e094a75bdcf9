/*
 * vfiomig preload library: runs an unmodified, dynamically linked program against the
 * vfiomig model kernel. Loaded with LD_PRELOAD by `vfiomig run`, it routes the program's
 * calls on /dev/iommu, /dev/vfio/vfio, /dev/vfio/N and /dev/vfio/devices/vfioN (and on the fds
 * they give) to the model server over a UNIX socket; every other call goes to the real libc.
 *
 * Protocol: src/vfiomig/shim/protocol.py (its numbers arrive here as -D flags, build.py).
 * Server:   src/vfiomig/shim/server.py. User documentation: docs/run.md.
 *
 * - A model file owns a real fd: a placeholder open of /dev/null with the open's access
 *   mode, O_CLOEXEC and O_NONBLOCK, so the number is the lowest free one, as the kernel
 *   would give, and can never collide with the program's own files. F_GETFL / F_SETFL /
 *   F_GETFD / F_SETFD / FIOCLEX / FIONBIO act on the placeholder; fork and exec keep or drop
 *   it as the kernel does, and the server follows (FORK_*, HELLO + FDS).
 * - An ioctl on a model fd reserves one more placeholder (the "spare") before the call: a
 *   file the ioctl creates (a migration data fd, VFIO_GROUP_GET_DEVICE_FD's device fd) is
 *   installed there, at the number get_unused_fd_flags() would pick.
 * - Each thread has its own connection; a call made from a signal handler while its thread
 *   waits for a reply uses a connection of its own. The server serializes all calls.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct vfm_req {
	uint32_t op;
	uint32_t seq;
	int64_t arg[6];
};
struct vfm_rep {
	int64_t ret;
	int32_t err;
	uint32_t seq;
	int64_t aux;
};
_Static_assert(sizeof(struct vfm_req) == VFM_REQUEST_SIZE, "request size (protocol.py)");
_Static_assert(sizeof(struct vfm_rep) == VFM_REPLY_SIZE, "reply size (protocol.py)");

#define VFM_MAX_FD 65536
#define FD_MODEL 1 /* a model file's placeholder */
#define FD_CONN 2  /* one of this library's connections to the server */

static unsigned char fd_kind[VFM_MAX_FD]; /* read and written with __atomic */
static _Atomic int n_model;                /* how many FD_MODEL entries there are */
static int enabled;
static int tracing;
/* Fault injection served (vfiomig run --iommufd-test): the fail-nth files go to the model,
 * /sys/kernel/debug/... to the directory the run made for it (VFM_ENV_DEBUGFS). */
static int fault_injection;
static char debugfs_dir[512];
static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int64_t pending_token; /* set in a fork child: claims the fd table copied for it */

/* fork takes it for writing; calls that change the fd table take it for reading */
static pthread_rwlock_t fd_lock = PTHREAD_RWLOCK_INITIALIZER;
static pthread_key_t conn_key;

static __thread int t_conn = -1;
static __thread pid_t t_conn_pid;
static __thread int t_busy;
static __thread uint32_t t_seq;

extern void __chk_fail(void) __attribute__((noreturn));

/* ---------------------------------------------------------------- the real functions */

#define REAL(ret, name, ...)                                                              \
	static ret (*real_##name)(__VA_ARGS__);                                           \
	static void resolve_##name(void)                                                  \
	{                                                                                 \
		if (!real_##name)                                                         \
			real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name);      \
	}

REAL(int, open, const char *, int, ...)
REAL(int, open64, const char *, int, ...)
REAL(int, openat, int, const char *, int, ...)
REAL(int, openat64, int, const char *, int, ...)
REAL(int, __open_2, const char *, int)
REAL(int, __open64_2, const char *, int)
REAL(int, __openat_2, int, const char *, int)
REAL(int, __openat64_2, int, const char *, int)
REAL(int, close, int)
REAL(int, close_range, unsigned int, unsigned int, int)
REAL(int, ioctl, int, unsigned long, ...)
REAL(ssize_t, read, int, void *, size_t)
REAL(ssize_t, write, int, const void *, size_t)
REAL(ssize_t, pread, int, void *, size_t, off_t)
REAL(ssize_t, pread64, int, void *, size_t, off64_t)
REAL(ssize_t, pwrite, int, const void *, size_t, off_t)
REAL(ssize_t, pwrite64, int, const void *, size_t, off64_t)
REAL(ssize_t, __read_chk, int, void *, size_t, size_t)
REAL(ssize_t, __pread_chk, int, void *, size_t, off_t, size_t)
REAL(ssize_t, __pread64_chk, int, void *, size_t, off64_t, size_t)
REAL(off_t, lseek, int, off_t, int)
REAL(off64_t, lseek64, int, off64_t, int)
REAL(int, poll, struct pollfd *, nfds_t, int)
REAL(int, ppoll, struct pollfd *, nfds_t, const struct timespec *, const sigset_t *)
REAL(void *, mmap, void *, size_t, int, int, int, off_t)
REAL(void *, mmap64, void *, size_t, int, int, int, off64_t)
REAL(int, fcntl, int, int, ...)
REAL(int, fcntl64, int, int, ...)
REAL(int, dup, int)
REAL(int, dup2, int, int)
REAL(int, dup3, int, int, int)
REAL(pid_t, fork, void)
REAL(DIR *, opendir, const char *)

/* The library's own file operations never go through the wrappers. */
static int raw_open_null(int flags)
{
	return (int)syscall(SYS_openat, AT_FDCWD, "/dev/null", flags);
}

static int raw_close(int fd)
{
	return (int)syscall(SYS_close, fd);
}

/*
 * Copy n bytes of this process's memory as the kernel would: through process_vm_readv /
 * writev, which answer a bad address with a short count or EFAULT instead of a SIGSEGV.
 * Returns the bytes copied (a prefix, when the range runs into unmapped memory).
 */
static ssize_t self_copy(void *dst, const void *src, size_t n, int to_src)
{
	struct iovec local = {.iov_base = to_src ? (void *)src : dst, .iov_len = n};
	struct iovec remote = {.iov_base = to_src ? dst : (void *)src, .iov_len = n};
	return syscall(to_src ? SYS_process_vm_writev : SYS_process_vm_readv, getpid(), &local,
		       1UL, &remote, 1UL, 0UL);
}

/* ---------------------------------------------------------------- fd bookkeeping */

static int kind_of(int fd)
{
	if (fd < 0 || fd >= VFM_MAX_FD)
		return 0;
	return __atomic_load_n(&fd_kind[fd], __ATOMIC_ACQUIRE);
}

static int is_model(int fd)
{
	return kind_of(fd) == FD_MODEL;
}

static void set_kind(int fd, int kind)
{
	if (fd < 0 || fd >= VFM_MAX_FD)
		return;
	int old = __atomic_exchange_n(&fd_kind[fd], (unsigned char)kind, __ATOMIC_ACQ_REL);
	n_model += (kind == FD_MODEL) - (old == FD_MODEL);
}

/* Whether s is a run of decimal digits followed by `end` (a task or process id). */
static const char *digits_then(const char *s, const char *end)
{
	const char *q = s;
	while (*q >= '0' && *q <= '9')
		q++;
	if (q == s || strncmp(q, end, strlen(end)))
		return NULL;
	return q + strlen(end);
}

/* The per-task fault-injection file (fs/proc/base.c, tid_base_stuff "fail-nth"):
 * /proc/thread-self/fail-nth, /proc/self/task/TID/fail-nth, /proc/PID/task/TID/fail-nth. */
static int fail_nth_path(const char *p)
{
	const char *q;

	if (!strcmp(p, "/proc/thread-self/fail-nth"))
		return 1;
	if (strncmp(p, "/proc/", 6))
		return 0;
	q = p + 6;
	if (!strncmp(q, "self/task/", 10))
		q += 10;
	else if (!(q = digits_then(q, "/task/")))
		return 0;
	q = digits_then(q, "/fail-nth");
	return q && !*q;
}

/* Whether path names a model node; path is the caller's pointer, possibly a bad one. */
static int model_path(const char *path)
{
	char p[128];
	ssize_t got;

	if (!enabled || !path)
		return 0;
	got = self_copy(p, path, sizeof(p) - 1, 0);
	if (got <= 0)
		return 0; /* unreadable: the real open answers EFAULT */
	p[got] = 0;
	if (strlen(p) == (size_t)got && got == sizeof(p) - 1)
		return !strncmp(p, "/dev/vfio/", 10); /* long: the server reads all of it */
	if (!strcmp(p, "/dev/iommu") || !strcmp(p, "/dev/vfio/vfio"))
		return 1;
	if (!strncmp(p, "/dev/vfio/devices/", 18))
		return p[18] && !strchr(p + 18, '/');
	if (!strncmp(p, "/dev/vfio/", 10)) {
		const char *q = p + 10;
		if (!*q)
			return 0;
		for (; *q; q++)
			if (*q < '0' || *q > '9')
				return 0;
		return 1;
	}
	return fault_injection && fail_nth_path(p);
}

/*
 * /sys/kernel/debug and what is under it, as the run serves it: `out` gets the same path
 * under the run's debugfs directory. 0 when path is anything else (or unreadable).
 */
static int debugfs_redirect(const char *path, char *out, size_t outsz)
{
	static const char root[] = "/sys/kernel/debug";
	char p[512];
	ssize_t got;
	int n;

	if (!fault_injection || !path)
		return 0;
	got = self_copy(p, path, sizeof(p) - 1, 0);
	if (got <= 0)
		return 0;
	p[got] = 0;
	if (strlen(p) == (size_t)got && got == sizeof(p) - 1)
		return 0; /* longer than any file the run serves */
	if (strncmp(p, root, sizeof(root) - 1) ||
	    (p[sizeof(root) - 1] && p[sizeof(root) - 1] != '/'))
		return 0;
	n = snprintf(out, outsz, "%s%s", debugfs_dir, p + sizeof(root) - 1);
	return n > 0 && (size_t)n < outsz;
}

static void trace(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n;

	if (!tracing)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n > 0)
		(void)!syscall(SYS_write, 2, buf, n < (int)sizeof(buf) ? n : (int)sizeof(buf) - 1);
}

static const char *op_name(uint32_t op)
{
	static const char *const names[] = {
		[VFM_OP_HELLO] = "hello",   [VFM_OP_FDS] = "fds",
		[VFM_OP_OPEN] = "open",     [VFM_OP_CLOSE] = "close",
		[VFM_OP_DUP] = "dup",       [VFM_OP_IOCTL] = "ioctl",
		[VFM_OP_READ] = "read",     [VFM_OP_WRITE] = "write",
		[VFM_OP_PREAD] = "pread",   [VFM_OP_PWRITE] = "pwrite",
		[VFM_OP_LSEEK] = "lseek",   [VFM_OP_POLL] = "poll",
		[VFM_OP_FORK_PREPARE] = "fork_prepare", [VFM_OP_FORK_COMMIT] = "fork_commit",
		[VFM_OP_FORK_ABORT] = "fork_abort",
	};
	return op < sizeof(names) / sizeof(names[0]) && names[op] ? names[op] : "?";
}

/* ---------------------------------------------------------------- the connection */

static int send_all(int s, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t r = send(s, p, n, MSG_NOSIGNAL);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static int recv_all(int s, void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t r = recv(s, p, n, 0);
		if (r < 0 && errno == EINTR)
			continue; /* the call was sent: wait for its reply, never send it twice */
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

/* One request and its reply on connection s. */
static int exchange(int s, uint32_t op, const int64_t *arg, struct vfm_rep *rep)
{
	struct vfm_req req = {.op = op, .seq = ++t_seq};
	memcpy(req.arg, arg, sizeof(req.arg));
	if (send_all(s, &req, sizeof(req)) || recv_all(s, rep, sizeof(*rep)))
		return -1;
	return rep->seq == req.seq ? 0 : -1;
}

static void conn_forget(int s)
{
	set_kind(s, 0);
	raw_close(s);
}

static void conn_key_destroy(void *v)
{
	/* thread exit: its connection goes (the value is fd + 1) */
	int s = (int)(intptr_t)v - 1;
	if (s >= 0 && kind_of(s) == FD_CONN)
		conn_forget(s);
}

/* A new connection, moved high in the fd space, that has said HELLO. */
static int conn_open(void)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct rlimit rl;
	struct vfm_rep rep;
	int64_t arg[6] = {0};
	int s, hi, low = 256;

	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	memcpy(sa.sun_path, sock_path, sizeof(sa.sun_path));
	if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		raw_close(s);
		return -1;
	}
	/* Out of the program's way: high above the numbers it is likely to use. */
	if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur > 128)
		low = (int)(rl.rlim_cur > VFM_MAX_FD ? VFM_MAX_FD : rl.rlim_cur) - 64;
	hi = (int)syscall(SYS_fcntl, s, F_DUPFD_CLOEXEC, low);
	if (hi >= 0 && hi < VFM_MAX_FD) {
		raw_close(s);
		s = hi;
	} else if (hi >= 0) {
		raw_close(hi);
	}
	set_kind(s, FD_CONN); /* atomic, no lock: a signal handler may open one too */
	arg[0] = pending_token;
	arg[1] = getppid();
	if (exchange(s, VFM_OP_HELLO, arg, &rep) || rep.err) {
		conn_forget(s);
		return -1;
	}
	pending_token = 0;
	return s;
}

/* One call into the model: its result, or -1 with errno set. */
static int64_t vfm_call(uint32_t op, int64_t a0, int64_t a1, int64_t a2, int64_t a3,
			int64_t *aux)
{
	int64_t arg[6] = {a0, a1, a2, a3, 0, 0};
	struct vfm_rep rep;
	pid_t me = getpid();
	int s, temp = 0, saved = errno;

	if (t_busy) {
		/* re-entered from a signal handler while this thread waits for a reply */
		t_busy++;
		s = conn_open();
		temp = 1;
	} else {
		t_busy++;
		if (t_conn >= 0 && t_conn_pid != me)
			t_conn = -1; /* a child that did not come through fork() */
		if (t_conn < 0) {
			t_conn = conn_open();
			t_conn_pid = me;
			if (t_conn >= 0)
				pthread_setspecific(conn_key, (void *)(intptr_t)(t_conn + 1));
		}
		s = t_conn;
	}
	if (s < 0 || exchange(s, op, arg, &rep)) {
		if (s >= 0) {
			conn_forget(s);
			if (!temp)
				t_conn = -1;
		}
		t_busy--;
		errno = EIO; /* the model server is gone */
		return -1;
	}
	if (temp)
		conn_forget(s);
	t_busy--;
	if (aux)
		*aux = rep.aux;
	if (tracing && op == VFM_OP_OPEN) {
		char p[96] = "?";
		ssize_t got = self_copy(p, (const void *)(intptr_t)a0, sizeof(p) - 1, 0);
		p[got > 0 ? got : 1] = 0;
		trace("vfiomig: open(\"%s\", %#llx) = %lld%s%s\n", p, (long long)a1,
		      (long long)rep.ret, rep.err ? " " : "", rep.err ? strerror(rep.err) : "");
	} else {
		trace("vfiomig: %s(%lld, %#llx, %#llx, %lld) = %lld%s%s\n", op_name(op),
		      (long long)a0, (long long)a1, (long long)a2, (long long)a3,
		      (long long)rep.ret, rep.err ? " " : "", rep.err ? strerror(rep.err) : "");
	}
	if (rep.err) {
		errno = rep.err;
		return -1;
	}
	errno = saved;
	return rep.ret;
}

/* After exec: which inherited fds are still model files (O_CLOEXEC ones are gone). */
static void sync_fds(void)
{
	static int32_t fds[4096];
	int64_t n = vfm_call(VFM_OP_FDS, (int64_t)(intptr_t)fds, 4096, 0, 0, NULL);
	struct stat st;

	for (int64_t i = 0; i < n && i < 4096; i++) {
		int fd = fds[i];
		if (fd >= 0 && fd < VFM_MAX_FD && !fstat(fd, &st) && S_ISCHR(st.st_mode) &&
		    st.st_rdev == makedev(1, 3))
			set_kind(fd, FD_MODEL);
		else
			vfm_call(VFM_OP_CLOSE, fd, 0, 0, 0, NULL);
	}
}

__attribute__((constructor)) static void vfm_init(void)
{
	const char *p = getenv(VFM_ENV_SOCKET);
	const char *t = getenv(VFM_ENV_TRACE);
	const char *srv = getenv("VFIOMIG_SERVER_PID");
	const char *dbg = getenv(VFM_ENV_DEBUGFS);

	if (!p || !*p || strlen(p) >= sizeof(sock_path))
		return;
	if (dbg && *dbg == '/' && strlen(dbg) < sizeof(debugfs_dir) - 64) {
		strcpy(debugfs_dir, dbg);
		fault_injection = 1;
	}
	strcpy(sock_path, p);
	tracing = t && *t && strcmp(t, "0");
	pthread_key_create(&conn_key, conn_key_destroy);
	/* Yama ptrace_scope 1: let the server read this process even if it is no ancestor
	 * (a daemonized child). Without Yama this is EINVAL and changes nothing. */
	if (srv)
		prctl(PR_SET_PTRACER, (unsigned long)atol(srv), 0, 0, 0);
	enabled = 1;
	sync_fds();
}

/* ---------------------------------------------------------------- open / close / dup */

static int vfm_open(const char *path, int flags)
{
	int fd;

	pthread_rwlock_rdlock(&fd_lock);
	fd = raw_open_null(flags & (O_ACCMODE | O_CLOEXEC | O_NONBLOCK));
	if (fd >= VFM_MAX_FD) {
		raw_close(fd);
		fd = -1;
		errno = EMFILE;
	}
	if (fd >= 0) {
		if (vfm_call(VFM_OP_OPEN, (int64_t)(intptr_t)path, flags, fd, 0, NULL) < 0) {
			int e = errno;
			raw_close(fd);
			errno = e;
			fd = -1;
		} else {
			set_kind(fd, FD_MODEL);
		}
	}
	pthread_rwlock_unlock(&fd_lock);
	return fd;
}

static mode_t mode_arg(int flags, va_list ap)
{
	return (flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

#define OPEN_WRAPPER(name)                                                                \
	int name(const char *path, int flags, ...)                                        \
	{                                                                                 \
		char served[600];                                                         \
		va_list ap;                                                               \
		mode_t mode;                                                              \
		if (model_path(path))                                                     \
			return vfm_open(path, flags);                                     \
		if (debugfs_redirect(path, served, sizeof(served)))                       \
			path = served;                                                    \
		va_start(ap, flags);                                                      \
		mode = mode_arg(flags, ap);                                               \
		va_end(ap);                                                               \
		resolve_##name();                                                         \
		return real_##name(path, flags, mode);                                    \
	}
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)

#define OPENAT_WRAPPER(name)                                                              \
	int name(int dirfd, const char *path, int flags, ...)                             \
	{                                                                                 \
		char served[600];                                                         \
		va_list ap;                                                               \
		mode_t mode;                                                              \
		if (model_path(path))                                                     \
			return vfm_open(path, flags);                                     \
		if (debugfs_redirect(path, served, sizeof(served)))                       \
			path = served;                                                    \
		va_start(ap, flags);                                                      \
		mode = mode_arg(flags, ap);                                               \
		va_end(ap);                                                               \
		resolve_##name();                                                         \
		return real_##name(dirfd, path, flags, mode);                             \
	}
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)

/* The fortified forms (glibc's bits/fcntl2.h calls them when flags are not constant). */
int __open_2(const char *path, int flags)
{
	char served[600];

	if (model_path(path))
		return vfm_open(path, flags);
	if (debugfs_redirect(path, served, sizeof(served)))
		path = served;
	resolve___open_2();
	return real___open_2(path, flags);
}

int __open64_2(const char *path, int flags)
{
	char served[600];

	if (model_path(path))
		return vfm_open(path, flags);
	if (debugfs_redirect(path, served, sizeof(served)))
		path = served;
	resolve___open64_2();
	return real___open64_2(path, flags);
}

int __openat_2(int dirfd, const char *path, int flags)
{
	char served[600];

	if (model_path(path))
		return vfm_open(path, flags);
	if (debugfs_redirect(path, served, sizeof(served)))
		path = served;
	resolve___openat_2();
	return real___openat_2(dirfd, path, flags);
}

int __openat64_2(int dirfd, const char *path, int flags)
{
	char served[600];

	if (model_path(path))
		return vfm_open(path, flags);
	if (debugfs_redirect(path, served, sizeof(served)))
		path = served;
	resolve___openat64_2();
	return real___openat64_2(dirfd, path, flags);
}

/* opendir of /sys/kernel/debug (glibc's own open inside opendir is not interposable). */
DIR *opendir(const char *path)
{
	char served[600];

	if (debugfs_redirect(path, served, sizeof(served)))
		path = served;
	resolve_opendir();
	return real_opendir(path);
}

/* Drop a model fd's file (the server) and then its placeholder. */
static int model_close(int fd)
{
	int r;

	pthread_rwlock_rdlock(&fd_lock);
	vfm_call(VFM_OP_CLOSE, fd, 0, 0, 0, NULL);
	set_kind(fd, 0);
	r = raw_close(fd);
	pthread_rwlock_unlock(&fd_lock);
	return r;
}

int close(int fd)
{
	int k = kind_of(fd);
	if (k == FD_MODEL)
		return model_close(fd);
	if (k == FD_CONN)
		return 0; /* a program closing "all fds": the library keeps its connection */
	resolve_close();
	return real_close(fd);
}

int close_range(unsigned int first, unsigned int last, int flags)
{
	unsigned int fd, from = first;

	resolve_close_range();
	if (!enabled || (flags & CLOSE_RANGE_CLOEXEC))
		return real_close_range(first, last, flags);
	for (fd = first; fd <= last && fd < VFM_MAX_FD; fd++) {
		int k = kind_of((int)fd);
		if (k == FD_MODEL) {
			model_close((int)fd);
		} else if (k == FD_CONN) {
			if (fd > from && real_close_range(from, fd - 1, flags) < 0)
				return -1;
			from = fd + 1;
		}
	}
	if (from > last)
		return 0;
	return real_close_range(from, last, flags);
}

void closefrom(int lowfd)
{
	close_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0U, 0);
}

/* newfd (already made by a real dup of oldfd's placeholder) shares oldfd's model file. */
static int model_dup(int oldfd, int newfd)
{
	if (newfd < 0)
		return newfd;
	if (newfd >= VFM_MAX_FD ||
	    vfm_call(VFM_OP_DUP, oldfd, newfd, 0, 0, NULL) < 0) {
		int e = newfd >= VFM_MAX_FD ? EMFILE : errno;
		raw_close(newfd);
		errno = e;
		return -1;
	}
	set_kind(newfd, FD_MODEL);
	return newfd;
}

int dup(int fd)
{
	int r;

	resolve_dup();
	if (!is_model(fd))
		return real_dup(fd);
	pthread_rwlock_rdlock(&fd_lock);
	r = model_dup(fd, real_dup(fd));
	pthread_rwlock_unlock(&fd_lock);
	return r;
}

static int dup_to(int oldfd, int newfd, int flags, int three)
{
	int r;

	resolve_dup2();
	resolve_dup3();
	if (kind_of(newfd) == FD_CONN) {
		errno = EBUSY; /* the library's connection lives there (docs/run.md) */
		return -1;
	}
	if (!is_model(oldfd) && !is_model(newfd))
		return three ? real_dup3(oldfd, newfd, flags) : real_dup2(oldfd, newfd);
	if (oldfd == newfd)
		return three ? real_dup3(oldfd, newfd, flags) : newfd;
	pthread_rwlock_rdlock(&fd_lock);
	if (is_model(newfd)) {
		/* dup2 closes newfd first: its model file goes */
		if (fcntl(oldfd, F_GETFD) < 0) {
			pthread_rwlock_unlock(&fd_lock);
			return -1; /* EBADF: dup2 does nothing */
		}
		vfm_call(VFM_OP_CLOSE, newfd, 0, 0, 0, NULL);
		set_kind(newfd, 0);
	}
	r = three ? real_dup3(oldfd, newfd, flags) : real_dup2(oldfd, newfd);
	if (r >= 0 && is_model(oldfd))
		r = model_dup(oldfd, r);
	pthread_rwlock_unlock(&fd_lock);
	return r;
}

int dup2(int oldfd, int newfd)
{
	return dup_to(oldfd, newfd, 0, 0);
}

int dup3(int oldfd, int newfd, int flags)
{
	return dup_to(oldfd, newfd, flags, 1);
}

static int do_fcntl(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
	int r;

	if (!is_model(fd) || (cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC))
		return real(fd, cmd, arg); /* flags, locks: the placeholder answers */
	pthread_rwlock_rdlock(&fd_lock);
	r = model_dup(fd, real(fd, cmd, arg));
	pthread_rwlock_unlock(&fd_lock);
	return r;
}

int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	resolve_fcntl();
	return do_fcntl(real_fcntl, fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	resolve_fcntl64();
	return do_fcntl(real_fcntl64 ? real_fcntl64 : real_fcntl, fd, cmd, arg);
}

/* ---------------------------------------------------------------- fork */

static void child_after_fork(int64_t token)
{
	/* Only this thread lives on: every inherited connection is a copy of the parent's. */
	for (int fd = 0; fd < VFM_MAX_FD; fd++)
		if (kind_of(fd) == FD_CONN) {
			set_kind(fd, 0);
			raw_close(fd);
		}
	t_conn = -1;
	t_busy = 0;
	pending_token = token;
	pthread_rwlock_init(&fd_lock, NULL);
}

pid_t fork(void)
{
	int64_t token;
	pid_t pid;
	int e;

	resolve_fork();
	if (!enabled)
		return real_fork();
	pthread_rwlock_wrlock(&fd_lock);
	/* The server copies this process's fd table now, while no thread can change it. */
	token = vfm_call(VFM_OP_FORK_PREPARE, 0, 0, 0, 0, NULL);
	pid = real_fork();
	if (pid == 0) {
		child_after_fork(token > 0 ? token : 0);
		return 0;
	}
	e = errno;
	if (token > 0)
		vfm_call(pid > 0 ? VFM_OP_FORK_COMMIT : VFM_OP_FORK_ABORT, token, pid, 0, 0, NULL);
	pthread_rwlock_unlock(&fd_lock);
	errno = e;
	return pid;
}

/* ---------------------------------------------------------------- ioctl */

int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	void *arg;
	int64_t aux = 0, r;
	int spare = -1;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	resolve_ioctl();
	if (!is_model(fd))
		return real_ioctl(fd, request, arg);
	switch (request) {
	case FIOCLEX:
	case FIONCLEX:
	case FIONBIO:
	case FIOASYNC:
		/* do_vfs_ioctl() handles these for any file: the placeholder's flags */
		return real_ioctl(fd, request, arg);
	}
	pthread_rwlock_rdlock(&fd_lock);
	if (_IOC_TYPE(request) == ';') {
		/* VFIO and iommufd: where a file the ioctl creates gets its fd */
		spare = raw_open_null(O_RDWR | O_CLOEXEC);
		if (spare >= VFM_MAX_FD) {
			raw_close(spare);
			spare = -1;
		}
	}
	r = vfm_call(VFM_OP_IOCTL, fd, (int64_t)request, (int64_t)(intptr_t)arg, spare, &aux);
	if (spare >= 0) {
		int e = errno;
		if (r >= 0 && (aux & VFM_IOCTL_FD_USED)) {
			int acc = (int)(aux >> 8) & O_ACCMODE;
			if (acc != O_RDWR) {
				int ph = raw_open_null(acc | O_CLOEXEC);
				if (ph >= 0) {
					syscall(SYS_dup3, ph, spare, O_CLOEXEC);
					raw_close(ph);
				}
			}
			set_kind(spare, FD_MODEL);
		} else {
			raw_close(spare);
		}
		errno = e;
	}
	pthread_rwlock_unlock(&fd_lock);
	return (int)r;
}

/* ---------------------------------------------------------------- read / write / seek */

ssize_t read(int fd, void *buf, size_t n)
{
	resolve_read();
	if (!is_model(fd))
		return real_read(fd, buf, n);
	return vfm_call(VFM_OP_READ, fd, (int64_t)(intptr_t)buf, (int64_t)n, 0, NULL);
}

ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
	if (n > buflen)
		__chk_fail();
	resolve___read_chk();
	if (!is_model(fd))
		return real___read_chk(fd, buf, n, buflen);
	return vfm_call(VFM_OP_READ, fd, (int64_t)(intptr_t)buf, (int64_t)n, 0, NULL);
}

ssize_t write(int fd, const void *buf, size_t n)
{
	resolve_write();
	if (!is_model(fd))
		return real_write(fd, buf, n);
	return vfm_call(VFM_OP_WRITE, fd, (int64_t)(intptr_t)buf, (int64_t)n, 0, NULL);
}

static ssize_t model_pread(int fd, void *buf, size_t n, int64_t off)
{
	return vfm_call(VFM_OP_PREAD, fd, (int64_t)(intptr_t)buf, (int64_t)n, off, NULL);
}

static ssize_t model_pwrite(int fd, const void *buf, size_t n, int64_t off)
{
	return vfm_call(VFM_OP_PWRITE, fd, (int64_t)(intptr_t)buf, (int64_t)n, off, NULL);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
	resolve_pread();
	return is_model(fd) ? model_pread(fd, buf, n, off) : real_pread(fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off64_t off)
{
	resolve_pread64();
	return is_model(fd) ? model_pread(fd, buf, n, off) : real_pread64(fd, buf, n, off);
}

ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen)
{
	if (n > buflen)
		__chk_fail();
	resolve___pread_chk();
	return is_model(fd) ? model_pread(fd, buf, n, off)
			    : real___pread_chk(fd, buf, n, off, buflen);
}

ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen)
{
	if (n > buflen)
		__chk_fail();
	resolve___pread64_chk();
	return is_model(fd) ? model_pread(fd, buf, n, off)
			    : real___pread64_chk(fd, buf, n, off, buflen);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
	resolve_pwrite();
	return is_model(fd) ? model_pwrite(fd, buf, n, off) : real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
	resolve_pwrite64();
	return is_model(fd) ? model_pwrite(fd, buf, n, off) : real_pwrite64(fd, buf, n, off);
}

off_t lseek(int fd, off_t off, int whence)
{
	resolve_lseek();
	if (!is_model(fd))
		return real_lseek(fd, off, whence);
	return vfm_call(VFM_OP_LSEEK, fd, off, whence, 0, NULL);
}

off64_t lseek64(int fd, off64_t off, int whence)
{
	resolve_lseek64();
	if (!is_model(fd))
		return real_lseek64(fd, off, whence);
	return vfm_call(VFM_OP_LSEEK, fd, off, whence, 0, NULL);
}

/* ---------------------------------------------------------------- mmap */

static int model_mmap(int flags, int fd)
{
	if ((flags & MAP_ANONYMOUS) || !is_model(fd))
		return 0;
	errno = ENODEV; /* the model maps no device regions */
	return 1;
}

/*
 * MAP_HUGETLB | MAP_ANONYMOUS when the machine has no huge pages to give (the real mmap says
 * ENOMEM): ordinary anonymous memory laid out as hugetlbfs would lay it out, the length
 * rounded up to the huge page size (MAP_HUGE_SHIFT's, else 2 MiB) and the address aligned to
 * it (a MAP_FIXED address that is not aligned is EINVAL, as for hugetlbfs). Programs that
 * test huge-page paths (the iommufd selftests) then run; the pages are 4 KiB ones.
 */
static void *huge_fallback(void *addr, size_t len, int prot, int flags)
{
	int shift = (flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK;
	size_t huge = (size_t)1 << (shift ? shift : 21);
	int plain = flags & ~(MAP_HUGETLB | (MAP_HUGE_MASK << MAP_HUGE_SHIFT));
	size_t size, span;
	char *p, *aligned;

	if (!len || len > SIZE_MAX - 2 * huge) {
		errno = ENOMEM;
		return MAP_FAILED;
	}
	size = (len + huge - 1) & ~(huge - 1);
	if (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) {
		if ((uintptr_t)addr & (huge - 1)) {
			errno = EINVAL;
			return MAP_FAILED;
		}
		return real_mmap(addr, size, prot, plain, -1, 0);
	}
	span = size + huge;
	p = real_mmap(NULL, span, prot, plain & ~MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED)
		return p;
	aligned = (char *)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
	if (aligned > p)
		munmap(p, (size_t)(aligned - p));
	if (aligned + size < p + span)
		munmap(aligned + size, (size_t)(p + span - (aligned + size)));
	if (plain & MAP_POPULATE)
		madvise(aligned, size, MADV_WILLNEED);
	return aligned;
}

static int wants_huge_fallback(void *r, int flags, int fd)
{
	return r == MAP_FAILED && errno == ENOMEM && (flags & MAP_HUGETLB) &&
	       (flags & MAP_ANONYMOUS) && fd == -1;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	void *r;

	resolve_mmap();
	if (model_mmap(flags, fd))
		return MAP_FAILED;
	r = real_mmap(addr, len, prot, flags, fd, off);
	if (wants_huge_fallback(r, flags, fd))
		r = huge_fallback(addr, len, prot, flags);
	return r;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	void *r;

	resolve_mmap64();
	resolve_mmap();
	if (model_mmap(flags, fd))
		return MAP_FAILED;
	r = real_mmap64(addr, len, prot, flags, fd, off);
	if (wants_huge_fallback(r, flags, fd))
		r = huge_fallback(addr, len, prot, flags);
	return r;
}

/* ---------------------------------------------------------------- poll */

static int64_t ms_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Model fds are asked (their ->poll); the real ones are polled with the real poll, in
 * slices of at most 10 ms while nothing is ready, so that either kind can end the wait.
 */
static int model_poll(struct pollfd *fds, nfds_t n, int timeout_ms, const sigset_t *mask)
{
	struct pollfd *real_fds = malloc(n * sizeof(*real_fds));
	int64_t deadline = timeout_ms > 0 ? ms_now() + timeout_ms : 0;
	struct timespec slice;
	int ready;

	if (!real_fds) {
		errno = ENOMEM;
		return -1;
	}
	for (;;) {
		ready = 0;
		for (nfds_t i = 0; i < n; i++) {
			real_fds[i] = fds[i];
			real_fds[i].revents = 0;
			if (is_model(fds[i].fd))
				real_fds[i].fd = -1; /* ignored by the real poll */
		}
		slice.tv_sec = 0;
		slice.tv_nsec = 0;
		if (real_ppoll(real_fds, n, &slice, mask) < 0)
			goto fail;
		for (nfds_t i = 0; i < n; i++) {
			short want = fds[i].events | POLLERR | POLLHUP;
			if (is_model(fds[i].fd)) {
				int64_t r = vfm_call(VFM_OP_POLL, fds[i].fd, fds[i].events, 0, 0, NULL);
				fds[i].revents = r < 0 ? POLLNVAL : (short)(r & want);
			} else {
				fds[i].revents = real_fds[i].revents;
			}
			ready += fds[i].revents != 0;
		}
		if (ready || timeout_ms == 0)
			break;
		if (timeout_ms > 0 && ms_now() >= deadline)
			break;
		slice.tv_nsec = 10 * 1000000;
		if (timeout_ms > 0 && deadline - ms_now() < 10)
			slice.tv_nsec = (deadline - ms_now()) * 1000000;
		if (slice.tv_nsec < 0)
			slice.tv_nsec = 0;
		if (real_ppoll(real_fds, n, &slice, mask) < 0)
			goto fail;
	}
	free(real_fds);
	return ready;
fail:
	free(real_fds);
	return -1;
}

static int any_model(const struct pollfd *fds, nfds_t n)
{
	if (!__atomic_load_n(&n_model, __ATOMIC_RELAXED))
		return 0; /* no model fd open: never look at the array (the real poll does) */
	for (nfds_t i = 0; i < n; i++) {
		struct pollfd pfd;
		if (self_copy(&pfd, &fds[i], sizeof(pfd), 0) != sizeof(pfd))
			return 0; /* a bad array: the real poll answers EFAULT */
		if (is_model(pfd.fd))
			return 1;
	}
	return 0;
}

int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	resolve_poll();
	resolve_ppoll();
	if (!any_model(fds, n))
		return real_poll(fds, n, timeout);
	return model_poll(fds, n, timeout, NULL);
}

int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		__chk_fail();
	return poll(fds, n, timeout);
}

int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
	int ms = -1;

	resolve_ppoll();
	if (!any_model(fds, n))
		return real_ppoll(fds, n, ts, mask);
	if (ts)
		ms = (int)(ts->tv_sec * 1000 + ts->tv_nsec / 1000000);
	return model_poll(fds, n, ms, mask);
}

int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask,
		size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		__chk_fail();
	return ppoll(fds, n, ts, mask);
}
