//! Global packet counters: every fate of a packet the programs see has one, so a drop or a
//! fallback to the kernel stack is never silent. The datapath adds to `NP_COUNTERS[counter]`
//! (a per-CPU array); the agent sums the CPUs and exports each under its name.

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident = $idx:literal, $kind:ident, $label:literal;)*) => {
        /// Index into the `NP_COUNTERS` per-CPU array.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum Counter {
            $($(#[doc = $doc])* $name = $idx,)*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// Stable snake_case name used in metrics and dumps.
            pub const fn label(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }

            /// What the counter counts.
            pub const fn kind(self) -> CounterKind {
                match self { $(Counter::$name => CounterKind::$kind,)* }
            }
        }
    };
}

/// The family a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// Translated and sent on without the kernel stack.
    Forwarded,
    /// Not nodeport traffic: passed to the kernel untouched.
    Passed,
    /// Nodeport traffic that had to go through the kernel stack after translation.
    Fallback,
    /// Dropped by the datapath.
    Dropped,
    /// Not a packet's fate but something that happened to a connection on the way (counted
    /// besides the packet's fate).
    Event,
}

counters! {
    /// Translated in XDP and sent back out of the interface it came in on (XDP_TX).
    ForwardedXdpTx = 0, Forwarded, "xdp_tx";
    /// Translated in XDP and handed to the TC ingress hook, which redirected it to the egress
    /// device (a local pod's veth, another interface).
    ForwardedTcRedirect = 1, Forwarded, "tc_redirect";
    /// As above, but the neighbour was unknown: redirected with bpf_redirect_neigh.
    ForwardedTcRedirectNeigh = 2, Forwarded, "tc_redirect_neigh";
    /// Reply from a local backend, translated on the pod-facing TC hook and redirected out.
    ForwardedPodReply = 3, Forwarded, "pod_reply_redirect";
    /// As above, with bpf_redirect_neigh.
    ForwardedPodReplyNeigh = 4, Forwarded, "pod_reply_redirect_neigh";
    /// Translated in XDP and passed with metadata to the TC hook of the same device, because
    /// it leaves through another device (counted again there as tc_redirect*).
    ForwardedToTc = 5, Forwarded, "xdp_to_tc";
    /// Translated in TC (`--external-hook tc`) and redirected to the egress device (the
    /// ingress device included).
    ForwardedTcNat = 6, Forwarded, "tc_nat_redirect";
    /// As above, the neighbour unknown: redirected with bpf_redirect_neigh.
    ForwardedTcNatNeigh = 7, Forwarded, "tc_nat_redirect_neigh";

    /// Not IPv4 and not IPv6 or ARP (other ethertypes).
    PassedOtherEthertype = 10, Passed, "other_ethertype";
    /// ARP.
    PassedArp = 11, Passed, "arp";
    /// IPv6 (passed until IPv6 is supported).
    PassedIpv6 = 12, Passed, "ipv6";
    /// 802.1Q / 802.1ad tagged frames: attach to the VLAN device instead (docs/datapath.md).
    PassedVlan = 13, Passed, "vlan";
    /// IPv4 but neither TCP nor UDP (ICMP, ...).
    PassedOtherProtocol = 14, Passed, "other_protocol";
    /// TCP/UDP that matches no frontend and no connection.
    PassedNoFrontend = 15, Passed, "no_frontend";
    /// A later IPv4 fragment (no ports of its own) of a datagram whose first fragment was
    /// not nodeport's: it follows its first fragment to the kernel, untouched.
    PassedLaterFragment = 16, Passed, "later_fragment";
    /// A TCP segment to a frontend that belongs to no nodeport connection and is not a SYN
    /// (an ACK, data, a FIN, an RST, a SYN-ACK): only a SYN starts a connection, so one
    /// kube-proxy carries (opened while the datapath was off) stays with the kernel.
    PassedNotSyn = 17, Passed, "not_syn";
    /// The first packet of a new connection while the datapath drains (`--datapath-switch`
    /// off): left to the kernel, where kube-proxy's rules take it.
    PassedDraining = 18, Passed, "draining";

    /// The FIB lookup could not decide (no route, not forwarding, ...): the packet goes to the
    /// kernel stack, which will route it or answer with ICMP. Translated, except the first
    /// packet to a remote backend, which cannot be SNATed without a route and goes untranslated.
    FallbackFibLookup = 20, Fallback, "fib_lookup";
    /// The driver cannot carry XDP metadata to the TC hook: the translated packet is routed by
    /// the kernel stack.
    FallbackNoMetadata = 21, Fallback, "no_xdp_metadata";
    /// The TC hook found a nodeport packet it could not redirect (device gone, ...).
    FallbackRedirect = 22, Fallback, "redirect_failed";
    /// TTL would reach zero on a packet the TC hooks translate (a pod's reply), or on an ICMP
    /// error: the kernel stack answers (or drops it), about the packet as the sender sent it.
    FallbackTtlExceeded = 23, Fallback, "ttl_exceeded";
    /// A local pod's reply larger than the egress MTU with DF set: handed to the kernel
    /// untranslated, which tells the pod (fragmentation needed, about its own packet).
    FallbackFragNeeded = 24, Fallback, "frag_needed_to_kernel";
    /// In TC (`--external-hook tc`), a packet nodeport would answer itself in XDP (TTL 1, too
    /// big with DF, no endpoint, endpoint gone): left untranslated to the kernel, whose
    /// forwarding and kube-proxy's rules answer it as they would without nodeport.
    FallbackKernelAnswers = 25, Fallback, "kernel_answers";

    /// No backend at all for the service.
    DroppedNoBackend = 30, Dropped, "no_backend";
    /// externalTrafficPolicy Local and no backend on this node.
    DroppedNoLocalEndpoint = 31, Dropped, "no_local_endpoint";
    /// Client outside the service's loadBalancerSourceRanges.
    DroppedSourceRange = 32, Dropped, "source_range_denied";
    /// Truncated or inconsistent headers (the kernel would drop these as well).
    DroppedMalformed = 33, Dropped, "malformed";
    /// A later IPv4 fragment of a datagram to a frontend whose first fragment started no
    /// connection (it was dropped or answered): it cannot start one without its ports.
    DroppedFragment = 34, Dropped, "fragment";
    /// The connection tracking table refused a new entry.
    DroppedConntrackFull = 35, Dropped, "conntrack_full";
    /// No free SNAT source port for this backend.
    DroppedSnatExhausted = 36, Dropped, "snat_port_exhausted";
    /// The egress interface for a remote backend has no SNAT address configured.
    DroppedNoSnatAddress = 37, Dropped, "no_snat_address";
    /// A new connection from a source that cannot be an outside client: loopback, 0/8,
    /// multicast, class E or broadcast, the node's own addresses or pod networks.
    DroppedMartianSource = 38, Dropped, "martian_source";
    /// A packet matching a connection's reply entry arrived from another device than the one
    /// the connection left by (a spoofed backend or pod): never let into the connection.
    DroppedReplyWrongInterface = 39, Dropped, "reply_wrong_interface";
    /// A TCP packet that cannot start a connection (an RST, or a SYN-ACK) and belongs to none.
    DroppedCtInvalid = 40, Dropped, "conntrack_invalid";
    /// One direction's entry of a connection was lost and its tuple now belongs to another
    /// connection: the packet is dropped rather than crossed into it.
    DroppedCtPartnerLost = 41, Dropped, "conntrack_partner_lost";
    /// The program for new connections was not in `NP_PROGS` (a datapath half loaded).
    DroppedNoNewConnectionProgram = 42, Dropped, "new_connection_program_missing";
    /// A frame from the wire to a loopback or 0.0.0.0/8 address on a port some frontend uses
    /// (a probe for services bound to localhost, CVE-2020-8558): never forwarded.
    DroppedMartianDestination = 43, Dropped, "martian_destination";
    /// A TCP SYN or a UDP datagram to a Service with no usable endpoint at all, answered with
    /// an ICMP port unreachable so the client fails at once, as kube-proxy's REJECT does (at
    /// most 100 answers a second per CPU, shared with backend_gone_reset; beyond that,
    /// counted as no_backend).
    RejectedNoBackend = 44, Dropped, "no_backend_rejected";
    /// A TCP segment of a connection whose endpoint has left the Service's EndpointSlices (its
    /// pod is gone): answered with an RST, so the client fails at once instead of retrying
    /// into a void or being crossed into another pod (rate-limited as no_backend_rejected;
    /// beyond that, counted as backend_gone). The connection is closed.
    RejectedBackendGone = 45, Dropped, "backend_gone_reset";
    /// As backend_gone_reset, past the answer budget or with IPv4 options: dropped.
    DroppedBackendGone = 46, Dropped, "backend_gone";
    /// A packet nodeport would forward arrived with TTL 1: answered with an ICMP time exceeded
    /// from its destination, quoting it as it was sent, as the kernel's forwarding (and so
    /// kube-proxy's path) answers (traceroute through a node port). Same budget as
    /// no_backend_rejected.
    AnsweredTtlExceeded = 47, Dropped, "ttl_exceeded_answered";
    /// As ttl_exceeded_answered, past the answer budget or with IPv4 options: dropped.
    DroppedTtlExceeded = 48, Dropped, "ttl_exceeded_dropped";
    /// A packet nodeport would forward is larger than the route's MTU and has DF set:
    /// answered with an ICMP fragmentation needed (with the MTU) from its destination, quoting
    /// it as it was sent, as the kernel's forwarding answers, so its sender's path MTU
    /// discovery works. Same budget as no_backend_rejected.
    AnsweredFragNeeded = 49, Dropped, "frag_needed_answered";
    /// As frag_needed_answered, past the answer budget or with IPv4 options: dropped.
    /// (Index 60: 30-49 are taken.)
    DroppedFragNeeded = 60, Dropped, "frag_needed_dropped";
    /// A later IPv4 fragment (no ports of its own) that arrived before its datagram's first
    /// fragment, or more than 2 s after it, addressed elsewhere than to the node or its pod
    /// networks: nodeport cannot tell which connection it belongs to, and passed on the kernel
    /// would forward it untranslated, so it is dropped (as Cilium does); the datagram is lost.
    /// One addressed to the node or a pod network goes its way untouched (`later_fragment`)
    /// (docs/datapath.md, "Fragments").
    DroppedFragmentOutOfOrder = 61, Dropped, "fragment_out_of_order";

    /// A connection completed its handshake but the established table was full: it stays in
    /// the handshake table (where a flood may evict it). Size --conntrack-size up.
    EventCtPromoteFailed = 50, Event, "conntrack_promote_failed";
    /// One direction's entry of a connection was missing and was recreated.
    EventCtPartnerRecreated = 51, Event, "conntrack_partner_recreated";
    /// A client's source port was rewritten because its tuple at a local pod was taken by
    /// another of its connections (to another frontend of the same pod).
    EventTupleClashRewritten = 52, Event, "tuple_clash_port_rewritten";
    /// A packet found its connection expired (idle past its timeout) but still whole, and
    /// carried on with it (same backend, same SNAT port) instead of starting a new one.
    EventCtRevived = 53, Event, "conntrack_revived";
    /// An RST outside its sender's sequence window (a blind spoof, or a stale one): passed to
    /// the endpoint, which drops it too, without closing the connection here.
    EventCtRstIgnored = 54, Event, "conntrack_rst_ignored";
    /// A new connection's SYN took the SNAT port of a connection closed more than a second
    /// ago (both FINs or an RST), being past its sequence (as Linux NAT does).
    EventSnatTakeover = 55, Event, "snat_port_taken_over";
    /// An ICMP error (destination unreachable, fragmentation needed, time exceeded, parameter
    /// problem) about a packet of a translated connection, rewritten outer and quoted headers
    /// alike so its receiver (the client, or the backend) finds its own packet in it, and sent
    /// on (as nf_nat's `nf_nat_icmp_reply_translation`).
    EventIcmpErrorTranslated = 56, Event, "icmp_error_translated";
}

/// Size of the `NP_COUNTERS` array (one more than the highest index; room to grow).
pub const COUNTER_SLOTS: u32 = 96;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_fit_and_are_unique() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for c in Counter::ALL {
            let i = *c as usize;
            assert!(i < COUNTER_SLOTS as usize, "{c:?}");
            assert!(!seen[i], "{c:?} reuses index {i}");
            seen[i] = true;
        }
    }
}
