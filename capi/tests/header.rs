//! `include/wick.h` is what cbindgen generates from the sources: a stale header fails here.

#[test]
fn the_checked_in_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let path = format!("{dir}/include/wick.h");
    let checked_in = std::fs::read(&path).unwrap_or_default();
    if std::env::var_os("WICK_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    assert!(
        checked_in == generated,
        "{path} is stale: regenerate it with WICK_BLESS_HEADER=1 cargo test -p wick-c --test header"
    );
}
