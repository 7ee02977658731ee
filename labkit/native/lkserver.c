/*
 * lkserver: the in-pod server of a labkit lab. TCP and UDP on every port: an epoll loop for
 * connections, a blocking child process per UDP socket and per long-lived echo connection.
 *
 * Usage: lkserver --name NAME [--port 8080] [--ports 8080,9090] [--bind 0.0.0.0]
 *   (--port and --ports may be repeated and combined; at least one port is needed)
 *
 * Once every socket listens it prints one line "ready <port> <port>...\n" on stdout and flushes it,
 * so a caller can wait for it (labkit.measure.loadgen.start_server does). Errors go to stderr.
 *
 * TCP, per connection, decided by the first bytes received:
 *   "GET "  -> HTTP/1.0: the request is read up to its blank line, then "200 OK" with body "NAME\n"
 *              (Content-Length set) is sent and the connection closed. It tells which pod answered
 *              (labkit check, Service spread tests).
 *   other   -> echo: every byte is written back as it arrives (request/response latency tests send
 *              N bytes and read N back on one connection). A message that starts with a strict prefix
 *              of "GET " ("G", "GE") waits for its next bytes before it is classified.
 * UDP: every datagram is echoed; the datagram "WHO?" (exactly 4 bytes) is answered with "NAME\n".
 *
 * Timing discipline: this process sits inside every measured round trip, so the hot path is one
 * read() and one send() per message, no allocation (connection state is a table indexed by fd,
 * grown only on accept of a higher fd), level-triggered epoll, TCP_NODELAY on every connection.
 * Short connections (CRR: connect, one request, RST) stay in the epoll loop: a thread per
 * connection cost +45 µs per CRR sample here. An echo connection that has echoed PROMOTE_AFTER
 * messages is handed to a child process of its own that blocks in read() (RR): that saves the
 * epoll_wait per message; UDP sockets are served by one blocking child each for the same reason.
 * Children die with the server (PR_SET_PDEATHSIG) and are in its cgroup. Measured with lkclient
 * alternating bursts between this and the single-loop server on one CPU: TCP RR -0.5 to -1.0 µs,
 * UDP RR -1.2 to -1.4 µs, CRR unchanged (threads instead of processes cost CRR +1 µs: see
 * promote()). benchmarks/bench_loadgen.py then puts TCP RR 0.46 µs above sockperf and UDP RR
 * 0.5 µs below it (it was +1.1 to +1.4 µs and within 1 µs).
 * Robustness: the loop's sockets are non-blocking; a client error only closes that client; a peer
 * that does not read makes the loop buffer the unsent bytes and stop reading from it
 * (back-pressure) instead of blocking (a promoted connection's process blocks, alone); SIGPIPE is
 * ignored; EMFILE on accept is survived with a spare descriptor.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_PORTS 64
#define BUF_SIZE 65536
#define NAME_MAX_LEN 200
#define PROMOTE_AFTER 2                       /* echoed messages before a connection gets a thread */

enum kind { K_FREE = 0, K_TCP_LISTEN, K_UDP, K_CONN };
enum proto { P_UNKNOWN = 0, P_ECHO, P_HTTP };

struct conn {
	unsigned char kind;  /* enum kind */
	unsigned char proto; /* enum proto, K_CONN only */
	unsigned char held;  /* bytes of a "GET " prefix received but not yet classified */
	unsigned char eoh;   /* HTTP: how much of "\r\n\r\n" has been matched so far */
	int close_after;     /* close once `out` is flushed (HTTP response sent) */
	int echoed;          /* echo messages answered in the loop (promotion to a thread) */
	char *out;           /* bytes accepted for sending but not yet sent (NULL: nothing pending) */
	size_t out_len, out_off, out_cap;
};

static struct conn *conns;
static size_t nconns;
static int ep;
static int spare_fd = -1;
static char buf[BUF_SIZE];
static char http_resp[512];
static size_t http_resp_len;
static char name_line[NAME_MAX_LEN + 2];
static size_t name_line_len;

static void die(const char *what) {
	perror(what);
	exit(1);
}

