/*
 * lkclient: labkit's load client. One process, one thread, one JSON line out per run. Latency mode
 * (the default): one transaction at a time on blocking sockets. Rate mode (--concurrency): C at once
 * on non-blocking sockets and epoll, closed loop or at an offered rate, with the CPU time they cost.
 *
 * Usage: lkclient --mode crr|rr|udp_rr|who --host IP --port P [-n SAMPLES] [-w WARMUP] [-s BYTES]
 *                 [--duration SECONDS] [--raw FILE] [--connect-timeout-ms MS] [--timeout-ms MS]
 *                 [--max-errors N]
 *        lkclient --mode crr|rr|udp_rr --host IP --port P --concurrency C [--duration-ms D] [-n N]
 *                 [--rate R] [--cpu-stat CPULIST] [-w WARMUP] [-s BYTES] [--raw FILE] [...]
 *
 * Modes (one sample = one timed transaction; -s bytes of payload each way, default 64):
 *   crr     socket + connect + write request + read the whole echo + close with SO_LINGER {1,0}
 *           (RST: no TIME_WAIT piles up, so 100k samples do not exhaust ports). The metric that
 *           shows Service-table scale: rules are walked on a connection's first packet.
 *   rr      one TCP connection, per sample write + read the whole echo. If it breaks, the failure
 *           counts as an error and the next sample reconnects (outside the timed region).
 *   udp_rr  one connected UDP socket, per sample send + recv. The first 8 payload bytes carry a
 *           sequence number so a late reply to a timed-out sample is discarded, not mis-timed. A
 *           reply not back within --timeout-ms counts as an error (ETIMEDOUT).
 *   who     exactly -n connections (failed ones are not retried), each sends
 *           "GET / HTTP/1.0\r\n\r\n" and reads the body, which lkserver sets to its pod name; the
 *           JSON gets "names": {name: count}. Tests Service spread over endpoints and refusal
 *           without endpoints. Warmup defaults to 0 in this mode.
 *
 * Output on stdout, one line: {"mode", "samples", "errors", "p50_us", "p90_us", "p99_us", "p999_us",
 * "mean_us", "min_us", "max_us", "elapsed_s", "error_kinds": {errno name: count}, "aborted"
 * [, "names"]}. Latencies are microseconds with 3 decimals (null when no sample was kept).
 * Percentiles use linear interpolation between closest ranks, exactly numpy.percentile's default
 * ("linear"): position q*(n-1) in the sorted samples. labkit.measure.stats uses the same method.
 * "errors" counts failed attempts, warmup included; a failed attempt is not a sample, the run
 * goes on until -n samples are kept. elapsed_s is the wall time of the kept phase (after warmup).
 *
 * --raw FILE: every kept sample, in the order taken, as little-endian int64 nanoseconds with no
 * header (numpy.fromfile(FILE, dtype="<i8")). Written also when the run aborts.
 * --duration: stop the kept phase once this many seconds have passed; "samples" says how many.
 * --max-errors: abort after this many CONSECUTIVE errors (default max(10, min(n/10, 100)); in who
 * mode unlimited, since "every connection refused" is a valid answer there). An abort prints the
 * JSON line with "aborted": true, a message on stderr, and exits 2. Usage errors exit 1.
 *
 * --serve (the only argument): run many measurements in one process, one per line read from stdin.
 * Each line holds the options of one run, separated by spaces (e.g. "--mode crr --host 10.96.0.10
 * --port 80 -n 100 -w 5 --raw /path/x.i64"); each gets its JSON line on stdout as above. A line
 * with bad options gets {"error": "..."}, having freed whatever it allocated for that line, and the
 * process waits for the next; EOF ends it (exit 0).
 * A line may name several targets instead of --host/--port/--raw: "--target HOST:PORT:RAWFILE"
 * repeated (crr, rr, udp_rr). The targets are then measured in turn, one attempt each, until each
 * has -n samples after its -w warm-up, and each one's samples are APPENDED to its file; the reply
 * is {"targets": [one object as above per target]}. labkit measures the points of a client pod
 * this way, a burst of a few samples per point at a time, bursts of different pods alternating.
 * labkit keeps one such process per client pod while it measures many points in slices, so a
 * slice costs a pipe round trip instead of a process start (3 ms) and a cold warm-up.
 *
 * Rate mode, selected by --concurrency C (1..1024; --duration-ms, --rate and --cpu-stat need it):
 * C slots, each with one transaction in flight, in this one thread (netperf's "N processes", wrk's
 * -c): crr: each slot connects (non-blocking), writes, reads the whole echo, closes with RST, and
 * begins again; rr: C persistent connections ping-ponging (connected before the clock starts); udp_rr:
 * C connected UDP sockets with sequence numbers as above. The first -w completions (default
 * max(100, 4 x C): every rr connection past lkserver's hand-over to a process of its own) are
 * discarded; then the window opens and lasts --duration-ms D, or until -n transactions completed
 * (no -n with a window: no cap; neither: -n 1000). A transaction completed in the window is a
 * sample: its latency (start to whole reply; crr's close included, as above) goes to the JSON's
 * figures and to --raw, in the order of completion. When the window closes, transactions in
 * flight are dropped, not counted. Errors are counted per kind as above (warm-up included); a
 * transaction that overruns --connect-timeout-ms / --timeout-ms fails with ETIMEDOUT (checked
 * every quarter of the smaller one, within [1, 50] ms); --max-errors CONSECUTIVE errors abort.
 *   closed loop (no --rate): a slot starts its next transaction the moment one ends, so C are
 *     in flight all the time (rate_per_s x mean latency = C, Little's law).
 *   open loop (--rate R, per second across the slots; wrk2's way): transaction k is meant to
 *     start at t0 + k/R (t0: after connecting, before the warm-up); it starts then, or as soon
 *     as a slot is free when all C are busy, and its latency counts from the INTENDED start, so a
 *     server that falls behind shows in the latencies instead of slowing the client down
 *     (coordinated omission). Timer slack is 1 ns meanwhile (epoll_pwait2: ns timeouts).
 * The JSON object is the latency one (over the window's samples; elapsed_s: the window) plus
 * "concurrency", "offered_per_s" (R, or null), "rate_per_s" (samples / elapsed_s; null if the
 * window never opened), "unstarted" (open loop: transactions due by the window's end that never
 * started: the backlog), and the CPU time of --cpu-stat's CPUs over the window: "cpu_stat" (as
 * given), "cpu_hz" (USER_HZ), "cpu_ticks" (user + nice + system + irq + softirq of those CPUs'
 * /proc/stat lines, read right before and right after the window), "cpu_steal_ticks" (taken by a
 * hypervisor), "cpu_total_ticks" (all fields but guest ones: busy + idle + iowait + steal),
 * "cpu_s" (cpu_ticks / cpu_hz), "cpu_us_per_txn" (cpu_s / samples, in µs) and "cpu_busy"
 * (cpu_ticks / cpu_total_ticks); all null without --cpu-stat. CPULIST: "1", "0-1,3"; every CPU
 * must be in /proc/stat. Resolution: /proc/stat counts in USER_HZ ticks (10 ms). Reading it
 * before and after rounds each counter that moved (user, system, softirq under this load) by under
 * 1 tick, independently from window to window (about 0.7 tick rms per window in all): a saturated
 * 1 s window (100 ticks) is known to ~0.7 %, one of 200 ms to ~3.5 %, 25 windows of 200 ms added
 * up (labkit's loadgen.combine_windows) to ~0.7 % again. On a CPU that is partly idle there is more:
 * with tick-based accounting (CONFIG_TICK_CPU_ACCOUNTING, this kernel's) each scheduler tick (4 ms
 * at HZ=250) is charged whole to whatever runs at that instant, a sample; at half load, 5 s carry
 * ~3 %. The counters are the CPUs', not this process's: everything that ran there is in them (the
 * servers, the softirqs of the packets, and any other process on those CPUs).
 * In --serve, a line with --concurrency and --target HOST:PORT:RAWFILE repeated (a rate burst) runs
 * one whole rate run per target in turn (its own connections, warm-up, window and CPU reading),
 * APPENDS each one's samples to its file and replies {"targets": [one rate object per target]}: the
 * interleaved discipline for rates (a window per point per turn, windows of different points
 * alternating, each point's windows added up).
 *
 * Timing discipline: CLOCK_MONOTONIC read immediately before and after the transaction; nothing
 * else in between (buffers, sample array and sequence stamps are prepared outside it, no
 * allocation per sample, no printing until the end). In crr the per-socket options (TCP_NODELAY,
 * send/receive timeouts, SO_LINGER) are inside the sample because they belong to that socket;
 * together they cost well under a microsecond. Pin this process (taskset, or labkit's cpus=) so
 * that it is not migrated mid-sample. Rate mode shares none of that code: its latencies include
 * waiting in epoll behind the other slots' work, which is what "latency under load" means.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <getopt.h>
#include <stdarg.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "--raw writes native int64; this file assumes a little-endian machine"
#endif

#define MAX_SAMPLES 100000000L
#define MAX_KINDS 32
#define MAX_NAMES 1024
#define NAME_LEN 256
#define WHO_BUF 4096
#define ERR_LEN 160 /* a usage message is cut there: a long bad value does not flood the reply */
#define MAX_CONCURRENCY 1024
#define MAX_CPUS 4096
#define MAX_RATE 1e8

