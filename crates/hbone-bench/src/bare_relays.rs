//! `hbone bench relays` (hidden): two relays that do nothing but carry
//! bytes as TLS records, a reference measured beside hbone in the same
//! runs, for bulk (per MB) and 1 KiB request/response (per request).
//!
//! ```text
//! load generator ─ entry relay ══ server relay ─ sink (or echo app)
//! ```
//!
//! Both relays run in this one process, each direction of each connection
//! on a blocking thread (no runtime, no poll). Between them the bytes
//! travel as TLS 1.3 application-data records of up to 16 KiB, sealed and
//! opened with AES-128-GCM (the suite hbone negotiates) by aws-lc-rs, as
//! rustls does under hbone. Nothing else: no handshake (a key per
//! direction is shared by the relays, and each connection starts with its
//! two random IVs in the clear), no HTTP/2 framing or flow control, no
//! multiplexing (a connection per stream), and no user-space copy of a
//! payload byte. The sealing side reads plaintext with one `readv`
//! straight into the payload slots of sixteen records (256 KiB, hbone's
//! largest read) and seals them in place; the opening side reads up to four
//! records at once (hbone reads 64 KiB under TLS), opens them in place and
//! writes the plaintexts out with one `writev`, moving only a partial
//! record's bytes to the front for the next read. On bulk that leaves the
//! two reads and two writes each byte costs in the relays, the cipher, and
//! the wake-ups between them. On request/response, blocking threads need
//! no poll (a read and a write per hop) but wake a different thread at
//! every hop.

#[cfg(target_os = "linux")]
mod event_loop;

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::Context;
use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// Plaintext in one record: TLS 1.3's limit.
const RECORD_PLAINTEXT: usize = 16 << 10;
/// Record header: content type, legacy version, length.
const HEADER: usize = 5;
/// TLS 1.3 inner content type, after the plaintext.
const INNER_TYPE: usize = 1;
const TAG: usize = 16;
/// Largest record on the wire.
const RECORD: usize = HEADER + RECORD_PLAINTEXT + INNER_TYPE + TAG;
/// Records sealed per read: 256 KiB of plaintext, hbone's largest read.
const SEAL_RECORDS: usize = 16;
/// Whole records the opening side's buffer holds: 64 KiB of records, as
/// hbone reads under TLS.
const OPEN_RECORDS: usize = 4;
const APPLICATION_DATA: u8 = 0x17;
/// A pause after a failed accept (out of file descriptors, usually), so
/// the relays do not spin on the CPU they are measured by.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Binds an entry relay and a server relay on loopback for each target,
/// logs `bare relays ready listen=ADDR` with each entry relay's address,
/// in the order of `targets` (the bench waits for them), and relays until
/// killed: on a blocking thread per direction of each connection, or all
/// on `one_thread` with epoll.
pub fn run(targets: &[SocketAddr], one_thread: bool) -> anyhow::Result<()> {
    if one_thread {
        #[cfg(target_os = "linux")]
        return event_loop::run(targets);
        #[cfg(not(target_os = "linux"))]
        anyhow::bail!("the one-thread bare relays use epoll, which only Linux has");
    }
    let mut entries = Vec::with_capacity(targets.len());
    for &target in targets {
        let server = TcpListener::bind("127.0.0.1:0").context("cannot bind a server relay")?;
        let entry = TcpListener::bind("127.0.0.1:0").context("cannot bind an entry relay")?;
        entries.push(entry.local_addr()?);
        start(entry, server, target)?;
    }
    for entry in entries {
        eprintln!("bare relays ready listen={entry}");
    }
    loop {
        std::thread::park();
    }
}

/// Relays from `entry` through `server` to `target`, on threads of their
/// own.
fn start(entry: TcpListener, server: TcpListener, target: SocketAddr) -> anyhow::Result<()> {
    let keys = Arc::new(Keys::generate()?);
    let workers = Workers::new();
    let server_addr = server.local_addr()?;
    // The server relay: records in from the entry relay, plaintext out to
    // the target, and back.
    let (server_keys, server_workers) = (keys.clone(), workers.clone());
    std::thread::spawn(move || {
        accept(
            &server,
            target,
            &server_workers,
            move |workers, from_entry, to_target| {
                relay(workers, from_entry, to_target, &server_keys, Side::Server)
            },
        )
    });
    // The entry relay: plaintext in from the load generator, records out
    // to the server relay, and back.
    std::thread::spawn(move || {
        accept(
            &entry,
            server_addr,
            &workers,
            move |workers, from_client, to_server| {
                relay(workers, from_client, to_server, &keys, Side::Entry)
            },
        )
    });
    Ok(())
}

