//! Tells the bench which Cargo profile built it, so that its report can say
//! whether the figures are those of the `dist` binary (optimised as one
//! program) or of a plain `--release` one. Cargo gives build scripts no
//! custom profile's name, but their output directory lies under it:
//! `target/[TRIPLE/]PROFILE/build/PACKAGE-HASH/out`.

fn main() {
    let profile = std::env::var("OUT_DIR")
        .ok()
        .and_then(|out| {
            let out = std::path::PathBuf::from(out);
            let name = out.ancestors().nth(3)?.file_name()?.to_str()?.to_owned();
            Some(name)
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=HBONE_BENCH_PROFILE={profile}");
    println!("cargo:rerun-if-changed=build.rs");
}