enum mode { M_CRR, M_RR, M_UDP_RR, M_WHO };
static const char *const mode_names[] = {"crr", "rr", "udp_rr", "who"};

struct opts {
	enum mode mode;
	const char *host, *port, *raw;
	long n, warmup, size, max_errors;
	double duration;
	int connect_timeout_ms, timeout_ms;
	/* rate mode (--concurrency): C transactions at once for --duration-ms and/or -n */
	long concurrency, duration_ms; /* 0: latency mode / no window (ends at -n) */
	double rate;                   /* --rate: offered transactions/s (open loop); 0: closed loop */
	const char *cpu_stat;          /* --cpu-stat as given, NULL: no CPU accounting */
	uint64_t cpus[MAX_CPUS / 64];  /* ... as a bit set */
	int n_set;                     /* -n given (rate mode with a window: no cap otherwise) */
};

struct tally { /* a small string -> count table (error kinds, backend names) */
	char (*key)[NAME_LEN];
	long *count;
	int len, cap;
};

struct run {
	int64_t *lat; /* kept samples, ns */
	long cap;     /* lat's length; a rate run's array grows */
	long kept, errors, consecutive;
	struct tally kinds, names;
	int aborted;
	int64_t kept_start, kept_end;
};

/* Everything a sample needs, prepared before the clock starts. */
struct ctx {
	const struct opts *o;
	struct sockaddr_storage addr;
	socklen_t addrlen;
	struct timeval cto, ioto;
	int fd;       /* rr / udp_rr: the long-lived socket, -1 when not connected */
	char *req, *resp;
	uint64_t seq; /* udp_rr */
	char name[NAME_LEN];
	const char *err; /* kind of the last failure */
};

static inline int64_t now_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Usage errors travel up as return values: the function that finds one writes the message into
 * its caller's err buffer (ERR_LEN bytes) and returns -1; whoever allocated frees on the way up,
 * and the top decides: --serve replies {"error": ...} on that line and reads the next, a single
 * run prints the usage and exits 1. In a long-lived --serve process nothing may leak on that path. */
static int __attribute__((format(printf, 2, 3))) usage_error(char *err, const char *fmt, ...) {
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, ERR_LEN, fmt, ap);
	va_end(ap);
	return -1;
}

/* ------------------------------------------------------------------ tallies and errors */

static void tally_add(struct tally *t, const char *key, size_t keylen) {
	if (keylen >= NAME_LEN)
		keylen = NAME_LEN - 1;
	for (int i = 0; i < t->len; i++)
		if (strlen(t->key[i]) == keylen && memcmp(t->key[i], key, keylen) == 0) {
			t->count[i]++;
			return;
		}
	if (t->len == t->cap) { /* full: the last slot, "(other)", lumps together what did not fit */
		t->count[t->cap - 1]++;
		return;
	}
	if (t->len == t->cap - 1)
		key = "(other)", keylen = 7;
	memcpy(t->key[t->len], key, keylen);
	t->key[t->len][keylen] = '\0';
	t->count[t->len++] = 1;
}

static void tally_free(struct tally *t) {
	free(t->key);
	free(t->count);
}

/* -1 when memory runs out; tally_free frees what was allocated either way. */
static int tally_init(struct tally *t, int cap) {
	t->key = calloc((size_t)cap, sizeof *t->key);
	t->count = calloc((size_t)cap, sizeof *t->count);
	t->cap = cap;
	return t->key && t->count ? 0 : -1;
}

/* The name of an errno value (ECONNREFUSED...); a timed-out blocking call reports EAGAIN or
 * EINPROGRESS (connect with SO_SNDTIMEO), both shown as ETIMEDOUT. */
static const char *err_kind(int e) {
	if (e == EAGAIN || e == EINPROGRESS || e == ETIMEDOUT)
		return "ETIMEDOUT";
	const char *s = strerrorname_np(e);
	return s ? s : "EUNKNOWN";
}

/* ------------------------------------------------------------------ socket helpers */

static int fail(struct ctx *c, const char *kind) {
	c->err = kind;
	return -1;
}

static int new_socket(struct ctx *c, int type) {
	static const int one = 1;
	int fd = socket(c->addr.ss_family, type, 0);
	if (fd < 0)
		return fail(c, err_kind(errno));
	if (type == SOCK_STREAM)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &c->cto, sizeof c->cto); /* bounds connect() */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &c->ioto, sizeof c->ioto);
	return fd;
}

static int connect_to(struct ctx *c, int type) {
	int fd = new_socket(c, type);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&c->addr, c->addrlen) != 0) {
		c->err = err_kind(errno);
		close(fd);
		return -1;
	}
	return fd;
}