/// Which relay of the pair.
#[derive(Clone, Copy)]
enum Side {
    /// Seals on the way up, opens on the way back.
    Entry,
    /// Opens on the way up, seals on the way back.
    Server,
}

/// One key per direction, shared by both relays of a pair and by all
/// their connections; each connection brings its own IVs, so no nonce
/// repeats under a key.
struct Keys {
    /// Towards the target.
    up: LessSafeKey,
    /// Back towards the load generator.
    down: LessSafeKey,
}

impl Keys {
    fn generate() -> anyhow::Result<Keys> {
        Ok(Keys {
            up: new_key()?,
            down: new_key()?,
        })
    }
}

fn new_key() -> anyhow::Result<LessSafeKey> {
    let mut secret = [0u8; 16];
    aws_lc_rs::rand::fill(&mut secret)
        .ok()
        .context("no randomness")?;
    let key = UnboundKey::new(&AES_128_GCM, &secret)
        .ok()
        .context("cannot build an AES-128-GCM key")?;
    Ok(LessSafeKey::new(key))
}

/// One direction of one connection: its key and its IV.
struct Direction<'a> {
    key: &'a LessSafeKey,
    iv: [u8; NONCE_LEN],
}

impl Direction<'_> {
    /// TLS 1.3's per-record nonce: the IV with the sequence number XORed
    /// into its last eight bytes.
    fn nonce(&self, sequence: u64) -> Nonce {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(sequence.to_be_bytes())
        {
            *byte ^= seq;
        }
        Nonce::assume_unique_for_key(nonce)
    }
}

/// Accepts connections on `listener`; for each, dials `next` and runs
/// `relay` with both sockets on a worker of `workers`.
fn accept<F>(listener: &TcpListener, next: SocketAddr, workers: &Arc<Workers>, relay: F)
where
    F: Fn(&Arc<Workers>, TcpStream, TcpStream) + Clone + Send + 'static,
{
    for accepted in listener.incoming() {
        let Ok(inbound) = accepted else {
            std::thread::sleep(ACCEPT_BACKOFF);
            continue;
        };
        let (relay, pool) = (relay.clone(), workers.clone());
        workers.run(move || {
            let Ok(outbound) = TcpStream::connect(next) else {
                let _ = inbound.shutdown(Shutdown::Both);
                return;
            };
            for socket in [&inbound, &outbound] {
                let _ = socket.set_nodelay(true);
            }
            relay(&pool, inbound, outbound);
        });
    }
}

