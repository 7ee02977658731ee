/* SPDX-License-Identifier: Apache-2.0 */
/* Service load balancing: the service, backend and reverse-NAT maps and the lookups on them.
 *
 * Layout (as Cilium's lb4_services / lb4_backends / lb4_reverse_nat, simplified):
 *   lk_svc_v4   lb4_key {ClusterIP, port, proto}        -> lb4_service {rev_nat_index, count}
 *   lk_be_v4    lb4_backend_key {rev_nat_index, slot}   -> lb4_backend {pod IP, target port}
 *   lk_rnat_v4  __u32 rev_nat_index                     -> lb4_reverse_nat {ClusterIP, port}
 * The loader writes backends before the service entry that counts them, and lowers a count before
 * deleting the slots above it, so a program never sees a count larger than the slots present
 * (a race with a concurrent shrink is still possible and falls back to slot 0).
 *
 * Helpers return 0 or a negative errno, as Cilium's do.
 */
#ifndef __LK_LIB_LB_H_
#define __LK_LIB_LB_H_

#include <uapi/linux/in.h>
#include "common.h"

/* Written by the loader only. Preallocated (unlike Cilium's BPF_F_NO_PREALLOC LB maps): a batch of
 * 60k backend updates then takes ~40-60 ms instead of ~75, for ~20 MB of memory held per datapath. */
LK_MAP("hash", struct lb4_key, struct lb4_service, lk_svc_v4, LK_SVC_MAP_SIZE, 0);
LK_MAP("hash", struct lb4_backend_key, struct lb4_backend, lk_be_v4, LK_BE_MAP_SIZE, 0);
LK_MAP("hash", __u32, struct lb4_reverse_nat, lk_rnat_v4, LK_RNAT_MAP_SIZE, 0);

/* The service listening on addr:port/proto (all network order but proto), or NULL. */
static __always_inline struct lb4_service *
lb4_lookup_service(__be32 addr, __be16 port, __u8 proto)
{
	struct lb4_key key = {};

	key.address = addr;
	key.dport = port;
	key.proto = proto;
	return lk_svc_v4.lookup(&key);
}

/* Backend in a given slot of a service, or NULL. */
static __always_inline struct lb4_backend *
lb4_lookup_backend(__u32 rev_nat_index, __u32 slot)
{
	struct lb4_backend_key key = {};

	key.rev_nat_index = rev_nat_index;
	key.slot = slot;
	return lk_be_v4.lookup(&key);
}

/* Where replies of a service are rewritten back to, or NULL. */
static __always_inline struct lb4_reverse_nat *
lb4_lookup_rev_nat(__u32 rev_nat_index)
{
	return lk_rnat_v4.lookup(&rev_nat_index);
}

/* Pick a backend of svc uniformly at random (bpf_get_prandom_u32, as Cilium's random selection).
 * Returns 0 with *slot and *backend filled, -ECONNREFUSED when the service has no endpoints, or
 * -ENOENT when its slots vanished under a concurrent update. */
static __always_inline int
lb4_select_backend(const struct lb4_service *svc, __u32 *slot, struct lb4_backend *backend)
{
	__u32 count = svc->count;
	__u32 rev_nat_index = svc->rev_nat_index;
	__u32 pick;
	struct lb4_backend *be;

	if (count == 0)
		return -ECONNREFUSED;
	pick = bpf_get_prandom_u32() % count;
	be = lb4_lookup_backend(rev_nat_index, pick);
	if (!be && pick != 0) {
		/* the service is shrinking right now: its lower slots are still there */
		pick = 0;
		be = lb4_lookup_backend(rev_nat_index, pick);
	}
	if (!be)
		return -ENOENT;
	*slot = pick;
	*backend = *be;
	return 0;
}

#endif /* __LK_LIB_LB_H_ */