static struct conn *conn_at(int fd) {
	if ((size_t)fd >= nconns) {
		size_t n = nconns ? nconns : 1024;
		while (n <= (size_t)fd)
			n *= 2;
		struct conn *c = realloc(conns, n * sizeof *c);
		if (!c)
			return NULL;
		memset(c + nconns, 0, (n - nconns) * sizeof *c);
		conns = c;
		nconns = n;
	}
	return &conns[fd];
}

static void watch(int fd, int op, unsigned events) {
	struct epoll_event ev = {.events = events, .data.fd = fd};
	if (epoll_ctl(ep, op, fd, &ev) != 0 && op != EPOLL_CTL_DEL)
		perror("epoll_ctl");
}

static void conn_close(int fd) {
	struct conn *c = &conns[fd];
	free(c->out);
	memset(c, 0, sizeof *c);
	close(fd); /* also removes it from the epoll set */
}

/* Queue what send() could not take; stop reading until it is flushed (back-pressure). */
static int queue_out(int fd, const char *p, size_t n) {
	struct conn *c = &conns[fd];
	size_t pending = c->out_len - c->out_off;
	if (c->out_off) {
		memmove(c->out, c->out + c->out_off, pending);
		c->out_off = 0;
		c->out_len = pending;
	}
	if (pending + n > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		while (cap < pending + n)
			cap *= 2;
		char *o = realloc(c->out, cap);
		if (!o)
			return -1;
		c->out = o;
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, p, n);
	c->out_len += n;
	watch(fd, EPOLL_CTL_MOD, EPOLLOUT);
	return 0;
}

/* Send now what the socket takes, queue the rest. Returns -1 if the connection must be closed. */
static int send_or_queue(int fd, const char *p, size_t n) {
	struct conn *c = &conns[fd];
	if (c->out_len > c->out_off)
		return queue_out(fd, p, n); /* keep byte order behind what is already queued */
	while (n > 0) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
		} else if (k < 0 && errno == EINTR) {
			continue;
		} else if (k < 0 && errno == EAGAIN) {
			return queue_out(fd, p, n);
		} else {
			return -1;
		}
	}
	return 0;
}

static void flush_out(int fd) {
	struct conn *c = &conns[fd];
	while (c->out_off < c->out_len) {
		ssize_t k = send(fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
		if (k > 0)
			c->out_off += (size_t)k;
		else if (k < 0 && errno == EINTR)
			continue;
		else if (k < 0 && errno == EAGAIN)
			return; /* still EPOLLOUT */
		else {
			conn_close(fd);
			return;
		}
	}
	c->out_off = c->out_len = 0;
	if (c->close_after) {
		conn_close(fd);
		return;
	}
	watch(fd, EPOLL_CTL_MOD, EPOLLIN);
}

/* Consume HTTP request bytes; once the blank line is seen, answer and close. */
static void http_feed(int fd, const char *p, size_t n) {
	static const char eoh[] = "\r\n\r\n";
	struct conn *c = &conns[fd];
	for (size_t i = 0; i < n; i++) {
		if (p[i] == eoh[c->eoh])
			c->eoh++;
		else
			c->eoh = (p[i] == '\r');
		if (c->eoh == 4) {
			c->close_after = 1;
			if (send_or_queue(fd, http_resp, http_resp_len) != 0 || c->out_len == 0)
				conn_close(fd);
			return; /* anything after the blank line is ignored */
		}
	}
}

/* First bytes of a connection decide its protocol; held bytes are a strict prefix of "GET ". */
static void classify_and_feed(int fd, const char *p, size_t n) {
	static const char get[] = "GET ";
	struct conn *c = &conns[fd];
	size_t held = c->held, take = 0;
	while (held + take < 4 && take < n && p[take] == get[held + take])
		take++;
	if (held + take == 4) {
		c->proto = P_HTTP;
		http_feed(fd, p + take, n - take);
		return;
	}
	if (take == n) { /* still a prefix of "GET ": wait for more */
		c->held = (unsigned char)(held + take);
		return;
	}
	c->proto = P_ECHO;
	c->held = 0;
	if ((held && send_or_queue(fd, get, held) != 0) || send_or_queue(fd, p, n) != 0)
		conn_close(fd);
}

/* In a child process: die with the server, keep only `keep` (and stdio) open. */
static void become_helper(int keep) {
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1)
		_exit(0); /* the server is already gone */
	for (size_t fd = 3; fd < nconns; fd++)
		if ((int)fd != keep && conns[fd].kind != K_FREE)
			close((int)fd);
	close(ep);
}

