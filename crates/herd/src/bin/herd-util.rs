//! `herd-util`: the per-node utility module (see the `herd-util` crate).

fn main() -> std::process::ExitCode {
    herd_util::main()
}
