//! Test packets, built and checked with etherparse: an implementation independent of the
//! datapath's own parsing and checksum code.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, SlicedPacket,
    TcpHeader, TransportSlice, UdpHeader,
};

pub type Mac = [u8; 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: TcpFlags = TcpFlags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const SYN_ACK: TcpFlags = TcpFlags {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const ACK: TcpFlags = TcpFlags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const FIN_ACK: TcpFlags = TcpFlags {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};

pub const RST: TcpFlags = TcpFlags {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: TcpFlags,
    },
    /// `checksum: false` sends a zero checksum ("none", allowed by RFC 768).
    Udp {
        checksum: bool,
    },
}

/// An Ethernet + IPv4 + TCP/UDP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    pub ip_id: u16,
    pub more_fragments: bool,
    /// In 8-byte units.
    pub fragment_offset: u16,
    /// The "don't fragment" bit of an unfragmented packet (on by default, as Linux sets it).
    pub dont_fragment: bool,
    /// TCP sequence and acknowledgement numbers. The defaults are one exchange's worth: the
    /// acknowledgement does not go past what a default packet the other way sends, so the
    /// datapath's window checks take them as one connection's.
    pub seq: u32,
    pub ack: u32,
}

impl Pkt {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: TcpFlags) -> Self {
        Self::new(src, dst, L4::Tcp { flags })
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::new(src, dst, L4::Udp { checksum: true })
    }

    fn new(src: SocketAddrV4, dst: SocketAddrV4, l4: L4) -> Self {
        Self {
            eth_src: [2, 0, 0, 0, 0, 0xee],
            eth_dst: [2, 0, 0, 0, 0, 0x01],
            src,
            dst,
            ttl: 64,
            l4,
            payload: b"nodeport".to_vec(),
            ip_options: Vec::new(),
            ip_id: 0x1234,
            more_fragments: false,
            fragment_offset: 0,
            dont_fragment: true,
            seq: 1000,
            ack: 1000,
        }
    }

    /// TCP sequence number.
    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    /// TCP acknowledgement number (sent when the ACK flag is).
    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    pub fn addrs(mut self, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        self.src = src;
        self.dst = dst;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Clears the "don't fragment" bit.
    pub fn may_fragment(mut self) -> Self {
        self.dont_fragment = false;
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// The frame, with every checksum computed by etherparse.
    pub fn bytes(&self) -> Vec<u8> {
        let (l4_header_len, proto) = match self.l4 {
            L4::Tcp { .. } => (20, IpNumber::TCP),
            L4::Udp { .. } => (8, IpNumber::UDP),
        };
        let l4_len = l4_header_len + self.payload.len();
        let mut ip = Ipv4Header::new(
            l4_len as u16,
            self.ttl,
            proto,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .expect("small packet");
        ip.options = Ipv4Options::try_from(self.ip_options.as_slice()).expect("valid options");
        ip.total_len = (ip.header_len() + l4_len) as u16;
        ip.identification = self.ip_id;
        ip.dont_fragment = self.dont_fragment && !self.more_fragments && self.fragment_offset == 0;
        ip.more_fragments = self.more_fragments;
        ip.fragment_offset = IpFragOffset::try_new(self.fragment_offset).expect("offset");
        ip.header_checksum = ip.calc_header_checksum();

        let mut out = Vec::new();
        Ethernet2Header {
            source: self.eth_src,
            destination: self.eth_dst,
            ether_type: EtherType::IPV4,
        }
        .write(&mut out)
        .expect("write");
        ip.write(&mut out).expect("write");
        match self.l4 {
            L4::Tcp { flags } => {
                let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), self.seq, 64_000);
                tcp.syn = flags.syn;
                tcp.ack = flags.ack;
                tcp.fin = flags.fin;
                tcp.rst = flags.rst;
                if flags.ack {
                    tcp.acknowledgment_number = self.ack;
                }
                tcp.checksum = tcp
                    .calc_checksum_ipv4(&ip, &self.payload)
                    .expect("checksum");
                tcp.write(&mut out).expect("write");
            }
            L4::Udp { checksum: true } => {
                UdpHeader::with_ipv4_checksum(self.src.port(), self.dst.port(), &ip, &self.payload)
                    .expect("checksum")
                    .write(&mut out)
                    .expect("write");
            }
            L4::Udp { checksum: false } => {
                UdpHeader::without_ipv4_checksum(
                    self.src.port(),
                    self.dst.port(),
                    self.payload.len(),
                )
                .expect("length")
                .write(&mut out)
                .expect("write");
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// What a test reads back from an output frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
}

/// Parses a frame with etherparse and verifies its IPv4 and TCP/UDP checksums from scratch.
/// A UDP checksum of zero is accepted (no checksum).
pub fn parse_checked(frame: &[u8]) -> anyhow::Result<Seen> {
    parse_checked_inner(frame).map_err(anyhow::Error::msg)
}

fn parse_checked_inner(frame: &[u8]) -> Result<Seen, String> {
    let sliced =
        SlicedPacket::from_ethernet(frame).map_err(|e| format!("unparsable frame: {e}"))?;
    let eth = match sliced.link {
        Some(etherparse::LinkSlice::Ethernet2(eth)) => eth,
        other => return Err(format!("not Ethernet II: {other:?}")),
    };
    let ip = match &sliced.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => ip,
        other => return Err(format!("not IPv4: {other:?}")),
    };
    let header = ip.header().to_header();
    if header.calc_header_checksum() != header.header_checksum {
        return Err(format!(
            "bad IPv4 header checksum {:#06x}, expected {:#06x}",
            header.header_checksum,
            header.calc_header_checksum()
        ));
    }
    let (sport, dport) = match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .map_err(|e| e.to_string())?;
            if expected != tcp.checksum() {
                return Err(format!(
                    "bad TCP checksum {:#06x}, expected {expected:#06x}",
                    tcp.checksum()
                ));
            }
            (tcp.source_port(), tcp.destination_port())
        }
        Some(TransportSlice::Udp(udp)) => {
            if udp.checksum() != 0 {
                let expected = udp
                    .to_header()
                    .calc_checksum_ipv4(&header, udp.payload())
                    .map_err(|e| e.to_string())?;
                if expected != udp.checksum() {
                    return Err(format!(
                        "bad UDP checksum {:#06x}, expected {expected:#06x}",
                        udp.checksum()
                    ));
                }
            }
            (udp.source_port(), udp.destination_port())
        }
        other => return Err(format!("no TCP/UDP: {other:?}")),
    };
    Ok(Seen {
        eth_src: eth.source(),
        eth_dst: eth.destination(),
        src: SocketAddrV4::new(Ipv4Addr::from(header.source), sport),
        dst: SocketAddrV4::new(Ipv4Addr::from(header.destination), dport),
        ttl: header.time_to_live,
    })
}