static void close_rst(int fd) {
	static const struct linger lg = {1, 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	close(fd);
}

static int write_all(struct ctx *c, int fd, const char *p, size_t n) {
	while (n > 0) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return fail(c, err_kind(errno));
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static int read_all(struct ctx *c, int fd, char *p, size_t n) {
	while (n > 0) {
		ssize_t k = read(fd, p, n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k == 0)
			return fail(c, "EOF");
		if (k < 0)
			return fail(c, err_kind(errno));
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* ------------------------------------------------------------------ one transaction per mode */

static int sample_crr(struct ctx *c) {
	int fd = connect_to(c, SOCK_STREAM);
	if (fd < 0)
		return -1;
	int rc = write_all(c, fd, c->req, (size_t)c->o->size);
	if (rc == 0)
		rc = read_all(c, fd, c->resp, (size_t)c->o->size);
	close_rst(fd);
	return rc;
}

static int sample_rr(struct ctx *c) {
	if (write_all(c, c->fd, c->req, (size_t)c->o->size) == 0 &&
	    read_all(c, c->fd, c->resp, (size_t)c->o->size) == 0)
		return 0;
	close_rst(c->fd);
	c->fd = -1;
	return -1;
}

static int sample_udp(struct ctx *c) {
	size_t n = (size_t)c->o->size;
	if (send(c->fd, c->req, n, 0) != (ssize_t)n)
		return fail(c, err_kind(errno));
	for (;;) {
		ssize_t k = recv(c->fd, c->resp, n, 0);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return fail(c, err_kind(errno)); /* ECONNREFUSED from ICMP, or the timeout */
		if (n < 8 || memcmp(c->resp, c->req, 8) == 0)
			return k == (ssize_t)n ? 0 : fail(c, "ESHORT");
		/* a late reply to an earlier, timed-out sample: wait for ours */
	}
}

/* Body of "HTTP/1.x 200 ...\r\n...\r\n\r\nNAME\n" into c->name. */
static int parse_who(struct ctx *c, const char *r, size_t n) {
	const char *body = memmem(r, n, "\r\n\r\n", 4);
	if (n < 12 || memcmp(r, "HTTP/1.", 7) != 0 || memcmp(r + 8, " 200", 4) != 0 || !body)
		return fail(c, "BADREPLY");
	body += 4;
	size_t len = (size_t)(r + n - body);
	const char *nl = memchr(body, '\n', len);
	if (nl)
		len = (size_t)(nl - body);
	if (len == 0 || len >= NAME_LEN)
		return fail(c, "BADREPLY");
	memcpy(c->name, body, len);
	c->name[len] = '\0';
	return 0;
}

static int sample_who(struct ctx *c) {
	static const char get[] = "GET / HTTP/1.0\r\n\r\n";
	int fd = connect_to(c, SOCK_STREAM);
	if (fd < 0)
		return -1;
	size_t got = 0;
	int rc = write_all(c, fd, get, sizeof get - 1);
	while (rc == 0 && got < WHO_BUF) { /* the server closes after the response */
		ssize_t k = read(fd, c->resp + got, WHO_BUF - got);
		if (k == 0)
			break;
		if (k < 0 && errno != EINTR)
			rc = fail(c, err_kind(errno));
		if (k > 0)
			got += (size_t)k;
	}
	close_rst(fd); /* the RST also frees the server's side without a TIME_WAIT */
	return rc == 0 ? parse_who(c, c->resp, got) : rc;
}

/* Outside the timed region: (re)connect the long-lived socket, stamp the sequence number. */
static int prepare(struct ctx *c) {
	if (c->o->mode == M_RR && c->fd < 0)
		c->fd = connect_to(c, SOCK_STREAM);
	if (c->o->mode == M_UDP_RR && c->fd < 0)
		c->fd = connect_to(c, SOCK_DGRAM);
	if (c->o->mode == M_UDP_RR && c->o->size >= 8) {
		c->seq++;
		memcpy(c->req, &c->seq, 8);
	}
	return (c->o->mode == M_RR || c->o->mode == M_UDP_RR) && c->fd < 0 ? -1 : 0;
}

static int (*const samplers[])(struct ctx *) = {sample_crr, sample_rr, sample_udp, sample_who};

/* ------------------------------------------------------------------ the run */

/* Count an error; returns 1 when the consecutive-error bound is reached. */
static int note_error(struct run *r, const struct opts *o, const char *kind) {
	r->errors++;
	r->consecutive++;
	tally_add(&r->kinds, kind, strlen(kind));
	return r->consecutive >= o->max_errors;
}

/* One attempt: preparation, then the clock around the transaction only. */
static inline int timed(struct ctx *c, int (*sample)(struct ctx *), int64_t *t0, int64_t *t1) {
	int rc = prepare(c);
	*t0 = now_ns();
	if (rc == 0)
		rc = sample(c);
	*t1 = now_ns();
	return rc;
}

static void measure(struct ctx *c, struct run *r) {
	const struct opts *o = c->o;
	int (*sample)(struct ctx *) = samplers[o->mode];
	long warm = o->warmup, attempts = 0;
	int64_t deadline = 0;
	r->kept_start = now_ns();
	if (!warm && o->duration > 0)
		deadline = r->kept_start + (int64_t)(o->duration * 1e9);
	while (r->kept < o->n) {
		int64_t t0, t1;
		int rc = timed(c, sample, &t0, &t1);
		if (rc != 0) {
			if (note_error(r, o, c->err)) {
				r->aborted = 1;
				break;
			}
		} else if (warm > 0) {
			r->consecutive = 0;
			if (--warm == 0) {
				r->kept_start = t1;
				if (o->duration > 0)
					deadline = t1 + (int64_t)(o->duration * 1e9);
			}
		} else {
			r->consecutive = 0;
			r->lat[r->kept++] = t1 - t0;
			if (o->mode == M_WHO)
				tally_add(&r->names, c->name, strlen(c->name));
		}
		if (deadline && t1 >= deadline)
			break;
		if (o->mode == M_WHO && ++attempts == o->n + o->warmup)
			break; /* who makes exactly -n connections (plus warmup), failed or not */
	}
	r->kept_end = now_ns();
	if (c->fd >= 0)
		close_rst(c->fd);
}

/* ------------------------------------------------------------------ rate mode: C transactions at once */

/* Sums over the --cpu-stat CPUs of their /proc/stat lines, in USER_HZ ticks. */
struct cpu_ticks {
	unsigned long long busy;  /* user + nice + system + irq + softirq: work done on those CPUs */
	unsigned long long steal; /* taken by the hypervisor: this guest neither worked nor idled */
	unsigned long long total; /* every field but guest and guest_nice (already in user and nice) */
};

/* Reads /proc/stat into t (t may be NULL: only checks); -1 unless every CPU of the set is there. */
static int read_cpu_ticks(const uint64_t *set, struct cpu_ticks *t) {
	static char buf[1 << 20];
	int fd = open("/proc/stat", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t len = 0;
	for (ssize_t k; len < sizeof buf - 1 && (k = read(fd, buf + len, sizeof buf - 1 - len)) > 0;)
		len += (size_t)k;
	close(fd);
	buf[len] = '\0';
	struct cpu_ticks sum = {0};
	int want = 0, found = 0;
	for (int w = 0; w < MAX_CPUS / 64; w++)
		want += __builtin_popcountll(set[w]);
	for (char *p = buf; p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		if (strncmp(p, "cpu", 3) != 0 || p[3] < '0' || p[3] > '9')
			continue;
		char *end;
		long cpu = strtol(p + 3, &end, 10);
		if (cpu >= MAX_CPUS || !(set[cpu / 64] >> (cpu % 64) & 1))
			continue;
		unsigned long long f[8]; /* user nice system idle iowait irq softirq steal */
		for (int i = 0; i < 8; i++)
			f[i] = strtoull(end, &end, 10);
		sum.busy += f[0] + f[1] + f[2] + f[5] + f[6];
		sum.steal += f[7];
		sum.total += f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7];
		found++;
	}
	if (t)
		*t = sum;
	return found == want ? 0 : -1;
}

/* What a rate run reports beside its samples. */
struct rate_out {
	struct cpu_ticks cpu0, cpu1; /* /proc/stat right before and right after the window */
	long unstarted;              /* open loop: transactions due by the window's end, never started */
};

enum slot_state { S_IDLE, S_CONNECTING, S_SENDING, S_RECEIVING };

/* One of the C transactions in flight. */
struct slot {
	int fd;                /* -1: none (crr between transactions, rr/udp_rr before (re)connecting) */
	enum slot_state state;
	uint32_t gen;          /* bumped per socket: an event for a socket closed earlier in the batch is stale */
	size_t done;           /* bytes of the current message sent (S_SENDING) or received (S_RECEIVING) */
	int64_t start;         /* latency origin: when the transaction began, or was meant to (open loop) */
	int64_t phase;         /* when its connect or its exchange began (timeouts) */
	uint64_t seq;          /* udp_rr: the sequence number in flight */
};

/* A rate run: the slots, their epoll set, the window and (open loop) the schedule. */
struct rate {
	struct ctx *c;
	struct run *r;
	const struct opts *o;
	struct slot *slots;
	int *idle, nidle;      /* slots with no transaction in flight (a stack) */
	int ep;
	long warm;             /* completions still to discard before the window opens */
	int window;            /* the window is open */
	int64_t deadline;      /* its end (0: it ends at -n samples) */
	int64_t sched0;        /* open loop: transaction k is meant to start at sched0 + k * interval */
	double interval;
	long next;             /* open loop: the next transaction of the schedule */
	uint64_t seq;
	struct rate_out *out;
};

static void push_idle(struct rate *q, struct slot *s) {
	s->state = S_IDLE;
	q->idle[q->nidle++] = (int)(s - q->slots);
}

static void slot_close(struct rate *q, struct slot *s) {
	if (s->fd < 0)
		return;
	if (q->o->mode == M_UDP_RR)
		close(s->fd);
	else
		close_rst(s->fd);
	s->fd = -1;
}

/* A failed transaction: counted by kind; a TCP socket is dropped (rr reconnects next time), a UDP
 * one kept (its sequence numbers tell a late reply apart). */
static void slot_fail(struct rate *q, struct slot *s, const char *kind) {
	if (note_error(q->r, q->o, kind))
		q->r->aborted = 1;
	if (q->o->mode != M_UDP_RR)
		slot_close(q, s);
	push_idle(q, s);
}

static void slot_start(struct rate *q, struct slot *s, int64_t start, int64_t now);

static void window_open(struct rate *q, int64_t now) {
	if (q->o->cpu_stat)
		read_cpu_ticks(q->o->cpus, &q->out->cpu0);
	q->r->kept_start = q->o->cpu_stat ? now_ns() : now;
	q->deadline = q->o->duration_ms ? q->r->kept_start + q->o->duration_ms * 1000000LL : 0;
	q->window = 1;
}

/* A transaction done: its latency kept (once the window is open); closed loop: the slot's next one
 * starts right away, so that C are in flight all the time (Little's law: rate x mean latency = C). */
static void slot_complete(struct rate *q, struct slot *s) {
	if (q->o->mode == M_CRR)
		slot_close(q, s); /* timed, as in latency mode */
	int64_t t = now_ns();
	struct run *r = q->r;
	r->consecutive = 0;
	if (!q->window) {
		if (--q->warm <= 0)
			window_open(q, t);
	} else if (r->kept < q->o->n) {
		if (r->kept == r->cap) { /* doubling: amortised, and realloc moves big blocks by remapping */
			long cap = r->cap * 2 < q->o->n ? r->cap * 2 : q->o->n;
			int64_t *lat = realloc(r->lat, (size_t)cap * sizeof *lat);
			if (!lat) {
				tally_add(&r->kinds, "ENOMEM", 6);
				r->errors++;
				r->aborted = 1;
				return;
			}
			r->lat = lat;
			r->cap = cap;
		}
		r->lat[r->kept++] = t - s->start;
	}
	if (q->o->rate > 0 || r->aborted)
		push_idle(q, s);
	else
		slot_start(q, s, t, t);
}

/* A new non-blocking TCP socket for s, connecting (or connected: loopback can be that quick). */
static void slot_connect(struct rate *q, struct slot *s) {
	static const int one = 1;
	s->fd = socket(q->c->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s->fd < 0)
		return slot_fail(q, s, err_kind(errno));
	setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	int rc = connect(s->fd, (struct sockaddr *)&q->c->addr, q->c->addrlen);
	if (rc != 0 && errno != EINPROGRESS)
		return slot_fail(q, s, err_kind(errno));
	/* Added after connect(): an unconnected socket polls as EPOLLOUT|EPOLLHUP, which would look
	 * like a finished connect. Edge-triggered: one epoll_ctl per socket, no re-arming per state. */
	struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
				 .data.u64 = (uint64_t)++s->gen << 32 | (uint32_t)(s - q->slots)};
	epoll_ctl(q->ep, EPOLL_CTL_ADD, s->fd, &ev);
	s->state = rc == 0 ? S_SENDING : S_CONNECTING;
	s->done = 0;
}

static void tcp_recv(struct rate *q, struct slot *s);

/* Write what is left of the request, then wait for the reply's EPOLLIN edge: no read yet, it could
 * only say EAGAIN. Unless the request went out in pieces: the echo of the first ones may be here
 * already, its edge spent while we were still sending. */
static void slot_send(struct rate *q, struct slot *s) {
	size_t n = (size_t)q->o->size;
	int resumed = s->done > 0;
	while (s->done < n) {
		ssize_t k = send(s->fd, q->c->req + s->done, n - s->done, MSG_NOSIGNAL);
		if (k > 0)
			s->done += (size_t)k;
		else if (k < 0 && errno == EINTR)
			continue;
		else if (k < 0 && errno == EAGAIN)
			return; /* the EPOLLOUT edge brings us back */
		else
			return slot_fail(q, s, err_kind(errno));
	}
	s->state = S_RECEIVING;
	s->done = 0;
	if (resumed)
		tcp_recv(q, s);
}

/* A connected, non-blocking UDP socket for s (connect() on UDP sends nothing). */
static int udp_open(struct rate *q, struct slot *s) {
	s->fd = socket(q->c->addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s->fd < 0 || connect(s->fd, (struct sockaddr *)&q->c->addr, q->c->addrlen) != 0) {
		const char *kind = err_kind(errno);
		if (s->fd >= 0)
			close(s->fd);
		s->fd = -1;
		slot_fail(q, s, kind);
		return -1;
	}
	struct epoll_event ev = {.events = EPOLLIN | EPOLLET,
				 .data.u64 = (uint64_t)++s->gen << 32 | (uint32_t)(s - q->slots)};
	epoll_ctl(q->ep, EPOLL_CTL_ADD, s->fd, &ev);
	return 0;
}

static void udp_send(struct rate *q, struct slot *s) {
	size_t n = (size_t)q->o->size;
	s->seq = ++q->seq;
	if (n >= 8)
		memcpy(q->c->req, &s->seq, 8); /* send() copies it: one request buffer serves every slot */
	ssize_t k = send(s->fd, q->c->req, n, 0);
	if (k != (ssize_t)n) /* EAGAIN here is a full send buffer, not a timeout: name it as it is */
		return slot_fail(q, s, k < 0 && errno == EAGAIN ? "EAGAIN" : err_kind(errno));
	s->state = S_RECEIVING;
}

/* A transaction begins on an idle slot; `start` is its latency origin. */
static void slot_start(struct rate *q, struct slot *s, int64_t start, int64_t now) {
	s->start = start;
	s->phase = now;
	if (q->o->mode == M_UDP_RR) {
		if (s->fd >= 0 || udp_open(q, s) == 0)
			udp_send(q, s);
		return;
	}
	if (s->fd < 0)
		slot_connect(q, s); /* crr every time; rr after a failure */
	else {
		s->state = S_SENDING;
		s->done = 0;
	}
	if (s->state == S_SENDING)
		slot_send(q, s);
}

static void tcp_recv(struct rate *q, struct slot *s) {
	size_t n = (size_t)q->o->size;
	for (;;) { /* edge-triggered: until the reply is whole or the socket says EAGAIN */
		ssize_t k = read(s->fd, q->c->resp, n - s->done);
		if (k > 0 && (s->done += (size_t)k) == n)
			return slot_complete(q, s);
		if (k == 0)
			return slot_fail(q, s, "EOF");
		if (k < 0 && errno == EAGAIN)
			return;
		if (k < 0 && errno != EINTR)
			return slot_fail(q, s, err_kind(errno));
	}
}

static void udp_recv(struct rate *q, struct slot *s) {
	size_t n = (size_t)q->o->size;
	for (;;) {
		ssize_t k = recv(s->fd, q->c->resp, n, 0);
		if (k < 0 && errno == EAGAIN)
			return;
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && s->state == S_RECEIVING)
			return slot_fail(q, s, err_kind(errno)); /* ECONNREFUSED from ICMP */
		if (k < 0)
			continue; /* about a transaction that already failed (timed out) */
		if (s->state == S_RECEIVING && (n < 8 || memcmp(q->c->resp, &s->seq, 8) == 0))
			return k == (ssize_t)n ? slot_complete(q, s) : slot_fail(q, s, "ESHORT");
		/* a late reply to an earlier, timed-out transaction: drop it */
	}
}

/* An epoll event for s: move its transaction on as far as the socket allows. */
static void slot_event(struct rate *q, struct slot *s, uint32_t events) {
	if (q->o->mode == M_UDP_RR)
		return udp_recv(q, s); /* in S_IDLE too: drains late replies */
	if (s->state == S_CONNECTING) {
		if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		int e = 0;
		socklen_t len = sizeof e;
		getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &e, &len);
		if (e != 0)
			return slot_fail(q, s, err_kind(e));
		s->state = S_SENDING;
		s->done = 0;
		s->phase = now_ns();
	}
	if (s->state == S_SENDING)
		slot_send(q, s);
	else if (s->state == S_RECEIVING)
		tcp_recv(q, s);
}

/* Transactions that overran their connect or I/O timeout fail with ETIMEDOUT. */
static void scan_timeouts(struct rate *q, int64_t now) {
	int64_t cto = q->o->connect_timeout_ms * 1000000LL, ioto = q->o->timeout_ms * 1000000LL;
	for (long i = 0; i < q->o->concurrency && !q->r->aborted; i++) {
		struct slot *s = &q->slots[i];
		if (s->state != S_IDLE && now - s->phase > (s->state == S_CONNECTING ? cto : ioto))
			slot_fail(q, s, "ETIMEDOUT");
	}
}

/* epoll_pwait2 takes nanoseconds (the open loop's schedule is finer than epoll_wait's 1 ms);
 * kernels before 5.11 lack it: then whole milliseconds, rounded up. */
static int wait_events(int ep, struct epoll_event *evs, int max, int64_t timeout_ns) {
	static int no_pwait2;
	if (!no_pwait2) {
		struct timespec ts = {timeout_ns / 1000000000LL, timeout_ns % 1000000000LL};
		int n = epoll_pwait2(ep, evs, max, &ts, NULL);
		if (n >= 0 || errno != ENOSYS)
			return n;
		no_pwait2 = 1;
	}
	return epoll_wait(ep, evs, max, (int)((timeout_ns + 999999) / 1000000));
}

static int64_t intended(const struct rate *q, long k) {
	return q->sched0 + (int64_t)((double)k * q->interval);
}

/* The event loop: start transactions on idle slots (closed loop: at once; open loop: when the
 * schedule says so), wait, move the slots the events name on; until the window closes, -n samples
 * are kept, or the run aborts. */
static void rate_loop(struct rate *q) {
	const struct opts *o = q->o;
	struct run *r = q->r;
	struct epoll_event evs[256];
	int64_t scan = (o->connect_timeout_ms < o->timeout_ms ? o->connect_timeout_ms : o->timeout_ms) * 250000LL;
	scan = scan < 1000000 ? 1000000 : scan > 50000000 ? 50000000 : scan;
	int64_t now = now_ns(), next_scan = now + scan;
	for (;;) {
		if (r->aborted || r->kept >= o->n || (q->deadline && now >= q->deadline))
			break;
		if (now >= next_scan) {
			scan_timeouts(q, now);
			next_scan = now + scan;
		}
		if (o->rate > 0) {
			while (q->nidle > 0 && intended(q, q->next) <= now && !r->aborted) {
				q->next++;
				slot_start(q, &q->slots[q->idle[--q->nidle]], intended(q, q->next - 1), now);
			}
		} else { /* every idle slot once; one that fails at once is pushed back below i, for the next turn */
			int k = q->nidle;
			q->nidle = 0;
			for (int i = 0; i < k; i++) {
				if (r->aborted) /* keep the rest idle: an abort stops at exactly --max-errors */
					q->idle[q->nidle++] = q->idle[i];
				else
					slot_start(q, &q->slots[q->idle[i]], now, now);
			}
		}
		now = now_ns();
		int64_t wake = next_scan;
		if (q->deadline && q->deadline < wake)
			wake = q->deadline;
		if (q->nidle > 0 && o->rate > 0 && intended(q, q->next) < wake)
			wake = intended(q, q->next);
		if (q->nidle > 0 && o->rate <= 0)
			wake = now; /* slots that failed at once: retry after looking at the events */
		int n = wait_events(q->ep, evs, 256, wake > now ? wake - now : 0);
		for (int i = 0; i < n && !r->aborted; i++) {
			struct slot *s = &q->slots[(uint32_t)evs[i].data.u64];
			if (s->fd >= 0 && s->gen == (uint32_t)(evs[i].data.u64 >> 32))
				slot_event(q, s, evs[i].events);
		}
		now = now_ns();
	}
	r->kept_end = q->window ? now : r->kept_start;
}

/* Long-lived sockets (rr, udp_rr) connected before the clock starts, blocking as in latency mode,
 * then made non-blocking; one that fails is retried in the loop. */
static void rate_connect_all(struct rate *q) {
	int type = q->o->mode == M_UDP_RR ? SOCK_DGRAM : SOCK_STREAM;
	unsigned events = type == SOCK_DGRAM ? EPOLLIN | EPOLLET : EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
	for (long i = 0; i < q->o->concurrency && !q->r->aborted; i++) {
		struct slot *s = &q->slots[i];
		if ((s->fd = connect_to(q->c, type)) < 0) {
			slot_fail(q, s, q->c->err);
			continue;
		}
		fcntl(s->fd, F_SETFL, fcntl(s->fd, F_GETFL) | O_NONBLOCK);
		struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)++s->gen << 32 | (uint32_t)i};
		epoll_ctl(q->ep, EPOLL_CTL_ADD, s->fd, &ev);
		push_idle(q, s);
	}
}

