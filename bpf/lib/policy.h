/* SPDX-License-Identifier: Apache-2.0 */
/* NetworkPolicy maps and lookups (Cilium's policy map idea, with an LPM trie instead of identities).
 *
 * This file is one half of a contract: labkit/policy/ebpf_structs.py holds the ctypes mirror of every
 * struct below and tests/test_policy_engines.py checks sizes and offsets as gcc sees them and against
 * bcc's typed views.
 * Byte order as in common.h: addresses and ports in NETWORK order, flags and ids in HOST order;
 * padding explicit and zero.
 *
 * Maps (all pinned, see LK_MAP in common.h):
 *   lk_pol_ep     hash      pod address -> which directions of that pod are isolated
 *   lk_pol_v4     lpm_trie  {pod, direction, protocol, port, peer/prefix} -> allowed
 *   lk_pol_flow   lru_hash  flows already allowed at one pod and direction, and their replies
 *   lk_pol_stats  percpu_array counters of verdicts (POL_STAT_*)
 * The loader writes lk_pol_ep and lk_pol_v4; only the programs write lk_pol_flow and lk_pol_stats.
 */
#ifndef __LK_LIB_POLICY_H_
#define __LK_LIB_POLICY_H_

#include "common.h"

#ifndef EACCES
#define EACCES		13
#endif

#define LK_POL_EP_MAP_SIZE	65536	/* lk_pol_ep: pods of one node */
#define LK_POL_MAP_SIZE		1048576	/* lk_pol_v4: rule entries over all pods of one node */
#define LK_POL_FLOW_MAP_SIZE	262144	/* lk_pol_flow (LRU): two entries per flow per enforcing pod */

#define POL_INGRESS	1	/* direction: traffic to the pod (policy_key.dir, policy_endpoint.isolated bit) */
#define POL_EGRESS	2	/* direction: traffic from the pod */

/* Prefix bits of policy_key before the peer address: endpoint, dir, proto, dport. */
#define POL_PREFIX_FIXED	64

#define POL_STAT_ESTABLISHED	0	/* packet of a flow already allowed (or its reply) */
#define POL_STAT_ALLOWED	1	/* new flow allowed (by a rule, or the direction is not isolated) */
#define POL_STAT_DENIED		2	/* new flow dropped: the pod is isolated and no rule allows it */
#define POL_STAT_MAX		3

/* lk_pol_ep value: one pod of the node, keyed by its address (__be32). 8 bytes. */
struct policy_endpoint {
	__u8  isolated;		/* POL_INGRESS | POL_EGRESS bits: directions some policy isolates */
	__u8  pad[3];		/* always 0 */
	__u32 policies;		/* host order: policies selecting the pod (for inspection) */
};

/* lk_pol_v4 key (LPM trie): prefixlen counts from `endpoint`; every entry fixes endpoint, dir, proto
 * and dport (POL_PREFIX_FIXED bits) plus the peer CIDR's prefix. 16 bytes. */
struct policy_key {
	__u32  prefixlen;	/* host order: POL_PREFIX_FIXED + peer prefix length (0..32) */
	__be32 endpoint;	/* the pod's address, network order */
	__u8   dir;		/* POL_INGRESS or POL_EGRESS */
	__u8   proto;		/* IPPROTO_TCP / IPPROTO_UDP; 0 = every protocol (then dport is 0) */
	__be16 dport;		/* destination port, network order; 0 = every port of proto */
	__be32 peer;		/* the other side's address (prefix), network order */
};

/* lk_pol_v4 value. 8 bytes. */
struct policy_entry {
	__u32 policy;		/* host order: loader's index of the policy that allowed it (inspection) */
	__u32 pad;		/* always 0 */
};

/* lk_pol_flow key: a packet's addresses and ports as seen at the hook, and the direction of the
 * hook's pod (POL_EGRESS: saddr is the pod; POL_INGRESS: daddr is the pod). 16 bytes. */
struct policy_flow_key {
	__be32 saddr;		/* source address, network order */
	__be32 daddr;		/* destination address, network order */
	__be16 sport;		/* source port, network order (0 without ports) */
	__be16 dport;		/* destination port, network order (0 without ports) */
	__u8   proto;		/* IP protocol */
	__u8   dir;		/* POL_INGRESS or POL_EGRESS */
	__u16  pad;		/* always 0 */
};

/* lk_pol_flow value. 8 bytes. */
struct policy_flow {
	__u64 created;		/* bpf_ktime_get_ns() when the flow was allowed (inspection) */
};

LK_MAP("hash", __be32, struct policy_endpoint, lk_pol_ep, LK_POL_EP_MAP_SIZE, 0);
LK_MAP("lpm_trie", struct policy_key, struct policy_entry, lk_pol_v4, LK_POL_MAP_SIZE, BPF_F_NO_PREALLOC);
LK_MAP("lru_hash", struct policy_flow_key, struct policy_flow, lk_pol_flow, LK_POL_FLOW_MAP_SIZE, 0);
LK_MAP("percpu_array", __u32, __u64, lk_pol_stats, POL_STAT_MAX, 0);

static __always_inline void policy_count(__u32 stat)
{
	__u64 *n = lk_pol_stats.lookup(&stat);

	if (n)
		*n += 1;
}

/* Whether a rule allows `peer` on proto/dport for pod `endpoint` in direction `dir`: the exact port,
 * then every port of the protocol, then every protocol (Kubernetes ports: port, protocol only, none).
 * Returns 0 if allowed, -EACCES otherwise. */
static __always_inline int policy_allows(__be32 endpoint, __u8 dir, __u8 proto, __be16 dport, __be32 peer)
{
	struct policy_key key = {};

	key.prefixlen = POL_PREFIX_FIXED + 32;
	key.endpoint = endpoint;
	key.dir = dir;
	key.proto = proto;
	key.dport = dport;
	key.peer = peer;
	if (dport && lk_pol_v4.lookup(&key))
		return 0;
	key.dport = 0;
	if (lk_pol_v4.lookup(&key))
		return 0;
	key.proto = 0;
	if (lk_pol_v4.lookup(&key))
		return 0;
	return -EACCES;
}

/* Remember an allowed flow at one pod and direction, and its reply (arriving in the other
 * direction with addresses and ports swapped). Returns 0 or -ENOMEM. */
static __always_inline int policy_flow_create(struct policy_flow_key *fwd)
{
	struct policy_flow_key rev = {};
	struct policy_flow flow = {};

	flow.created = bpf_ktime_get_ns();
	if (lk_pol_flow.update(fwd, &flow) < 0)
		return -ENOMEM;
	rev.saddr = fwd->daddr;
	rev.daddr = fwd->saddr;
	rev.sport = fwd->dport;
	rev.dport = fwd->sport;
	rev.proto = fwd->proto;
	rev.dir = fwd->dir ^ (POL_INGRESS | POL_EGRESS);
	if (lk_pol_flow.update(&rev, &flow) < 0)
		return -ENOMEM;
	return 0;
}

#endif /* __LK_LIB_POLICY_H_ */
