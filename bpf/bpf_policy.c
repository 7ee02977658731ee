/* SPDX-License-Identifier: Apache-2.0 */
/* NetworkPolicy enforcement at tc, on the interface between a pod and its node (Cilium enforces
 * policy in bpf_lxc.c at the same place).
 *
 * Entry programs (tc clsact, direct action):
 *   lk_pol_from_pod   packets the pod sends: tc ingress of the node-side interface facing the pod,
 *                     or tc egress of the pod's own interface (pods without a node-side path)
 *   lk_pol_to_pod     packets to the pod: tc egress of the node-side interface, or tc ingress of the
 *                     pod's own interface
 * Verdicts: TC_ACT_SHOT for a denied new flow; otherwise TC_ACT_UNSPEC, so that filters after this
 * one (the ebpf-tc Service datapath, at a later priority) still see the packet.
 *
 * Per IPv4 packet: the pod (source for from_pod, destination for to_pod) is looked up in lk_pol_ep;
 * a pod no policy selects is left alone. A packet of a flow this pod already allowed in this
 * direction, or a reply to one it allowed in the other, passes (lk_pol_flow: the "established"
 * state). Otherwise, if the direction is isolated, lk_pol_v4 must allow the peer on the packet's
 * protocol and port; an allowed flow is recorded with its reply. Non-IPv4 (ARP) and non-first
 * fragments pass. Flows are never deleted here: lk_pol_flow is an LRU.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/common.h"
#include "lib/policy.h"

/* Fill a flow key from an IPv4 packet. Returns 0, -EOPNOTSUPP (not IPv4, or a later fragment: let
 * it pass) or -EINVAL (truncated). */
static __always_inline int policy_parse(struct __sk_buff *skb, struct policy_flow_key *fk)
{
	struct iphdr ip;
	__be16 ports[2] = {};

	if (skb->protocol != lk_htons(ETH_P_IP))
		return -EOPNOTSUPP;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -EINVAL;
	if (ip.ihl < 5 || ip.frag_off & lk_htons(0x1fff))
		return -EOPNOTSUPP;
	if (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, ports, sizeof(ports)) < 0)
			return -EINVAL;
	}
	fk->saddr = ip.saddr;
	fk->daddr = ip.daddr;
	fk->sport = ports[0];
	fk->dport = ports[1];
	fk->proto = ip.protocol;
	return 0;
}

static __always_inline int policy_enforce(struct __sk_buff *skb, __u8 dir)
{
	struct policy_flow_key fk = {};
	struct policy_endpoint *ep;
	__be32 endpoint, peer;
	int ret;

	ret = policy_parse(skb, &fk);
	if (ret == -EOPNOTSUPP)
		return TC_ACT_UNSPEC;
	if (ret < 0)
		return TC_ACT_SHOT;
	fk.dir = dir;
	endpoint = dir == POL_EGRESS ? fk.saddr : fk.daddr;
	peer = dir == POL_EGRESS ? fk.daddr : fk.saddr;
	ep = lk_pol_ep.lookup(&endpoint);
	if (!ep)
		return TC_ACT_UNSPEC;
	if (lk_pol_flow.lookup(&fk)) {
		policy_count(POL_STAT_ESTABLISHED);
		return TC_ACT_UNSPEC;
	}
	if ((ep->isolated & dir) && policy_allows(endpoint, dir, fk.proto, fk.dport, peer) < 0) {
		policy_count(POL_STAT_DENIED);
		return TC_ACT_SHOT;
	}
	policy_count(POL_STAT_ALLOWED);
	policy_flow_create(&fk);	/* on -ENOMEM the next packet is simply checked again */
	return TC_ACT_UNSPEC;
}

int lk_pol_from_pod(struct __sk_buff *skb)
{
	return policy_enforce(skb, POL_EGRESS);
}

int lk_pol_to_pod(struct __sk_buff *skb)
{
	return policy_enforce(skb, POL_INGRESS);
}
