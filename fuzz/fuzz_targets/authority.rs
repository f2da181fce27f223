#![no_main]
//! `cargo fuzz run authority`: see `hbone_fuzz::authority` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::authority(data));