/* A whole rate run on c's target: connect, warm up (-w completions), the window, then every socket
 * closed (a transaction still in flight is dropped, not counted). Fills r and out; no memory for
 * the slots is an abort (ENOMEM). */
static void rate_run(struct ctx *c, struct run *r, struct rate_out *out) {
	const struct opts *o = c->o;
	struct rate q = {.c = c, .r = r, .o = o, .out = out, .warm = o->warmup, .ep = epoll_create1(EPOLL_CLOEXEC)};
	*out = (struct rate_out){0};
	q.slots = calloc((size_t)o->concurrency, sizeof *q.slots);
	q.idle = calloc((size_t)o->concurrency, sizeof *q.idle);
	if (q.ep < 0 || !q.slots || !q.idle) {
		tally_add(&r->kinds, "ENOMEM", 6);
		r->errors++;
		r->aborted = 1;
		free(q.slots);
		free(q.idle);
		if (q.ep >= 0)
			close(q.ep);
		return;
	}
	struct rlimit nofile; /* C sockets, and crr's closing ones: more than the usual soft 1024 */
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		setrlimit(RLIMIT_NOFILE, &nofile);
	}
	for (long i = 0; i < o->concurrency; i++)
		q.slots[i].fd = -1;
	if (o->mode == M_CRR)
		for (long i = 0; i < o->concurrency; i++)
			push_idle(&q, &q.slots[i]);
	else
		rate_connect_all(&q);
	int slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
	if (o->rate > 0) { /* the default 50 µs of timer slack would make every scheduled start late */
		prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);
		q.interval = 1e9 / o->rate;
	}
	q.sched0 = now_ns();
	if (q.warm <= 0)
		window_open(&q, q.sched0);
	rate_loop(&q);
	if (q.window && o->cpu_stat)
		read_cpu_ticks(o->cpus, &out->cpu1);
	if (o->rate > 0 && slack > 0)
		prctl(PR_SET_TIMERSLACK, slack, 0, 0, 0);
	if (o->rate > 0 && q.window) { /* meant to start by the end, never started: the backlog */
		long due = (long)((double)(r->kept_end - q.sched0) / q.interval) + 1;
		out->unstarted = due > q.next ? due - q.next : 0;
	}
	for (long i = 0; i < o->concurrency; i++)
		slot_close(&q, &q.slots[i]);
	close(q.ep);
	free(q.slots);
	free(q.idle);
}

