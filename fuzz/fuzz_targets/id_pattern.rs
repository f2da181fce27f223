#![no_main]
//! `cargo fuzz run id_pattern`: see `hbone_fuzz::id_pattern` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::id_pattern(data));
