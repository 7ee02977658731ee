/* SPDX-License-Identifier: Apache-2.0 */
/* Per-packet service translation at tc, on the interface between a pod and its node (Cilium's
 * bpf_lxc.c idea): a pod's packet to ClusterIP:port is DNATed to a backend, the backend's replies are
 * SNATed back to ClusterIP:port, and conntrack-lite (lib/conntrack.h) keeps a flow on one backend.
 *
 * Entry programs (tc clsact, direct action):
 *   lk_from_container      tc ingress of the node-side interface facing the pod (the pod's egress)
 *   lk_from_container_eni  tc egress of the pod's own eth0, for pods with no node-side interface
 *                          (Cilium's attach point on IPVLAN slaves)
 *   lk_to_container        tc egress of the node-side interface, or tc ingress of the pod's eth0
 *                          (the pod's ingress): reverse translation of replies
 * Verdicts: TC_ACT_UNSPEC for every packet that goes on, translated or not, so that filters at
 * later priorities on the same hook see it as translated (eBPF host routing, bpf_host.c, forwards
 * after DNAT); with no later filter the kernel treats it as TC_ACT_OK. TC_ACT_SHOT when a rewrite
 * fails; TC_ACT_REDIRECT for an ICMP error, or a hairpin turned round, at the pod's own interface.
 * Only IPv4 TCP/UDP is translated; everything else passes untouched. A packet to a service without
 * endpoints is answered with ICMP port unreachable (the connection is refused). A pod that reaches
 * itself through a service (hairpin) sees the connection come from the ClusterIP: its replies then
 * go where service traffic goes, back through these programs (Cilium SNATs hairpin flows to a
 * loopback address for the same reason).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/common.h"
#include "lib/lb.h"
#include "lib/conntrack.h"
#include "lib/nat.h"
#include "lib/icmp.h"

#define TCP_FLAGS_OFF	13	/* byte of struct tcphdr holding FIN..CWR */

/* What the programs need from a packet's headers. */
struct pkt4 {
	struct iphdr ip;	/* IPv4 header (options not copied) */
	__be16 sport;		/* L4 source port */
	__be16 dport;		/* L4 destination port */
	int l4_off;		/* offset of the L4 header from the start of the frame */
	__u8 tcp_flags;		/* TCP flags byte, 0 for UDP */
};

/* Parse an Ethernet frame carrying IPv4 TCP/UDP. Returns 0, or -EOPNOTSUPP for anything else
 * (other protocols, non-first fragments: left alone) and -EINVAL for a truncated packet. */
static __always_inline int parse_ipv4_l4(struct __sk_buff *skb, struct pkt4 *pkt)
{
	__be16 ports[2];

	if (skb->protocol != lk_htons(ETH_P_IP))
		return -EOPNOTSUPP;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &pkt->ip, sizeof(pkt->ip)) < 0)
		return -EINVAL;
	if (pkt->ip.protocol != IPPROTO_TCP && pkt->ip.protocol != IPPROTO_UDP)
		return -EOPNOTSUPP;
	if (pkt->ip.ihl < 5 || pkt->ip.frag_off & lk_htons(0x1fff))
		return -EOPNOTSUPP;
	pkt->l4_off = ETH_HLEN + pkt->ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, pkt->l4_off, ports, sizeof(ports)) < 0)
		return -EINVAL;
	pkt->sport = ports[0];
	pkt->dport = ports[1];
	pkt->tcp_flags = 0;
	if (pkt->ip.protocol == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, pkt->l4_off + TCP_FLAGS_OFF, &pkt->tcp_flags, 1) < 0)
		return -EINVAL;
	return 0;
}

static __always_inline int dnat4(struct __sk_buff *skb, struct pkt4 *pkt, __be32 addr, __be16 port)
{
	return l4_rewrite(skb, ETH_HLEN, pkt->l4_off, pkt->ip.protocol, IPV4_DADDR_OFF, L4_DPORT_OFF,
			  pkt->ip.daddr, addr, pkt->dport, port);
}