/// Both directions of one connection, `inbound` up to `outbound` on this
/// worker and back on another. The entry relay picks the connection's two
/// IVs and sends them first; the server relay reads them.
fn relay(
    workers: &Arc<Workers>,
    mut inbound: TcpStream,
    mut outbound: TcpStream,
    keys: &Arc<Keys>,
    side: Side,
) {
    let mut ivs = [0u8; 2 * NONCE_LEN];
    let agreed = match side {
        Side::Entry => aws_lc_rs::rand::fill(&mut ivs)
            .map_err(|_| io::Error::other("no randomness"))
            .and_then(|()| outbound.write_all(&ivs)),
        Side::Server => inbound.read_exact(&mut ivs),
    };
    let clones = inbound
        .try_clone()
        .and_then(|i| Ok((i, outbound.try_clone()?)));
    let (Ok(()), Ok((inbound_back, outbound_back))) = (agreed, clones) else {
        let _ = inbound.shutdown(Shutdown::Both);
        let _ = outbound.shutdown(Shutdown::Both);
        return;
    };
    let (up_iv, down_iv) = ivs.split_at(NONCE_LEN);
    let (up_iv, down_iv): ([u8; NONCE_LEN], [u8; NONCE_LEN]) = (
        up_iv.try_into().expect("IV size"),
        down_iv.try_into().expect("IV size"),
    );
    let (seal_up, back_keys) = (matches!(side, Side::Entry), keys.clone());
    workers.run(move || {
        let down = Direction {
            key: &back_keys.down,
            iv: down_iv,
        };
        pump(outbound_back, inbound_back, &down, !seal_up);
    });
    let up = Direction {
        key: &keys.up,
        iv: up_iv,
    };
    pump(inbound, outbound, &up, seal_up);
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that outlive the connections they serve, so that the bench's
/// per-thread counters (context switches, migrations) see all their work:
/// a thread that ends takes its counts with it. A job never waits for a
/// worker: one is spawned whenever none is idle.
struct Workers {
    jobs: mpsc::Sender<Job>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// Workers that have counted themselves idle (they are waiting for a
    /// job, or about to) and have not been promised one yet.
    idle: Arc<AtomicUsize>,
}

impl Workers {
    fn new() -> Arc<Workers> {
        let (jobs, queue) = mpsc::channel();
        Arc::new(Workers {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            idle: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        let promised = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if promised {
            let _ = self.jobs.send(Box::new(job));
            return;
        }
        // A new worker starts on this job, and counts itself idle only once
        // it is done with it.
        let (queue, idle) = (self.queue.clone(), self.idle.clone());
        std::thread::spawn(move || {
            job();
            loop {
                idle.fetch_add(1, Ordering::AcqRel);
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok(job) = next else { return };
                job();
            }
        });
    }
}

/// Moves one direction until its reader ends, then half-closes the writer;
/// on an error, closes both sockets so the other direction ends too.
fn pump(from: TcpStream, to: TcpStream, direction: &Direction<'_>, seal: bool) {
    let result = if seal {
        seal_records(&from, &to, direction)
    } else {
        open_records(&from, &to, direction)
    };
    match result {
        Ok(()) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

/// Plaintext from `from`, records to `to`: each `readv` lands in the
/// payload slots of [`SEAL_RECORDS`] records, which are sealed in place
/// and written with one `writev`.
fn seal_records(
    mut from: &TcpStream,
    mut to: &TcpStream,
    direction: &Direction<'_>,
) -> io::Result<()> {
    let mut slots = vec![0u8; SEAL_RECORDS * RECORD];
    let mut sequence = 0u64;
    loop {
        let read = read_into_slots(&mut from, &mut slots)?;
        if read == 0 {
            return Ok(());
        }
        let mut lengths = [0usize; SEAL_RECORDS];
        let mut records = 0;
        seal_slots(
            &mut slots,
            read,
            direction,
            &mut sequence,
            |index, length| {
                lengths[index] = length;
                records += 1;
            },
        )?;
        let mut chunks = slots.chunks(RECORD);
        let mut out: [IoSlice<'_>; SEAL_RECORDS] = std::array::from_fn(|index| {
            let slot = chunks.next().expect("a slot per record");
            IoSlice::new(&slot[..lengths[index]])
        });
        write_all_vectored(&mut to, &mut out[..records])?;
    }
}

/// One `readv` of plaintext into the payload slots of the
/// [`SEAL_RECORDS`] records in `slots`.
fn read_into_slots(from: &mut impl Read, slots: &mut [u8]) -> io::Result<usize> {
    let mut chunks = slots.chunks_mut(RECORD);
    let mut payloads: [IoSliceMut<'_>; SEAL_RECORDS] = std::array::from_fn(|_| {
        let slot = chunks.next().expect("a slot per record");
        IoSliceMut::new(&mut slot[HEADER..HEADER + RECORD_PLAINTEXT])
    });
    from.read_vectored(&mut payloads)
}

/// Seals in place the records that `read` bytes of plaintext filled,
/// numbering them from `sequence`; `sealed(index, length)` learns each
/// record's slot and length on the wire.
fn seal_slots(
    slots: &mut [u8],
    read: usize,
    direction: &Direction<'_>,
    sequence: &mut u64,
    mut sealed: impl FnMut(usize, usize),
) -> io::Result<()> {
    for (index, slot) in slots.chunks_mut(RECORD).enumerate() {
        let plaintext = read
            .saturating_sub(index * RECORD_PLAINTEXT)
            .min(RECORD_PLAINTEXT);
        if plaintext == 0 {
            break;
        }
        sealed(index, seal_in_slot(slot, plaintext, direction, *sequence)?);
        *sequence += 1;
    }
    Ok(())
}

/// Opens the whole record `record` in place; returns the length of its
/// plaintext, which follows the header.
fn open_record(record: &mut [u8], direction: &Direction<'_>, sequence: u64) -> io::Result<usize> {
    let (head, rest) = record.split_at_mut(HEADER);
    let opened = direction
        .key
        .open_in_place(direction.nonce(sequence), Aad::from(&*head), rest)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a record failed to open"))?;
    Ok(opened.len() - INNER_TYPE)
}

/// Seals the `plaintext` bytes after the header of `slot` into a record in
/// place; returns the record's length on the wire.
fn seal_in_slot(
    slot: &mut [u8],
    plaintext: usize,
    direction: &Direction<'_>,
    sequence: u64,
) -> io::Result<usize> {
    let body = plaintext + INNER_TYPE;
    let length = u16::try_from(body + TAG).expect("a record fits its length field");
    slot[..HEADER].copy_from_slice(&header(length));
    slot[HEADER + plaintext] = APPLICATION_DATA;
    let (head, rest) = slot.split_at_mut(HEADER);
    let tag = direction
        .key
        .seal_in_place_separate_tag(
            direction.nonce(sequence),
            Aad::from(&*head),
            &mut rest[..body],
        )
        .map_err(|_| io::Error::other("sealing failed"))?;
    rest[body..body + TAG].copy_from_slice(tag.as_ref());
    Ok(HEADER + body + TAG)
}

/// Records from `from`, plaintext to `to`: the records a read completes
/// are opened in place and their plaintexts written with one `writev`.
fn open_records(
    mut from: &TcpStream,
    mut to: &TcpStream,
    direction: &Direction<'_>,
) -> io::Result<()> {
    let mut buffer = vec![0u8; OPEN_RECORDS * RECORD];
    let mut filled = 0;
    let mut sequence = 0u64;
    loop {
        // Never zero-length: what stays after opening is less than a record.
        let read = from.read(&mut buffer[filled..])?;
        if read == 0 {
            return match filled {
                0 => Ok(()),
                _ => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "record cut short",
                )),
            };
        }
        filled += read;
        // Open every whole record in place, noting where its plaintext is;
        // write them out a buffer's worth of full records at a time.
        let mut plaintexts = [(0usize, 0usize); OPEN_RECORDS];
        let (mut records, mut start) = (0, 0);
        while let Some(length) = whole_record(&buffer[start..filled])? {
            let plaintext = open_record(&mut buffer[start..start + length], direction, sequence)?;
            plaintexts[records] = (start + HEADER, plaintext);
            sequence += 1;
            records += 1;
            start += length;
            if records == OPEN_RECORDS {
                write_plaintexts(&mut to, &buffer, &plaintexts)?;
                records = 0;
            }
        }
        write_plaintexts(&mut to, &buffer, &plaintexts[..records])?;
        buffer.copy_within(start..filled, 0);
        filled -= start;
    }
}

/// Writes the `(offset, length)` ranges of `buffer` with one `writev`
/// (more if the socket takes less).
fn write_plaintexts(
    to: &mut &TcpStream,
    buffer: &[u8],
    plaintexts: &[(usize, usize)],
) -> io::Result<()> {
    let mut out: [IoSlice<'_>; OPEN_RECORDS] = std::array::from_fn(|index| {
        let (at, length) = plaintexts.get(index).copied().unwrap_or_default();
        IoSlice::new(&buffer[at..at + length])
    });
    write_all_vectored(to, &mut out[..plaintexts.len()])
}

