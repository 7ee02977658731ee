/* SPDX-License-Identifier: Apache-2.0 */
/* eBPF host routing (Cilium's "BPF host routing", 1.9+, kernel >= 5.10): the maps and the forwarding
 * helpers of bpf_host.c. A pod's packet is forwarded at tc, before the node's IP stack sees it, so
 * the node's routing cache, netfilter hooks (PREROUTING/FORWARD/POSTROUTING) and the backlog queue
 * of the receiving veth are skipped:
 *   to a pod of this node       bpf_redirect_peer() into the pod's namespace (the peer of its
 *                               node-side veth), or bpf_redirect() to the egress of that veth when
 *                               something sits there that must see the packet (HOST_EP_F_VIA_EGRESS)
 *   anywhere else               bpf_fib_lookup() in the node's tables (rules included, as if the
 *                               packet were routed from the interface it arrived on), then
 *                               bpf_redirect_neigh() to the FIB's next hop: the kernel resolves the
 *                               neighbour and writes the Ethernet header
 * Both decrement the TTL as a router does.
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
#define HR_STAT_REDIRECT_NEIGH	2	/* forwarded with bpf_fib_lookup + bpf_redirect_neigh */
#define HR_STAT_PASS		3	/* left to the node's stack (not IPv4, for the node, no FIB answer, TTL) */
#define HR_STAT_MAX		4

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

/* The IPv4 header of a frame addressed to this interface. Returns 0, -EOPNOTSUPP for anything
 * the node's stack should have (not IPv4, another host's frame) or -EINVAL (truncated). */
static __always_inline int host_load_ipv4(struct __sk_buff *skb, struct iphdr *ip)
{
	if (skb->protocol != lk_htons(ETH_P_IP) || skb->pkt_type != HR_PACKET_HOST)
		return -EOPNOTSUPP;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, ip, sizeof(*ip)) < 0)
		return -EINVAL;
	if (ip->version != 4 || ip->ihl < 5)
		return -EINVAL;
	return 0;
}

/* A packet's IPv4 header (host_load_ipv4) and, in *ep, the pod of this node it is addressed to
 * (NULL: none). Returns 0 or host_load_ipv4's -errno. */
static __always_inline int host_lookup_local(struct __sk_buff *skb, struct iphdr *ip, struct host_endpoint **ep)
{
	int ret;

	ret = host_load_ipv4(skb, ip);
	if (ret < 0)
		return ret;
	*ep = lk_host_eps.lookup(&ip->daddr);
	return 0;
}

/* Decrement the TTL as a forwarding router does, fixing the header checksum. Returns 0, -ETIMEDOUT
 * when the packet must not be forwarded (the stack then answers with ICMP time exceeded) or
 * -EFAULT. */
static __always_inline int host_dec_ttl(struct __sk_buff *skb, const struct iphdr *ip)
{
	__u8 before[2] = { ip->ttl, ip->protocol };	/* the 16-bit word of the checksum holding the TTL */
	__u8 after[2] = { ip->ttl - 1, ip->protocol };
	__u16 old_word, new_word;

	if (ip->ttl <= 1)
		return -ETIMEDOUT;
	__builtin_memcpy(&old_word, before, sizeof(old_word));
	__builtin_memcpy(&new_word, after, sizeof(new_word));
	if (bpf_l3_csum_replace(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, check), old_word, new_word,
				sizeof(new_word)) < 0)
		return -EFAULT;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, ttl), after, 1, 0) < 0)
		return -EFAULT;
	return 0;
}

/* Deliver to pod `ep` of this node, as its gateway would: Ethernet addresses from the gateway to
 * the pod, TTL down, then straight into the pod's namespace (bpf_redirect_peer: no backlog queue,
 * no second pass through the node's stack) or through the egress of its node-side veth. Returns a
 * tc verdict, or -ETIMEDOUT / -EFAULT. */
static __always_inline int host_deliver_local(struct __sk_buff *skb, const struct iphdr *ip,
					      const struct host_endpoint *ep)
{
	int ret;

	ret = host_dec_ttl(skb, ip);
	if (ret < 0)
		return ret;
	if (bpf_skb_store_bytes(skb, 0, (void *)ep->mac, 2 * ETH_ALEN, 0) < 0)
		return -EFAULT;
	if (ep->flags & HOST_EP_F_VIA_EGRESS) {
		host_count(HR_STAT_REDIRECT_EGRESS);
		return bpf_redirect(ep->ifindex, 0);
	}
	host_count(HR_STAT_REDIRECT_PEER);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/* Forward as the node's routing would, without it: look the destination up in the node's FIB as a
 * packet arriving on this interface (policy rules apply; tot_len 0 lets the kernel check the
 * frame, GSO included, against the egress MTU), TTL down, and hand the packet to the FIB's next
 * hop with bpf_redirect_neigh. Returns a tc verdict; -ENOENT when the FIB gives no forwarding
 * answer (a local address, unreachable, blackhole, fragmentation needed, forwarding off), -ELOOP
 * when the route leads back out of the interface the packet came in on (left to the stack, which
 * may send a redirect), -ETIMEDOUT / -EFAULT. */
static __always_inline int host_forward_fib(struct __sk_buff *skb, const struct iphdr *ip)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	int ret;

	fib.family = HR_AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -ENOENT;
	if (fib.ifindex == skb->ingress_ifindex)
		return -ELOOP;
	ret = host_dec_ttl(skb, ip);
	if (ret < 0)
		return ret;
	nh.nh_family = HR_AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;	/* the lookup left the next hop here: the gateway, or the destination */
	host_count(HR_STAT_REDIRECT_NEIGH);
	return host_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

/* An entry program's verdict from a helper's result: a tc verdict stands; a packet the helpers
 * left alone goes on (TC_ACT_UNSPEC: to later filters, then the node's stack), counted; a packet
 * they had begun to rewrite when a store failed is dropped. */
static __always_inline int host_verdict(int ret)
{
	if (ret >= 0)
		return ret;
	if (ret == -EFAULT)
		return TC_ACT_SHOT;
	host_count(HR_STAT_PASS);
	return TC_ACT_UNSPEC;
}

#endif /* __LK_LIB_HOST_ROUTING_H_ */