/* ------------------------------------------------------------------ output */

static int cmp_i64(const void *a, const void *b) {
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* numpy.percentile(..., method="linear") on sorted s, q in percent; same float operations. */
static double percentile(const int64_t *s, long n, double q) {
	double pos = (q / 100.0) * (double)(n - 1);
	long lo = (long)pos;
	if (lo >= n - 1)
		return (double)s[n - 1];
	double t = pos - (double)lo, a = (double)s[lo], b = (double)s[lo + 1];
	return t >= 0.5 ? b - (b - a) * (1.0 - t) : a + (b - a) * t;
}

static void json_str(const char *s) {
	putchar('"');
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch < 0x20)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

static void json_tally(const char *key, const struct tally *t) {
	printf(", \"%s\": {", key);
	for (int i = 0; i < t->len; i++) {
		printf(i ? ", " : "");
		json_str(t->key[i]);
		printf(": %ld", t->count[i]);
	}
	printf("}");
}

static void print_stat(const char *key, double ns, long n) {
	if (n > 0)
		printf(", \"%s\": %.3f", key, ns / 1000.0);
	else
		printf(", \"%s\": null", key);
}

/* The fields of a run's object, without its closing brace (a rate run's object adds to them). */
static void report_fields(const struct opts *o, struct run *r) {
	long n = r->kept;
	int64_t sum = 0;
	for (long i = 0; i < n; i++)
		sum += r->lat[i];
	qsort(r->lat, (size_t)n, sizeof *r->lat, cmp_i64);
	printf("{\"mode\": \"%s\", \"samples\": %ld, \"errors\": %ld", mode_names[o->mode], n, r->errors);
	static const struct { const char *key; double q; } ps[] = {
		{"p50_us", 50}, {"p90_us", 90}, {"p99_us", 99}, {"p999_us", 99.9}};
	for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++)
		print_stat(ps[i].key, n ? percentile(r->lat, n, ps[i].q) : 0, n);
	print_stat("mean_us", n ? (double)sum / (double)n : 0, n);
	print_stat("min_us", n ? (double)r->lat[0] : 0, n);
	print_stat("max_us", n ? (double)r->lat[n - 1] : 0, n);
	printf(", \"elapsed_s\": %.6f", (double)(r->kept_end - r->kept_start) / 1e9);
	json_tally("error_kinds", &r->kinds);
	if (o->mode == M_WHO)
		json_tally("names", &r->names);
	printf(", \"aborted\": %s", r->aborted ? "true" : "false");
}

