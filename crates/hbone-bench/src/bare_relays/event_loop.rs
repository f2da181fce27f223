//! `hbone bench relays --one-thread`: the same two relays, records and
//! keys as the blocking ones, on one thread that waits in `epoll_wait`
//! for every socket of both relays, as a single-threaded proxy holding an
//! entry and a server must. The least a readiness-driven proxy can do per
//! unit of work on this path:
//!
//! - sockets are non-blocking, registered once, edge-triggered, for both
//!   directions;
//! - a read that returns less than it asked for counts as draining the
//!   socket (no read that only returns EAGAIN), and a write that takes
//!   less than it was given as filling it, until epoll says otherwise;
//! - each wake-up moves every byte it can on every socket it names before
//!   waiting again.
//!
//! On 1 KiB request/response that is a read and a write at each of the
//! four hops and an `epoll_wait` for each time readiness arrives: twice
//! from outside (the request, the reply) and twice from this process's
//! own writes to the other relay, which epoll only reports to the next
//! wait.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context;
use aws_lc_rs::aead::NONCE_LEN;

use super::{
    Direction, HEADER, Keys, OPEN_RECORDS, RECORD, RECORD_PLAINTEXT, SEAL_RECORDS, Side,
    open_record, read_into_slots, seal_slots, whole_record,
};

/// Tokens at or above this name a listener (its index below it); the
/// others a connection's socket: its slot, shifted, and which side.
const LISTENER_TOKEN: u64 = 1 << 63;
/// Events one `epoll_wait` returns at most.
const EVENTS: usize = 256;
/// Slices one `writev` is given at most (IOV_MAX is 1024).
const SLICES: usize = 64;
/// How long the server relay waits, on accepting, for the IVs the entry
/// relay wrote: they are there already, as both relays run on this thread.
const IV_WAIT: Duration = Duration::from_secs(1);

/// Binds an entry relay and a server relay for each target, logs
/// `bare relays ready listen=ADDR` for each entry relay in the order of
/// `targets`, and relays on this thread until killed.
pub fn run(targets: &[SocketAddr]) -> anyhow::Result<()> {
    let (mut relays, entries) = Relays::bind(targets)?;
    for entry in entries {
        eprintln!("bare relays ready listen={entry}");
    }
    relays.serve()
}

/// An epoll instance.
struct Poller {
    fd: OwnedFd,
}

