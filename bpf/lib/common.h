/* SPDX-License-Identifier: Apache-2.0 */
/* Types shared by every labkit BPF program and by the Python loader.
 *
 * This file is one half of a contract: labkit/datapath/ebpf_structs.py holds the ctypes mirror of
 * every struct below and tests/test_bpf_structs.py checks that sizes and field offsets match (the
 * test reads the layouts bcc derives from this file). Change both together.
 *
 * Byte order: addresses (__be32) and ports (__be16) are kept in NETWORK byte order, as they appear in
 * packets and in struct bpf_sock_addr (user_ip4, and the low 16 bits of user_port), so the programs
 * compare and copy them without conversion. Identifiers and counters (__u16/__u32 without "be") are
 * in HOST byte order. Padding fields are explicit and always zero: hash keys are compared bytewise.
 *
 * Naming follows Cilium's bpf/lib/common.h (lb4_key, lb4_service, lb4_backend, lb4_reverse_nat,
 * ipv4_revnat_tuple/entry, ipv4_ct_tuple, ct_entry); the layouts are labkit's own.
 */
#ifndef __LK_LIB_COMMON_H_
#define __LK_LIB_COMMON_H_

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* Map sizes (max_entries). The loader refuses a table that does not fit, before writing anything. */
#define LK_SVC_MAP_SIZE		65536	/* lk_svc_v4: service ports */
#define LK_BE_MAP_SIZE		262144	/* lk_be_v4: backend slots over all services */
#define LK_RNAT_MAP_SIZE	65536	/* lk_rnat_v4: one entry per service */
#define LK_RNAT_SK_MAP_SIZE	262144	/* lk_rnat_sk_v4 (LRU): UDP sockets talking to a service */
#define LK_CT_MAP_SIZE		262144	/* lk_ct_v4 (LRU): two entries per translated flow */

/* Negative errno values returned by the helpers (uapi errno.h is not always reachable from bcc). */
#ifndef ENOENT
#define ENOENT		2
#endif
#ifndef ENXIO
#define ENXIO		6
#endif
#ifndef ENOMEM
#define ENOMEM		12
#endif
#ifndef EFAULT
#define EFAULT		14
#endif
#ifndef EINVAL
#define EINVAL		22
#endif
#ifndef EOPNOTSUPP
#define EOPNOTSUPP	95
#endif
#ifndef ECONNREFUSED
#define ECONNREFUSED	111
#endif

/* Host <-> network order for constants. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define lk_htons(x)	((__be16)__builtin_bswap16(x))
#else
#define lk_htons(x)	((__be16)(x))
#endif

/* Return codes of cgroup sock_addr programs. */
#define SYS_REJECT	0
#define SYS_PROCEED	1

/* Map definitions. Every map is pinned under LK_PIN_DIR (a bpffs folder the loader passes with
 * -DLK_PIN_DIR="..."): bcc reuses a map already pinned there and pins a new one otherwise, so a
 * reloaded program shares its maps with the running ones and with later processes. */