/* A long-lived echo connection, blocking: read() and send() until EOF. */
static void echo_blocking(int fd) {
	for (;;) {
		ssize_t r = read(fd, buf, sizeof buf);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return;
		for (size_t off = 0; off < (size_t)r;) {
			ssize_t k = send(fd, buf + off, (size_t)r - off, MSG_NOSIGNAL);
			if (k < 0 && errno == EINTR)
				continue;
			if (k <= 0)
				return;
			off += (size_t)k;
		}
	}
}

/* Hand an echo connection (nothing queued for it) from the loop to a process of its own, which
 * serves it blocking. Processes, not threads: a second thread would make every syscall of the
 * loop pay for a shared file table (CRR +1 µs here). If fork fails it stays in the loop. */
static void promote(int fd) {
	int flags = fcntl(fd, F_GETFL);
	if (flags < 0)
		return;
	/* Out of the epoll set first: it holds the open file, which the child keeps open, so the
	 * parent's close() below would not remove it and every message would wake the loop too. */
	watch(fd, EPOLL_CTL_DEL, 0);
	pid_t pid = fork();
	if (pid < 0) {
		watch(fd, EPOLL_CTL_ADD, EPOLLIN);
		return;
	}
	if (pid == 0) {
		become_helper(fd);
		fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
		echo_blocking(fd);
		_exit(0);
	}
	conn_close(fd); /* the child has its own descriptor */
}

static void on_readable(int fd) {
	struct conn *c = &conns[fd];
	ssize_t r = read(fd, buf, sizeof buf);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r <= 0) { /* EOF or error (ECONNRESET from a CRR client's RST close) */
		conn_close(fd);
		return;
	}
	if (c->proto == P_ECHO) {
		if (send_or_queue(fd, buf, (size_t)r) != 0)
			conn_close(fd);
		else if (++c->echoed >= PROMOTE_AFTER && c->out_len == 0)
			promote(fd);
	} else if (c->proto == P_HTTP) {
		http_feed(fd, buf, (size_t)r);
	} else {
		classify_and_feed(fd, buf, (size_t)r);
	}
}

static void accept_all(int ls) {
	static const int one = 1;
	for (;;) {
		int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if ((errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
				/* Accept and drop one connection so the listener stops waking us up. */
				close(spare_fd);
				int c = accept(ls, NULL, NULL);
				if (c >= 0)
					close(c);
				spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
				continue;
			}
			return; /* EAGAIN, or a transient error (ECONNABORTED...): try on next wake-up */
		}
		struct conn *c = conn_at(fd);
		if (!c) {
			close(fd);
			continue;
		}
		c->kind = K_CONN;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		watch(fd, EPOLL_CTL_ADD, EPOLLIN);
	}
}

/* One UDP socket, blocking, in a child process: every datagram echoed, "WHO?" answered with the
 * pod's name (no epoll_wait and no recvfrom returning EAGAIN per datagram). */
static void serve_udp(int fd) {
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid > 0) {
		close(fd);
		conns[fd].kind = K_FREE;
		return;
	}
	become_helper(fd);
	for (;;) {
		struct sockaddr_storage peer;
		socklen_t plen = sizeof peer;
		ssize_t r = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen);
		if (r < 0)
			continue; /* EINTR, or an ICMP error reported on the socket: nothing to answer */
		const char *p = buf;
		size_t n = (size_t)r;
		if (n == 4 && memcmp(buf, "WHO?", 4) == 0) {
			p = name_line;
			n = name_line_len;
		}
		sendto(fd, p, n, MSG_NOSIGNAL, (struct sockaddr *)&peer, plen);
	}
}

static int open_socket(int type, const struct in_addr *bind_ip, int port) {
	static const int one = 1;
	int fd = socket(AF_INET, type | (type == SOCK_STREAM ? SOCK_NONBLOCK : 0) | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	/* Only TCP: on UDP, SO_REUSEADDR would let two servers share a port silently. */
	if (type == SOCK_STREAM && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
		die("setsockopt SO_REUSEADDR");
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr = *bind_ip};
	if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
		fprintf(stderr, "lkserver: bind %s port %d: %s\n", type == SOCK_STREAM ? "tcp" : "udp", port,
			strerror(errno));
		exit(1);
	}
	if (type == SOCK_STREAM && listen(fd, 65535) != 0)
		die("listen");
	if (type == SOCK_DGRAM) { /* blocking, served by its own thread (started after every bind) */
		struct conn *c = conn_at(fd);
		if (!c)
			die("out of memory");
		c->kind = K_UDP;
		return fd;
	}
	struct conn *c = conn_at(fd);
	if (!c)
		die("out of memory");
	c->kind = K_TCP_LISTEN;
	watch(fd, EPOLL_CTL_ADD, EPOLLIN);
	return fd;
}