/// An ICMP error frame from `from` to `to` (Ethernet `macs`, TTL 64) quoting `quoted`, an IPv4
/// packet as it was sent (a `Pkt`'s bytes without Ethernet): every checksum by etherparse.
pub fn icmp_error(
    macs: (Mac, Mac),
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: etherparse::Icmpv4Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(from.octets(), to.octets(), 64)
        .icmpv4(kind)
        .write(&mut out, quoted)
        .expect("write");
    out
}

/// An ICMP error read back: its outer header and the packet it quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenIcmp {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub kind: etherparse::Icmpv4Type,
    /// The quoted packet (its Ethernet addresses are meaningless).
    pub quoted: Seen,
}

/// Parses an ICMP error frame with etherparse and verifies every checksum from scratch: the
/// outer IPv4 header, the ICMP message, and the quoted packet's IPv4 header and TCP/UDP
/// checksum (so the quote must hold the whole packet).
pub fn parse_icmp_error(frame: &[u8]) -> anyhow::Result<SeenIcmp> {
    use anyhow::{Context, bail, ensure};
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
    let headers = PacketHeaders::from_ethernet_slice(frame)?;
    let eth = headers
        .link
        .clone()
        .and_then(|l| l.ethernet2())
        .context("not Ethernet II")?;
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        bail!("not IPv4: {headers:?}");
    };
    ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "bad outer IPv4 checksum"
    );
    let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else {
        bail!("not ICMP: {headers:?}");
    };
    let quoted = headers.payload.slice();
    ensure!(
        icmp.checksum == icmp.icmp_type.calc_checksum(quoted),
        "bad ICMP checksum {:#06x}, expected {:#06x}",
        icmp.checksum,
        icmp.icmp_type.calc_checksum(quoted)
    );
    let mut inner = vec![0u8; 12];
    inner.extend_from_slice(&[0x08, 0x00]);
    inner.extend_from_slice(quoted);
    Ok(SeenIcmp {
        eth_src: eth.source,
        eth_dst: eth.destination,
        src: Ipv4Addr::from(ip.source),
        dst: Ipv4Addr::from(ip.destination),
        ttl: ip.time_to_live,
        kind: icmp.icmp_type.clone(),
        quoted: parse_checked(&inner).context("the quoted packet")?,
    })
}

