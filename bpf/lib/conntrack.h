/* SPDX-License-Identifier: Apache-2.0 */
/* Conntrack-lite for per-packet service translation at tc.
 *
 * A translated flow owns two lk_ct_v4 entries, written together on its first packet:
 *   CT_EGRESS {client -> ClusterIP:port}  -> backend address/port and slot (DNAT of later packets)
 *   CT_REPLY  {backend -> client}         -> rev_nat_index (SNAT of replies back to ClusterIP:port)
 * A hairpin flow (the client picked itself as backend, CT_F_HAIRPIN) is also SNATed to the
 * ClusterIP, keeping its port, so its reply tuple is {backend -> ClusterIP:client port}.
 * Entries are never deleted by the programs: the map is an LRU and evicts the oldest flows. A
 * CT_EGRESS entry is trusted only while its backend still sits in its slot (the caller checks).
 */
#ifndef __LK_LIB_CONNTRACK_H_
#define __LK_LIB_CONNTRACK_H_

#include "common.h"

LK_MAP("lru_hash", struct ipv4_ct_tuple, struct ct_entry, lk_ct_v4, LK_CT_MAP_SIZE, 0);

static __always_inline struct ct_entry *ct4_lookup(struct ipv4_ct_tuple *tuple)
{
	return lk_ct_v4.lookup(tuple);
}

/* Record a new flow `fwd` (as the client sent it, flags CT_EGRESS) translated to backend
 * be_addr:be_port (slot `slot` of service rev_nat_index, `flags` CT_F_*), and the reply tuple that
 * undoes it. Returns 0 or -ENOMEM. */
static __always_inline int
ct4_create(struct ipv4_ct_tuple *fwd, __be32 be_addr, __be16 be_port, __u32 rev_nat_index,
	   __u32 slot, __u16 flags)
{
	struct ipv4_ct_tuple rev = {};
	struct ct_entry entry = {};

	entry.backend_address = be_addr;
	entry.backend_port = be_port;
	entry.rev_nat_index = rev_nat_index;
	entry.slot = slot;
	entry.flags = flags;
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

#endif /* __LK_LIB_CONNTRACK_H_ */
