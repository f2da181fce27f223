//! PROXY protocol v2 headers, which the server can send to a target before
//! the tunnelled bytes so the application learns the original client and
//! its proven identity. The SPIFFE ID travels in TLV type 0xD0, as ztunnel
//! sends it.

use std::net::{IpAddr, SocketAddr};

use crate::identity::SpiffeId;

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV type carrying the peer's SPIFFE ID (a ztunnel convention).
pub const TLV_PEER_IDENTITY: u8 = 0xD0;

const VERSION_2_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

/// Encodes a PROXY v2 header for a TCP connection from `source` to
/// `destination`. Mixed families are sent as IPv6, IPv4 addresses mapped.
pub fn encode(source: SocketAddr, destination: SocketAddr, peer: Option<&SpiffeId>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            body.extend_from_slice(&src.octets());
            body.extend_from_slice(&dst.octets());
            TCP_OVER_IPV4
        }
        (src, dst) => {
            body.extend_from_slice(&as_v6(src));
            body.extend_from_slice(&as_v6(dst));
            TCP_OVER_IPV6
        }
    };
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    if let Some(id) = peer {
        let value = id.as_str().as_bytes();
        body.push(TLV_PEER_IDENTITY);
        // SPIFFE IDs are at most 2048 bytes, well within a u16.
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut header = Vec::with_capacity(16 + body.len());
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_2_PROXY);
    header.push(family);
    header.extend_from_slice(&(body.len() as u16).to_be_bytes());
    header.extend_from_slice(&body);
    header
}

fn as_v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// What a v2 header says, for tests and tools that read one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decoded {
    /// The original client.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
    /// The peer's SPIFFE ID, from TLV 0xD0, when present.
    pub peer_identity: Option<String>,
    /// Bytes the header occupied.
    pub len: usize,
}