static void report_obj(const struct opts *o, struct run *r) {
	report_fields(o, r);
	printf("}");
}

static void print_or_null(const char *key, const char *fmt, double v, int known) {
	printf(", \"%s\": ", key);
	if (known)
		printf(fmt, v);
	else
		printf("null");
}

/* A rate run's object: the latency fields (over the transactions completed in the window), then
 * its rate, and the CPU time of the --cpu-stat CPUs over the window. */
static void report_rate_obj(const struct opts *o, struct run *r, const struct rate_out *x) {
	double elapsed = (double)(r->kept_end - r->kept_start) / 1e9;
	report_fields(o, r);
	printf(", \"concurrency\": %ld", o->concurrency);
	print_or_null("offered_per_s", "%.3f", o->rate, o->rate > 0);
	print_or_null("rate_per_s", "%.3f", (double)r->kept / elapsed, elapsed > 0);
	printf(", \"unstarted\": %ld", x->unstarted);
	int cpu = o->cpu_stat && elapsed > 0;
	double hz = (double)sysconf(_SC_CLK_TCK);
	double busy = (double)(x->cpu1.busy - x->cpu0.busy), total = (double)(x->cpu1.total - x->cpu0.total);
	printf(", \"cpu_stat\": ");
	if (o->cpu_stat)
		json_str(o->cpu_stat);
	else
		printf("null");
	print_or_null("cpu_hz", "%.0f", hz, cpu);
	print_or_null("cpu_ticks", "%.0f", busy, cpu);
	print_or_null("cpu_steal_ticks", "%.0f", (double)(x->cpu1.steal - x->cpu0.steal), cpu);
	print_or_null("cpu_total_ticks", "%.0f", total, cpu);
	print_or_null("cpu_s", "%.2f", busy / hz, cpu);
	print_or_null("cpu_us_per_txn", "%.3f", busy / hz * 1e6 / (double)r->kept, cpu && r->kept > 0);
	print_or_null("cpu_busy", "%.4f", busy / total, cpu && total > 0);
	printf("}");
}

static void report(const struct opts *o, struct run *r) {
	report_obj(o, r);
	printf("\n");
	fflush(stdout);
}

