#![no_main]
//! `cargo fuzz run target_rule`: see `hbone_fuzz::target_rule` for what it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::target_rule(data));
