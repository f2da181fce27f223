#![no_main]
//! `cargo fuzz run h2_front`: see `hbone_fuzz::h2_front`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| hbone_fuzz::h2_front(data));
