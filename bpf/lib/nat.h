/* SPDX-License-Identifier: Apache-2.0 */
/* Rewriting an IPv4 address and L4 port in place with incremental checksum updates. */
#ifndef __LK_LIB_NAT_H_
#define __LK_LIB_NAT_H_

#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include "common.h"

#define IPV4_SADDR_OFF	12	/* offsetof(struct iphdr, saddr) */
#define IPV4_DADDR_OFF	16	/* offsetof(struct iphdr, daddr) */
#define IPV4_CSUM_OFF	10	/* offsetof(struct iphdr, check) */
#define L4_SPORT_OFF	0	/* source port: same offset in tcphdr and udphdr */
#define L4_DPORT_OFF	2	/* destination port: same offset in tcphdr and udphdr */
#define TCP_CSUM_OFF	16	/* offsetof(struct tcphdr, check) */
#define UDP_CSUM_OFF	6	/* offsetof(struct udphdr, check) */

/* Replace the address at l3_off+addr_off and the port at l4_off+port_off (network order values),
 * fixing the IP header checksum and the TCP/UDP checksum (pseudo-header included). A UDP checksum
 * of 0 (none) stays 0 (BPF_F_MARK_MANGLED_0). Returns 0 or -EFAULT. */
static __always_inline int
l4_rewrite(struct __sk_buff *skb, int l3_off, int l4_off, __u8 proto, int addr_off, int port_off,
	   __be32 old_addr, __be32 new_addr, __be16 old_port, __be16 new_port)
{
	int csum_off = l4_off + (proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
				BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr)) < 0)
		return -EFAULT;
	if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port)) < 0)
		return -EFAULT;
	if (bpf_l3_csum_replace(skb, l3_off + IPV4_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return -EFAULT;
	if (bpf_skb_store_bytes(skb, l3_off + addr_off, &new_addr, sizeof(new_addr), 0) < 0)
		return -EFAULT;
	if (bpf_skb_store_bytes(skb, l4_off + port_off, &new_port, sizeof(new_port), 0) < 0)
		return -EFAULT;
	return 0;
}

#endif /* __LK_LIB_NAT_H_ */
