/* SPDX-License-Identifier: Apache-2.0 */
/* Answering a packet with ICMP "port unreachable" from tc, so that a connection to a service
 * without endpoints is refused at once (connect() and a connected UDP recv() fail with
 * ECONNREFUSED) rather than timing out; Cilium's tail_no_service_ipv4 does the same. */
#ifndef __LK_LIB_ICMP_H_
#define __LK_LIB_ICMP_H_

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include "common.h"

#define ICMP4_QUOTE_LEN	28	/* original IPv4 header (20, no options) + first 8 bytes of L4 */
#define ICMP4_PKT_LEN	(ETH_HLEN + 20 + 8 + ICMP4_QUOTE_LEN)

static __always_inline __u16 csum_fold32(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/* Turn the packet (Ethernet + IPv4 without options at l3_off == ETH_HLEN) into an ICMP port
 * unreachable from its destination to its source, and send it back where it came from:
 * `redirect_flags` 0 sends it out of the same interface (tc ingress of the node-side interface),
 * BPF_F_INGRESS delivers it up the same interface (tc egress of the pod's own interface).
 * Returns a tc verdict (TC_ACT_REDIRECT) or -errno. */
static __always_inline int icmp4_port_unreach(struct __sk_buff *skb, __u32 redirect_flags)
{
	struct ethhdr eth;
	struct iphdr ip = {};
	struct icmphdr icmp = {};
	__u32 quote[ICMP4_QUOTE_LEN / 4];
	__u8 mac[ETH_ALEN];
	__u32 csum;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return -EINVAL;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, sizeof(quote)) < 0)
		return -EINVAL;
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);

	ip.version = 4;
	ip.ihl = 5;
	ip.tot_len = lk_htons(ICMP4_PKT_LEN - ETH_HLEN);
	ip.ttl = 64;
	ip.protocol = IPPROTO_ICMP;
	ip.saddr = quote[4];	/* the quoted header's daddr (bytes 16..19): the ClusterIP */
	ip.daddr = quote[3];	/* the quoted header's saddr (bytes 12..15): the client */
	ip.check = csum_fold32(bpf_csum_diff(0, 0, &ip, sizeof(ip), 0));

	icmp.type = ICMP_DEST_UNREACH;
	icmp.code = ICMP_PORT_UNREACH;
	csum = bpf_csum_diff(0, 0, &icmp, sizeof(icmp), 0);
	csum = bpf_csum_diff(0, 0, quote, sizeof(quote), csum);
	icmp.checksum = csum_fold32(csum);

	if (bpf_skb_change_tail(skb, ICMP4_PKT_LEN, 0) < 0)
		return -EFAULT;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &icmp, sizeof(icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip) + sizeof(icmp), quote, sizeof(quote), 0) < 0)
		return -EFAULT;
	return bpf_redirect(skb->ifindex, redirect_flags);
}

#endif /* __LK_LIB_ICMP_H_ */