static __always_inline int snat4(struct __sk_buff *skb, struct pkt4 *pkt, __be32 old_addr,
				 __be32 addr, __be16 port)
{
	return l4_rewrite(skb, ETH_HLEN, pkt->l4_off, pkt->ip.protocol, IPV4_SADDR_OFF, L4_SPORT_OFF,
			  old_addr, addr, pkt->sport, port);
}

/* Send a packet that is now addressed to the pod it came from back to that pod. At the node-side
 * interface (`self_redirect` 0) routing does it (or eBPF host routing, a later filter). At the
 * pod's own interface (BPF_F_INGRESS) it is turned round into the pod's ingress, its MAC addresses
 * swapped. */
static __always_inline int to_self(struct __sk_buff *skb, __u32 self_redirect)
{
	__u8 mac[2 * ETH_ALEN];
	__u8 swapped[2 * ETH_ALEN];

	if (!self_redirect)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, 0, mac, sizeof(mac)) < 0)
		return TC_ACT_SHOT;
	__builtin_memcpy(swapped, mac + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, self_redirect);
}

/* The backend a live flow was sent to, if it still holds the same slot of its service (a TCP
 * SYN always starts over: its tuple may be a reused one). */
static __always_inline struct ct_entry *ct4_current_flow(struct ipv4_ct_tuple *tuple, struct pkt4 *pkt,
							 __u32 now)
{
	struct ct_entry *ct;
	struct lb4_backend *be;

	if ((pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return 0;
	ct = ct4_lookup(tuple, now);
	if (!ct)
		return 0;
	be = lb4_lookup_backend(ct->rev_nat_index, ct->slot);
	if (!be || be->address != ct->backend_address || be->port != ct->backend_port)
		return 0;
	return ct;
}

/* Translate a pod's packet to backend be_addr:be_port; a hairpin packet also gets the ClusterIP
 * (its original destination) as source and goes straight back to the pod. */
static __always_inline int xlate_fwd(struct __sk_buff *skb, struct pkt4 *pkt, __be32 be_addr,
				     __be16 be_port, __u16 flags, __u32 self_redirect)
{
	if (dnat4(skb, pkt, be_addr, be_port) < 0)
		return TC_ACT_SHOT;
	if (!(flags & CT_F_HAIRPIN))
		return TC_ACT_UNSPEC;
	if (snat4(skb, pkt, pkt->ip.saddr, pkt->ip.daddr, pkt->sport) < 0)
		return TC_ACT_SHOT;
	return to_self(skb, self_redirect);
}

/* A pod answering itself through a service: {pod:bport -> ClusterIP:cport} becomes
 * {ClusterIP:port -> pod:cport} and goes back to the pod. Anything else passes. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, struct pkt4 *pkt, __u32 self_redirect)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *ct;
	struct lb4_reverse_nat *rnat;
	__u32 now = ct_now();

	tuple.daddr = pkt->ip.daddr;
	tuple.saddr = pkt->ip.saddr;
	tuple.dport = pkt->dport;
	tuple.sport = pkt->sport;
	tuple.nexthdr = pkt->ip.protocol;
	tuple.flags = CT_REPLY;
	ct = ct4_lookup(&tuple, now);
	if (!ct || !(ct->flags & CT_F_HAIRPIN))
		return TC_ACT_UNSPEC;
	ct4_refresh(ct, now, pkt->ip.protocol, pkt->tcp_flags);
	rnat = lb4_lookup_rev_nat(ct->rev_nat_index);
	if (!rnat)
		return TC_ACT_UNSPEC;
	if (dnat4(skb, pkt, pkt->ip.saddr, pkt->dport) < 0 ||
	    snat4(skb, pkt, pkt->ip.saddr, rnat->address, rnat->port) < 0)
		return TC_ACT_SHOT;
	return to_self(skb, self_redirect);
}

/* A packet leaving a pod: translate it if it goes to a service. `self_redirect` says how a packet
 * is sent back into the pod from here (0 at the node-side interface, BPF_F_INGRESS at the pod's). */
static __always_inline int handle_from_container(struct __sk_buff *skb, __u32 self_redirect)
{
	struct pkt4 pkt = {};
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *ct;
	struct lb4_service *svc;
	struct lb4_backend be = {};
	__u32 slot = 0, rev_nat_index, now = ct_now();
	__u16 flags;
	int ret;

	if (parse_ipv4_l4(skb, &pkt) < 0)
		return TC_ACT_UNSPEC;
	tuple.daddr = pkt.ip.daddr;
	tuple.saddr = pkt.ip.saddr;
	tuple.dport = pkt.dport;
	tuple.sport = pkt.sport;
	tuple.nexthdr = pkt.ip.protocol;
	tuple.flags = CT_EGRESS;

	ct = ct4_current_flow(&tuple, &pkt, now);
	if (ct) {
		ct4_refresh(ct, now, pkt.ip.protocol, pkt.tcp_flags);
		return xlate_fwd(skb, &pkt, ct->backend_address, ct->backend_port, ct->flags, self_redirect);
	}

	svc = lb4_lookup_service(pkt.ip.daddr, pkt.dport, pkt.ip.protocol);
	if (!svc) {
		if ((pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
			ct4_forget_reply(pkt.ip.saddr, pkt.sport, pkt.ip.daddr, pkt.dport, pkt.ip.protocol);
		return hairpin_reply(skb, &pkt, self_redirect);
	}
	rev_nat_index = svc->rev_nat_index;
	if (lb4_select_backend(svc, &slot, &be) < 0) {
		if (pkt.ip.ihl != 5)
			return TC_ACT_SHOT;
		ret = icmp4_port_unreach(skb, self_redirect);
		return ret < 0 ? TC_ACT_SHOT : ret;
	}
	flags = be.address == pkt.ip.saddr ? CT_F_HAIRPIN : 0;
	if (ct4_create(&tuple, be.address, be.port, rev_nat_index, slot, flags,
		       now + ct_lifetime(pkt.ip.protocol, pkt.tcp_flags, 0)) < 0)
		return TC_ACT_SHOT;
	return xlate_fwd(skb, &pkt, be.address, be.port, flags, self_redirect);
}

/* A packet entering a pod: a reply of a translated flow gets the service as its source again. */
static __always_inline int handle_to_container(struct __sk_buff *skb)
{
	struct pkt4 pkt = {};
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *ct;
	struct lb4_reverse_nat *rnat;
	__u32 now = ct_now();

	if (parse_ipv4_l4(skb, &pkt) < 0)
		return TC_ACT_UNSPEC;
	tuple.daddr = pkt.ip.daddr;
	tuple.saddr = pkt.ip.saddr;
	tuple.dport = pkt.dport;
	tuple.sport = pkt.sport;
	tuple.nexthdr = pkt.ip.protocol;
	tuple.flags = CT_REPLY;
	ct = ct4_lookup(&tuple, now);
	if (!ct)
		return TC_ACT_UNSPEC;
	ct4_refresh(ct, now, pkt.ip.protocol, pkt.tcp_flags);
	rnat = lb4_lookup_rev_nat(ct->rev_nat_index);
	if (!rnat)
		return TC_ACT_UNSPEC;
	if (l4_rewrite(skb, ETH_HLEN, pkt.l4_off, pkt.ip.protocol, IPV4_SADDR_OFF, L4_SPORT_OFF,
		       pkt.ip.saddr, rnat->address, pkt.sport, rnat->port) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

int lk_from_container(struct __sk_buff *skb)
{
	return handle_from_container(skb, 0);
}

int lk_from_container_eni(struct __sk_buff *skb)
{
	return handle_from_container(skb, BPF_F_INGRESS);
}

int lk_to_container(struct __sk_buff *skb)
{
	return handle_to_container(skb);
}
