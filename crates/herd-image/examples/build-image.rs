//! Builds a guest image: `cargo run -p herd-image --example build-image -- DATA_DIR [NAME]`.
//! Builds the static herd-guest binary first if it is missing (set HERD_REBUILD_GUEST=1 to
//! force a rebuild,
//! or HERD_GUEST_BINARY=PATH to use a given binary).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let data_dir =
        std::path::PathBuf::from(args.next().ok_or("usage: build-image DATA_DIR [NAME]")?);
    let name = args.next().unwrap_or_else(|| "default".into());
    let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
    let rebuild = std::env::var("HERD_REBUILD_GUEST").is_ok_and(|v| v == "1");
    let guest = match std::env::var_os("HERD_GUEST_BINARY") {
        Some(path) => path.into(),
        None => herd_image::guest_binary(&root, rebuild)?,
    };
    let started = std::time::Instant::now();
    let info = herd_image::build_image(&data_dir, &name, &guest, |m| eprintln!("image: {m}"))?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    eprintln!("done in {:.2?}", started.elapsed());
    Ok(())
}