static int parse_port(const char *s) {
	char *end;
	long p = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || p < 1 || p > 65535) {
		fprintf(stderr, "lkserver: bad port '%s'\n", s);
		exit(1);
	}
	return (int)p;
}

static void add_ports(const char *arg, int *ports, int *nports) {
	char *list = strdup(arg); /* strtok writes into its input; keep argv intact for ps */
	if (!list)
		die("strdup");
	for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
		if (*nports == MAX_PORTS) {
			fprintf(stderr, "lkserver: at most %d ports\n", MAX_PORTS);
			exit(1);
		}
		ports[(*nports)++] = parse_port(tok);
	}
	free(list);
}

static void usage(void) {
	fprintf(stderr, "usage: lkserver --name NAME [--port P] [--ports P1,P2,...] [--bind IPV4]\n");
	exit(1);
}

static void raise_nofile(void) {
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static void build_replies(const char *name) {
	size_t len = strlen(name);
	if (len == 0 || len > NAME_MAX_LEN) {
		fprintf(stderr, "lkserver: --name must be 1..%d bytes\n", NAME_MAX_LEN);
		exit(1);
	}
	name_line_len = (size_t)snprintf(name_line, sizeof name_line, "%s\n", name);
	http_resp_len = (size_t)snprintf(http_resp, sizeof http_resp,
					 "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
					 "Connection: close\r\n\r\n%s",
					 name_line_len, name_line);
}

int main(int argc, char **argv) {
	static const struct option opts[] = {
		{"port", required_argument, 0, 'p'}, {"ports", required_argument, 0, 'P'},
		{"bind", required_argument, 0, 'b'}, {"name", required_argument, 0, 'n'},
		{"help", no_argument, 0, 'h'},       {0, 0, 0, 0},
	};
	int ports[MAX_PORTS], nports = 0, o;
	const char *name = NULL, *bind_s = "0.0.0.0";
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (o == 'p' || o == 'P')
			add_ports(optarg, ports, &nports);
		else if (o == 'b')
			bind_s = optarg;
		else if (o == 'n')
			name = optarg;
		else
			usage();
	}
	if (!name || nports == 0 || optind != argc)
		usage();
	struct in_addr bind_ip;
	if (inet_pton(AF_INET, bind_s, &bind_ip) != 1) {
		fprintf(stderr, "lkserver: --bind needs an IPv4 address, got '%s'\n", bind_s);
		return 1;
	}
	build_replies(name);
	signal(SIGPIPE, SIG_IGN);
	raise_nofile();
	spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
		die("epoll_create1");
	struct sigaction sa = {.sa_handler = SIG_IGN, .sa_flags = SA_NOCLDWAIT}; /* children reap themselves */
	sigaction(SIGCHLD, &sa, NULL);
	int udp_fds[MAX_PORTS];
	for (int i = 0; i < nports; i++) { /* every bind first: a port in use fails before "ready" */
		open_socket(SOCK_STREAM, &bind_ip, ports[i]);
		udp_fds[i] = open_socket(SOCK_DGRAM, &bind_ip, ports[i]);
	}
	for (int i = 0; i < nports; i++)
		serve_udp(udp_fds[i]);
	printf("ready");
	for (int i = 0; i < nports; i++)
		printf(" %d", ports[i]);
	printf("\n");
	fflush(stdout);

	struct epoll_event evs[256];
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if ((size_t)fd >= nconns || conns[fd].kind == K_FREE)
				continue; /* closed earlier in this batch */
			struct conn *c = &conns[fd];
			if (c->kind == K_TCP_LISTEN)
				accept_all(fd);
			else if (evs[i].events & EPOLLOUT)
				flush_out(fd);
			else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
				on_readable(fd);
		}
	}
}