impl Poller {
    fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is
        // a new descriptor this process owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned open and is owned by nothing else.
        Ok(Poller {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are open; `event` outlives the call.
        let done =
            unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if done < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for readiness; fills `events` with what arrived.
    fn wait(&self, events: &mut Vec<libc::epoll_event>) -> io::Result<()> {
        events.clear();
        loop {
            // SAFETY: `events` has room for EVENTS entries, which is what
            // the kernel is told it may write.
            let got = unsafe {
                libc::epoll_wait(
                    self.fd.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS as libc::c_int,
                    -1,
                )
            };
            if got >= 0 {
                // SAFETY: the kernel initialised the first `got` entries.
                unsafe { events.set_len(got as usize) };
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

/// A listener and where what it accepts goes.
struct Listener {
    socket: TcpListener,
    next: SocketAddr,
    keys: Rc<Keys>,
    side: Side,
}

/// Everything both relays hold, on the one thread.
struct Relays {
    poller: Poller,
    listeners: Vec<Listener>,
    /// Connections by slot; a token names a slot.
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
}

impl Relays {
    /// The relays for `targets`, and the entry relay of each, in order.
    fn bind(targets: &[SocketAddr]) -> anyhow::Result<(Relays, Vec<SocketAddr>)> {
        let poller = Poller::new().context("cannot create an epoll instance")?;
        let mut relays = Relays {
            poller,
            listeners: Vec::new(),
            pairs: Vec::new(),
            free: Vec::new(),
        };
        let mut entries = Vec::with_capacity(targets.len());
        for &target in targets {
            let keys = Rc::new(Keys::generate()?);
            let server = TcpListener::bind("127.0.0.1:0").context("cannot bind a server relay")?;
            let entry = TcpListener::bind("127.0.0.1:0").context("cannot bind an entry relay")?;
            entries.push(entry.local_addr()?);
            let server_addr = server.local_addr()?;
            relays.listen(server, target, keys.clone(), Side::Server)?;
            relays.listen(entry, server_addr, keys, Side::Entry)?;
        }
        Ok((relays, entries))
    }

    fn listen(
        &mut self,
        socket: TcpListener,
        next: SocketAddr,
        keys: Rc<Keys>,
        side: Side,
    ) -> anyhow::Result<()> {
        socket.set_nonblocking(true)?;
        let token = LISTENER_TOKEN | self.listeners.len() as u64;
        self.poller
            .add(socket.as_raw_fd(), token, libc::EPOLLIN as u32)
            .context("cannot watch a listener")?;
        self.listeners.push(Listener {
            socket,
            next,
            keys,
            side,
        });
        Ok(())
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let mut events = Vec::with_capacity(EVENTS);
        loop {
            self.poller.wait(&mut events).context("epoll_wait failed")?;
            for event in &events {
                let (token, flags) = (event.u64, event.events);
                if token >= LISTENER_TOKEN {
                    self.accept((token - LISTENER_TOKEN) as usize);
                    continue;
                }
                let (slot, outbound) = ((token >> 1) as usize, token & 1 == 1);
                let Some(Some(pair)) = self.pairs.get_mut(slot) else {
                    continue;
                };
                let socket = match outbound {
                    true => &mut pair.outbound,
                    false => &mut pair.inbound,
                };
                socket.note(flags);
                if pair.progress() {
                    self.pairs[slot] = None;
                    self.free.push(slot);
                }
            }
        }
    }

    /// Accepts every connection waiting on listener `index`.
    fn accept(&mut self, index: usize) {
        loop {
            let listener = &self.listeners[index];
            let inbound = match listener.socket.accept() {
                Ok((inbound, _)) => inbound,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Out of descriptors, usually: the listener is
                // level-triggered, so the next wait reports it again.
                Err(_) => return,
            };
            let (next, keys, side) = (listener.next, listener.keys.clone(), listener.side);
            if let Ok(pair) = Pair::connect(inbound, next, keys, side) {
                self.insert(pair);
            }
        }
    }

    fn insert(&mut self, pair: Pair) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.pairs.push(None);
            self.pairs.len() - 1
        });
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        let watched = [&pair.inbound, &pair.outbound]
            .iter()
            .enumerate()
            .try_for_each(|(side, socket)| {
                self.poller.add(
                    socket.stream.as_raw_fd(),
                    ((slot as u64) << 1) | side as u64,
                    events,
                )
            });
        match watched {
            // Registering reports what is ready already: the first event
            // starts the pumps.
            Ok(()) => self.pairs[slot] = Some(pair),
            Err(_) => self.free.push(slot),
        }
    }
}

/// A socket and what epoll last said of it.
struct Socket {
    stream: TcpStream,
    /// No short read since epoll last reported it readable.
    readable: bool,
    /// No short write since epoll last reported it writable.
    writable: bool,
    /// The peer has closed or the socket failed: the next read says which,
    /// however short the last one was (epoll reports it only once).
    closing: bool,
}

impl Socket {
    fn new(stream: TcpStream) -> io::Result<Socket> {
        stream.set_nodelay(true)?;
        Ok(Socket {
            stream,
            readable: true,
            writable: true,
            closing: false,
        })
    }

    fn note(&mut self, flags: u32) {
        let trouble = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if flags & trouble != 0 {
            self.closing = true;
        }
        if flags & (libc::EPOLLIN as u32 | trouble) != 0 {
            self.readable = true;
        }
        if flags & (libc::EPOLLOUT as u32 | trouble) != 0 {
            self.writable = true;
        }
    }
}

/// One connection through one relay: the socket it came in on, the one
/// to the next hop, and a pump each way.
struct Pair {
    inbound: Socket,
    outbound: Socket,
    /// Inbound to outbound.
    up: Pump,
    /// Outbound to inbound.
    down: Pump,
}

impl Pair {
    /// Dials `next` for `inbound`. The entry relay picks the connection's
    /// two IVs and sends them first; the server relay reads them.
    fn connect(
        mut inbound: TcpStream,
        next: SocketAddr,
        keys: Rc<Keys>,
        side: Side,
    ) -> io::Result<Pair> {
        let mut outbound = TcpStream::connect(next)?;
        let mut ivs = [0u8; 2 * NONCE_LEN];
        match side {
            Side::Entry => {
                aws_lc_rs::rand::fill(&mut ivs).map_err(|_| io::Error::other("no randomness"))?;
                outbound.write_all(&ivs)?;
            }
            Side::Server => {
                inbound.set_read_timeout(Some(IV_WAIT))?;
                inbound.read_exact(&mut ivs)?;
            }
        }
        for stream in [&inbound, &outbound] {
            stream.set_nonblocking(true)?;
        }
        let (up_iv, down_iv) = ivs.split_at(NONCE_LEN);
        let iv = |bytes: &[u8]| -> [u8; NONCE_LEN] { bytes.try_into().expect("IV size") };
        let seal_up = matches!(side, Side::Entry);
        Ok(Pair {
            inbound: Socket::new(inbound)?,
            outbound: Socket::new(outbound)?,
            up: Pump::new(keys.clone(), true, iv(up_iv), seal_up),
            down: Pump::new(keys, false, iv(down_iv), !seal_up),
        })
    }

    /// Moves what both directions can; true once the pair is done with.
    fn progress(&mut self) -> bool {
        let up = self.up.progress(&mut self.inbound, &mut self.outbound);
        let down = self.down.progress(&mut self.outbound, &mut self.inbound);
        match (up, down) {
            (Ok(Flow::Ended), Ok(Flow::Ended)) => true,
            (Ok(_), Ok(_)) => false,
            _ => {
                let _ = self.inbound.stream.shutdown(Shutdown::Both);
                let _ = self.outbound.stream.shutdown(Shutdown::Both);
                true
            }
        }
    }
}

/// Where a pump stopped.
enum Flow {
    /// Waiting for readiness.
    Blocked,
    /// Its reader ended and everything read went out.
    Ended,
}

/// One direction of one connection: reads, seals or opens in place, and
/// writes ranges of its own buffer.
struct Pump {
    keys: Rc<Keys>,
    /// Towards the target (the `up` key).
    up: bool,
    iv: [u8; NONCE_LEN],
    seal: bool,
    sequence: u64,
    buffer: Vec<u8>,
    /// Opening: bytes of records read so far.
    filled: usize,
    /// Opening: bytes of whole records opened, moved out once written.
    consumed: usize,
    /// (offset, length) ranges of `buffer` still to write, from `out_at`,
    /// of which the first has `out_skip` bytes written.
    out: Vec<(usize, usize)>,
    out_at: usize,
    out_skip: usize,
    ended: bool,
}

impl Pump {
    fn new(keys: Rc<Keys>, up: bool, iv: [u8; NONCE_LEN], seal: bool) -> Pump {
        let records = if seal { SEAL_RECORDS } else { OPEN_RECORDS };
        Pump {
            keys,
            up,
            iv,
            seal,
            sequence: 0,
            buffer: vec![0; records * RECORD],
            filled: 0,
            consumed: 0,
            out: Vec::with_capacity(SEAL_RECORDS),
            out_at: 0,
            out_skip: 0,
            ended: false,
        }
    }

    fn progress(&mut self, from: &mut Socket, to: &mut Socket) -> io::Result<Flow> {
        if self.ended && self.out.is_empty() {
            return Ok(Flow::Ended);
        }
        loop {
            if !self.flush(to)? {
                return Ok(Flow::Blocked);
            }
            if self.ended {
                to.stream.shutdown(Shutdown::Write)?;
                return Ok(Flow::Ended);
            }
            if !from.readable {
                return Ok(Flow::Blocked);
            }
            let read = match self.seal {
                true => self.read_and_seal(&mut from.stream),
                false => self.read_and_open(&mut from.stream),
            };
            match read {
                Ok(Got::Drained) => from.readable = from.closing,
                Ok(Got::More) => {}
                Ok(Got::End) => self.ended = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => from.readable = false,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes what is pending; true once nothing is.
    fn flush(&mut self, to: &mut Socket) -> io::Result<bool> {
        while self.out_at < self.out.len() {
            if !to.writable {
                return Ok(false);
            }
            let ranges = &self.out[self.out_at..self.out.len().min(self.out_at + SLICES)];
            let mut slices = [IoSlice::new(&[]); SLICES];
            let mut asked = 0;
            for (index, &(at, length)) in ranges.iter().enumerate() {
                let skip = if index == 0 { self.out_skip } else { 0 };
                slices[index] = IoSlice::new(&self.buffer[at + skip..at + length]);
                asked += length - skip;
            }
            let written = match to.stream.write_vectored(&slices[..ranges.len()]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.writable = false;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            if written < asked {
                to.writable = false;
            }
            self.advance(written);
        }
        self.out.clear();
        (self.out_at, self.out_skip) = (0, 0);
        if !self.seal && self.consumed > 0 {
            // Only a partial record stays: to the front for the next read.
            self.buffer.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        Ok(true)
    }

    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let (_, length) = self.out[self.out_at];
            let left = length - self.out_skip;
            if written < left {
                self.out_skip += written;
                return;
            }
            written -= left;
            self.out_at += 1;
            self.out_skip = 0;
        }
    }

    /// One `readv` into the payload slots of the records, sealed in place.
    fn read_and_seal(&mut self, from: &mut TcpStream) -> io::Result<Got> {
        let read = read_into_slots(from, &mut self.buffer)?;
        if read == 0 {
            return Ok(Got::End);
        }
        let direction = direction(&self.keys, self.up, self.iv);
        let out = &mut self.out;
        seal_slots(
            &mut self.buffer,
            read,
            &direction,
            &mut self.sequence,
            |index, length| out.push((index * RECORD, length)),
        )?;
        Ok(Got::after(read, SEAL_RECORDS * RECORD_PLAINTEXT))
    }

    /// One read of records; every whole one is opened in place.
    fn read_and_open(&mut self, from: &mut TcpStream) -> io::Result<Got> {
        let room = self.buffer.len() - self.filled;
        let read = from.read(&mut self.buffer[self.filled..])?;
        if read == 0 {
            if self.filled > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "record cut short",
                ));
            }
            return Ok(Got::End);
        }
        self.filled += read;
        let direction = direction(&self.keys, self.up, self.iv);
        while let Some(length) = whole_record(&self.buffer[self.consumed..self.filled])? {
            let at = self.consumed;
            let record = &mut self.buffer[at..at + length];
            let plaintext = open_record(record, &direction, self.sequence)?;
            if plaintext > 0 {
                self.out.push((at + HEADER, plaintext));
            }
            self.sequence += 1;
            self.consumed += length;
        }
        Ok(Got::after(read, room))
    }
}

/// The key and IV of one direction.
fn direction(keys: &Keys, up: bool, iv: [u8; NONCE_LEN]) -> Direction<'_> {
    let key = if up { &keys.up } else { &keys.down };
    Direction { key, iv }
}

/// What one read found.
enum Got {
    /// Less than asked: nothing more until epoll says so.
    Drained,
    /// As much as asked: there may be more.
    More,
    /// The peer closed its side.
    End,
}

impl Got {
    fn after(read: usize, asked: usize) -> Got {
        if read < asked {
            Got::Drained
        } else {
            Got::More
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;

    use super::*;

    /// An echo app on loopback: each connection's bytes come back until it
    /// half-closes.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for socket in listener.incoming() {
                let socket = socket.unwrap();
                thread::spawn(move || {
                    let mut back = socket.try_clone().unwrap();
                    let _ = io::copy(&mut &socket, &mut back);
                    let _ = back.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    /// Both relays on a thread of their own; the entry relay's address.
    fn relays_to(target: SocketAddr) -> SocketAddr {
        let (ready, entry) = mpsc::channel();
        thread::spawn(move || {
            let (mut relays, entries) = Relays::bind(&[target]).unwrap();
            ready.send(entries[0]).unwrap();
            relays.serve().unwrap();
        });
        entry.recv().unwrap()
    }

    fn connect(entry: SocketAddr) -> TcpStream {
        let client = TcpStream::connect(entry).unwrap();
        // A stalled pump fails the test instead of hanging it.
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client
    }

    /// More than a read's worth of records, and a partial one, arrive whole
    /// and in order both ways, while the other direction is busy too (the
    /// echo writes back while more is sent: the pumps must wait for
    /// writability without losing their place), on several connections at
    /// once.
    #[test]
    fn carries_bulk_both_ways_on_concurrent_connections() {
        let entry = relays_to(echo());
        let sent: Vec<u8> = (0..5 * SEAL_RECORDS * RECORD_PLAINTEXT + 4321)
            .map(|i| (i % 251) as u8)
            .collect();
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let sent = sent.clone();
                thread::spawn(move || {
                    let client = connect(entry);
                    let writer = {
                        let (client, sent) = (client.try_clone().unwrap(), sent.clone());
                        thread::spawn(move || {
                            (&client).write_all(&sent).unwrap();
                            client.shutdown(Shutdown::Write).unwrap();
                        })
                    };
                    let mut received = Vec::new();
                    (&client).read_to_end(&mut received).unwrap();
                    writer.join().unwrap();
                    received == sent
                })
            })
            .collect();
        for (index, client) in clients.into_iter().enumerate() {
            assert!(
                client.join().unwrap(),
                "connection {index}: the echo differs"
            );
        }
    }

    /// Small exchanges one after another on one connection: each request
    /// comes back before the next is sent, so a pump that waited for more
    /// than a short read promised would stall here.
    #[test]
    fn answers_request_after_request() {
        let entry = relays_to(echo());
        let mut client = connect(entry);
        for round in 0..200u32 {
            let request = vec![(round % 256) as u8; 1 + (round as usize * 37) % 2048];
            client.write_all(&request).unwrap();
            let mut response = vec![0u8; request.len()];
            client.read_exact(&mut response).unwrap();
            assert_eq!(response, request, "round {round}");
        }
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after the last response");
    }

    /// A connection whose target is gone ends, and the relays go on
    /// serving the next.
    #[test]
    fn a_dead_target_ends_only_its_connection() {
        let gone = TcpListener::bind("127.0.0.1:0").unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        let (ready, entries) = mpsc::channel();
        let live = echo();
        thread::spawn(move || {
            let (mut relays, entries) = Relays::bind(&[gone_addr, live]).unwrap();
            ready.send(entries).unwrap();
            relays.serve().unwrap();
        });
        let entries = entries.recv().unwrap();
        let mut doomed = connect(entries[0]);
        let _ = doomed.write_all(b"anyone?");
        let mut got = Vec::new();
        assert!(
            doomed.read_to_end(&mut got).is_err() || got.is_empty(),
            "bytes came back from a target that is not there"
        );
        let mut client = connect(entries[1]);
        client.write_all(b"still here").unwrap();
        let mut response = [0u8; 10];
        client.read_exact(&mut response).unwrap();
        assert_eq!(&response, b"still here");
    }
}