#ifdef LK_PIN_DIR
#define LK_MAP(_type, _key, _leaf, _name, _size, _flags) \
	BPF_TABLE_PINNED(_type, _key, _leaf, _name, _size, LK_PIN_DIR "/" #_name, _flags)
#else
#define LK_MAP(_type, _key, _leaf, _name, _size, _flags) \
	BPF_F_TABLE(_type, _key, _leaf, _name, _size, _flags)
#endif

/* ------------------------------------------------------------------ services */

/* lk_svc_v4 key: one Service port (ClusterIP:port/protocol). 8 bytes. */
struct lb4_key {
	__be32 address;		/* ClusterIP, network order */
	__be16 dport;		/* Service port, network order */
	__u8   proto;		/* IPPROTO_TCP (6) or IPPROTO_UDP (17) */
	__u8   pad;		/* always 0 */
};

/* lk_svc_v4 value. 8 bytes. */
struct lb4_service {
	__u32 rev_nat_index;	/* service id, host order, >= 1: key of lk_rnat_v4 and first half of
				 * lk_be_v4 keys; allocated by the loader, stable while the service lives */
	__u16 count;		/* number of backends, host order: slots 0..count-1 exist in lk_be_v4;
				 * 0 = the service has no endpoints and connections are refused */
	__u16 flags;		/* reserved, always 0 */
};

/* lk_be_v4 key: the slot-th backend of one service. 8 bytes. */
struct lb4_backend_key {
	__u32 rev_nat_index;	/* service id (lb4_service.rev_nat_index), host order */
	__u32 slot;		/* 0..count-1, host order */
};

/* lk_be_v4 value: one endpoint. 8 bytes. */
struct lb4_backend {
	__be32 address;		/* pod IP, network order */
	__be16 port;		/* target port, network order */
	__u8   proto;		/* IPPROTO_TCP or IPPROTO_UDP (same as the service) */
	__u8   flags;		/* reserved, always 0 */
};

/* lk_rnat_v4 value, keyed by __u32 rev_nat_index (host order): what a reply's source is
 * rewritten back to. 8 bytes. */
struct lb4_reverse_nat {
	__be32 address;		/* ClusterIP, network order */
	__be16 port;		/* Service port, network order */
	__u16  pad;		/* always 0 */
};

/* ------------------------------------------------------- socket reverse NAT (UDP) */

/* lk_rnat_sk_v4 key: a socket and the backend it was sent to (Cilium's lb4_reverse_nat_sk).
 * Written by connect4/sendmsg4, read by recvmsg4. 16 bytes. */
struct ipv4_revnat_tuple {
	__u64  cookie;		/* socket cookie (bpf_get_socket_cookie), host order */
	__be32 address;		/* backend address, network order */
	__be16 port;		/* backend port, network order */
	__u16  pad;		/* always 0 */
};

/* lk_rnat_sk_v4 value: the service address the application asked for. 12 bytes. */
struct ipv4_revnat_entry {
	__be32 address;		/* ClusterIP, network order */
	__be16 port;		/* Service port, network order */
	__u16  pad;		/* always 0 */
	__u32  rev_nat_index;	/* service id, host order (for inspection) */
};

/* ---------------------------------------------------------- conntrack-lite (tc) */

#define CT_EGRESS	0	/* ipv4_ct_tuple.flags: client -> ClusterIP, as sent by the pod */
#define CT_REPLY	1	/* ipv4_ct_tuple.flags: backend -> client, as the reply arrives */

#define CT_F_HAIRPIN	1	/* ct_entry.flags: the pod reached itself through a service */
#define CT_F_CLOSING	2	/* ct_entry.flags: a FIN or RST went by; the entry lives close_ms more */

/* Conntrack-lite lifetimes in ms (Cilium's defaults: CT_CONNECTION_LIFETIME_TCP, CT_SYN_TIMEOUT,
 * CT_CLOSE_TIMEOUT, CT_CONNECTION_LIFETIME_NONTCP), used where lk_ct_cfg holds 0. */
#define LK_CT_TCP_MS		21600000	/* an established TCP flow, idle */
#define LK_CT_SYN_MS		60000		/* a TCP flow that has sent nothing but its SYN */
#define LK_CT_CLOSE_MS		10000		/* after a FIN or RST */
#define LK_CT_NONTCP_MS		60000		/* a UDP flow, idle */

/* lk_ct_v4 key: a packet's addresses and ports as they are on the wire where it is looked up.
 * 16 bytes. */
struct ipv4_ct_tuple {
	__be32 daddr;		/* destination address, network order */
	__be32 saddr;		/* source address, network order */
	__be16 dport;		/* destination port, network order */
	__be16 sport;		/* source port, network order */
	__u8   nexthdr;		/* IPPROTO_TCP or IPPROTO_UDP */
	__u8   flags;		/* CT_EGRESS or CT_REPLY */
	__u16  pad;		/* always 0 */
};

/* lk_ct_v4 value. 20 bytes. */
struct ct_entry {
	__be32 backend_address;	/* CT_EGRESS: the backend this flow was sent to, network order; CT_REPLY: 0 */
	__be16 backend_port;	/* CT_EGRESS: backend port, network order; CT_REPLY: 0 */
	__u16  flags;		/* CT_F_HAIRPIN: the client is its own backend; its packets carry the
				 * ClusterIP as source, so that replies route back like service traffic */
	__u32  rev_nat_index;	/* service id, host order: CT_REPLY restores lk_rnat_v4[rev_nat_index] */
	__u32  slot;		/* CT_EGRESS: backend slot, host order, re-checked on every packet */
	__u32  lifetime;	/* when the entry expires, host order: ms of bpf_ktime_get_ns(), as a
				 * wrapping u32 (compared as a signed difference); each packet of the
				 * flow in the entry's direction pushes it out */
};

/* lk_ct_cfg value (an array of one, key 0), written by the loader: lifetimes in ms, 0 = the
 * LK_CT_*_MS default. 16 bytes. */
struct ct_config {
	__u32 tcp_ms;
	__u32 syn_ms;
	__u32 close_ms;
	__u32 nontcp_ms;
};

#endif /* __LK_LIB_COMMON_H_ */
