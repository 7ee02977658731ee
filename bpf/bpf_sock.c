/* SPDX-License-Identifier: Apache-2.0 */
/* Socket-level load balancing (Cilium's bpf_sock.c idea): translate ClusterIP:port to a backend when
 * a socket connects or sends, so no packet ever carries the ClusterIP and no per-packet NAT is needed.
 *
 * Attached to the cgroup v2 folder holding a node's pod processes (never the root cgroup):
 *   lk_sock4_connect  BPF_CGROUP_INET4_CONNECT  TCP connect(), connected UDP connect()
 *   lk_sock4_sendmsg  BPF_CGROUP_UDP4_SENDMSG   unconnected UDP sendto()/sendmsg()
 *   lk_sock4_recvmsg  BPF_CGROUP_UDP4_RECVMSG   UDP recvfrom(): the reply's source becomes the
 *                                               ClusterIP again (lk_rnat_sk_v4, keyed by socket)
 * A service without endpoints refuses: connect()/sendmsg() fail with ECONNREFUSED (bpf_set_retval).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "lib/common.h"
#include "lib/lb.h"

/* UDP sockets that were sent to a backend in place of a service: socket+backend -> service. */
LK_MAP("lru_hash", struct ipv4_revnat_tuple, struct ipv4_revnat_entry, lk_rnat_sk_v4,
       LK_RNAT_SK_MAP_SIZE, 0);

/* bcc declares bpf_get_socket_cookie as returning u32; the cookie is 64 bits. */
#define lk_get_socket_cookie(ctx) \
	((__u64 (*)(void *))BPF_FUNC_get_socket_cookie)(ctx)

/* Remember that this socket talks to backend `be` in place of vip:vport (UDP only: a TCP socket is
 * connected to its backend and never sees a datagram from elsewhere). */
static __always_inline int
sock4_update_revnat(struct bpf_sock_addr *ctx, const struct lb4_backend *be, __be32 vip,
		    __be16 vport, __u32 rev_nat_index)
{
	struct ipv4_revnat_tuple key = {};
	struct ipv4_revnat_entry val = {};
	struct ipv4_revnat_entry *cur;

	key.cookie = lk_get_socket_cookie(ctx);
	key.address = be->address;
	key.port = be->port;
	cur = lk_rnat_sk_v4.lookup(&key);
	/* unconnected UDP passes here on every datagram: skip the write when nothing changes */
	if (cur && cur->address == vip && cur->port == vport)
		return 0;
	val.address = vip;
	val.port = vport;
	val.rev_nat_index = rev_nat_index;
	return lk_rnat_sk_v4.update(&key, &val) < 0 ? -ENOMEM : 0;
}

/* Rewrite the socket's destination from a service to one of its backends. Returns 0 when
 * translated, -ENXIO when the destination is not a service (left alone), -ECONNREFUSED when the
 * service has no endpoints, -ENOMEM when the UDP reverse entry could not be written. */
static __always_inline int
sock4_xlate_fwd(struct bpf_sock_addr *ctx, __u8 proto)
{
	__be32 vip = ctx->user_ip4;
	__be16 vport = (__be16)ctx->user_port;
	struct lb4_service *svc;
	struct lb4_backend be = {};
	__u32 slot = 0, rev_nat_index;
	int err;

	svc = lb4_lookup_service(vip, vport, proto);
	if (!svc)
		return -ENXIO;
	rev_nat_index = svc->rev_nat_index;
	err = lb4_select_backend(svc, &slot, &be);
	if (err < 0)
		return -ECONNREFUSED;
	if (proto == IPPROTO_UDP) {
		err = sock4_update_revnat(ctx, &be, vip, vport, rev_nat_index);
		if (err < 0)
			return err;
	}
	ctx->user_ip4 = be.address;
	ctx->user_port = (__u32)be.port;
	return 0;
}

/* A refused service fails the syscall with that errno; anything else proceeds untouched. */
static __always_inline int sock4_verdict(int err)
{
	if (err == -ECONNREFUSED || err == -ENOMEM) {
		bpf_set_retval(err);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

int lk_sock4_connect(struct bpf_sock_addr *ctx)
{
	__u8 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	return sock4_verdict(sock4_xlate_fwd(ctx, proto));
}

int lk_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(sock4_xlate_fwd(ctx, IPPROTO_UDP));
}

int lk_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	struct ipv4_revnat_tuple key = {};
	struct ipv4_revnat_entry *val;

	key.cookie = lk_get_socket_cookie(ctx);
	key.address = ctx->user_ip4;
	key.port = (__be16)ctx->user_port;
	val = lk_rnat_sk_v4.lookup(&key);
	if (val) {
		ctx->user_ip4 = val->address;
		ctx->user_port = (__u32)val->port;
	}
	return SYS_PROCEED;	/* recvmsg hooks must return 1 */
}
