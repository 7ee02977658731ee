/* SPDX-License-Identifier: Apache-2.0 */
/* eBPF host routing at tc (Cilium's bpf_host.c and the host-routing half of bpf_lxc.c, 1.9+): pod
 * traffic is forwarded past the node's routing and netfilter (lib/host_routing.h says how).
 *
 * Entry programs (tc clsact, direct action):
 *   lk_host_from_container  tc ingress of a pod's node-side veth (lx-<pod>): a packet the pod sent,
 *                           to a pod of this node (lk_host_eps) into that pod, anywhere else to the
 *                           FIB's next hop (another node: out of eth0)
 *   lk_host_from_netkit     the same for a netkit pod, in its device's own list for what the pod
 *                           sends (BPF_NETKIT_PEER, on the primary lx-<pod>): it runs in the pod's
 *                           transmit, so a packet leaves for eth0 or another pod before any queue
 *   lk_host_from_netdev     tc ingress of the node's uplink (eth0): a packet from another node or
 *                           the VPC to a pod of this node, into that pod; anything else goes on
 * Both sit at a later tc priority than labkit's other filters on the same hook (the ebpf policy
 * engine's lk_pol_from_pod, ebpf-tc's lk_from_container), which return TC_ACT_UNSPEC for packets
 * that go on: host routing sees a packet only once policy allowed it and after Service DNAT.
 *
 * Verdicts: TC_ACT_REDIRECT for a packet forwarded here; TC_ACT_UNSPEC for one left to the node's
 * stack (not IPv4 (ARP), not addressed to this interface, to the node itself, no FIB answer, TTL
 * expiring: the stack then answers as a router does), so any later filter still sees it;
 * never TC_ACT_SHOT: the headers are rewritten in place, once every check has passed.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/common.h"
#include "lib/host_routing.h"

/* A packet for a pod of this node goes into it; any other is forwarded through the FIB if
 * `forward` (it came from a pod), else left to the stack (-ENOENT). `in_xmit`: run in a netkit
 * device's transmit rather than at tc ingress. Returns a verdict or -errno. */
static __always_inline int handle_packet(struct __sk_buff *skb, bool forward, bool in_xmit)
{
	struct host_pkt pkt;
	struct host_endpoint *ep = 0;
	int ret;

	ret = host_lookup_local(skb, &pkt, &ep);
	if (ret < 0)
		return ret;
	if (ep)
		return host_deliver_local(&pkt, ep, in_xmit);
	return forward ? host_forward_fib(skb, &pkt) : -ENOENT;
}

int lk_host_from_container(struct __sk_buff *skb)
{
	return host_verdict(handle_packet(skb, true, false));
}

int lk_host_from_netkit(struct __sk_buff *skb)
{
	return host_verdict(handle_packet(skb, true, true));
}

int lk_host_from_netdev(struct __sk_buff *skb)
{
	return host_verdict(handle_packet(skb, false, false));
}
