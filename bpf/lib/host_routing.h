/* SPDX-License-Identifier: Apache-2.0 */
/* eBPF host routing (Cilium's "BPF host routing", 1.9+, kernel >= 5.10): the maps and the forwarding
 * helpers of bpf_host.c. A pod's packet is forwarded at tc, before the node's IP stack sees it, so
 * the node's routing cache, netfilter hooks (PREROUTING/FORWARD/POSTROUTING) and the backlog queue
 * of the receiving veth are skipped:
 *   to a pod of this node       bpf_redirect_peer() into the pod's namespace (the peer of its
 *                               node-side veth), or bpf_redirect() to the egress of that veth when
 *                               something sits there that must see the packet (HOST_EP_F_VIA_EGRESS)
 *   anywhere else               bpf_fib_lookup() in the node's tables (rules included, as if the
 *                               packet were routed from the interface it arrived on), then to the
 *                               FIB's next hop: bpf_redirect() with the MAC addresses the FIB gave
 *                               (Cilium's fib_do_redirect), or, when the neighbour is not resolved
 *                               yet, bpf_redirect_neigh(): the kernel resolves it and writes the
 *                               Ethernet header
 * Both decrement the TTL as a router does. Headers are read and written in place (direct packet
 * access), not through helper calls.
 *
 * This file is one half of a contract: labkit/hostrouting.py holds the ctypes mirror of
 * struct host_endpoint and the constants below; tests/test_host_routing.py checks sizes, offsets and
 * values as gcc sees this header, and bcc's typed views of the maps of bpf_host.c compiled.
 * Byte order as in common.h: addresses in NETWORK order, everything else in HOST order; padding
 * explicit and zero.
 *
 * Maps (pinned, see LK_MAP in common.h):
 *   lk_host_eps    hash          pod address -> its node-side interface and MAC addresses (the
 *                                loader writes it, the programs only read it)
 *   lk_host_stats  percpu_array  how packets went on (HR_STAT_*), for tests and notebooks
 */
#ifndef __LK_LIB_HOST_ROUTING_H_
#define __LK_LIB_HOST_ROUTING_H_

#include "common.h"

#ifndef ELOOP
#define ELOOP		40
#endif
#ifndef ETIMEDOUT
#define ETIMEDOUT	110
#endif

#define LK_HOST_EPS_MAP_SIZE	16384	/* lk_host_eps: pods of one node */

#define HOST_EP_F_VIA_EGRESS	1	/* host_endpoint.flags: deliver through the egress of the node-side
					 * interface (bpf_redirect), not into the pod (bpf_redirect_peer):
					 * a tc filter or qdisc there must see the packet (the ebpf policy
					 * engine's lk_pol_to_pod, ebpf-tc's reverse NAT lk_to_container) */

#define HR_STAT_REDIRECT_PEER	0	/* delivered to a pod of this node with bpf_redirect_peer */
#define HR_STAT_REDIRECT_EGRESS	1	/* delivered to a pod of this node through its veth's egress */
#define HR_STAT_REDIRECT_NEIGH	2	/* forwarded to the FIB's next hop (bpf_fib_lookup, then bpf_redirect
					 * with the FIB's MAC addresses, or bpf_redirect_neigh) */
#define HR_STAT_PASS		3	/* left to the node's stack (not IPv4, for the node, no FIB answer, TTL) */
#define HR_STAT_NEIGH_UNRESOLVED 4	/* of HR_STAT_REDIRECT_NEIGH: the FIB had no resolved neighbour, so
					 * bpf_redirect_neigh resolved it (and wrote the Ethernet header) */
#define HR_STAT_MAX		5

#define HR_AF_INET		2	/* AF_INET, for bpf_fib_lookup and bpf_redir_neigh */
#define HR_PACKET_HOST		0	/* PACKET_HOST: the frame was addressed to this interface */

/* bcc (0.26) declares bpf_redirect_neigh with three arguments; the kernel's helper takes four
 * (ifindex, params, plen, flags), as uapi/linux/bpf.h documents it. */
