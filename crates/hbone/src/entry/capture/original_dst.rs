//! Where a connection redirected by a NAT rule (nftables `redirect`,
//! iptables `REDIRECT`) was going before it was redirected: Linux keeps
//! it in conntrack, and `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST`
//! (IPv6) reads it back.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination `stream` had before it was redirected to us. For a
/// connection that was not redirected this is our own address, or an
/// error when conntrack holds nothing for it.
#[cfg(target_os = "linux")]
pub(super) fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let original = if local.ip().to_canonical().is_ipv4() {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    original.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

/// Transparent capture needs Linux's conntrack.
#[cfg(not(target_os = "linux"))]
pub(super) fn original_dst(_stream: &TcpStream) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reading a redirected connection's original destination needs Linux",
    ))
}