fn header(length: u16) -> [u8; HEADER] {
    let [high, low] = length.to_be_bytes();
    [APPLICATION_DATA, 3, 3, high, low]
}

/// The length of the record at the start of `bytes`, if all of it is there.
fn whole_record(bytes: &[u8]) -> io::Result<Option<usize>> {
    if bytes.len() < HEADER {
        return Ok(None);
    }
    let length = HEADER + usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    if bytes[0] != APPLICATION_DATA || length > RECORD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a record"));
    }
    Ok((bytes.len() >= length).then_some(length))
}

fn write_all_vectored(to: &mut &TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        let written = to.write_vectored(slices)?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes through both relays arrive whole and in order, both ways,
    /// on connection after connection (workers freed by one serve the
    /// next).
    #[test]
    fn relays_bytes_through_sealed_records() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for socket in echo.incoming() {
                let socket = socket.unwrap();
                std::thread::spawn(move || {
                    let mut back = socket.try_clone().unwrap();
                    std::io::copy(&mut &socket, &mut back).unwrap();
                    back.shutdown(Shutdown::Write).unwrap();
                });
            }
        });
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let entry = TcpListener::bind("127.0.0.1:0").unwrap();
        let entry_addr = entry.local_addr().unwrap();
        start(entry, server, echo_addr).unwrap();

        // More than one read's worth of records, and a partial one.
        let sent: Vec<u8> = (0..3 * SEAL_RECORDS * RECORD_PLAINTEXT + 1234)
            .map(|i| (i % 251) as u8)
            .collect();
        for round in 0..3 {
            let client = TcpStream::connect(entry_addr).unwrap();
            let writer = {
                let (client, sent) = (client.try_clone().unwrap(), sent.clone());
                std::thread::spawn(move || {
                    (&client).write_all(&sent).unwrap();
                    client.shutdown(Shutdown::Write).unwrap();
                })
            };
            let mut received = Vec::new();
            (&client).read_to_end(&mut received).unwrap();
            writer.join().unwrap();
            assert_eq!(received.len(), sent.len(), "round {round}");
            assert!(
                received == sent,
                "round {round}: the echo differs from what was sent"
            );
        }
    }

    /// Every job runs at once, however many wait on one another, round
    /// after round on the same workers: a job queued for a worker that is
    /// not free would leave its pump, and so its tunnel, stuck.
    #[test]
    fn workers_run_every_job_at_once() {
        use std::time::{Duration, Instant};
        let workers = Workers::new();
        for round in 0..4 {
            let jobs = 3 + round;
            let started = Arc::new(AtomicUsize::new(0));
            let (done, results) = mpsc::channel();
            for _ in 0..jobs {
                let (started, done) = (started.clone(), done.clone());
                workers.run(move || {
                    started.fetch_add(1, Ordering::AcqRel);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while started.load(Ordering::Acquire) < jobs && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let _ = done.send(started.load(Ordering::Acquire));
                });
            }
            for _ in 0..jobs {
                let seen = results.recv_timeout(Duration::from_secs(10)).unwrap();
                assert_eq!(seen, jobs, "round {round}: a job waited for a worker");
            }
        }
    }

    /// More small records arrive in one read than a write takes at once:
    /// all of them come out, in order.
    #[test]
    fn opens_many_small_records_from_one_read() {
        let pair = || {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (near, listener.accept().unwrap().0)
        };
        let ((mut sender, records_in), (plain_out, mut receiver)) = (pair(), pair());
        let keys = Keys::generate().unwrap();
        let direction = Direction {
            key: &keys.up,
            iv: [3; NONCE_LEN],
        };
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for sequence in 0..(3 * OPEN_RECORDS as u64 + 1) {
            let plaintext = format!("record {sequence};");
            let mut slot = vec![0u8; RECORD];
            slot[HEADER..HEADER + plaintext.len()].copy_from_slice(plaintext.as_bytes());
            let length = seal_in_slot(&mut slot, plaintext.len(), &direction, sequence).unwrap();
            wire.extend_from_slice(&slot[..length]);
            expected.extend_from_slice(plaintext.as_bytes());
        }
        sender.write_all(&wire).unwrap();
        sender.shutdown(Shutdown::Write).unwrap();
        let opener = std::thread::spawn(move || {
            let direction = Direction {
                key: &keys.up,
                iv: [3; NONCE_LEN],
            };
            let opened = open_records(&records_in, &plain_out, &direction);
            plain_out.shutdown(Shutdown::Write).unwrap();
            opened
        });
        let mut received = Vec::new();
        receiver.read_to_end(&mut received).unwrap();
        opener.join().unwrap().unwrap();
        assert_eq!(
            String::from_utf8(received).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    #[test]
    fn a_record_is_whole_only_with_all_its_bytes() {
        let record = [&header(3)[..], &[1, 2, 3]].concat();
        assert_eq!(whole_record(&record).unwrap(), Some(8));
        assert_eq!(whole_record(&record[..7]).unwrap(), None);
        assert_eq!(whole_record(&record[..4]).unwrap(), None);
        let mut wrong = record.clone();
        wrong[0] = 0x16;
        assert!(whole_record(&wrong).is_err());
    }

    #[test]
    fn a_tampered_record_fails_to_open() {
        let keys = Keys::generate().unwrap();
        let direction = Direction {
            key: &keys.up,
            iv: [7; NONCE_LEN],
        };
        let mut slot = vec![0u8; RECORD];
        slot[HEADER..HEADER + 5].copy_from_slice(b"hello");
        let length = seal_in_slot(&mut slot, 5, &direction, 0).unwrap();
        slot.truncate(length);
        assert_eq!(whole_record(&slot).unwrap(), Some(length));
        let open = |sequence: u64, iv: u8, mut record: Vec<u8>| {
            let direction = Direction {
                key: &keys.up,
                iv: [iv; NONCE_LEN],
            };
            let (head, rest) = record.split_at_mut(HEADER);
            let opened =
                direction
                    .key
                    .open_in_place(direction.nonce(sequence), Aad::from(&*head), rest);
            opened.map(|plaintext| plaintext.to_vec())
        };
        assert_eq!(open(0, 7, slot.clone()).unwrap(), b"hello\x17");
        assert!(
            open(1, 7, slot.clone()).is_err(),
            "opened under another sequence number"
        );
        assert!(open(0, 8, slot.clone()).is_err(), "opened under another IV");
        let mut tampered = slot;
        tampered[HEADER] ^= 1;
        assert!(open(0, 7, tampered).is_err(), "opened a tampered record");
    }
}