static int write_raw(const char *path, const struct run *r, int append) {
	FILE *f = fopen(path, append ? "ab" : "wb");
	if (!f || fwrite(r->lat, sizeof *r->lat, (size_t)r->kept, f) != (size_t)r->kept || fclose(f) != 0) {
		fprintf(stderr, "lkclient: writing raw samples to %s: %s\n", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------ options */

/* *v = the integer s, which must lie in [lo, hi]; 0, or -1 with the message in err. */
static int parse_long(const char *s, const char *what, long lo, long hi, long *v, char *err) {
	char *end;
	errno = 0;
	*v = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || errno || *v < lo || *v > hi)
		return usage_error(err, "%s must be an integer in [%ld, %ld], got '%s'", what, lo, hi, s);
	return 0;
}

/* "0", "0,2", "0-3,6" (the kernel's cpulist format) into the bit set; 0, or -1 with the message. */
static int parse_cpu_list(const char *s, uint64_t *set, char *err) {
	for (const char *p = s;;) {
		char *end;
		long lo = *p >= '0' && *p <= '9' ? strtol(p, &end, 10) : -1, hi = lo;
		if (lo >= 0 && *end == '-')
			hi = end[1] >= '0' && end[1] <= '9' ? strtol(end + 1, &end, 10) : -1;
		if (lo < 0 || hi < lo || hi >= MAX_CPUS || (*end != ',' && *end != '\0'))
			break;
		for (long cpu = lo; cpu <= hi; cpu++)
			set[cpu / 64] |= 1ULL << (cpu % 64);
		if (*end == '\0')
			return 0;
		p = end + 1;
	}
	return usage_error(err, "--cpu-stat takes a CPU list such as 1 or 0-1,3 (CPUs below %d), got '%s'",
			   MAX_CPUS, s);
}

struct cpu_ticks;
static int read_cpu_ticks(const uint64_t *set, struct cpu_ticks *t);

/* The rate-mode options (given that --concurrency selects it) and their defaults; 0, or -1. */
static int rate_opts(struct opts *o, char *err) {
	if (!o->concurrency) {
		if (o->duration_ms || o->rate > 0 || o->cpu_stat)
			return usage_error(err, "--duration-ms, --rate and --cpu-stat belong to rate mode: give --concurrency");
		return 0;
	}
	if (o->mode == M_WHO)
		return usage_error(err, "--concurrency takes crr, rr or udp_rr");
	if (o->duration > 0)
		return usage_error(err, "rate mode takes a window in --duration-ms, not --duration");
	if (o->cpu_stat && read_cpu_ticks(o->cpus, NULL) != 0)
		return usage_error(err, "--cpu-stat %s: not every CPU is in /proc/stat (offline or absent?)",
				   o->cpu_stat);
	if (!o->n_set && o->duration_ms)
		o->n = MAX_SAMPLES; /* the window ends it */
	if (o->warmup < 0) /* rr: every connection past lkserver's hand-over to a process of its own */
		o->warmup = 4 * o->concurrency > 100 ? 4 * o->concurrency : 100;
	return 0;
}

/* The options of one run into o; 0, or -1 with the message in err. Allocates nothing. */
static int parse_opts(int argc, char **argv, struct opts *o, char *err) {
	static const struct option lo[] = {
		{"mode", required_argument, 0, 'm'},         {"host", required_argument, 0, 'H'},
		{"port", required_argument, 0, 'p'},         {"samples", required_argument, 0, 'n'},
		{"warmup", required_argument, 0, 'w'},       {"size", required_argument, 0, 's'},
		{"duration", required_argument, 0, 'd'},     {"raw", required_argument, 0, 'r'},
		{"connect-timeout-ms", required_argument, 0, 'c'}, {"timeout-ms", required_argument, 0, 't'},
		{"max-errors", required_argument, 0, 'e'},   {"help", no_argument, 0, 'h'},
		{"concurrency", required_argument, 0, 'C'},  {"duration-ms", required_argument, 0, 'D'},
		{"rate", required_argument, 0, 'R'},         {"cpu-stat", required_argument, 0, 'U'},
		{0, 0, 0, 0},
	};
	const char *mode = NULL;
	long port, ms;
	int opt, rc = 0;
	*o = (struct opts){.n = 1000, .warmup = -1, .size = 64, .max_errors = -1,
			   .connect_timeout_ms = 1000, .timeout_ms = 1000};
	while (rc == 0 && (opt = getopt_long(argc, argv, "n:w:s:", lo, NULL)) != -1) {
		switch (opt) {
		case 'm': mode = optarg; break;
		case 'H': o->host = optarg; break;
		case 'p': o->port = optarg; rc = parse_long(optarg, "--port", 1, 65535, &port, err); break;
		case 'n': rc = parse_long(optarg, "-n", 1, MAX_SAMPLES, &o->n, err); o->n_set = 1; break;
		case 'w': rc = parse_long(optarg, "-w", 0, MAX_SAMPLES, &o->warmup, err); break;
		case 's': rc = parse_long(optarg, "-s", 1, 65536, &o->size, err); break;
		case 'd': o->duration = atof(optarg); break;
		case 'r': o->raw = optarg; break;
		case 'c':
			rc = parse_long(optarg, "--connect-timeout-ms", 1, 3600000, &ms, err);
			o->connect_timeout_ms = (int)ms;
			break;
		case 't':
			rc = parse_long(optarg, "--timeout-ms", 1, 3600000, &ms, err);
			o->timeout_ms = (int)ms;
			break;
		case 'e': rc = parse_long(optarg, "--max-errors", 1, MAX_SAMPLES, &o->max_errors, err); break;
		case 'C': rc = parse_long(optarg, "--concurrency", 1, MAX_CONCURRENCY, &o->concurrency, err); break;
		case 'D': rc = parse_long(optarg, "--duration-ms", 1, 3600000, &o->duration_ms, err); break;
		case 'R': {
			char *end;
			o->rate = strtod(optarg, &end);
			if (*optarg == '\0' || *end != '\0' || !(o->rate > 0 && o->rate <= MAX_RATE))
				rc = usage_error(err, "--rate must be a number of transactions/s in (0, %g], got '%s'",
						 MAX_RATE, optarg);
			break;
		}
		case 'U':
			o->cpu_stat = optarg;
			memset(o->cpus, 0, sizeof o->cpus);
			rc = parse_cpu_list(optarg, o->cpus, err);
			break;
		default: return usage_error(err, "bad option");
		}
	}
	if (rc != 0)
		return rc;
	if (!mode || !o->host || !o->port || optind != argc)
		return usage_error(err, "--mode, --host and --port are required");
	int m;
	for (m = 0; m < 4 && strcmp(mode, mode_names[m]) != 0; m++)
		;
	if (m == 4)
		return usage_error(err, "--mode must be crr, rr, udp_rr or who");
	o->mode = (enum mode)m;
	if (o->mode == M_UDP_RR && o->size > 65507)
		return usage_error(err, "-s is at most 65507 for udp_rr");
	if (rate_opts(o, err) != 0)
		return -1;
	if (o->warmup < 0)
		o->warmup = o->mode == M_WHO ? 0 : 100;
	if (o->max_errors < 0) {
		long b = o->n / 10 < 100 ? o->n / 10 : 100;
		o->max_errors = o->mode == M_WHO ? LONG_MAX : (b > 10 ? b : 10);
	}
	return 0;
}

/* The address and buffers of one run; 0, or -1 with the message in err. Either way c is left
 * safe to release(): whatever it holds is freed there. */
static int init_ctx(struct ctx *c, const struct opts *o, char *err) {
	struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV, .ai_family = AF_UNSPEC};
	struct addrinfo *ai;
	*c = (struct ctx){.o = o, .fd = -1};
	int rc = getaddrinfo(o->host, o->port, &hints, &ai);
	if (rc != 0) /* numeric only: labkit never resolves names, so nothing leaves the lab */
		return usage_error(err, "--host must be a numeric IP address: %s", gai_strerror(rc));
	c->addrlen = ai->ai_addrlen;
	memcpy(&c->addr, ai->ai_addr, ai->ai_addrlen);
	freeaddrinfo(ai);
	c->cto = (struct timeval){o->connect_timeout_ms / 1000, (o->connect_timeout_ms % 1000) * 1000};
	c->ioto = (struct timeval){o->timeout_ms / 1000, (o->timeout_ms % 1000) * 1000};
	size_t bufsize = (size_t)o->size > WHO_BUF ? (size_t)o->size : WHO_BUF;
	c->req = malloc(bufsize);
	c->resp = malloc(bufsize);
	if (!c->req || !c->resp)
		return usage_error(err, "out of memory");
	memset(c->req, 'x', bufsize);
	return 0;
}

/* How many samples a run allocates first: all of them, or (rate mode, growing) at most 64 Ki. */
static long first_cap(const struct opts *o) {
	return o->concurrency && o->n > 65536 ? 65536 : o->n;
}

/* The sample array (zeroed) and tallies of a run of n samples; 0, or -1 with the message in err.
 * Either way r is left safe to release(). */
static int init_run(struct run *r, long n, int names, char *err) {
	*r = (struct run){.cap = n};
	r->lat = calloc((size_t)n, sizeof *r->lat);
	if (!r->lat)
		return usage_error(err, "cannot allocate the sample array");
	if (tally_init(&r->kinds, MAX_KINDS) != 0 || tally_init(&r->names, names) != 0)
		return usage_error(err, "out of memory");
	return 0;
}

/* Frees what init_ctx and init_run allocated, also when they failed half-way (free(NULL) is a
 * no-op). The socket is not closed here: measure and run_burst close it after the last sample. */
static void release(struct ctx *c, struct run *r) {
	free(r->lat);
	free(c->req);
	free(c->resp);
	tally_free(&r->kinds);
	tally_free(&r->names);
}

/* One measurement with these options; returns the process exit status it would have, or -1 with
 * a usage error in err (nothing printed, nothing left allocated). */
static int run_once(int argc, char **argv, char *err) {
	struct opts o;
	struct ctx c = {.fd = -1};
	struct run r = {0};
	if (parse_opts(argc, argv, &o, err) != 0)
		return -1;
	if (init_ctx(&c, &o, err) != 0 || init_run(&r, first_cap(&o), MAX_NAMES, err) != 0) {
		release(&c, &r);
		return -1;
	}
	memset(r.lat, 0, (size_t)r.cap * sizeof *r.lat); /* fault every page in before the first sample */
	struct rate_out x;
	if (o.concurrency)
		rate_run(&c, &r, &x);
	else
		measure(&c, &r);
	int raw_failed = o.raw ? write_raw(o.raw, &r, 0) : 0; /* raw samples first: keep the data */
	if (o.concurrency) {
		report_rate_obj(&o, &r, &x);
		printf("\n");
		fflush(stdout);
	} else {
		report(&o, &r);
	}
	int rc = raw_failed ? 3 : 0;
	if (r.aborted) {
		fprintf(stderr, "lkclient: aborted after %ld consecutive errors (last: %s) against %s port %s; "
				"%ld samples kept\n", r.consecutive, c.err, o.host, o.port, r.kept);
		rc = 2;
	}
	release(&c, &r);
	return rc;
}

#define SERVE_LINE 16384
#define SERVE_ARGS 512
#define MAX_TARGETS 128

/* One attempt on an interleaved target; returns 1 once that target is done (kept -n, or aborted). */
static int attempt(struct ctx *c, struct run *r, long *warm) {
	int64_t t0, t1;
	if (timed(c, samplers[c->o->mode], &t0, &t1) != 0) {
		if (note_error(r, c->o, c->err))
			r->aborted = 1;
	} else if (*warm > 0) {
		r->consecutive = 0;
		--*warm;
	} else {
		r->consecutive = 0;
		r->lat[r->kept++] = t1 - t0;
	}
	return r->aborted || r->kept >= c->o->n;
}

/* A burst: the options of one run, with the targets given as repeated "--target HOST:PORT:RAW"
 * (crr, rr or udp_rr). Each target gets -w warm-up then -n kept samples, taken one attempt per
 * target in turn, so that every target sees the same moments; each one's samples are appended
 * to its RAW file. Output: {"targets": [one run object per target, in order]}. Returns as run_once:
 * the exit status, or -1 with a usage error in err (nothing printed, nothing left allocated). */
static int run_burst(int argc, char **argv, char *err) {
	static char *rest[SERVE_ARGS + 8];
	static char *spec[MAX_TARGETS];
	int nr = 0, nt = 0;
	for (int i = 0; i < argc; i++) {
		if (strcmp(argv[i], "--target") == 0 && i + 1 < argc) {
			if (nt == MAX_TARGETS)
				return usage_error(err, "too many --target");
			spec[nt++] = argv[++i];
		} else {
			rest[nr++] = argv[i];
		}
	}
	static struct opts o[MAX_TARGETS];
	static struct ctx c[MAX_TARGETS];
	static struct run r[MAX_TARGETS];
	static char *raw[MAX_TARGETS];
	for (int t = 0; t < nt; t++) {
		char *host = spec[t], *port = strchr(host, ':'), *path = port ? strchr(port + 1, ':') : NULL;
		if (!port || !path)
			return usage_error(err, "--target is HOST:PORT:RAWFILE (IPv4 only)");
		*port++ = '\0';
		*path++ = '\0';
		raw[t] = path;
		char *args[SERVE_ARGS + 8];
		memcpy(args, rest, (size_t)nr * sizeof *args);
		args[nr] = "--host";
		args[nr + 1] = host;
		args[nr + 2] = "--port";
		args[nr + 3] = port;
		optind = 0;
		if (parse_opts(nr + 4, args, &o[t], err) != 0)
			return -1;
		if (o[t].mode == M_WHO || o[t].duration > 0)
			return usage_error(err, "interleaved targets take crr, rr or udp_rr, without --duration");
	}
	for (int t = 0; t < nt; t++) {
		r[t] = (struct run){0}; /* init_ctx may fail before init_run clears it */
		if (init_ctx(&c[t], &o[t], err) != 0 || init_run(&r[t], first_cap(&o[t]), 1, err) != 0) {
			for (int u = 0; u <= t; u++) /* a later target's bad host frees the earlier ones */
				release(&c[u], &r[u]);
			return -1;
		}
	}
	long warm[MAX_TARGETS];
	int done[MAX_TARGETS] = {0}, left = nt;
	for (int t = 0; t < nt; t++)
		warm[t] = o[t].warmup;
	static struct rate_out x[MAX_TARGETS];
	int64_t start = now_ns();
	if (o[0].concurrency) /* rate: a window per target, in turn */
		for (int t = 0; t < nt; t++)
			rate_run(&c[t], &r[t], &x[t]);
	while (left > 0 && !o[0].concurrency)
		for (int t = 0; t < nt; t++)
			if (!done[t] && attempt(&c[t], &r[t], &warm[t])) {
				done[t] = 1;
				left--;
			}
	int64_t end = now_ns();
	int rc = 0;
	for (int t = 0; t < nt; t++)
		if (write_raw(raw[t], &r[t], 1) != 0)
			rc = 3;
	printf("{\"targets\": [");
	for (int t = 0; t < nt; t++) {
		printf(t ? ", " : "");
		if (o[t].concurrency) {
			report_rate_obj(&o[t], &r[t], &x[t]);
		} else {
			r[t].kept_start = start;
			r[t].kept_end = end;
			report_obj(&o[t], &r[t]);
		}
		if (c[t].fd >= 0)
			close_rst(c[t].fd);
		release(&c[t], &r[t]);
	}
	printf("]}\n");
	fflush(stdout);
	return rc;
}

static void reply_error(const char *msg) {
	printf("{\"error\": ");
	json_str(msg);
	printf("}\n");
	fflush(stdout);
}

static int serve(void) {
	static char line[SERVE_LINE];
	char err[ERR_LEN];
	while (fgets(line, sizeof line, stdin)) {
		char *args[SERVE_ARGS + 1] = {"lkclient"};
		int n = 1;
		for (char *tok = strtok(line, " \t\n"); tok && n < SERVE_ARGS; tok = strtok(NULL, " \t\n"))
			args[n++] = tok;
		args[n] = NULL;
		int burst = 0;
		for (int i = 1; i < n; i++)
			burst |= strcmp(args[i], "--target") == 0;
		optind = 0; /* GNU getopt: start over for the next argv */
		if ((burst ? run_burst(n, args, err) : run_once(n, args, err)) < 0)
			reply_error(err);
	}
	return 0;
}

int main(int argc, char **argv) {
	if (argc == 2 && strcmp(argv[1], "--serve") == 0)
		return serve();
	char err[ERR_LEN];
	int rc = run_once(argc, argv, err);
	if (rc < 0) {
		fprintf(stderr, "lkclient: %s\nusage: lkclient --mode crr|rr|udp_rr|who --host IP --port P [-n N] [-w N] "
				"[-s BYTES] [--duration S] [--raw FILE] [--connect-timeout-ms MS] [--timeout-ms MS] "
				"[--max-errors N] [--concurrency C [--duration-ms D] [--rate R] [--cpu-stat CPUS]]\n", err);
		return 1;
	}
	return rc;
}