/// Decodes a v2 PROXY (not LOCAL) TCP header at the start of `data`.
pub fn decode(data: &[u8]) -> Option<Decoded> {
    if data.len() < 16 || data[..12] != SIGNATURE || data[12] != VERSION_2_PROXY {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([data[14], data[15]]));
    let body = data.get(16..16 + len)?;
    let (source_ip, destination_ip, rest): (IpAddr, IpAddr, &[u8]) = match data[13] {
        TCP_OVER_IPV4 if body.len() >= 12 => (
            IpAddr::from(<[u8; 4]>::try_from(&body[0..4]).ok()?),
            IpAddr::from(<[u8; 4]>::try_from(&body[4..8]).ok()?),
            &body[8..],
        ),
        TCP_OVER_IPV6 if body.len() >= 36 => (
            IpAddr::from(<[u8; 16]>::try_from(&body[0..16]).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(&body[16..32]).ok()?),
            &body[32..],
        ),
        _ => return None,
    };
    let source_port = u16::from_be_bytes([rest[0], rest[1]]);
    let destination_port = u16::from_be_bytes([rest[2], rest[3]]);
    let mut tlvs = &rest[4..];
    let mut peer_identity = None;
    while tlvs.len() >= 3 {
        let kind = tlvs[0];
        let tlv_len = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        let value = tlvs.get(3..3 + tlv_len)?;
        if kind == TLV_PEER_IDENTITY {
            peer_identity = Some(String::from_utf8(value.to_vec()).ok()?);
        }
        tlvs = &tlvs[3 + tlv_len..];
    }
    Some(Decoded {
        source: SocketAddr::new(source_ip, source_port),
        destination: SocketAddr::new(destination_ip, destination_port),
        peer_identity,
        len: 16 + len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_with_identity_roundtrips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let src: SocketAddr = "10.0.0.1:5555".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let header = encode(src, dst, Some(&id));
        assert_eq!(&header[..12], &SIGNATURE);
        assert_eq!(header[12], 0x21);
        assert_eq!(header[13], 0x11);
        assert_eq!(
            usize::from(u16::from_be_bytes([header[14], header[15]])),
            header.len() - 16
        );
        let decoded = decode(&header).unwrap();
        assert_eq!(decoded.source, src);
        assert_eq!(decoded.destination, dst);
        assert_eq!(decoded.peer_identity.as_deref(), Some(id.as_str()));
        assert_eq!(decoded.len, header.len());
    }

    /// Whole headers written out byte by byte from the PROXY protocol
    /// specification (section 2.2 of haproxy's proxy-protocol.txt), not
    /// from this module: the 12-byte signature, 0x21 (version 2, PROXY),
    /// the family and transport byte, the length of what follows (network
    /// order), both addresses, both ports, then the TLVs.
    const SIG: [u8; 12] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];

    fn bytes(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn ipv4_header_with_identity_is_byte_exact() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let expected = bytes(&[
            &SIG,
            &[0x21],                   // version 2, command PROXY
            &[0x11],                   // AF_INET, STREAM
            &[0x00, 0x2F],             // 12 address bytes + 3 + 32 TLV bytes
            &[0x0A, 0x00, 0x00, 0x01], // source 10.0.0.1
            &[0x7F, 0x00, 0x00, 0x01], // destination 127.0.0.1
            &[0x15, 0xB3],             // source port 5555
            &[0x1F, 0x90],             // destination port 8080
            &[0xD0, 0x00, 0x20],       // TLV 0xD0, 32 bytes
            b"spiffe://cluster.local/ns/a/sa/b",
        ]);
        let header = encode(
            "10.0.0.1:5555".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            Some(&id),
        );
        assert_eq!(header, expected);
    }

    #[test]
    fn ipv4_header_without_identity_is_byte_exact() {
        let expected = bytes(&[
            &SIG,
            &[0x21, 0x11, 0x00, 0x0C],
            &[0xC0, 0x00, 0x02, 0x07], // source 192.0.2.7
            &[0xC6, 0x33, 0x64, 0xFE], // destination 198.51.100.254
            &[0xFF, 0xFF],             // source port 65535
            &[0x00, 0x01],             // destination port 1
        ]);
        let header = encode(
            "192.0.2.7:65535".parse().unwrap(),
            "198.51.100.254:1".parse().unwrap(),
            None,
        );
        assert_eq!(header, expected);
    }

    #[test]
    fn ipv6_header_with_identity_is_byte_exact() {
        let id = SpiffeId::parse("spiffe://td/x").unwrap();
        let expected = bytes(&[
            &SIG,
            &[0x21],       // version 2, command PROXY
            &[0x21],       // AF_INET6, STREAM
            &[0x00, 0x34], // 36 address bytes + 3 + 13 TLV bytes
            // source 2001:db8::1
            &[
                0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            ],
            // destination ::1
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01],
            &[0x01, 0xBB],       // source port 443
            &[0x3A, 0xA0],       // destination port 15008
            &[0xD0, 0x00, 0x0D], // TLV 0xD0, 13 bytes
            b"spiffe://td/x",
        ]);
        let header = encode(
            "[2001:db8::1]:443".parse().unwrap(),
            "[::1]:15008".parse().unwrap(),
            Some(&id),
        );
        assert_eq!(header, expected);
    }

    #[test]
    fn mixed_header_maps_ipv4_into_ipv6_byte_exact() {
        let expected = bytes(&[
            &SIG,
            &[0x21, 0x21, 0x00, 0x24],
            // source ::ffff:10.0.0.1
            &[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x0A, 0x00, 0x00, 0x01,
            ],
            // destination ::1
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01],
            &[0x00, 0x01, 0x00, 0x02],
        ]);
        let header = encode(
            "10.0.0.1:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
            None,
        );
        assert_eq!(header, expected);
    }

    /// The decoder reads a header written by hand, skipping TLVs it does
    /// not know (here PP2_TYPE_NOOP, 0x04), and refuses LOCAL and other
    /// versions.
    #[test]
    fn hand_written_headers_decode() {
        let header = bytes(&[
            &SIG,
            &[0x21, 0x11, 0x00, 0x18],
            &[0x0A, 0x00, 0x00, 0x01, 0x7F, 0x00, 0x00, 0x01],
            &[0x15, 0xB3, 0x1F, 0x90],
            &[0x04, 0x00, 0x02, 0xAA, 0xBB], // NOOP, 2 bytes
            &[0xD0, 0x00, 0x04, b't', b'd', b':', b'x'], // 0xD0, 4 bytes
            b"payload",
        ]);
        let decoded = decode(&header).unwrap();
        assert_eq!(
            decoded.source,
            "10.0.0.1:5555".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            decoded.destination,
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(decoded.peer_identity.as_deref(), Some("td:x"));
        assert_eq!(decoded.len, header.len() - b"payload".len());

        let mut local = header.clone();
        local[12] = 0x20; // version 2, command LOCAL
        assert_eq!(decode(&local), None);
        let mut version_1 = header.clone();
        version_1[12] = 0x11;
        assert_eq!(decode(&version_1), None);
        let mut udp = header;
        udp[13] = 0x12; // AF_INET, DGRAM
        assert_eq!(decode(&udp), None);
    }

    #[test]
    fn mixed_families_use_ipv6() {
        let src: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let dst: SocketAddr = "[::1]:2".parse().unwrap();
        let header = encode(src, dst, None);
        assert_eq!(header[13], 0x21);
        let decoded = decode(&header).unwrap();
        assert_eq!(
            decoded.source,
            "[::ffff:10.0.0.1]:1".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(decoded.destination, dst);
        assert_eq!(decoded.peer_identity, None);
        assert_eq!(decode(&header[..header.len() - 1]), None);
        assert_eq!(decode(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
