//! `hbone bench relays` (hidden): two relays that do nothing but carry
//! bytes as TLS records, a reference measured beside hbone in the same
//! runs: on bulk, a floor for what user-space encryption costs per MB; on
//! request/response, what the fewest syscalls cost in wake-ups.
//!
//! ```text
//! load generator ─ entry relay ══ server relay ─ sink (or echo app)
//! ```
//!
//! Both relays run in this one process, each direction of each connection
//! on a blocking thread of its own (no runtime, no poll). Between them the
//! bytes travel as TLS 1.3 application-data records of up to 16 KiB,
//! sealed and opened with AES-128-GCM (the suite hbone negotiates) by
//! aws-lc-rs, as rustls does under hbone. Nothing else: no handshake, no
//! HTTP/2 framing or flow control, no multiplexing, and no user-space copy
//! of a payload byte. The sealing side reads plaintext with one `readv`
//! straight into the payload slots of sixteen records and seals them in
//! place; the opening side opens records in place in its read buffer and
//! writes the plaintexts out with one `writev`, moving only a partial
//! record's bytes to the front for the next read. On bulk, what remains is
//! what any relay pair that encrypts in user space must spend: the four
//! socket hops, the cipher, and the wake-ups between them. On 1 KiB
//! request/response, blocking threads make the fewest syscalls (a read and
//! a write per hop, no poll) but wake a different thread at every hop.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

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
const RECORDS_PER_READ: usize = 16;
/// The opening side's read buffer: as many whole records.
const OPEN_BUFFER: usize = RECORDS_PER_READ * RECORD;
const APPLICATION_DATA: u8 = 0x17;

/// Binds an entry relay and a server relay on loopback for each target,
/// logs `bare relays ready listen=ADDR` with each entry relay's address,
/// in the order of `targets` (the bench waits for them), and relays until
/// killed.
pub fn run(targets: &[SocketAddr]) -> anyhow::Result<()> {
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
                pump_both(workers, from_entry, to_target, &server_keys, false)
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
                pump_both(workers, from_client, to_server, &keys, true)
            },
        )
    });
    Ok(())
}

/// One key and nonce base per direction, shared by both relays (they have
/// no handshake to agree on them).
struct Keys {
    /// Towards the target.
    up: Direction,
    /// Back towards the load generator.
    down: Direction,
}

struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
}

impl Keys {
    fn generate() -> anyhow::Result<Keys> {
        Ok(Keys {
            up: Direction::generate()?,
            down: Direction::generate()?,
        })
    }
}

impl Direction {
    fn generate() -> anyhow::Result<Direction> {
        let mut secret = [0u8; 16];
        let mut iv = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut secret)
            .ok()
            .context("no randomness")?;
        aws_lc_rs::rand::fill(&mut iv)
            .ok()
            .context("no randomness")?;
        let key = UnboundKey::new(&AES_128_GCM, &secret)
            .ok()
            .context("cannot build an AES-128-GCM key")?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
        })
    }

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
        let Ok(inbound) = accepted else { continue };
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