/// `a.b.c.d:port`.
pub fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Splits a frame's IPv4 datagram into fragments of `chunk` bytes of IPv4 payload (a multiple
/// of 8), as a sender's IP layer does: same Ethernet header, IP id and TTL, DF cleared, MF on
/// all but the last; every header checksum by etherparse. The L4 header (with its checksum
/// over the whole datagram) is in the first fragment only.
pub fn fragment(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    assert!(
        chunk.is_multiple_of(8) && chunk > 0,
        "fragment size {chunk}"
    );
    let (ip, rest) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 frame");
    let payload = &rest[..usize::from(ip.total_len) - ip.header_len()];
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut header = ip.clone();
            header.dont_fragment = false;
            header.more_fragments = (i + 1) * chunk < payload.len();
            header.fragment_offset = IpFragOffset::try_new((i * chunk / 8) as u16).expect("offset");
            header.total_len = (header.header_len() + part.len()) as u16;
            header.header_checksum = header.calc_header_checksum();
            let mut out = frame[..14].to_vec();
            header.write(&mut out).expect("write");
            out.extend_from_slice(part);
            out
        })
        .collect()
}

/// Reassembles fragments (any order) into one frame, as a receiver's IP layer does, after
/// checking every fragment's IPv4 header checksum; the result's L4 checksum can then be
/// verified over the whole datagram with [`parse_checked`]. The Ethernet header and IPv4
/// fields are the first fragment's.
pub fn reassemble(frames: &[Vec<u8>]) -> anyhow::Result<Vec<u8>> {
    use anyhow::{Context, ensure};
    let mut first = None;
    let mut parts = Vec::new();
    for frame in frames {
        let (ip, rest) = Ipv4Header::from_slice(&frame[14..]).context("an IPv4 fragment")?;
        ensure!(
            ip.header_checksum == ip.calc_header_checksum(),
            "bad IPv4 header checksum in a fragment: {:#06x}, expected {:#06x}",
            ip.header_checksum,
            ip.calc_header_checksum()
        );
        let offset = usize::from(ip.fragment_offset.value()) * 8;
        let data = rest[..usize::from(ip.total_len) - ip.header_len()].to_vec();
        if offset == 0 {
            first = Some((frame[..14].to_vec(), ip.clone()));
        }
        parts.push((offset, ip.more_fragments, data));
    }
    parts.sort_by_key(|(offset, _, _)| *offset);
    let mut payload = Vec::new();
    for (offset, _, data) in &parts {
        ensure!(*offset == payload.len(), "a hole or overlap at {offset}");
        payload.extend_from_slice(data);
    }
    ensure!(
        parts.last().is_some_and(|(_, more, _)| !more),
        "no last fragment"
    );
    let (eth, mut ip) = first.context("no first fragment")?;
    ip.more_fragments = false;
    ip.fragment_offset = IpFragOffset::ZERO;
    ip.total_len = (ip.header_len() + payload.len()) as u16;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = eth;
    ip.write(&mut out)?;
    out.extend_from_slice(&payload);
    Ok(out)
}
