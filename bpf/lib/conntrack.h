/* SPDX-License-Identifier: Apache-2.0 */
/* Conntrack-lite for per-packet service translation at tc.
 *
 * A translated flow owns two lk_ct_v4 entries, written together on its first packet:
 *   CT_EGRESS {client -> ClusterIP:port}  -> backend address/port and slot (DNAT of later packets)
 *   CT_REPLY  {backend -> client}         -> rev_nat_index (SNAT of replies back to ClusterIP:port)
 * A hairpin flow (the client picked itself as backend, CT_F_HAIRPIN) is also SNATed to the
 * ClusterIP, keeping its port, so its reply tuple is {backend -> ClusterIP:client port}.
 * Entries are never deleted by the programs: the map is an LRU and evicts the oldest flows. An
 * entry expires (is treated as absent) once idle for its lifetime, as Cilium's CT entries do
 * (lk_ct_cfg; Cilium's defaults: a UDP flow 60 s, an established TCP flow 6 h, a TCP flow that
 * sent only its SYN 60 s, 10 s after a FIN or RST): a UDP client that keeps its port is balanced
 * afresh after an idle minute. A TCP SYN always starts a new flow (its tuple may be a reused one),
 * and a CT_EGRESS entry is trusted only while its backend still sits in its slot (the caller checks).
 */
#ifndef __LK_LIB_CONNTRACK_H_
#define __LK_LIB_CONNTRACK_H_

#include "common.h"

#define TCP_FLAG_FIN	0x01
#define TCP_FLAG_SYN	0x02
#define TCP_FLAG_RST	0x04
#define TCP_FLAG_ACK	0x10

LK_MAP("lru_hash", struct ipv4_ct_tuple, struct ct_entry, lk_ct_v4, LK_CT_MAP_SIZE, 0);
LK_MAP("array", __u32, struct ct_config, lk_ct_cfg, 1, 0);

/* Now, in the unit of ct_entry.lifetime. */
static __always_inline __u32 ct_now(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000);
}

/* How long a flow may stay idle after a packet with these protocol and TCP flags, given the
 * entry's flags (CT_F_CLOSING). */
static __always_inline __u32 ct_lifetime(__u8 proto, __u8 tcp_flags, __u16 ct_flags)
{
	__u32 zero = 0;
	struct ct_config *cfg = lk_ct_cfg.lookup(&zero);

	if (proto != IPPROTO_TCP)
		return cfg && cfg->nontcp_ms ? cfg->nontcp_ms : LK_CT_NONTCP_MS;
	if ((ct_flags & CT_F_CLOSING) || (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		return cfg && cfg->close_ms ? cfg->close_ms : LK_CT_CLOSE_MS;
	if ((tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return cfg && cfg->syn_ms ? cfg->syn_ms : LK_CT_SYN_MS;
	return cfg && cfg->tcp_ms ? cfg->tcp_ms : LK_CT_TCP_MS;
}

/* The live entry of `tuple` at time `now`, or 0 (none, or expired). */
static __always_inline struct ct_entry *ct4_lookup(struct ipv4_ct_tuple *tuple, __u32 now)
{
	struct ct_entry *ct = lk_ct_v4.lookup(tuple);

	if (!ct || (__s32)(ct->lifetime - now) < 0)
		return 0;
	return ct;
}

/* A packet of the entry's flow went by: push its expiry out (a FIN or RST marks it closing). */
static __always_inline void ct4_refresh(struct ct_entry *ct, __u32 now, __u8 proto, __u8 tcp_flags)
{
	if (proto == IPPROTO_TCP && (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		ct->flags |= CT_F_CLOSING;
	ct->lifetime = now + ct_lifetime(proto, tcp_flags, ct->flags);
}

/* Record a new flow `fwd` (as the client sent it, flags CT_EGRESS) translated to backend
 * be_addr:be_port (slot `slot` of service rev_nat_index, `flags` CT_F_*), and the reply tuple that
 * undoes it, both living until `lifetime`. Returns 0 or -ENOMEM. */
static __always_inline int
ct4_create(struct ipv4_ct_tuple *fwd, __be32 be_addr, __be16 be_port, __u32 rev_nat_index,
	   __u32 slot, __u16 flags, __u32 lifetime)
{
	struct ipv4_ct_tuple rev = {};
	struct ct_entry entry = {};

	entry.backend_address = be_addr;
	entry.backend_port = be_port;
	entry.rev_nat_index = rev_nat_index;
	entry.slot = slot;
	entry.flags = flags;
	entry.lifetime = lifetime;
	if (lk_ct_v4.update(fwd, &entry) < 0)
		return -ENOMEM;

	rev.saddr = be_addr;
	rev.sport = be_port;
	rev.daddr = flags & CT_F_HAIRPIN ? fwd->daddr : fwd->saddr;
	rev.dport = fwd->sport;
	rev.nexthdr = fwd->nexthdr;
	rev.flags = CT_REPLY;
	entry.backend_address = 0;
	entry.backend_port = 0;
	entry.slot = 0;
	if (lk_ct_v4.update(&rev, &entry) < 0)
		return -ENOMEM;
	return 0;
}

/* A pod opens a connection (a TCP SYN) to an address no service has: forget any reply entry a
 * translated flow left for the same tuple. With thousands of connections a second a pod reuses its
 * ports within seconds, and a service flow to backend B from port P leaves {B -> pod:P} in lk_ct_v4
 * while it closes (10 s): a direct connection to B from P would otherwise get its replies rewritten
 * to the ClusterIP, which its socket never sent to, and stall. */
static __always_inline void ct4_forget_reply(__be32 saddr, __be16 sport, __be32 daddr, __be16 dport, __u8 proto)
{
	struct ipv4_ct_tuple rev = {};

	rev.saddr = daddr;
	rev.sport = dport;
	rev.daddr = saddr;
	rev.dport = sport;
	rev.nexthdr = proto;
	rev.flags = CT_REPLY;
	lk_ct_v4.delete(&rev);
}

#endif /* __LK_LIB_CONNTRACK_H_ */