/// Both directions of one connection: `inbound`'s bytes go up to
/// `outbound`, sealed if `seal_up` (the entry relay) or opened (the server
/// relay); the other way the reverse, on another worker.
fn pump_both(
    workers: &Arc<Workers>,
    inbound: TcpStream,
    outbound: TcpStream,
    keys: &Arc<Keys>,
    seal_up: bool,
) {
    let (Ok(inbound_back), Ok(outbound_back)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    let back_keys = keys.clone();
    workers.run(move || pump(outbound_back, inbound_back, &back_keys.down, !seal_up));
    pump(inbound, outbound, &keys.up, seal_up);
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that outlive the connections they serve, so that the bench's
/// per-thread counters (context switches, migrations) see all their work:
/// a thread that ends takes its counts with it. A job never waits for a
/// worker: one is spawned whenever none is idle.
struct Workers {
    jobs: Mutex<mpsc::Sender<Job>>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// Workers waiting for a job and not yet promised one.
    idle: Arc<AtomicUsize>,
}

impl Workers {
    fn new() -> Arc<Workers> {
        let (jobs, queue) = mpsc::channel();
        Arc::new(Workers {
            jobs: Mutex::new(jobs),
            queue: Arc::new(Mutex::new(queue)),
            idle: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        let promised = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !promised {
            // A new worker starts on this job, and counts itself idle only
            // once it is done with it.
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
            return;
        }
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let _ = jobs.send(Box::new(job));
    }
}

/// Moves one direction until its reader ends, then half-closes the writer;
/// on an error, closes both sockets so the other direction ends too.
fn pump(from: TcpStream, to: TcpStream, direction: &Direction, seal: bool) {
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
/// payload slots of [`RECORDS_PER_READ`] records, which are sealed in place
/// and written with one `writev`.
fn seal_records(mut from: &TcpStream, mut to: &TcpStream, direction: &Direction) -> io::Result<()> {
    let mut slots = vec![0u8; RECORDS_PER_READ * RECORD];
    let mut sequence = 0u64;
    loop {
        let read = {
            let mut payloads: Vec<IoSliceMut<'_>> = slots
                .chunks_mut(RECORD)
                .map(|slot| IoSliceMut::new(&mut slot[HEADER..HEADER + RECORD_PLAINTEXT]))
                .collect();
            from.read_vectored(&mut payloads)?
        };
        if read == 0 {
            return Ok(());
        }
        let mut lengths = Vec::with_capacity(RECORDS_PER_READ);
        for (index, slot) in slots.chunks_mut(RECORD).enumerate() {
            let plaintext = read
                .saturating_sub(index * RECORD_PLAINTEXT)
                .min(RECORD_PLAINTEXT);
            if plaintext == 0 {
                break;
            }
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
            sequence += 1;
            lengths.push(HEADER + body + TAG);
        }
        let mut records: Vec<IoSlice<'_>> = slots
            .chunks(RECORD)
            .zip(&lengths)
            .map(|(slot, &length)| IoSlice::new(&slot[..length]))
            .collect();
        write_all_vectored(&mut to, &mut records)?;
    }
}

/// Records from `from`, plaintext to `to`: the records a read completes
/// are opened in place and their plaintexts written with one `writev`.
fn open_records(mut from: &TcpStream, mut to: &TcpStream, direction: &Direction) -> io::Result<()> {
    let mut buffer = vec![0u8; OPEN_BUFFER];
    let mut filled = 0;
    let mut sequence = 0u64;
    loop {
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
        // Open every whole record in place, noting where its plaintext is.
        let mut plaintexts = Vec::with_capacity(RECORDS_PER_READ);
        let mut start = 0;
        while let Some(length) = whole_record(&buffer[start..filled])? {
            let (head, rest) = buffer[start..start + length].split_at_mut(HEADER);
            let opened = direction
                .key
                .open_in_place(direction.nonce(sequence), Aad::from(&*head), rest)
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "a record failed to open")
                })?;
            let plaintext = opened.len() - INNER_TYPE;
            plaintexts.push((start + HEADER, plaintext));
            sequence += 1;
            start += length;
        }
        let mut slices: Vec<IoSlice<'_>> = plaintexts
            .iter()
            .map(|&(at, length)| IoSlice::new(&buffer[at..at + length]))
            .collect();
        write_all_vectored(&mut to, &mut slices)?;
        buffer.copy_within(start..filled, 0);
        filled -= start;
    }
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
        let sent: Vec<u8> = (0..3 * RECORDS_PER_READ * RECORD_PLAINTEXT + 1234)
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
        let mut body = b"hello\x17".to_vec();
        let head = header((body.len() + TAG) as u16);
        let tag = keys
            .up
            .key
            .seal_in_place_separate_tag(keys.up.nonce(0), Aad::from(&head), &mut body)
            .unwrap();
        body.extend_from_slice(tag.as_ref());
        let open = |nonce: u64, mut record: Vec<u8>| {
            let key = &keys.up;
            let opened = key
                .key
                .open_in_place(key.nonce(nonce), Aad::from(&head), &mut record);
            opened.map(|plaintext| plaintext.to_vec())
        };
        assert_eq!(open(0, body.clone()).unwrap(), b"hello\x17");
        assert!(open(1, body.clone()).is_err(), "opened under another nonce");
        let mut tampered = body;
        tampered[0] ^= 1;
        assert!(open(0, tampered).is_err(), "opened a tampered record");
    }
}
