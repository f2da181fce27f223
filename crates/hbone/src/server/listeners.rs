//! Per-worker listening sockets: with SO_REUSEPORT the kernel spreads new
//! connections over several sockets bound to one address, so each worker
//! accepts its own and no accepted socket is handed between threads.

use std::io;
use std::net::SocketAddr;

/// `count` non-blocking listeners on `addr`, not yet registered with any
/// runtime; with port 0 the others take the port the first was given.
/// Only sockets of the same user can join the group (Linux's rule).
pub(super) fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    // What tokio's `TcpListener::bind` uses.
    const BACKLOG: i32 = 1024;
    let mut listeners = Vec::with_capacity(count);
    let mut at = addr;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        at = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}