#define host_redirect_neigh(ifindex, params, plen, flags) \
	((long (*)(__u32, struct bpf_redir_neigh *, int, __u64))BPF_FUNC_redirect_neigh)(ifindex, params, plen, flags)

/* lk_host_eps value: one pod of this node, keyed by its address (__be32). mac and node_mac follow
 * each other as h_dest and h_source do in struct ethhdr, so one store writes both. 20 bytes. */
struct host_endpoint {
	__u32 ifindex;		/* host order: ifindex of the pod's node-side veth (lx-<pod>) in the node */
	__u16 flags;		/* host order: HOST_EP_F_* bits */
	__u8  mac[6];		/* the pod's own interface (the veth's peer): destination of delivered frames */
	__u8  node_mac[6];	/* the node-side veth, the pod's gateway: source of delivered frames */
	__u16 pad;		/* always 0 */
};

LK_MAP("hash", __be32, struct host_endpoint, lk_host_eps, LK_HOST_EPS_MAP_SIZE, 0);
LK_MAP("percpu_array", __u32, __u64, lk_host_stats, HR_STAT_MAX, 0);

static __always_inline void host_count(__u32 stat)
{
	__u64 *n = lk_host_stats.lookup(&stat);

	if (n)
		*n += 1;
}

/* Where a packet's headers are, in the skb's linear data: the programs read and write them in place
 * (direct packet access) rather than through bpf_skb_load_bytes / bpf_skb_store_bytes /
 * bpf_l3_csum_replace, which cost a helper call (and a writability check) each; on every packet of
 * a round trip that was about half of the programs' run time. */
struct host_pkt {
	struct ethhdr *eth;	/* the frame's Ethernet header */
	struct iphdr *ip;	/* its IPv4 header (options not looked at) */
};

/* A frame addressed to this interface carrying IPv4, its headers made linear if they were not.
 * Returns 0, -EOPNOTSUPP for anything the node's stack should have (not IPv4, another host's
 * frame) or -EINVAL (truncated). */
static __always_inline int host_load_ipv4(struct __sk_buff *skb, struct host_pkt *pkt)
{
	void *data, *data_end;

	if (skb->protocol != lk_htons(ETH_P_IP) || skb->pkt_type != HR_PACKET_HOST)
		return -EOPNOTSUPP;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN + sizeof(struct iphdr) > data_end) {
		if (bpf_skb_pull_data(skb, ETH_HLEN + sizeof(struct iphdr)) < 0)
			return -EINVAL;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + ETH_HLEN + sizeof(struct iphdr) > data_end)
			return -EINVAL;
	}
	pkt->eth = data;
	pkt->ip = data + ETH_HLEN;
	if (pkt->ip->version != 4 || pkt->ip->ihl < 5)
		return -EINVAL;
	return 0;
}

/* A packet's headers (host_load_ipv4) and, in *ep, the pod of this node it is addressed to
 * (NULL: none). Returns 0 or host_load_ipv4's -errno. */
static __always_inline int host_lookup_local(struct __sk_buff *skb, struct host_pkt *pkt,
					     struct host_endpoint **ep)
{
	__be32 daddr;
	int ret;

	ret = host_load_ipv4(skb, pkt);
	if (ret < 0)
		return ret;
	daddr = pkt->ip->daddr;
	*ep = lk_host_eps.lookup(&daddr);
	return 0;
}

/* Decrement the TTL as a forwarding router does, the header checksum updated incrementally as
 * the kernel's ip_decrease_ttl() does. Returns 0, or -ETIMEDOUT when the packet must not be
 * forwarded (the stack then answers with ICMP time exceeded). */
static __always_inline int host_dec_ttl(struct iphdr *ip)
{
	__u32 check;

	if (ip->ttl <= 1)
		return -ETIMEDOUT;
	check = ip->check;
	check += lk_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
	return 0;
}

