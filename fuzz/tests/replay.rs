//! The fuzz checks on stable Rust, without libFuzzer or sanitizers: each
//! target's check runs on every file in `seeds/<target>/`, and in
//! `corpus/<target>/` and `artifacts/<target>/` where those exist (so a
//! crash libFuzzer saved replays here), then on pseudo-random mutations of
//! them from a fixed seed (`FUZZ_MUTATIONS` per target, default 20000).
//!
//!     cargo test --manifest-path fuzz/Cargo.toml

use std::path::Path;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 10] = [
    ("spiffe_id", hbone_fuzz::spiffe_id),
    ("authority", hbone_fuzz::authority),
    ("target_rule", hbone_fuzz::target_rule),
    ("id_pattern", hbone_fuzz::id_pattern),
    ("headers", hbone_fuzz::headers),
    ("proxy_protocol_decode", hbone_fuzz::proxy_protocol_decode),
    ("gateway_routes", hbone_fuzz::gateway_routes),
    ("peer_certificate", hbone_fuzz::peer_certificate),
    ("socks5_negotiation", hbone_fuzz::socks5_negotiation),
    ("h2_front", hbone_fuzz::h2_front),
];

/// Targets whose inputs cost far more than a parse (a whole connection on
/// a runtime of its own) get this fraction of the mutations.
const SLOW: [(&str, usize); 1] = [("h2_front", 50)];

/// Byte strings worth splicing in: the punctuation of the grammars.
const TOKENS: [&[u8]; 16] = [
    b"spiffe://",
    b"/ns/",
    b"/sa/",
    b"/*",
    b"::",
    b"::ffff:",
    b"[",
    b"]",
    b":",
    b"/",
    b"-",
    b",",
    b";",
    b"=",
    b"\"",
    b"\n",
];

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = Vec::new();
    for dir in ["seeds", "corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if let Ok(bytes) = std::fs::read(&path) {
                inputs.push(bytes);
            }
        }
    }
    inputs
}

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 if at < input.len() => {
                let end = (at + 1 + rng.below(4)).min(input.len());
                input.drain(at..end);
            }
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                input.splice(at..at, token.iter().copied());
            }
            4 if !input.is_empty() => {
                let from = rng.below(input.len());
                let end = (from + 1 + rng.below(8)).min(input.len());
                let copy = input[from..end].to_vec();
                input.splice(at..at, copy);
            }
            _ => input.insert(at, rng.next() as u8),
        }
    }
}

#[test]
fn fuzz_checks_hold_on_seeds_and_mutations() {
    let mutations: usize = std::env::var("FUZZ_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    for (target, check) in TARGETS {
        let inputs = inputs(target);
        assert!(!inputs.is_empty(), "no seeds for {target}");
        for input in &inputs {
            check(input);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let share = SLOW
            .iter()
            .find(|(slow, _)| *slow == target)
            .map_or(1, |(_, share)| *share);
        let mutations = mutations / share;
        for _ in 0..mutations {
            let mut input = inputs[rng.below(inputs.len())].clone();
            mutate(&mut rng, &mut input);
            let result = std::panic::catch_unwind(|| check(&input));
            if result.is_err() {
                panic!(
                    "{target} failed on {:?} ({})",
                    input,
                    String::from_utf8_lossy(&input)
                );
            }
        }
        eprintln!("{target}: {} inputs, {mutations} mutations", inputs.len());
    }
}
