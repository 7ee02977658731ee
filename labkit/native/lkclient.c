/*
 * lkclient: labkit's latency client. One process, one thread, blocking sockets, one JSON line out.
 *
 * Usage: lkclient --mode crr|rr|udp_rr|who --host IP --port P [-n SAMPLES] [-w WARMUP] [-s BYTES]
 *                 [--duration SECONDS] [--raw FILE] [--connect-timeout-ms MS] [--timeout-ms MS]
 *                 [--max-errors N]
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
 * Timing discipline: CLOCK_MONOTONIC read immediately before and after the transaction; nothing
 * else in between (buffers, sample array and sequence stamps are prepared outside it, no
 * allocation per sample, no printing until the end). In crr the per-socket options (TCP_NODELAY,
 * send/receive timeouts, SO_LINGER) are inside the sample because they belong to that socket;
 * together they cost well under a microsecond. Pin this process (taskset, or labkit's cpus=) so
 * that it is not migrated mid-sample.
 */
#define _GNU_SOURCE
#include <errno.h>
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

enum mode { M_CRR, M_RR, M_UDP_RR, M_WHO };
static const char *const mode_names[] = {"crr", "rr", "udp_rr", "who"};

struct opts {
	enum mode mode;
	const char *host, *port, *raw;
	long n, warmup, size, max_errors;
	double duration;
	int connect_timeout_ms, timeout_ms;
};

struct tally { /* a small string -> count table (error kinds, backend names) */
	char (*key)[NAME_LEN];
	long *count;
	int len, cap;
};

struct run {
	int64_t *lat; /* kept samples, ns */
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

static void report_obj(const struct opts *o, struct run *r) {
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
	printf(", \"aborted\": %s}", r->aborted ? "true" : "false");
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

/* The options of one run into o; 0, or -1 with the message in err. Allocates nothing. */
static int parse_opts(int argc, char **argv, struct opts *o, char *err) {
	static const struct option lo[] = {
		{"mode", required_argument, 0, 'm'},         {"host", required_argument, 0, 'H'},
		{"port", required_argument, 0, 'p'},         {"samples", required_argument, 0, 'n'},
		{"warmup", required_argument, 0, 'w'},       {"size", required_argument, 0, 's'},
		{"duration", required_argument, 0, 'd'},     {"raw", required_argument, 0, 'r'},
		{"connect-timeout-ms", required_argument, 0, 'c'}, {"timeout-ms", required_argument, 0, 't'},
		{"max-errors", required_argument, 0, 'e'},   {"help", no_argument, 0, 'h'},
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
		case 'n': rc = parse_long(optarg, "-n", 1, MAX_SAMPLES, &o->n, err); break;
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

/* The sample array (zeroed) and tallies of a run of n samples; 0, or -1 with the message in err.
 * Either way r is left safe to release(). */
static int init_run(struct run *r, long n, int names, char *err) {
	*r = (struct run){0};
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
	if (init_ctx(&c, &o, err) != 0 || init_run(&r, o.n, MAX_NAMES, err) != 0) {
		release(&c, &r);
		return -1;
	}
	memset(r.lat, 0, (size_t)o.n * sizeof *r.lat); /* fault every page in before the first sample */
	measure(&c, &r);
	int raw_failed = o.raw ? write_raw(o.raw, &r, 0) : 0; /* raw samples first: keep the data */
	report(&o, &r);
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
		if (init_ctx(&c[t], &o[t], err) != 0 || init_run(&r[t], o[t].n, 1, err) != 0) {
			for (int u = 0; u <= t; u++) /* a later target's bad host frees the earlier ones */
				release(&c[u], &r[u]);
			return -1;
		}
	}
	long warm[MAX_TARGETS];
	int done[MAX_TARGETS] = {0}, left = nt;
	for (int t = 0; t < nt; t++)
		warm[t] = o[t].warmup;
	int64_t start = now_ns();
	while (left > 0)
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
		r[t].kept_start = start;
		r[t].kept_end = end;
		printf(t ? ", " : "");
		report_obj(&o[t], &r[t]);
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
				"[--max-errors N]\n", err);
		return 1;
	}
	return rc;
}