/* Deliver to pod `ep` of this node, as its gateway would: Ethernet addresses from the gateway to
 * the pod, TTL down, then straight into the pod's namespace (bpf_redirect_peer: no backlog queue,
 * no second pass through the node's stack) or through the egress of its node-side device. From a
 * netkit device's own list (`in_xmit`: the program runs in the sending pod's transmit, not at tc
 * ingress, where bpf_redirect_peer is refused) always the latter: the packet enters the other pod
 * through its device's transmit (a netkit primary's: its list for the pod's ingress runs there).
 * Returns a tc verdict, or -ETIMEDOUT. */
static __always_inline int host_deliver_local(struct host_pkt *pkt, const struct host_endpoint *ep,
					      bool in_xmit)
{
	int ret;

	ret = host_dec_ttl(pkt->ip);
	if (ret < 0)
		return ret;
	__builtin_memcpy(pkt->eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, ep->node_mac, ETH_ALEN);
	if (in_xmit || (ep->flags & HOST_EP_F_VIA_EGRESS)) {
		host_count(HR_STAT_REDIRECT_EGRESS);
		return bpf_redirect(ep->ifindex, 0);
	}
	host_count(HR_STAT_REDIRECT_PEER);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/* Forward as the node's routing would, without it: look the destination up in the node's FIB as a
 * packet arriving on this interface (skb->ifindex: at tc ingress the interface it came in on, in a
 * netkit device's list the primary, which it is about to enter by; policy rules apply; tot_len 0
 * lets the kernel check the frame, GSO included, against the egress MTU), TTL down, and send the
 * packet to the FIB's next hop. When the FIB knows the next hop's MAC (BPF_FIB_LKUP_RET_SUCCESS) the program writes the
 * Ethernet addresses itself and redirects to the egress device (bpf_redirect), as Cilium's
 * fib_do_redirect does: the kernel's neighbour output path (neigh_output, the cached header copy
 * under its seqlock) is skipped. Only an unresolved neighbour (BPF_FIB_LKUP_RET_NO_NEIGH) goes by
 * bpf_redirect_neigh, which resolves it and writes the header. Returns a tc verdict; -ENOENT when
 * the FIB gives no forwarding answer (a local address, unreachable, blackhole, fragmentation
 * needed, forwarding off), -ELOOP when the route leads back out of the interface the packet came
 * in on (left to the stack, which may send a redirect), -ETIMEDOUT. */
static __always_inline int host_forward_fib(struct __sk_buff *skb, struct host_pkt *pkt)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	int ret;

	fib.family = HR_AF_INET;
	fib.tos = pkt->ip->tos;
	fib.l4_protocol = pkt->ip->protocol;
	fib.ipv4_src = pkt->ip->saddr;
	fib.ipv4_dst = pkt->ip->daddr;
	fib.ifindex = skb->ifindex;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -ENOENT;
	if (fib.ifindex == skb->ifindex)
		return -ELOOP;
	if (host_dec_ttl(pkt->ip) < 0)
		return -ETIMEDOUT;
	if (ret == BPF_FIB_LKUP_RET_SUCCESS) {
		__builtin_memcpy(pkt->eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(pkt->eth->h_source, fib.smac, ETH_ALEN);
		host_count(HR_STAT_REDIRECT_NEIGH);
		return bpf_redirect(fib.ifindex, 0);
	}
	nh.nh_family = HR_AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;	/* the lookup left the next hop here: the gateway, or the destination */
	host_count(HR_STAT_REDIRECT_NEIGH);
	host_count(HR_STAT_NEIGH_UNRESOLVED);
	return host_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

/* An entry program's verdict from a helper's result: a tc verdict stands; a packet the helpers
 * left alone goes on (TC_ACT_UNSPEC: to later filters, then the node's stack), counted. */
static __always_inline int host_verdict(int ret)
{
	if (ret >= 0)
		return ret;
	host_count(HR_STAT_PASS);
	return TC_ACT_UNSPEC;
}

#endif /* __LK_LIB_HOST_ROUTING_H_ */
